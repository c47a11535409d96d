"""Inference: decode a task's split with a checkpoint, write JSONL, compute the task's metrics.

Output: <model_dir>/inference/<task>-<split>-<step>.jsonl, one {"inputs", "targets",
"prediction", "score"} object per example, and <same name>-metrics.json with the task's
seqio predict metrics (when it has any). Process 0 writes.
"""
import json
import os
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from ssr_jax import distributed
from ssr_jax.data.dataset import DatasetConfig, get_task, host_batches
from ssr_jax.models.base import BaseModel, DecodeConfig
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt


def infer(*, model: BaseModel, checkpoint_path: str, dataset: DatasetConfig,
          partitioner: Partitioner, model_dir: str, decode: DecodeConfig = DecodeConfig(),
          num_batches: Optional[int] = None, seed: int = 0) -> Dict[str, Any]:
    """Decodes `dataset` (unpacked, in order) and returns the task's metrics (maybe empty)."""
    task = get_task(dataset.mixture_or_task_name, dataset.module)
    params, _ = ckpt.restore_model_params(model, partitioner, checkpoint_path)
    dataset = _for_inference(dataset)
    rows: List[Dict[str, Any]] = []
    key = jax.random.PRNGKey(seed)
    for i, (host_batch, batch, n) in enumerate(host_batches(dataset, partitioner, num_batches)):
        with partitioner.activation_context():
            tokens, scores = model.predict_batch(params, batch, decode,
                                                 rng=jax.random.fold_in(key, i))
        preds = {"prediction": partitioner.host_rows(tokens),
                 "score": partitioner.host_rows(scores)}
        rows.extend(_decode_rows(task, distributed.gather_rows(host_batch, n),
                                 distributed.gather_rows(preds, n)))
    step = os.path.basename(ckpt.resolve_step_dir(checkpoint_path))
    name = f"{dataset.mixture_or_task_name}-{dataset.split}-{step}"
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
        print(f"wrote {len(rows)} predictions to {os.path.join(out_dir, name + '.jsonl')}"
              + (f"; metrics {metrics}" if metrics else ""), flush=True)
    return metrics


def _for_inference(cfg: DatasetConfig) -> DatasetConfig:
    import dataclasses  # pylint: disable=import-outside-toplevel
    return dataclasses.replace(cfg, pack=False, shuffle=False)


def _ids(row: np.ndarray, eos_id: int = 1) -> List[int]:
    ids = [int(t) for t in row if int(t) != 0]
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _decode_rows(task, inputs: Dict[str, np.ndarray], preds: Dict[str, np.ndarray]):
    feats = task.output_features
    in_vocab = feats["inputs"].vocabulary if "inputs" in feats else None
    out_vocab = feats["targets"].vocabulary
    rows = []
    for i in range(len(preds["prediction"])):
        row = {"targets": out_vocab.decode(_ids(inputs["decoder_target_tokens"][i])),
               "prediction": out_vocab.decode(_ids(preds["prediction"][i])),
               "score": float(preds["score"][i])}
        if in_vocab is not None and "encoder_input_tokens" in inputs:
            row = {"inputs": in_vocab.decode(_ids(inputs["encoder_input_tokens"][i])), **row}
        rows.append(row)
    return rows


def _task_metrics(task, rows) -> Dict[str, Any]:
    """The task's predict metric_fns on post-processed targets and predictions."""
    fns = list(getattr(task, "predict_metric_fns", None) or [])
    if not fns or not rows:
        return {}
    post = getattr(task, "postprocess_fn", None) or (lambda x, **_: x)
    targets = [post(r["targets"], example=None, is_target=True) for r in rows]
    predictions = [post(r["prediction"], example=None, is_target=False) for r in rows]
    metrics: Dict[str, Any] = {}
    for fn in fns:
        for k, v in fn(targets, predictions).items():
            metrics[k] = float(np.asarray(getattr(v, "value", v)))
    return metrics
