"""The SSR teacher: checkpoint + vocabulary checks before any compute, sharding on the student's
mesh, the sampler (the paper's top-p 0.9 + top-k 50 default, top-p -> greedy, top-k support,
per-example keys, mesh independence)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.errors import UserError
from ssr_jax.models.base import DecodeConfig
from ssr_jax.models.config import T5Config
from ssr_jax.models.decoding import filter_logits
from ssr_jax.partitioning import Partitioner, bytes_on_device
from ssr_jax.ssr import teacher as tl
from ssr_jax.train import checkpoints
from ssr_jax import vocab as vocab_lib
import helpers

VOCAB = 4224  # the default vocabulary's padded size (4000 pieces + 100 sentinels)
SMALL = T5Config(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                 num_encoder_layers=1, num_decoder_layers=1)


def random_params(config, seed=0):
    """Random params of the right shapes (numpy: no init to compile)."""
    return helpers.random_params(config, seed, embedding_std=1.0)


def make_teacher_checkpoint(root, config=SMALL, seed=0, vocabulary=None) -> str:
    """A params-only checkpoint root (<root>/1/params + model_config.json) of random params."""
    params = random_params(config, seed)
    checkpoints.save_params(os.path.join(root, "1"), params, dataclasses.asdict(config))
    if vocabulary is not None:
        vocab_lib.write_vocab_record(root, vocabulary)
    return str(root)


def inputs_batch(batch=8, length=24, seed=0):
    """Teacher-like inputs: context tokens, 1-2 sentinels, EOS, padding."""
    rng = np.random.RandomState(seed)
    x = np.zeros((batch, length), np.int32)
    for b in range(batch):
        n = rng.randint(8, length)
        row = rng.randint(3, 4000, size=n)
        row[n // 3] = 4099  # <extra_id_0> of the default vocabulary (4100 ids)
        if b % 2:
            row[2 * n // 3] = 4098
        row[-1] = 1
        x[b, :n] = row
    return x


def generate(teacher, partitioner, x, keys=None, seed=0, lens=None):
    num_spans = (x >= 4000).sum(1)
    host = {"inputs": x, "keys": tl.example_keys(x, seed) if keys is None else keys,
            "stops": tl.stop_tokens(num_spans, 4100),
            "lens": np.full((x.shape[0],), teacher.decode.max_decode_length, np.int32)
            if lens is None else lens}
    g = partitioner.make_global_batch(host)
    return np.asarray(teacher.generate(g["inputs"], g["keys"], g["stops"], g["lens"])), host


def test_example_keys_depend_only_on_content_and_seed():
    x = inputs_batch(4)
    keys = tl.example_keys(x, 7)
    assert keys.dtype == np.uint32 and keys.shape == (4, 2)
    # Another batch order, extra padding columns: the same key per example.
    wider = np.pad(x[::-1], [(0, 0), (0, 5)])
    np.testing.assert_array_equal(tl.example_keys(wider, 7), keys[::-1])
    assert not np.array_equal(tl.example_keys(x, 8), keys)
    assert len({tuple(k) for k in keys}) == 4


def test_stop_tokens_and_budgets():
    # Two spans: the teacher stops after <extra_id_2>.
    assert tl.stop_tokens(np.array([2, 0]), 4100).tolist() == [4097, 4099]
    assert tl.static_decode_length(64, 16, 2.0) == 32
    assert tl.static_decode_length(20, 16, 2.0) == 20  # capped by the slot


def _sorted_nucleus(logits, top_p):
    """Reference: keep the most likely tokens until their mass reaches top_p (full sort)."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    kept = np.zeros_like(probs, bool)
    for row in range(probs.shape[0]):
        mass = 0.0
        for token in order[row]:
            kept[row, token] = True
            mass += probs[row, token]
            if mass >= top_p:
                break
    return kept


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_nucleus_filter_matches_sorted_reference(top_p):
    logits = np.random.RandomState(1).standard_normal((6, 500)).astype(np.float32) * 3
    ours = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), 0, top_p)))
    np.testing.assert_array_equal(ours, _sorted_nucleus(logits, top_p))
    if top_p == 1e-6:
        assert (ours.sum(1) == 1).all()


