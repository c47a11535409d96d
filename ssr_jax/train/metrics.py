"""Training metrics: the console progress line, TensorBoard (tf.summary) and a JSONL log.

Only process 0 writes files. Values arrive already summed over a logging window on the host;
nothing here touches device arrays, so the loop decides when to synchronise.
"""
import glob
import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from ssr_jax.models.config import resolve_dtype

# Dense peak FLOP/s per device by activation dtype, matched by substring of
# `device.device_kind` (first match wins): (name, bf16/fp16 tensor cores, fp32 matmuls at the
# default precision, fp32 at "highest" precision). fp32 at the default precision is what JAX
# runs: on A100/H100-class GPUs XLA uses TF32 tensor cores for fp32 dots (so the TF32 figure;
# `jax_default_matmul_precision="highest"` gives true fp32 on the non-tensor units, the last
# figure); on TPUs an fp32 dot is one bf16 pass by default and 6 passes at "highest" (3 at
# "high"), so their fp32 figures are the bf16 peak / passes. None: not known, no MFU.
PEAK_FLOPS_BY_KIND = (
        ("TPU v6", 918e12, 918e12, 918e12 / 6), ("TPU v5p", 459e12, 459e12, 459e12 / 6),
        ("TPU v5 lite", 197e12, 197e12, 197e12 / 6), ("TPU v5e", 197e12, 197e12, 197e12 / 6),
        ("TPU v5", 459e12, 459e12, 459e12 / 6), ("TPU v4", 275e12, 275e12, 275e12 / 6),
        ("TPU v3", 123e12, 123e12, 123e12 / 6), ("TPU v2", 46e12, 46e12, 46e12 / 6),
        ("H200", 989e12, 494e12, 67e12), ("H100", 989e12, 494e12, 67e12),
        ("A100", 312e12, 156e12, 19.5e12), ("L4", 121e12, 60e12, 30e12),
        ("A10", 125e12, 62.5e12, 31.2e12), ("V100", None, 15.7e12, 15.7e12),
)
_TPU_PASSES = {"high": 3, "bfloat16_3x": 3, "tensorfloat32": 3}  # else 1 (default) or 6


METRICS_FILE = "metrics.jsonl"


