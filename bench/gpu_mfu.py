"""Benchmark 6 (GPU only): bf16 model FLOPs utilisation of our train step for T5 1.1 base and
large on one accelerator.

Model FLOPs: the analytic matmul count (ssr_jax.models.flops.t5_train_flops: projections,
attention, output layer; forward + backward = 3x forward); MFU = model FLOPs / step time / the
device's dense bf16 peak (the bf16 column of ssr_jax.train.metrics.PEAK_FLOPS_BY_KIND). T5
pre-training shapes: 512 inputs / 114 targets, packed-size batches of random ids, Adafactor,
bf16 activations with fp32 params. On a machine without a GPU the table says so and nothing
is measured.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env()

SIZES = {
        "base": (dict(d_model=768, num_heads=12, d_kv=64, d_ff=2048, num_encoder_layers=12,
                      num_decoder_layers=12), 64),
        "large": (dict(d_model=1024, num_heads=16, d_kv=64, d_ff=2816, num_encoder_layers=24,
                       num_decoder_layers=24), 32),
}
INPUTS_LENGTH, TARGETS_LENGTH = 512, 114


def run(quick: bool):
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.flops import t5_train_flops  # pylint: disable=C0415
    from ssr_jax.train.metrics import peak_flops  # pylint: disable=import-outside-toplevel
    import train_step  # pylint: disable=import-outside-toplevel
    device = jax.devices()[0]
    headers = ["size", "batch", "lengths", "step s", "tokens/s", "model TFLOP/s", "MFU"]
    if device.platform != "gpu":
        return {"name": "gpu_mfu", "title": "GPU bf16 MFU (T5 1.1 base, large)",
                "headers": headers,
                "rows": [[s, b, f"{INPUTS_LENGTH}/{TARGETS_LENGTH}", "not measured", "-", "-",
                          "-"] for s, (_, b) in SIZES.items()],
                "notes": [f"no GPU on this machine ({device.platform}: {device.device_kind}); "
                          "`make bench` on a GPU machine measures these rows."],
                "data": {"measured": False}}
    peak = peak_flops() / jax.device_count()
    rows, data = [], {"measured": True, "device": device.device_kind, "peak_flops": peak}
    for size, (overrides, batch_size) in SIZES.items():
        config = T5Config(**overrides, dtype="bfloat16")
        b = train_step.random_batch(config.vocab_size, batch_size, 0, INPUTS_LENGTH,
                                    TARGETS_LENGTH)
        fn, _, _ = train_step.ours(config, b)
        times, _ = common.interleaved({"step": fn}, 5 if quick else 20, warmup=2)
        s = common.median(times["step"])
        flops = t5_train_flops(config, batch_size, INPUTS_LENGTH, TARGETS_LENGTH)
        tokens = batch_size * (INPUTS_LENGTH + TARGETS_LENGTH)
        data[size] = {"step_s": s, "tokens_per_s": tokens / s, "model_flops_per_s": flops / s,
                      "mfu": flops / s / peak, "times": times["step"]}
        rows.append([size, batch_size, f"{INPUTS_LENGTH}/{TARGETS_LENGTH}", f"{s:.4f}",
                     f"{tokens / s:,.0f}", f"{flops / s / 1e12:.1f}",
                     f"{100 * flops / s / peak:.1f}%"])
    return {"name": "gpu_mfu", "title": f"GPU bf16 MFU on {device.device_kind}",
            "headers": headers, "rows": rows, "data": data,
            "notes": [f"peak {peak / 1e12:.0f} TFLOP/s (dense bf16) per device; one device."]}


if __name__ == "__main__":
    common.main(run)
