"""Hugging Face T5 <-> our params, both ways, without executing pickles.

Export writes model.safetensors (PyTorch layout: Linear weights are [out, in]), a
config.json for `T5ForConditionalGeneration` and, given a SentencePiece model, the tokenizer
files. Import reads safetensors (single or sharded); a PyTorch .bin is read only through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects.

Tying: our T5Config.tie_word_embeddings means T5 1.0 (shared output layer, logits scaled
by d_model**-0.5); untied means T5 1.1 (separate `lm_head`, no scaling). transformers 5
always ties in memory and keys the scaling on `scale_decoder_outputs`, so export writes
both flags and import reads the scaling flag first.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

from ssr_jax.errors import UserError
from ssr_jax.models.config import ACTIVATIONS, T5Config

HFState = Dict[str, np.ndarray]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG = "config.json"
SPM_FILE = "spiece.model"

# Present in some HF checkpoints, never used by the model (copies of `shared`, or a bias
# table old versions created in cross-attention).
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def _param_map(config: T5Config) -> Dict[str, Tuple[Tuple[str, ...], bool]]:
    """HF name -> (our param path, transpose?). Every HF tensor is 2D or a norm vector."""
    m: Dict[str, Tuple[Tuple[str, ...], bool]] = {
            "shared.weight": (("token_embedder", "embedding"), False)}

    def attention(hf: str, ours: Tuple[str, ...]):
        for a, b in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            m[f"{hf}.{a}.weight"] = (ours + (b, "kernel"), True)

    def mlp(hf: str, ours: Tuple[str, ...]):
        names = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
        for n in names:
            m[f"{hf}.DenseReluDense.{n}.weight"] = (ours + ("mlp", n, "kernel"), True)

    def norm(hf: str, ours: Tuple[str, ...]):
        m[f"{hf}.weight"] = (ours + ("scale",), False)

    for stack, n_layers in (("encoder", config.num_encoder_layers),
                            ("decoder", config.num_decoder_layers)):
        m[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
                (stack, "relpos_bias", "rel_embedding"), True)
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
            if stack == "encoder":
                attention(f"{hf}.0.SelfAttention", ours + ("attention",))
                norm(f"{hf}.0.layer_norm", ours + ("pre_attention_layer_norm",))
                mlp(f"{hf}.1", ours)
                norm(f"{hf}.1.layer_norm", ours + ("pre_mlp_layer_norm",))
            else:
                attention(f"{hf}.0.SelfAttention", ours + ("self_attention",))
                norm(f"{hf}.0.layer_norm", ours + ("pre_self_attention_layer_norm",))
                attention(f"{hf}.1.EncDecAttention", ours + ("encoder_decoder_attention",))
                norm(f"{hf}.1.layer_norm", ours + ("pre_cross_attention_layer_norm",))
                mlp(f"{hf}.2", ours)
                norm(f"{hf}.2.layer_norm", ours + ("pre_mlp_layer_norm",))
        norm(f"{stack}.final_layer_norm", (stack, f"{stack}_norm"))
    if not config.tie_word_embeddings:
        m["lm_head.weight"] = (("decoder", "logits_dense", "kernel"), True)
    return m


def _expected_hf_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
    c = config
    inner = c.num_heads * c.d_kv
    shapes = {}
    for name in _param_map(config):
        if name in ("shared.weight", "lm_head.weight"):
            s = (c.vocab_size, c.d_model)
        elif name.endswith("relative_attention_bias.weight"):
            s = (c.relative_attention_num_buckets, c.num_heads)
        elif name.endswith((".q.weight", ".k.weight", ".v.weight")):
            s = (inner, c.d_model)
        elif name.endswith(".o.weight"):
            s = (c.d_model, inner)
        elif name.endswith(("wi.weight", "wi_0.weight", "wi_1.weight")):
            s = (c.d_ff, c.d_model)
        elif name.endswith("wo.weight"):
            s = (c.d_model, c.d_ff)
        else:
            s = (c.d_model,)
        shapes[name] = s
    return shapes


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# --- configs ----------------------------------------------------------------------------------
def t5config_to_hf(config: T5Config) -> dict:
    """config.json contents for transformers' T5ForConditionalGeneration."""
    c = config
    return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": c.vocab_size,
            "d_model": c.d_model,
            "d_kv": c.d_kv,
            "d_ff": c.d_ff,
            "num_layers": c.num_encoder_layers,
            "num_decoder_layers": c.num_decoder_layers,
            "num_heads": c.num_heads,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "dropout_rate": c.dropout_rate,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "initializer_factor": 1.0,
            "feed_forward_proj": c.feed_forward_proj,
            "tie_word_embeddings": c.tie_word_embeddings,
            "scale_decoder_outputs": c.tie_word_embeddings,
            "is_encoder_decoder": True,
            "use_cache": True,
            "pad_token_id": c.pad_id,
            "eos_token_id": c.eos_id,
            "decoder_start_token_id": c.decoder_start_token_id,
            "dtype": "float32",
    }


