"""`ssr-jax export-hf` and `ssr-jax import-hf`.

export-hf: params from a trainer checkpoint (--checkpoint: a step dir holding params/, a
checkpoint root or a model dir; see ssr_jax.train.checkpoints for the layout) or from a
.npz of flattened params (--params_npz, keys 'a/b/c'), the model config from the
checkpoint's model_config.json or --model_config (a JSON of T5Config fields, or a gin file
binding MODEL, e.g. gin/models/t5_1_1/base.gin), the tokenizer from --vocab or else the
vocabulary the checkpoint records (vocab.json; refused when none is known, --no_tokenizer
for the weights only).

import-hf: reads an HF T5 directory and writes a params-only checkpoint (<out>/params/ +
<out>/model_config.json) that the trainer accepts as an initial checkpoint.
"""
import argparse
import json
import os
from typing import Optional, Tuple

import numpy as np

from ssr_jax.cli import gin_registry
from ssr_jax.errors import UserError
from ssr_jax.hf.convert import export_hf, import_hf
from ssr_jax.models.config import T5Config


def load_model_config_file(path: str) -> T5Config:
    """--model_config: a JSON of T5Config fields or a gin model file."""
    if not os.path.isfile(path):
        raise UserError(f"--model_config {path}: no such file.")
    if path.endswith(".gin"):
        return gin_registry.t5config_from_gin(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise UserError(f"--model_config {path}: not valid JSON ({e}); give a JSON of "
                        "T5Config fields or a .gin model file.") from e
    return T5Config.from_dict(d, f"--model_config {path}")


def load_params_from_checkpoint(path: str) -> Tuple[dict, Optional[T5Config]]:
    """(params as numpy, T5Config from model_config.json or None) of a trainer checkpoint."""
    import jax
    from ssr_jax.train import checkpoints
    params = checkpoints.load_params(path)
    config_dict = checkpoints.load_model_config(path)
    config = None
    if config_dict:
        config = T5Config.from_dict(config_dict, os.path.join(path, "model_config.json"))
    return jax.tree.map(np.asarray, params), config


def save_params_npz(params, path: str):
    """Flattened 'a/b/c' -> array .npz (the --params_npz format)."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                flat["/".join(prefix + (k,))] = np.asarray(v)
    walk(params, ())
    np.savez(path, **flat)


def load_params_npz(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--params_npz {path}: no such file.")
    params: dict = {}
    # allow_pickle=False: an .npz holding object arrays is refused, never unpickled.
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            node = params
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = z[key]
    return params


def _check_param_shapes(params, config: T5Config, source: str):
    """A clear error when params and config disagree (before any conversion)."""
    import jax
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel
    expected = EncoderDecoderModel(config).abstract_params()
    flat_e = {jax.tree_util.keystr(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_p = {jax.tree_util.keystr(p): tuple(np.shape(x))
              for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for k, shape in flat_e.items():
        if k not in flat_p:
            raise UserError(f"{source}: param {k} missing for the model config.")
        if flat_p[k] != shape:
            raise UserError(f"{source}: param {k} has shape {flat_p[k]}, the model config "
                            f"implies {shape}.")
    extra = sorted(set(flat_p) - set(flat_e))
    if extra:
        raise UserError(f"{source}: param {extra[0]} is not in the model config "
                        f"({len(extra)} unexpected).")


def export_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ssr-jax export-hf",
                                     description="Write params as a Hugging Face T5 directory.")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trainer checkpoint (step dir, root or model dir)")
    src.add_argument("--params_npz", help="params saved as a flattened .npz")
    parser.add_argument("--model_config", help="T5Config JSON or gin model file (default: "
                        "the checkpoint's model_config.json)")
    parser.add_argument("--vocab", help="SentencePiece model for the tokenizer files "
                        "(default: the one the checkpoint's vocab.json records)")
    parser.add_argument("--no_tokenizer", action="store_true",
                        help="write the weights only (no tokenizer files)")
    parser.add_argument("--extra_ids", type=int, default=None,
                        help="sentinel count (default: the recorded one, else 100)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    config = load_model_config_file(args.model_config) if args.model_config else None
    if args.checkpoint:
        params, stored_config = load_params_from_checkpoint(args.checkpoint)
        source = args.checkpoint
        config = config or stored_config
    else:
        params, source = load_params_npz(args.params_npz), args.params_npz
    if config is None:
        raise UserError(f"{source}: no model_config.json; pass --model_config (a T5Config JSON "
                        "or a gin file such as gin/models/t5_1_1/base.gin).")
    _check_param_shapes(params, config, source)
    spm_path, extra_ids = _tokenizer_source(args)
    export_hf(params, config, args.out, spm_path, extra_ids)
    print(f"wrote Hugging Face T5 to {args.out}"
          + (f" (tokenizer from {spm_path})" if spm_path else " (no tokenizer)"))
    return 0


def _tokenizer_source(args) -> Tuple[Optional[str], int]:
    """(SentencePiece file, extra ids) of the export: --vocab, else the vocabulary the
    checkpoint records (vocab.json, its sha256 checked), else refused: without a tokenizer
    transformers silently loads a broken default one."""
    from ssr_jax import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
    if args.no_tokenizer:
        return None, args.extra_ids or vocab_lib.DEFAULT_EXTRA_IDS
    if args.vocab:
        return args.vocab, args.extra_ids or vocab_lib.DEFAULT_EXTRA_IDS
    record, where = None, args.params_npz
    if args.checkpoint:
        from ssr_jax.ssr.teacher import read_vocab_record  # pylint: disable=C0415
        from ssr_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
        step_dir = checkpoints.resolve_step_dir(args.checkpoint)
        record, where = read_vocab_record(step_dir), args.checkpoint
    spm_path = (record or {}).get("sentencepiece_model_file")
    if not spm_path:
        raise UserError(f"{where} records no vocabulary (vocab.json): pass --vocab (the "
                        "SentencePiece model it was trained with), or --no_tokenizer for the "
                        "weights only.")
    if not os.path.isfile(spm_path):
        raise UserError(f"{where}: the recorded vocabulary {spm_path} no longer exists; pass "
                        "--vocab with the SentencePiece model it was trained with.")
    extra_ids = args.extra_ids or int(record.get("extra_ids") or vocab_lib.DEFAULT_EXTRA_IDS)
    # The record hashes the serialized model seqio loads, not the file's bytes.
    sha = vocab_lib.vocab_record(vocab_lib.get_vocabulary(spm_path, extra_ids)).get(
            "sentencepiece_sha256")
    if record.get("sentencepiece_sha256") not in (None, sha):
        raise UserError(f"{where}: the recorded vocabulary {spm_path} has changed since "
                        f"training (sha256 {sha[:12]}..., recorded "
                        f"{record['sentencepiece_sha256'][:12]}...); pass --vocab with the "
                        "SentencePiece model it was trained with.")
    return spm_path, extra_ids


def import_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ssr-jax import-hf",
                                     description="Read a Hugging Face T5 directory into an "
                                                 "initial checkpoint for training.")
    parser.add_argument("hf_dir", help="directory with config.json and model.safetensors "
                        "(or pytorch_model.bin, loaded with torch.load(weights_only=True))")
    parser.add_argument("--out", required=True, help="output checkpoint dir (params/ + "
                        "model_config.json)")
    parser.add_argument("--vocab", help="the model's SentencePiece file (e.g. T5's "
                        "cc_all.32000 model): recorded in vocab.json so that a student with "
                        "another vocabulary is refused this teacher")
    args = parser.parse_args(argv)
    params, config = import_hf(args.hf_dir)
    from ssr_jax import vocab as vocab_lib
    from ssr_jax.train import checkpoints
    checkpoints.save_params(args.out, params, config.to_dict())
    if args.vocab:
        vocab_lib.write_vocab_record(args.out, vocab_lib.get_vocabulary(args.vocab))
    print(f"wrote params checkpoint to {args.out} ({config.num_encoder_layers}+"
          f"{config.num_decoder_layers} layers, d_model {config.d_model}, "
          f"{config.feed_forward_proj})")
    return 0
