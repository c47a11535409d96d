"""Hugging Face export/import: bit-identical round trips, loading in transformers (weights and
tokenizer), the CLI commands, safe .bin loading, and one-line errors on bad input."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ssr_jax import cli
from ssr_jax.vocab import get_vocabulary, vocab_record
from ssr_jax.errors import UserError
from ssr_jax.cli import hf as hf_cli
from ssr_jax.hf import export_hf, import_hf
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
import helpers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SPM_PIECES = 300  # SentencePiece size; + 100 extra ids = 400, padded to 512

CONFIGS = {
        "t5_1_1": T5Config(vocab_size=512, d_model=32, num_heads=2, d_kv=8, d_ff=48,
                           num_encoder_layers=2, num_decoder_layers=1),
        "t5_1_0": T5Config(vocab_size=512, d_model=32, num_heads=2, d_kv=8, d_ff=48,
                           num_encoder_layers=1, num_decoder_layers=2, feed_forward_proj="relu",
                           tie_word_embeddings=True),
}


def random_params(config: T5Config, seed: int = 0):
    return helpers.random_params(config, seed, norm_noise=0.1)


def assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    from pydoc_data import topics

    from ssr_jax import vocab
    d = tmp_path_factory.mktemp("spm")
    text = d / "text.txt"
    text.write_text("\n".join(list(topics.topics.values())[:60]))
    return vocab.train_sentencepiece([str(text)], str(d / "spm"), SPM_PIECES,
                                     input_sentence_size=20000, seed_sentencepiece_size=20000)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, spm_model):
    config = CONFIGS[request.param]
    params = random_params(config)
    out = str(tmp_path_factory.mktemp("hf_" + request.param))
    export_hf(params, config, out, spm_model)
    return config, params, out


def test_export_import_round_trip_is_bit_identical(exported):
    config, params, out = exported
    for name in ("model.safetensors", "config.json", "spiece.model", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert hf_config["model_type"] == "t5" and hf_config["decoder_start_token_id"] == 0
    assert hf_config["num_layers"] == config.num_encoder_layers
    assert hf_config["num_decoder_layers"] == config.num_decoder_layers
    assert hf_config["tie_word_embeddings"] == config.tie_word_embeddings
    params2, config2 = import_hf(out)
    assert config2 == config
    assert_identical(params, params2)


def test_exported_model_loads_in_transformers_with_same_logits(exported):
    config, params, out = exported
    hf, info = transformers.T5ForConditionalGeneration.from_pretrained(
            out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    hf.eval()
    rng = np.random.RandomState(0)
    enc = rng.randint(2, 400, (2, 20))
    enc[1, 12:] = 0
    dec = rng.randint(2, 400, (2, 9))
    dec[:, 0] = 0
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0).long(),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = jax.jit(EncoderDecoderModel(config).logits)(
            params, {"encoder_input_tokens": enc, "decoder_input_tokens": dec})
    np.testing.assert_array_less(np.abs(np.asarray(ours) - ref).max(), 1e-4)


def test_exported_tokenizer_round_trips_text_and_sentinels(exported, spm_model):
    from ssr_jax import vocab
    _, _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = vocab.get_vocabulary(spm_model)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == ours.vocab_size - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == ours.vocab_size - 100
    plain = "The quick brown fox jumps over the lazy dog."
    ids = tok(plain).input_ids
    assert ids == list(ours.encode(plain)) + [1]
    assert tok.decode(ids, skip_special_tokens=True) == plain
    text = "The quick <extra_id_0> jumps over the <extra_id_1> dog."
    ids = tok(text).input_ids
    assert ids == list(ours.encode(text)) + [1]
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert "<extra_id_0>" in decoded and "<extra_id_1>" in decoded
    assert tok(decoded.replace("</s>", "")).input_ids == ids


def test_cli_import_then_export_checkpoint(exported, spm_model, tmp_path):
    config, params, out = exported
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["import-hf", out, "--out", ckpt, "--vocab", spm_model]) == 0
    assert os.path.isdir(os.path.join(ckpt, "params"))
    record = json.load(open(os.path.join(ckpt, "vocab.json")))  # the teacher check reads it
    assert record == vocab_record(get_vocabulary(spm_model))
    stored = json.load(open(os.path.join(ckpt, "model_config.json")))
    assert T5Config(**stored) == config
    loaded, loaded_config = hf_cli.load_params_from_checkpoint(ckpt)
    assert loaded_config == config
    assert_identical(params, loaded)
    again = str(tmp_path / "again")
    # No --vocab: the tokenizer comes from the vocabulary the checkpoint records.
    assert cli.main(["export-hf", "--checkpoint", ckpt, "--out", again]) == 0
    params3, config3 = import_hf(again)
    assert config3 == config
    assert_identical(params, params3)
    tok = transformers.AutoTokenizer.from_pretrained(again)
    assert tok.convert_tokens_to_ids("<extra_id_0>") == get_vocabulary(spm_model).vocab_size - 1
    # --params_npz with a JSON model config: no vocabulary is known, so --vocab (or
    # --no_tokenizer) is needed.
    npz, cfg_json = str(tmp_path / "p.npz"), str(tmp_path / "model.json")
    hf_cli.save_params_npz(params, npz)
    with open(cfg_json, "w") as f:
        json.dump(stored, f)
    third = str(tmp_path / "third")
    with pytest.raises(UserError, match=r"p\.npz records no vocabulary .*--vocab"):
        hf_cli.export_main(["--params_npz", npz, "--model_config", cfg_json, "--out", third])
    assert not os.path.exists(third)
    assert cli.main(["export-hf", "--params_npz", npz, "--model_config", cfg_json,
                     "--no_tokenizer", "--out", third]) == 0
    assert_identical(params, import_hf(third)[0])
    assert not os.path.exists(os.path.join(third, "spiece.model"))


def test_pytorch_bin_is_loaded_safely(exported, tmp_path):
    config, params, out = exported
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(os.path.join(out, "config.json"), d / "config.json")
    from safetensors.torch import load_file
    torch.save(load_file(os.path.join(out, "model.safetensors")), d / "pytorch_model.bin")
    assert_identical(params, import_hf(str(d))[0])
    # A pickle carrying an arbitrary object is refused, never executed.
    torch.save({"shared.weight": torch.zeros(2), "payload": _Payload()}, d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin.*weights_only"):
        import_hf(str(d))


class _Payload:
    """An object torch.load(weights_only=True) must refuse to unpickle."""


_error_line = helpers.cli_error_line


def test_bad_inputs_give_one_clear_line(exported, tmp_path, capsys):
    config, _, out = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error_line(capsys, ["import-hf", str(empty), "--out", str(tmp_path / "o")])
    assert str(empty) in err and "config.json" in err

    def variant(name, edit=None, weights=True):
        d = tmp_path / name
        shutil.copytree(out, d)
        if not weights:
            os.remove(d / "model.safetensors")
        if edit:
            cfg = json.load(open(d / "config.json"))
            edit(cfg)
            json.dump(cfg, open(d / "config.json", "w"))
        return str(d)

    d = variant("bert", lambda c: c.update(model_type="bert"))
    err = _error_line(capsys, ["import-hf", d, "--out", str(tmp_path / "o")])
    assert "config.json" in err and "bert" in err and "not a T5" in err

    d = variant("noweights", weights=False)
    err = _error_line(capsys, ["import-hf", d, "--out", str(tmp_path / "o")])
    assert d in err and "model.safetensors" in err

    d = variant("shape", lambda c: c.update(d_ff=64))
    err = _error_line(capsys, ["import-hf", d, "--out", str(tmp_path / "o")])
    assert "model.safetensors" in err and "shape" in err and "(64, 32)" in err

    d = variant("layers", lambda c: c.update(num_decoder_layers=c["num_decoder_layers"] + 1))
    err = _error_line(capsys, ["import-hf", d, "--out", str(tmp_path / "o")])
    assert "model.safetensors" in err and "missing" in err

    d = variant("silu", lambda c: c.update(feed_forward_proj="gated-silu"))
    err = _error_line(capsys, ["import-hf", d, "--out", str(tmp_path / "o")])
    assert "config.json" in err and "gated-silu" in err and "not supported" in err

    # Export: params that do not fit the model config.
    npz = str(tmp_path / "p.npz")
    hf_cli.save_params_npz(random_params(config), npz)
    gin_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "gin", "models", "t5_1_1", "tiny.gin")
    try:
        err = _error_line(capsys, ["export-hf", "--params_npz", npz, "--model_config", gin_file,
                                   "--out", str(tmp_path / "x")])
    finally:
        import gin
        gin.clear_config()
    assert npz in err and "shape" in err
