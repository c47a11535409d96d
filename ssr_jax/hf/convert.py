"""Hugging Face T5 <-> our params, both ways, without executing pickles.

Export writes model.safetensors (PyTorch layout: Linear weights are [out, in]), a
config.json for `T5ForConditionalGeneration` and, given a SentencePiece model, the tokenizer
files. Import reads safetensors (single or sharded); a PyTorch .bin is read only through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects. Before any tensor
data is read, config.json's sizes are checked against the tensors' shapes (safetensors
headers; a .bin must be loaded to know them) and a weight index may only name files inside
the model directory, so a hostile config or index cannot make import allocate without bound
or read files elsewhere.

Tying: our T5Config.tie_word_embeddings means T5 1.0 (shared output layer, logits scaled
by d_model**-0.5); untied means T5 1.1 (separate `lm_head`, no scaling). transformers 5
always ties in memory and keys the scaling on `scale_decoder_outputs`, so export writes
both flags and import reads the scaling flag first.
"""
import json
import os
import re
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


def _layer_indices(shapes, stack: str):
    found = set()
    for name in shapes:
        m = re.match(rf"{stack}\.block\.(\d+)\.", name)
        if m:
            found.add(int(m.group(1)))
    return found


def _check_sizes(shapes: Dict[str, Tuple[int, ...]], config: T5Config, source: str):
    """config.json's layer counts and sizes against the tensors present; runs before the
    (per-layer) name map is built, so a config with 10**9 layers costs nothing."""
    for stack, n, key in (("encoder", config.num_encoder_layers, "num_layers"),
                          ("decoder", config.num_decoder_layers, "num_decoder_layers")):
        found = _layer_indices(shapes, stack)
        if len(found) != n or found != set(range(n)):  # the length first: n may be huge
            k, extra = len(found), ""
            if found == set(range(k)):
                held = (f"no {stack} blocks" if not k else f"{stack} block 0" if k == 1
                        else f"{stack} blocks 0-{k - 1}")
                lo, hi, what = (k, n - 1, "missing") if n > k else (n, k - 1, "unexpected")
                extra = (f"; block {lo} is {what}" if lo == hi else
                         f"; blocks {lo}-{hi} are {what}")
            else:
                held = (f"{stack} block indices {sorted(found)[:6]}"
                        f"{' ...' if k > 6 else ''}")
            raise UserError(f"{source}: config.json implies {n} {stack} layers ({key}) but the "
                            f"weights hold {held}{extra}; config.json does not match the "
                            "weights.")
    c = config
    checks = [("shared.weight", (("vocab_size", c.vocab_size), ("d_model", c.d_model)))]
    for stack in ("encoder", "decoder"):
        blk = f"{stack}.block.0.layer"
        checks += [
                (f"{blk}.0.SelfAttention.relative_attention_bias.weight",
                 (("relative_attention_num_buckets", c.relative_attention_num_buckets),
                  ("num_heads", c.num_heads))),
                (f"{blk}.0.SelfAttention.q.weight", (("num_heads x d_kv", c.num_heads * c.d_kv),
                                                     ("d_model", c.d_model)))]
        mlp = f"{blk}.{1 if stack == 'encoder' else 2}.DenseReluDense"
        for wi in (f"{mlp}.wi.weight", f"{mlp}.wi_0.weight"):
            checks.append((wi, (("d_ff", c.d_ff), ("d_model", c.d_model))))
    for name, dims in checks:
        shape = shapes.get(name)
        if shape is None:
            continue  # reported as missing below
        implied = tuple(want for _, want in dims)
        for axis, (key, want) in enumerate(dims):
            if len(shape) != len(dims) or shape[axis] != want:
                raise UserError(f"{source}: config.json says {key}={want}, so {name} should "
                                f"have shape {implied}, but it has shape {tuple(shape)}; "
                                "config.json does not match the weights.")


