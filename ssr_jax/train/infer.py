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

from ssr_jax.models.base import BaseModel, DecodeConfig
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import checkpoints as ckpt
from ssr_jax.train.input_stage import DatasetConfig, host_batches, import_task_module


def infer(*, model: BaseModel, checkpoint_path: str, dataset: DatasetConfig,
          partitioner: Partitioner, model_dir: str, decode: DecodeConfig = DecodeConfig(),
          num_batches: Optional[int] = None, seed: int = 0) -> Dict[str, Any]:
    """Decodes `dataset` (unpacked, in order) and returns the task's metrics (maybe empty)."""
    import seqio  # pylint: disable=import-outside-toplevel
    import_task_module(dataset.module)
    task = seqio.get_mixture_or_task(dataset.mixture_or_task_name)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
    shardings = partitioner.param_shardings(abstract, model.param_logical_axes())
    params = ckpt.load_params(checkpoint_path, shardings, abstract)
    dataset = _for_inference(dataset)
    rows: List[Dict[str, Any]] = []
    key = jax.random.PRNGKey(seed)
    for i, (host_batch, batch, n) in enumerate(host_batches(dataset, partitioner, num_batches)):
        with partitioner.activation_context():
            tokens, scores = model.predict_batch(params, batch, decode,
                                                 rng=jax.random.fold_in(key, i))
        rows.extend(_decode_rows(task, _gather_rows(host_batch, n),
                                 _gather_rows(_local_rows(tokens, scores, partitioner), n)))
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


def _local_rows(tokens: jax.Array, scores: jax.Array, partitioner: Partitioner):
    """This host's rows of the (batch-sharded) predictions, in the order of its host batch."""
    layout_rows = partitioner.data_layout(tokens.shape[0])
    start = layout_rows.shard_index * layout_rows.per_host_batch_size
    stop = start + layout_rows.per_host_batch_size
    if jax.process_count() == 1:
        return {"prediction": np.asarray(tokens)[start:stop],
                "score": np.asarray(scores)[start:stop]}
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    full_t = multihost_utils.process_allgather(tokens, tiled=True)
    full_s = multihost_utils.process_allgather(scores, tiled=True)
    return {"prediction": full_t[start:stop], "score": full_s[start:stop]}


def _gather_rows(host: Dict[str, np.ndarray], n: int) -> Dict[str, np.ndarray]:
    """All hosts' real (unpadded) rows, in process order (identical on every host)."""
    mine = {k: np.asarray(v)[:n] for k, v in host.items()}
    if jax.process_count() == 1:
        return mine
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    counts = multihost_utils.process_allgather(np.array([n]))
    out = {}
    for k, v in host.items():
        everyone = multihost_utils.process_allgather(np.asarray(v))
        out[k] = np.concatenate([everyone[i][:int(counts[i][0])] for i in range(len(counts))])
    return out


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
