"""Benchmark 5: `ssr-jax plan` -- accuracy against a real compiled + executed step, the
depth extrapolation's error, and the T5 1.1 XL student + XXL teacher plan on 64 fake devices.

1. accuracy: a tiny T5 on 8 fake devices (data 2 x fsdp 2 x model 2): the plan (compiled from
   abstract arguments) against the same step compiled from real sharded arrays and executed
   (memory_analysis, and the live buffers of the state on device 0).
2. extrapolation: T5 1.1 small (8+8 layers) on 8 devices, fully compiled vs extrapolated from
   2 and 4 layers per stack.
3. XL + XXL: gin/experiments/plan_xl_xxl.gin on 64 fake devices, extrapolated from 2 and 4
   layers (a full compile of XL's 24+24 layers for 64 devices takes minutes on 2 cores; part
   2 measures the extrapolation's error where a full compile is affordable).
"""
import contextlib
import io
import json
import os
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = " ".join(
        [f for f in os.environ.get("XLA_FLAGS", "").split()
         if "xla_force_host_platform_device_count" not in f]
        + ["--xla_force_host_platform_device_count=64"])
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)
REPO = common.REPO


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1.0)


def accuracy():
    """Plan vs the compiled+executed tiny step on 8 devices: relative errors."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax import plan  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import optimizers, steps  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import train_state as ts  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import packing  # pylint: disable=import-outside-toplevel
    config = T5Config(vocab_size=4224, d_model=64, num_heads=4, d_kv=16, d_ff=128,
                      num_encoder_layers=2, num_decoder_layers=2)
    model = EncoderDecoderModel(config)
    optimizer = optimizers.adafactor(learning_rate=1e-2)
    partitioner = Partitioner({"data": 2, "fsdp": 2, "model": 2}, "fsdp",
                              devices=jax.devices()[:8])
    p = plan.plan_train_step(model, optimizer, partitioner, 16, {"inputs": 128, "targets": 32})
    abstract = ts.abstract_state(model, optimizer)
    shardings = ts.state_shardings(partitioner, model, abstract)
    state = ts.init_state(model, optimizer, partitioner, shardings, seed=0)
    rng = np.random.RandomState(0)
    examples = [{"inputs": rng.randint(2, config.vocab_size, 63).astype(np.int32),
                 "targets": rng.randint(2, config.vocab_size, 15).astype(np.int32)}
                for _ in range(32)]
    host_batch, _ = packing.pack_examples(examples, 16, 128, 32)  # 2 examples per row
    batch = partitioner.make_global_batch(host_batch)
    step = steps.make_train_step(model, optimizer, partitioner, shardings)
    with partitioner.activation_context():
        compiled = step.jitted.lower(state, batch).compile()
    m = compiled.memory_analysis()
    device = jax.devices()[0]

    def on_device0(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                   for s in leaf.addressable_shards if s.device == device)

    live_args = on_device0(state) + on_device0(batch)
    new_state, _ = step(state, batch)
    jax.block_until_ready(new_state)
    real = {"activation_bytes": m.temp_size_in_bytes,
            "peak_bytes": (m.argument_size_in_bytes + m.output_size_in_bytes
                           - m.alias_size_in_bytes + m.temp_size_in_bytes),
            "argument_bytes": live_args, "params_bytes": on_device0(new_state.params),
            "opt_state_bytes": on_device0(new_state.opt_state)}
    errors = {k: rel(getattr(p, k), v) for k, v in real.items()}
    rows = [[k.replace("_", " "), common.fmt(float(getattr(p, k))), common.fmt(float(v)),
             f"{100 * errors[k]:.2f}%"] for k, v in real.items()]
    return rows, {"plan": p.__dict__, "real": real, "errors": errors,
                  "max_relative_error": max(errors.values())}


def extrapolation():
    """Full compile of T5 1.1 small on 8 devices vs the 2/4-layer extrapolation."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax import plan  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import optimizers  # pylint: disable=import-outside-toplevel
    config = T5Config()  # T5 1.1 small, 8+8 layers
    optimizer = optimizers.adafactor(learning_rate=1e-2)
    partitioner = Partitioner({"data": 4, "model": 2}, "standard", devices=jax.devices()[:8])
    lengths = {"inputs": 128, "targets": 32}

    def at(n):
        return plan.plan_train_step(EncoderDecoderModel(config).replace_config(
                num_encoder_layers=n, num_decoder_layers=n), optimizer, partitioner, 32, lengths)

    full = at(config.num_encoder_layers)
    model = EncoderDecoderModel(config)
    est = plan.extrapolate(at, config.num_encoder_layers, 2,
                           plan.state_footprint(model, partitioner, optimizer),
                           model.train_flops(32, 128, 32))
    fields = ("activation_bytes", "peak_bytes", "argument_bytes", "xla_flops_per_device")
    errors = {f: rel(getattr(est, f), getattr(full, f)) for f in fields}
    rows = [[f.replace("_", " "), common.fmt(float(getattr(est, f))),
             common.fmt(float(getattr(full, f))), f"{100 * errors[f]:.3f}%"] for f in fields]
    rows.append(["compile seconds", f"{est.compile_seconds:.1f}", f"{full.compile_seconds:.1f}",
                 "-"])
    return rows, {"errors": errors, "max_relative_error": max(errors.values()),
                  "full_compile_s": full.compile_seconds,
                  "extrapolated_compile_s": est.compile_seconds}


def xl_xxl():
    from ssr_jax.cli import plan as plan_cli  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "plan.json")
        buf = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stdout(buf):
            gin_file = os.path.join(REPO, "gin/experiments/plan_xl_xxl.gin")
            rc = plan_cli.main([f"--gin_file={gin_file}", "--extrapolate_from_layers=2",
                                f"--json={out}"])
        seconds = time.time() - t0
        if rc != 0:
            raise RuntimeError(f"ssr-jax plan exited {rc}: {buf.getvalue()[-2000:]}")
        with open(out) as f:
            plans = json.load(f)
    return buf.getvalue(), plans, seconds


def run(quick: bool):
    del quick  # every part runs once
    acc_rows, acc = accuracy()
    ext_rows, ext = extrapolation()
    text, plans, seconds = xl_xxl()
    rows = [["accuracy (tiny, 8 devices, vs compiled + executed)", *r] for r in acc_rows]
    rows += [["depth extrapolation (T5 1.1 small, 8 devices, vs full compile)", *r]
             for r in ext_rows]
    notes = [f"XL student + XXL teacher on 64 fake devices (gin/experiments/plan_xl_xxl.gin, "
             f"extrapolated from 2 and 4 layers per stack) in {seconds:.0f} s:",
             "\n```\n" + text.strip() + "\n```"]
    return {"name": "plan", "title": "ssr-jax plan: accuracy and the XL + XXL plan",
            "headers": ["check", "quantity", "plan", "reference", "deviation"],
            "rows": rows, "notes": notes,
            "data": {"accuracy": acc, "extrapolation": ext, "xl_xxl": plans,
                     "xl_xxl_seconds": seconds}}


if __name__ == "__main__":
    common.main(run)