def test_top_p_tiny_equals_greedy(teacher_dir, vocabulary):
    partitioner = Partitioner({"data": -1})
    cfg = tl.TeacherConfig(teacher_dir, top_p=1e-6)
    teacher = tl.Teacher.load(cfg, partitioner, vocabulary, max_decode_length=12)
    x = inputs_batch(8)
    sampled, host = generate(teacher, partitioner, x)
    greedy, _ = teacher.model.predict_batch(
            teacher.params, {"encoder_input_tokens": jnp.asarray(x)},
            DecodeConfig(method="greedy", max_decode_length=12),
            stop_tokens=jnp.asarray(host["stops"]), max_decode_lengths=jnp.asarray(host["lens"]))
    np.testing.assert_array_equal(sampled, np.asarray(greedy))


def test_same_samples_on_one_device_and_data2_model4(teacher_dir, vocabulary):
    cfg = tl.TeacherConfig(teacher_dir, top_p=0.9)
    x = inputs_batch(8, seed=3)
    one = Partitioner({"data": 1}, devices=jax.devices()[:1])
    mesh = Partitioner({"data": 2, "model": 4})
    t_one = tl.Teacher.load(cfg, one, vocabulary, max_decode_length=12)
    t_mesh = tl.Teacher.load(cfg, mesh, vocabulary, max_decode_length=12)
    out_one, _ = generate(t_one, one, x)
    out_mesh, _ = generate(t_mesh, mesh, x)
    np.testing.assert_array_equal(out_one, out_mesh)
    # Sharded by the teacher's own logical axes: a device holds well under the whole teacher.
    total = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(t_one.params))
    assert bytes_on_device(t_one.params, one.mesh.devices.flat[0]) == total
    assert bytes_on_device(t_mesh.params, mesh.mesh.devices.flat[0]) < 0.45 * total
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(t_mesh.params)]
    assert any("model" in str(s) for s in specs), specs[:4]


def test_top_k_restricts_to_k_tokens(teacher_dir, vocabulary):
    partitioner = Partitioner({"data": -1})
    teacher = tl.Teacher.load(tl.TeacherConfig(teacher_dir, top_p=1.0, top_k=3), partitioner,
                              vocabulary, max_decode_length=1)
    x = np.repeat(inputs_batch(1, seed=5), 32, axis=0)
    keys = np.random.RandomState(0).randint(0, 2**31, size=(32, 2)).astype(np.uint32)
    out, _ = generate(teacher, partitioner, x, keys=keys)
    logits = jax.jit(teacher.model.logits)(teacher.params, {
            "encoder_input_tokens": jnp.asarray(x[:1]),
            "decoder_input_tokens": jnp.zeros((1, 1), jnp.int32)})[0, 0]
    top3 = set(np.argsort(-np.asarray(logits))[:3].tolist())
    first = set(out[:, 0].tolist())
    assert first <= top3
    assert len(first) >= 2  # it does sample


def test_default_sampler_is_the_papers(teacher_dir, vocabulary):
    """HF generate(do_sample=True, top_p=0.9) with its implicit top_k=50 and temperature 1:
    the dataclass default, the gin objective's binding and the loaded teacher's decoding."""
    import re
    cfg = tl.TeacherConfig(teacher_dir)
    assert (cfg.top_p, cfg.top_k, cfg.temperature) == (0.9, 50, 1.0)
    gin_text = open(os.path.join(os.path.dirname(__file__), "..", "gin", "objectives",
                                 "ssr_online.gin")).read()
    bound = dict(re.findall(r"^TeacherConfig\.(top_p|top_k|temperature) = (\S+)", gin_text,
                            re.M))
    assert bound == {"top_p": "0.9", "top_k": "50", "temperature": "1.0"}
    teacher = tl.Teacher.load(cfg, Partitioner({"data": -1}), vocabulary, max_decode_length=4)
    assert (teacher.decode.method, teacher.decode.top_p, teacher.decode.top_k,
            teacher.decode.temperature) == ("sample", 0.9, 50, 1.0)