def hf_to_t5config(hf: dict, source: str = CONFIG) -> T5Config:
    """T5Config from a parsed HF config.json; `source` names the file in errors."""
    model_type = hf.get("model_type")
    if model_type not in ("t5", "mt5"):
        raise UserError(f"{source}: model_type {model_type!r} is not a T5 model "
                        "(expected 't5').")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ACTIVATIONS:
        raise UserError(f"{source}: feed_forward_proj {proj!r} is not supported; "
                        f"supported: {', '.join(ACTIVATIONS)}.")
    missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
               if k not in hf]
    if missing:
        raise UserError(f"{source}: missing {', '.join(missing)}; not a complete T5 config.")
    # transformers 5 keys the output scaling on scale_decoder_outputs; older files only have
    # tie_word_embeddings (absent means tied, as in the original T5 configs).
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    pad = hf.get("pad_token_id", 0)
    pad = 0 if pad is None else pad
    eos = _first(hf.get("eos_token_id", 1))
    start = _first(hf.get("decoder_start_token_id"))
    try:
        return T5Config(
                vocab_size=int(hf["vocab_size"]), d_model=int(hf["d_model"]),
                num_heads=int(hf["num_heads"]), d_kv=int(hf["d_kv"]), d_ff=int(hf["d_ff"]),
                num_encoder_layers=int(hf["num_layers"]),
                num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
                relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
                relative_attention_max_distance=int(
                        hf.get("relative_attention_max_distance", 128)),
                dropout_rate=float(hf.get("dropout_rate", 0.1)),
                layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
                feed_forward_proj=proj, tie_word_embeddings=bool(scaled),
                pad_id=int(pad), eos_id=int(1 if eos is None else eos),
                decoder_start_token_id=int(pad if start is None else start))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from e


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


# --- weights ----------------------------------------------------------------------------------
def params_to_hf_state(params, config: T5Config) -> HFState:
    """Our params -> HF tensor dict (float32 numpy, [out, in] Linear layout)."""
    out = {}
    for name, (path, transpose) in _param_map(config).items():
        x = np.asarray(_get(params, path))
        if x.dtype not in (np.float32, np.float16):
            x = x.astype(np.float32)
        out[name] = np.ascontiguousarray(x.T if transpose else x)
    return out


def hf_state_to_params(state: HFState, config: T5Config, source: str = SAFETENSORS):
    """HF tensor dict -> our params (nested dict of float32 numpy arrays).

    Raises UserError naming `source` on missing, unexpected or mis-shaped tensors.
    """
    mapping = _param_map(config)
    shapes = _expected_hf_shapes(config)
    state = dict(state)
    if config.tie_word_embeddings and "lm_head.weight" in state:
        lm = state.pop("lm_head.weight")
        shared = state.get("shared.weight")
        if shared is not None and not np.array_equal(np.asarray(lm), np.asarray(shared)):
            raise UserError(f"{source}: lm_head.weight differs from shared.weight but the config "
                            "scales tied output logits (T5 1.0); an untied lm_head with scaled "
                            "logits is not supported.")
    untied_without_head = "lm_head.weight" not in state and "shared.weight" in state
    if not config.tie_word_embeddings and untied_without_head:
        # Unscaled logits through the shared embedding: an untied copy represents it exactly.
        state["lm_head.weight"] = state["shared.weight"]
    missing = [k for k in mapping if k not in state]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{source}: missing tensors {', '.join(missing[:3])}{more}; the weights "
                        "do not match config.json (layer counts, activation or tying).")
    unexpected = [k for k in state if k not in mapping and k not in _IGNORED]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise UserError(f"{source}: unexpected tensors {', '.join(unexpected[:3])}{more}; the "
                        "weights do not match config.json.")
    params: dict = {}
    for name, (path, transpose) in mapping.items():
        x = np.asarray(state[name])
        if tuple(x.shape) != shapes[name]:
            raise UserError(f"{source}: {name} has shape {tuple(x.shape)} but config.json "
                            f"implies {shapes[name]}.")
        x = x.astype(np.float32)
        _set(params, path, np.ascontiguousarray(x.T if transpose else x))
    return params


def _read_safetensors(path: str) -> HFState:
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{path}: cannot read safetensors ({_first_line(e)}).") from e


