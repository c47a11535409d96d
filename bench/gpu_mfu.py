"""Benchmark 6 (GPU): bf16 model FLOPs utilisation of our train step for T5 1.1 base and
large on one accelerator, with the fused attention (jax.nn.dot_product_attention, cuDNN) and,
for base, the einsum attention too.

Model FLOPs: the analytic matmul count (ssr_jax.models.flops.t5_train_flops: projections,
attention, output layer; forward + backward = 3x forward); MFU = model FLOPs / step time / the
device's dense bf16 peak (the bf16 column of ssr_jax.train.metrics.PEAK_FLOPS_BY_KIND). T5
pre-training shapes: 512 inputs / 114 targets, batches of random ids, Adafactor, bf16
activations with fp32 params (train_step.ours: the trainer's jitted step). A configuration
that fails (e.g. cuDNN refusing a shape) gets a row saying so; the others still run.
Without a GPU the table says "not measured"; --smoke runs tiny shapes on any device.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import gpu_card  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

SIZES = {
        "base": (dict(d_model=768, num_heads=12, d_kv=64, d_ff=2048, num_encoder_layers=12,
                      num_decoder_layers=12), 64),
        "large": (dict(d_model=1024, num_heads=16, d_kv=64, d_ff=2816, num_encoder_layers=24,
                       num_decoder_layers=24), 32),
}
# (size, attention_impl): base both ways (what the fused kernels buy), large fused only;
# the einsum row last, as the one to lose if the time limit strikes.
RUNS = (("base", "dot_product_attention"), ("large", "dot_product_attention"), ("base", "einsum"))
SMOKE_SIZES = {"tiny": (dict(vocab_size=512, d_model=64, num_heads=4, d_kv=16, d_ff=128,
                             num_encoder_layers=2, num_decoder_layers=2), 4)}
SMOKE_RUNS = (("tiny", "dot_product_attention"), ("tiny", "einsum"))
INPUTS_LENGTH, TARGETS_LENGTH = 512, 114
HEADERS = ["size", "attention", "batch", "lengths", "step s", "tokens/s", "model TFLOP/s",
           "MFU"]


def measure(size: str, impl: str, overrides, batch_size: int, lengths, dtype: str, reps: int,
            peak: float):
    """One (size, attention) row and its data."""
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.flops import t5_train_flops  # pylint: disable=C0415
    import train_step  # pylint: disable=import-outside-toplevel
    li, lt = lengths
    config = T5Config(**overrides, dtype=dtype, attention_impl=impl)
    b = train_step.random_batch(config.vocab_size, batch_size, 0, li, lt)
    fn, _, first_loss = train_step.ours(config, b)
    times, _ = common.interleaved({"step": fn}, reps, warmup=2)
    s = common.median(times["step"])
    flops = t5_train_flops(config, batch_size, li, lt)
    tokens = batch_size * (li + lt)
    mfu = flops / s / peak if peak == peak else float("nan")  # NaN peak: unknown device
    row = [size, impl, batch_size, f"{li}/{lt}", f"{s:.4f}", f"{tokens / s:,.0f}",
           f"{flops / s / 1e12:.2f}", "-" if mfu != mfu else f"{100 * mfu:.1f}%"]
    return row, {"step_s": s, "tokens_per_s": tokens / s, "model_flops_per_s": flops / s,
                 "model_flops_per_step": flops, "mfu": mfu, "times": times["step"],
                 "first_loss": first_loss, "dtype": dtype}


def run(args):
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.train.metrics import peak_flops  # pylint: disable=import-outside-toplevel
    title = "GPU bf16 MFU (T5 1.1 base, large)"
    if not gpu_card.on_gpu() and not args.smoke:
        rows = [[s, a, SIZES[s][1], f"{INPUTS_LENGTH}/{TARGETS_LENGTH}", "not measured", "-",
                 "-", "-"] for s, a in RUNS]
        device = jax.devices()[0]
        return gpu_card.not_measured(
                "gpu_mfu", title, HEADERS, rows,
                f"no GPU on this machine ({device.platform}: {device.device_kind}); "
                "bench/gpu.sh on a GPU machine measures these rows.")
    sizes, runs = (SMOKE_SIZES, SMOKE_RUNS) if args.smoke else (SIZES, RUNS)
    lengths = (32, 8) if args.smoke else (INPUTS_LENGTH, TARGETS_LENGTH)
    dtype = "bfloat16" if gpu_card.on_gpu() else "float32"
    peak = peak_flops(dtype=dtype) / jax.device_count()
    rows, data = [], {"measured": True, "device": jax.devices()[0].device_kind,
                      "peak_flops": peak}
    reps = 3 if args.smoke else (5 if args.quick else 10)
    for size, impl in runs:
        overrides, batch_size = sizes[size]
        try:
            row, entry = measure(size, impl, overrides, batch_size, lengths, dtype, reps, peak)
        except Exception as e:  # pylint: disable=broad-except
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            row, entry = ([size, impl, batch_size, f"{lengths[0]}/{lengths[1]}",
                           f"failed: {msg}", "-", "-", "-"], {"error": msg})
        rows.append(row)
        data[f"{size} {impl}"] = entry
        gpu_card.write_partial(args, {"name": "gpu_mfu", "title": title, "headers": HEADERS,
                                      "rows": rows, "data": data, "notes": []})
    notes = [f"{dtype} activations, fp32 params, Adafactor; median of {reps} steps after 2 "
             "warm-up steps; tokens/s count input + target positions."]
    notes.append(f"peak {peak / 1e12:.0f} TFLOP/s ({dtype}) per device; one device."
                 if peak == peak else "no peak known for this device: MFU not reported.")
    return {"name": "gpu_mfu", "title": f"{title} on {gpu_card.card_name()}"
            + (" (smoke shapes)" if args.smoke else ""),
            "headers": HEADERS, "rows": rows, "data": data, "notes": notes}


if __name__ == "__main__":
    gpu_card.main(run)