def test_bfloat16_teacher(teacher_dir, vocabulary):
    partitioner = Partitioner({"data": 2, "model": 4})
    teacher = tl.Teacher.load(tl.TeacherConfig(teacher_dir, dtype="bfloat16"), partitioner,
                              vocabulary, max_decode_length=8)
    assert {leaf.dtype for leaf in jax.tree.leaves(teacher.params)} == {jnp.dtype("bfloat16")}
    out, _ = generate(teacher, partitioner, inputs_batch(8))
    assert out.shape == (8, 8) and out.min() >= 0 and out.max() < VOCAB


# --- bad input: one clear line before any compute ----------------------------------------------
def test_missing_checkpoint(tmp_path, vocabulary):
    with pytest.raises(UserError) as e:
        tl.check_teacher(tl.TeacherConfig(str(tmp_path / "no_such_teacher")), vocabulary, VOCAB)
    assert "TEACHER_CHECKPOINT" in str(e.value) and "\n" not in str(e.value)


def test_vocab_size_mismatch(tmp_path, vocabulary):
    # A config-only "checkpoint": the check never reads params.
    big = dataclasses.replace(SMALL, vocab_size=4352)
    os.makedirs(tmp_path / "1" / "params")
    with open(tmp_path / "1" / "model_config.json", "w") as f:
        import json
        json.dump(dataclasses.asdict(big), f)
    with pytest.raises(UserError) as e:
        tl.check_teacher(tl.TeacherConfig(str(tmp_path)), vocabulary, VOCAB)
    assert "4352" in str(e.value) and "4224" in str(e.value) and "\n" not in str(e.value)


def test_vocab_record_mismatch(tmp_path, teacher_dir, vocabulary):
    tl.check_teacher(tl.TeacherConfig(teacher_dir), vocabulary, VOCAB)  # recorded: same
    os.makedirs(tmp_path / "1" / "params")
    with open(tmp_path / "1" / "model_config.json", "w") as f:
        import json
        json.dump(dataclasses.asdict(SMALL), f)
    record = vocab_lib.vocab_record(vocabulary)
    record.update(sentencepiece_sha256="0" * 64, sentencepiece_model_file="/other/spm.model")
    with open(tmp_path / "vocab.json", "w") as f:
        json.dump(record, f)
    with pytest.raises(UserError) as e:
        tl.check_teacher(tl.TeacherConfig(str(tmp_path)), vocabulary, VOCAB)
    assert "/other/spm.model" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing", "vocab"])
def test_train_cli_stops_before_compute(tmp_path, capsys, case, vocabulary):
    from ssr_jax import cli
    teacher = str(tmp_path / "no_teacher")
    if case == "vocab":
        teacher = str(tmp_path / "teacher")
        os.makedirs(os.path.join(teacher, "1", "params"))
        with open(os.path.join(teacher, "1", "model_config.json"), "w") as f:
            import json
            json.dump(dataclasses.asdict(dataclasses.replace(SMALL, vocab_size=32128)), f)
    model_dir = tmp_path / "student"
    rc = cli.main(["train", "--gin_file=gin/experiments/default_student_ssr.gin",
                   f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TEACHER_CHECKPOINT='{teacher}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[0].startswith("ssr-jax train: error: SSR teacher")
    assert ("not found" if case == "missing" else "32128") in err[0]
    assert not os.path.exists(model_dir / "checkpoints")  # nothing was built