def _read_torch_bin(path: str) -> HFState:
    try:
        import torch
    except ImportError as e:
        raise UserError(f"{path}: reading PyTorch .bin weights needs torch; convert the "
                        "checkpoint to safetensors or install torch.") from e
    try:
        # weights_only=True: tensors and plain containers only, no arbitrary pickled code.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"{path}: cannot load safely with torch.load(weights_only=True) "
                        f"({_first_line(e)}).") from e
    if not isinstance(sd, dict):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}.")
    return {k: v.detach().to(torch.float32).numpy() for k, v in sd.items()
            if hasattr(v, "detach")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_hf_weights(hf_dir: str) -> Tuple[HFState, str]:
    """All tensors of an HF checkpoint dir and the file name used in messages."""
    for index, reader in ((SAFETENSORS_INDEX, _read_safetensors),
                          (TORCH_BIN_INDEX, _read_torch_bin)):
        index_path = os.path.join(hf_dir, index)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"{index_path}: not a valid weight index ({_first_line(e)}).") \
                    from e
            state: HFState = {}
            for name in files:
                state.update(reader(os.path.join(hf_dir, name)))
            return state, index_path
    for name, reader in ((SAFETENSORS, _read_safetensors), (TORCH_BIN, _read_torch_bin)):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            return reader(path), path
    raise UserError(f"{hf_dir}: no {SAFETENSORS} or {TORCH_BIN}; not a Hugging Face T5 "
                    "checkpoint directory.")


def read_hf_config(hf_dir: str) -> T5Config:
    if not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir}: not a directory; give a Hugging Face T5 checkpoint "
                        "directory.")
    path = os.path.join(hf_dir, CONFIG)
    if not os.path.exists(path):
        raise UserError(f"{hf_dir}: no {CONFIG}; not a Hugging Face T5 checkpoint directory.")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({_first_line(e)}).") from e
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object.")
    return hf_to_t5config(hf, path)


# --- public API -------------------------------------------------------------------------------
def import_hf(hf_dir: str):
    """Reads an HF T5 directory -> (params as a nested dict of float32 arrays, T5Config)."""
    config = read_hf_config(hf_dir)
    state, source = read_hf_weights(hf_dir)
    return hf_state_to_params(state, config, source), config


def export_hf(params, config: T5Config, out_dir: str, spm_model_path: Optional[str] = None,
              extra_ids: int = 100) -> str:
    """Writes `params` as an HF T5 directory (weights, config, tokenizer); returns out_dir."""
    from safetensors.numpy import save_file
    state = params_to_hf_state(params, config)
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(t5config_to_hf(config), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"decoder_start_token_id": config.decoder_start_token_id,
                   "eos_token_id": config.eos_id, "pad_token_id": config.pad_id}, f, indent=2)
    if spm_model_path is not None:
        write_tokenizer(spm_model_path, out_dir, extra_ids, config.vocab_size)
    return out_dir


def write_tokenizer(spm_model_path: str, out_dir: str, extra_ids: int = 100,
                    model_vocab_size: Optional[int] = None):
    """spiece.model + tokenizer_config.json for T5Tokenizer, plus tokenizer.json when
    transformers is installed (so loading needs neither sentencepiece nor a conversion)."""
    if not os.path.isfile(spm_model_path):
        raise UserError(f"--vocab {spm_model_path}: no such SentencePiece model file.")
    import sentencepiece
    try:
        pieces = sentencepiece.SentencePieceProcessor(model_file=spm_model_path).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise UserError(f"--vocab {spm_model_path}: not a SentencePiece model "
                        f"({_first_line(e)}).") from e
    if model_vocab_size is not None and pieces + extra_ids > model_vocab_size:
        raise UserError(f"--vocab {spm_model_path}: {pieces} pieces + {extra_ids} extra ids "
                        f"exceed the model's vocab_size {model_vocab_size}; wrong vocabulary.")
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    tok_config = {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids,
                  "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                  "additional_special_tokens": sentinels, "model_max_length": 512}
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(spm_model_path, os.path.join(tmp, SPM_FILE))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=2)
        try:
            import transformers  # noqa: F401
        except ImportError:
            transformers = None
        if transformers is not None:
            tok = transformers.AutoTokenizer.from_pretrained(tmp)
            tok.save_pretrained(out_dir)
        # Always ship the SentencePiece model and our config (save_pretrained may not).
        shutil.copyfile(os.path.join(tmp, SPM_FILE), os.path.join(out_dir, SPM_FILE))
        if transformers is None:
            shutil.copyfile(os.path.join(tmp, "tokenizer_config.json"),
                            os.path.join(out_dir, "tokenizer_config.json"))