def peak_flops(peak_flops_per_device: Optional[float] = None,
               dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of all devices together for matmuls in `dtype` (the activation dtype);
    NaN where unknown (CPU, unlisted devices), so that no MFU is reported.
    `peak_flops_per_device` (train.peak_flops_per_device) overrides the table."""
    devices = jax.devices()
    if peak_flops_per_device:
        return float(peak_flops_per_device) * len(devices)
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        return float("nan")  # no meaningful peak: it depends on the CPU, its cores, SIMD
    precision = str(jax.config.jax_default_matmul_precision or "default").lower()
    dtype = resolve_dtype(str(dtype), devices[0].platform)  # T5Config.dtype 'auto'
    for name, half, fp32, fp32_highest in PEAK_FLOPS_BY_KIND:
        if name.lower() not in kind:
            continue
        if str(dtype) in ("bfloat16", "float16"):
            flops = half
        elif str(dtype) == "float32":
            flops = fp32_highest if precision in ("highest", "float32") else fp32
            if name.startswith("TPU") and precision in _TPU_PASSES:
                flops = half / _TPU_PASSES[precision]
        else:
            flops = None
        return float("nan") if flops is None else flops * len(devices)
    return float("nan")  # unknown device: MFU is not reported


def drop_steps_after(model_dir: str, step: int):
    """Resuming from `step`: removes the lines with a later step from MODEL_DIR/{train,eval*}/
    metrics.jsonl (written before the resumed checkpoint's successor was lost), so that the
    resumed run appends each step once. Rewrites atomically; process 0 only."""
    if jax.process_index() != 0:
        return
    for path in sorted(glob.glob(os.path.join(model_dir, "train", METRICS_FILE))
                       + glob.glob(os.path.join(model_dir, "eval*", METRICS_FILE))):
        with open(path) as f:
            lines = f.readlines()
        kept = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= step]
        if len(kept) == len(lines):
            continue
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def count_params(params: Any) -> int:
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    """Console line every log step; TensorBoard scalars under <model_dir>/{train,eval} and the
    same values as JSON lines in <model_dir>/{train,eval}/metrics.jsonl (process 0 only)."""

    def __init__(self, model_dir: Optional[str], total_steps: int, tokens_per_step: int,
                 flops_per_step: float, peak_flops_total: float):
        """tokens_per_step: positions of the batch's static shape (padding included), the
        ones flops_per_step (the model's matmul FLOPs) is counted over."""
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak = peak_flops_total
        self.is_primary = jax.process_index() == 0
        self.model_dir = model_dir if self.is_primary else None
        self._writers = {}

    def _write(self, kind: str, step: int, scalars: Mapping[str, float]):
        if not self.model_dir:
            return
        directory = os.path.join(self.model_dir, kind)
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        if kind not in self._writers:
            os.makedirs(directory, exist_ok=True)
            self._writers[kind] = tf.summary.create_file_writer(directory)
        # tf.summary.scalar lives in the tensorboard package; the core op plus the scalar
        # plugin's metadata writes the same event without it.
        metadata = tf.compat.v1.SummaryMetadata(
                plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self._writers[kind].as_default():
            for name, value in scalars.items():
                tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                                 metadata=metadata)
        self._writers[kind].flush()
        with open(os.path.join(directory, METRICS_FILE), "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                    + "\n")

    def log_train(self, step: int, summed: Mapping[str, float], num_steps: int,
                  seconds: float, extra: Optional[Mapping[str, float]] = None
                  ) -> Mapping[str, float]:
        """summed: metric sums over the last num_steps steps (grad_norm/lr: last step).
        extra: scalars from the input stage (e.g. SSR fill statistics), logged as they are."""
        w = max(summed["weight_sum"], 1.0)
        tok_s = self.tokens_per_step * num_steps / max(seconds, 1e-9)
        mfu = self.flops_per_step * num_steps / max(seconds, 1e-9) / self.peak
        eta = seconds / max(num_steps, 1) * (self.total_steps - step)  # at the latest rate
        scalars = {
                "loss": summed["loss_sum"] / w,
                "accuracy": summed["correct_sum"] / w,
                "cross_ent_loss": summed["cross_ent_sum"] / w,
                "z_loss": summed["z_loss_sum"] / w,
                "learning_rate": summed["learning_rate"],
                "grad_norm": summed["grad_norm"],
                "nonfinite_steps": summed["nonfinite"],
                "timing/steps_per_second": num_steps / max(seconds, 1e-9),
                "timing/tokens_per_second": tok_s,
        }
        if "real_tokens" in summed and self.tokens_per_step:
            scalars["timing/padding_fraction"] = 1.0 - summed["real_tokens"] / (
                    self.tokens_per_step * num_steps)
        if math.isfinite(mfu):
            scalars["timing/mfu"] = mfu
        scalars.update(extra or {})
        line = (f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} | "
                f"acc {scalars['accuracy']:.4f} | lr {scalars['learning_rate']:.3g} | "
                f"gnorm {scalars['grad_norm']:.3g} | {tok_s:,.0f} tok/s | "
                + (f"MFU {100 * mfu:.3g}% | " if math.isfinite(mfu) else "")
                + f"ETA {_fmt_duration(eta)}")
        if summed["nonfinite"]:
            line += f" | {int(summed['nonfinite'])} non-finite steps skipped"
        if self.is_primary:
            print(line, flush=True)
        self._write("train", step, scalars)
        return scalars

    def log_eval(self, step: int, summed: Mapping[str, float], num_batches: int,
                 name: str = "eval", whole_split: bool = True) -> Mapping[str, float]:
        """whole_split: the batches covered the split once; else they were its first
        num_batches batches (a fixed subset, the same at every eval)."""
        w = max(summed["weight_sum"], 1.0)
        scalars = {"loss": (summed["cross_ent_sum"] + summed["z_loss_sum"]) / w,
                   "accuracy": summed["correct_sum"] / w,
                   "cross_ent_loss": summed["cross_ent_sum"] / w,
                   "weight_sum": summed["weight_sum"]}
        if self.is_primary:
            print(f"{name} step {step} | loss {scalars['loss']:.4f} | "
                  f"acc {scalars['accuracy']:.4f} | {num_batches} batches ("
                  + ("the whole split" if whole_split else
                     f"the first {num_batches} batches of the split")
                  + f": {int(summed['weight_sum']):,} target tokens)", flush=True)
        self._write(name, step, scalars)
        return scalars

    def close(self):
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