def check_hf_shapes(shapes: Dict[str, Tuple[int, ...]], config: T5Config,
                    source: str = SAFETENSORS):
    """Refuses tensors (name -> shape) that do not fit `config`: layer counts, sizes, missing,
    unexpected or mis-shaped tensors; one UserError naming `source`."""
    _check_sizes(shapes, config, source)
    mapping = _param_map(config)
    expected = _expected_hf_shapes(config)
    shapes = dict(shapes)
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # must equal shared.weight: checked when loaded
    elif "lm_head.weight" not in shapes and "shared.weight" in shapes:
        shapes["lm_head.weight"] = shapes["shared.weight"]  # untied copy of shared
    missing = [k for k in mapping if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(f"{source}: missing tensors {', '.join(missing[:3])}{more}; the weights "
                        "do not match config.json (layer counts, activation or tying).")
    unexpected = [k for k in shapes if k not in mapping and k not in _IGNORED]
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise UserError(f"{source}: unexpected tensors {', '.join(unexpected[:3])}{more}; the "
                        "weights do not match config.json.")
    for name in mapping:
        if tuple(shapes[name]) != expected[name]:
            raise UserError(f"{source}: {name} has shape {tuple(shapes[name])} but config.json "
                            f"implies {expected[name]}.")


def hf_state_to_params(state: HFState, config: T5Config, source: str = SAFETENSORS):
    """HF tensor dict -> our params (nested dict of float32 numpy arrays).

    Raises UserError naming `source` on missing, unexpected or mis-shaped tensors.
    """
    check_hf_shapes({k: tuple(np.shape(v)) for k, v in state.items()}, config, source)
    state = dict(state)
    if config.tie_word_embeddings and "lm_head.weight" in state:
        lm = state.pop("lm_head.weight")
        shared = state.get("shared.weight")
        if shared is not None and not np.array_equal(np.asarray(lm), np.asarray(shared)):
            raise UserError(f"{source}: lm_head.weight differs from shared.weight but the config "
                            "scales tied output logits (T5 1.0); an untied lm_head with scaled "
                            "logits is not supported.")
    if not config.tie_word_embeddings and "lm_head.weight" not in state:
        # Unscaled logits through the shared embedding: an untied copy represents it exactly.
        state["lm_head.weight"] = state["shared.weight"]
    params: dict = {}
    for name, (path, transpose) in _param_map(config).items():
        x = np.asarray(state[name]).astype(np.float32)
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


def _safetensors_shapes(path: str) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (8-byte little-endian length,
    then JSON), without reading any tensor data."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        shapes = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0
                                                      for d in shape):
                raise ValueError(f"tensor {name!r} has no valid shape")
            shapes[name] = tuple(shape)
        return shapes
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read safetensors ({_first_line(e)}).") from e


def _allowed_roots(hf_dir: str):
    """Where weight files may resolve: the model directory, and for a Hugging Face hub cache
    snapshot (.../snapshots/<revision>, whose files link to ../../blobs) that repo's blobs."""
    real = os.path.realpath(hf_dir)
    roots = [real]
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        roots.append(os.path.join(os.path.dirname(os.path.dirname(real)), "blobs"))
    return roots


def _index_file(hf_dir: str, name, index_path: str) -> str:
    """The path of a weight-map entry, refused unless it names a file inside hf_dir."""
    if (not isinstance(name, str) or not name or os.path.isabs(name)
            or ".." in re.split(r"[\\/]", name)):
        raise UserError(f"{index_path}: weight file {name!r} is not a relative path inside "
                        f"{hf_dir}; a weight index may only name files of its own directory.")
    path = os.path.join(hf_dir, name)
    real = os.path.realpath(path)
    if not any(real.startswith(root + os.sep) for root in _allowed_roots(hf_dir)):
        raise UserError(f"{index_path}: weight file {name!r} resolves (through a link) to "
                        f"{real}, outside {hf_dir}; a weight index may only name files of "
                        "its own directory.")
    return path


def _weight_files(hf_dir: str) -> Tuple[list, bool, str]:
    """(weight file paths, safetensors?, the file named in messages)."""
    for index, is_st in ((SAFETENSORS_INDEX, True), (TORCH_BIN_INDEX, False)):
        index_path = os.path.join(hf_dir, index)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
                names = sorted(set(weight_map.values()), key=str)
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index_path}: not a valid weight index ({_first_line(e)}).") \
                    from e
            return [_index_file(hf_dir, n, index_path) for n in names], is_st, index_path
    for name, is_st in ((SAFETENSORS, True), (TORCH_BIN, False)):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            return [path], is_st, path
    raise UserError(f"{hf_dir}: no {SAFETENSORS} or {TORCH_BIN}; not a Hugging Face T5 "
                    "checkpoint directory.")


def read_hf_weights(hf_dir: str, config: Optional[T5Config] = None) -> Tuple[HFState, str]:
    """All tensors of an HF checkpoint dir and the file name used in messages. With a
    config, safetensors shapes are checked against it before any tensor is read."""
    files, is_st, source = _weight_files(hf_dir)
    if is_st and config is not None:
        shapes: Dict[str, Tuple[int, ...]] = {}
        for path in files:
            shapes.update(_safetensors_shapes(path))
        check_hf_shapes(shapes, config, source)
    reader = _read_safetensors if is_st else _read_torch_bin
    state: HFState = {}
    for path in files:
        state.update(reader(path))
    return state, source


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
    state, source = read_hf_weights(hf_dir, config)
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
