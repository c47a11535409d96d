"""Inference: decode a task's split with a checkpoint, write JSONL, compute the task's metrics.

Output: <model_dir>/inference/<task>-<split>-<step>-<decode>.jsonl (`output_name`: decode is
e.g. 'greedy', 'beam4', 'sample-t0.7-seed0', 'greedy-norep3', so runs with other settings
keep their own files), one {"inputs", "targets", "prediction", "score"} object per real
example of the split, in order (padding rows are never written), and <same name>-metrics.json
with the task's seqio predict metrics over those rows (when it has any). `inputs` and
`targets` are the task's text before tokenization and truncation (seqio's `*_pretokenized`
features) when that text is what the tokens came from; otherwise (e.g. span corruption, whose
inputs are made after tokenizing) the decoded tokens. The metrics see the same text, the
postprocess_fn getting an example {"inputs_pretokenized", "targets_pretokenized"} (bytes, as
seqio gives them), so they can be recomputed from the file. Process 0 writes.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Iterator, List, Optional

import jax
import numpy as np

from ssr_jax import distributed
from ssr_jax.data.dataset import DatasetConfig, get_task, host_batches
from ssr_jax.models.base import BaseModel, DecodeConfig
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt

_DEFAULTS = DecodeConfig()


def output_name(task: str, split: str, step: str, decode: DecodeConfig, seed: int = 0) -> str:
    """<task>-<split>-<step>-<method and the settings that change its output>."""
    norep = f"-norep{decode.no_repeat_ngram_size}" if decode.no_repeat_ngram_size else ""
    if decode.method == "beam":
        method = f"beam{decode.num_beams}"
        if decode.brevity_alpha != _DEFAULTS.brevity_alpha:
            method += f"-alpha{decode.brevity_alpha:g}"
        method += norep
    elif decode.method == "sample":
        method = "sample"
        method += f"-t{decode.temperature:g}" if decode.temperature != 1.0 else ""
        method += f"-k{decode.top_k}" if decode.top_k else ""
        method += f"-p{decode.top_p:g}" if decode.top_p < 1.0 else ""
        method += f"{norep}-seed{seed}"
    else:
        method = decode.method + norep
    return f"{task}-{split}-{step}-{method}"


def infer(*, model: BaseModel, checkpoint_path: str, dataset: DatasetConfig,
          partitioner: Partitioner, model_dir: str, decode: DecodeConfig = DecodeConfig(),
          num_batches: Optional[int] = None, seed: int = 0) -> Dict[str, Any]:
    """Decodes `dataset` (unpacked, in order) and returns the task's metrics (maybe empty)."""
    task = get_task(dataset.mixture_or_task_name, dataset.module)
    params, _ = ckpt.restore_model_params(model, partitioner, checkpoint_path)
    dataset = dataclasses.replace(dataset, pack=False, shuffle=False)
    layout = partitioner.data_layout(dataset.batch_size)
    # Hosts that read the same shard (a 'model' axis across hosts) write its rows once.
    shards = distributed.gather_json(layout.shard_index)
    writes = shards.index(layout.shard_index) == jax.process_index()
    raw = _raw_examples(task, dataset, layout.shard_info)
    rows: List[Dict[str, Any]] = []
    unmatched = 0
    key = jax.random.PRNGKey(seed)
    for i, (host_batch, batch, n) in enumerate(host_batches(dataset, partitioner, num_batches)):
        with partitioner.activation_context():
            tokens, scores = model.predict_batch(params, batch, decode,
                                                 rng=jax.random.fold_in(key, i))
        mine = _decode_rows(task, host_batch, {"prediction": partitioner.host_rows(tokens),
                                               "score": partitioner.host_rows(scores)},
                            [next(raw, None) for _ in range(n)])
        unmatched += sum(r.pop("_unmatched") for r in mine)
        for host_rows in distributed.gather_json(mine if writes else []):
            rows.extend(host_rows)
    step = os.path.basename(ckpt.resolve_step_dir(checkpoint_path))
    name = output_name(dataset.mixture_or_task_name, dataset.split, step, decode, seed)
    metrics = _task_metrics(task, rows)
    if jax.process_index() == 0:
        out_dir = os.path.join(model_dir, "inference")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name + ".jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        if metrics:
            with open(os.path.join(out_dir, name + "-metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        if unmatched:
            print(f"warning: the raw text of {unmatched} example(s) on this host did not line "
                  "up with their tokens; wrote their decoded tokens instead", flush=True)
        print(f"wrote {len(rows)} predictions to {os.path.join(out_dir, name + '.jsonl')}"
              + (f"; metrics {metrics}" if metrics else ""), flush=True)
    return metrics


def _raw_examples(task, cfg: DatasetConfig, shard_info) -> Iterator[Dict[str, Any]]:
    """This host's examples of the split as InputPipeline reads them (same arguments, so the
    same order), with seqio's '*_pretokenized' copies of the text; checked row by row."""
    import seqio  # pylint: disable=import-outside-toplevel
    kwargs = dict(split=cfg.split, use_cached=cfg.use_cached, shuffle=False, seed=cfg.seed,
                  shard_info=seqio.ShardInfo(*shard_info) if shard_info[1] > 1 else None,
                  num_epochs=1, trim_output_features=True, try_in_mem_cache=False)
    if isinstance(task, seqio.Mixture):
        kwargs["copy_pretokenized"] = True  # a Mixture drops them by default
    ds = task.get_dataset(dict(cfg.task_feature_lengths), **kwargs)
    keep = ("inputs", "targets", "inputs_pretokenized", "targets_pretokenized")
    return iter(ds.map(lambda ex: {k: ex[k] for k in keep if k in ex}).as_numpy_iterator())


def _ids(row: np.ndarray, eos_id: int = 1) -> List[int]:
    ids = [int(t) for t in row if int(t) != 0]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _text(vocab, row_tokens: np.ndarray, raw: Optional[Dict[str, Any]], feature: str):
    """(text, lined_up): the pretokenized text when these tokens came from it, else the
    decoded tokens. lined_up is False when the raw example is not this row's."""
    ids = _ids(row_tokens)
    if raw is None or feature not in raw:
        return vocab.decode(ids), raw is not None
    if _ids(raw[feature]) != ids:
        return vocab.decode(ids), False
    text = raw.get(feature + "_pretokenized")
    if text is not None:
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        full = list(vocab.encode(text))
        # Truncation keeps a prefix (and the EOS, which _ids cuts at).
        if full[:len(ids)] == ids and (len(full) == len(ids)
                                       or len(ids) >= row_tokens.shape[0] - 1):
            return text, True
    return vocab.decode(ids), True


def _decode_rows(task, inputs: Dict[str, np.ndarray], preds: Dict[str, np.ndarray],
                 raw: Optional[List[Optional[Dict[str, Any]]]] = None):
    """Rows for the first len(raw) examples (all of preds when raw is None)."""
    feats = task.output_features
    in_vocab = feats["inputs"].vocabulary if "inputs" in feats else None
    out_vocab = feats["targets"].vocabulary
    rows = []
    for i in range(len(preds["prediction"]) if raw is None else len(raw)):
        ex = raw[i] if raw is not None else {}
        targets, ok = _text(out_vocab, inputs["decoder_target_tokens"][i], ex, "targets")
        row = {"targets": targets, "prediction": out_vocab.decode(_ids(preds["prediction"][i])),
               "score": float(preds["score"][i])}
        if in_vocab is not None and "encoder_input_tokens" in inputs:
            text, in_ok = _text(in_vocab, inputs["encoder_input_tokens"][i], ex, "inputs")
            row, ok = {"inputs": text, **row}, ok and in_ok
        if raw is not None:
            row["_unmatched"] = int(not ok)
        rows.append(row)
    return rows


def postprocessed(task, rows: List[Dict[str, Any]]):
    """(targets, predictions) of written rows as the task's metric fns take them: through its
    postprocess_fn, which sees the example's text as seqio gives it (bytes)."""
    post = getattr(task, "postprocess_fn", None) or (lambda x, **_: x)
    examples = [{"inputs_pretokenized": r.get("inputs", "").encode("utf-8"),
                 "targets_pretokenized": r["targets"].encode("utf-8")} for r in rows]
    targets = [post(r["targets"], example=ex, is_target=True) for r, ex in zip(rows, examples)]
    predictions = [post(r["prediction"], example=ex, is_target=False)
                   for r, ex in zip(rows, examples)]
    return targets, predictions


def _task_metrics(task, rows) -> Dict[str, Any]:
    """The task's predict metric_fns on post-processed targets and predictions."""
    fns = list(getattr(task, "predict_metric_fns", None) or [])
    if not fns or not rows:
        return {}
    targets, predictions = postprocessed(task, rows)
    metrics: Dict[str, Any] = {}
    for fn in fns:
        for k, v in fn(targets, predictions).items():
            metrics[k] = float(np.asarray(getattr(v, "value", v)))
    return metrics
