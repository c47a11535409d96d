"""Benchmark 1: one training step, ours (jitted train step of the trainer) against Hugging
Face transformers' T5 in PyTorch, same config, same weights, same batch, same optimizer kind
(Adafactor, constant 1e-3, T5 settings), interleaved repetition by repetition.

Shapes: T5 1.1 tiny (gin/models/t5_1_1/tiny.gin) at batch 32 and T5 1.1 small at batch 8,
128 input / 32 target tokens, unpacked rows of random ids (HF has no packing). Tokens/s count
input + target positions. Model FLOP/s use the same analytic count for both sides
(common.t5_train_flops); "% of matmul" divides by a plain fp32 jnp.dot of 2048 x 2048
measured in the same interleaved loop (the hardware's practical limit for XLA here).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env()

SHAPES = {
        # name: (T5Config overrides, batch)
        "tiny": (dict(d_model=128, num_heads=4, d_kv=32, d_ff=256, num_encoder_layers=2,
                      num_decoder_layers=2), 32),
        "small": (dict(), 8),  # T5Config defaults are T5 1.1 small
}
INPUTS_LENGTH, TARGETS_LENGTH = 128, 32
LEARNING_RATE = 1e-3


def random_batch(vocab_size: int, batch: int, seed: int = 0, inputs_length: int = INPUTS_LENGTH,
                 targets_length: int = TARGETS_LENGTH):
    """An unpacked teacher-forced batch of random ids (below the sentinels, never pad or EOS)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, vocab_size - 100, (batch, inputs_length)).astype(np.int32)
    tgt = rng.randint(2, vocab_size - 100, (batch, targets_length)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)}


def ours(config, batch, params=None):
    """(step callable, initial params as numpy, first-step cross-entropy). The state is
    built around `params` (default: common.random_params) like a run that starts from a
    checkpoint."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import optimizers, steps  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import train_state as ts  # pylint: disable=import-outside-toplevel
    model = EncoderDecoderModel(config)
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    optimizer = optimizers.adafactor(learning_rate=LEARNING_RATE)
    abstract = ts.abstract_state(model, optimizer)
    shardings = ts.state_shardings(partitioner, model, abstract)
    params0 = common.random_params(model) if params is None else params
    state = ts.state_from_params(jax.device_put(params0, shardings.params), optimizer,
                                 partitioner, shardings, seed=0)
    step = steps.make_train_step(model, optimizer, partitioner, shardings)
    global_batch = partitioner.make_global_batch(batch)
    box = {"state": state}

    def run():
        box["state"], metrics = step(box["state"], global_batch)
        jax.block_until_ready(box["state"].step)
        return metrics

    metrics = jax.device_get(run())
    first_loss = float(metrics["cross_ent_sum"]) / float(metrics["weight_sum"])
    return run, params0, first_loss


def hf_model(config, params):
    """transformers' T5ForConditionalGeneration with exactly our weights: written by our
    exporter and read back by `from_pretrained` (the path users take)."""
    import tempfile  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from ssr_jax.hf import convert  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as d:
        convert.export_hf(params, config, d)
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return transformers.T5ForConditionalGeneration.from_pretrained(d)


def huggingface(config, params, batch):
    """(step callable, first-step loss) for transformers' T5 with our weights."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    model = hf_model(config, params)
    model.train()
    optimizer = transformers.optimization.Adafactor(
            model.parameters(), lr=LEARNING_RATE, relative_step=False, scale_parameter=True,
            warmup_init=False, decay_rate=-0.8, clip_threshold=1.0)
    tb = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}

    def run():
        out = model(input_ids=tb["encoder_input_tokens"],
                    decoder_input_ids=tb["decoder_input_tokens"],
                    labels=tb["decoder_target_tokens"])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    first_loss = float(run())
    return run, first_loss


def run(quick: bool):
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    threads = common.torch_threads()
    reps = {"tiny": 3 if quick else 9, "small": 3 if quick else 7}
    budget = {"tiny": 40 if quick else 90, "small": 60 if quick else 150}  # seconds
    rows, data, notes = [], {}, []
    matmul = common.matmul_runner()
    for shape, (overrides, batch_size) in SHAPES.items():
        fns, info = {}, {}
        base = T5Config(**overrides)
        batch = random_batch(base.vocab_size, batch_size)
        tokens = batch_size * (INPUTS_LENGTH + TARGETS_LENGTH)
        flops = common.t5_train_flops(base, batch_size, INPUTS_LENGTH, TARGETS_LENGTH)
        params0 = None
        for dtype in ("float32", "bfloat16"):
            fn, params0, loss = ours(base.replace(dtype=dtype), batch, params0)
            fns[f"ours {dtype}"] = fn
            info[f"ours {dtype}"] = {"first_loss": loss, "dtype": dtype}
        fns["hf float32"], hf_loss = huggingface(base, params0, batch)
        info["hf float32"] = {"first_loss": hf_loss, "dtype": "float32"}
        fns["matmul"] = matmul
        times, cpu = common.interleaved(fns, reps[shape], warmup=1, budget_s=budget[shape])
        matmul_flops = 2.0 * 2048 ** 3 / common.median(times["matmul"])
        hf_s = common.median(times["hf float32"])
        for name in ("ours float32", "ours bfloat16", "hf float32"):
            s = common.median(times[name])
            entry = dict(info[name], step_s=s, spread=common.spread(times[name]),
                         tokens_per_s=tokens / s, model_flops_per_s=flops / s,
                         of_matmul=flops / s / matmul_flops, vs_hf=hf_s / s, times=times[name],
                         cpu_s=common.median(cpu[name]), cpu_times=cpu[name])
            data[f"{shape} {name}"] = entry
            rows.append([shape, name.split()[0], name.split()[1], batch_size, f"{s:.3f}",
                         f"{tokens / s:,.0f}", f"{flops / s / 1e9:.1f}",
                         f"{100 * flops / s / matmul_flops:.0f}%", f"{hf_s / s:.2f}x",
                         f"{common.median(cpu[name]):.2f}",
                         f"{common.median(cpu['hf float32']) / common.median(cpu[name]):.2f}x"])
        data[f"{shape} matmul"] = {"flops_per_s": matmul_flops, "times": times["matmul"]}
        data[f"{shape} model_flops_per_step"] = flops
        notes.append(f"{shape}: first-step cross-entropy ours {info['ours float32']['first_loss']:.4f}"
                     f" (bf16 {info['ours bfloat16']['first_loss']:.4f}) vs HF "
                     f"{hf_loss:.4f} (same weights); {flops / 1e9:.1f} model GFLOP/step; "
                     f"2048^3 fp32 jnp.dot in the same loop: {matmul_flops / 1e9:.0f} GFLOP/s.")
        del fns
    best = {shape: max(("float32", "bfloat16"),
                       key=lambda d: data[f"{shape} ours {d}"]["tokens_per_s"])
            for shape in SHAPES}
    data["best_dtype"] = best
    notes.append(f"torch threads {threads}; XLA CPU uses all {os.cpu_count()} cores; "
                 f"medians of up to {reps['tiny']} (tiny) / {reps['small']} (small) interleaved "
                 "repetitions; step s = wall seconds per step.")
    notes.append("This CPU has no native bf16 arithmetic (AVX2/FMA only): bf16 activations "
                 "(fp32 params, fp32 softmax/loss) are measured, the faster dtype is the "
                 f"headline: {best}.")
    return {"name": "train_step",
            "title": "Train step: ours vs Hugging Face T5 (PyTorch), CPU",
            "headers": ["shape", "impl", "activations", "batch", "step s", "tokens/s",
                        "model GFLOP/s", "% of matmul", "vs HF", "CPU s", "vs HF (CPU s)"],
            "rows": rows, "notes": notes, "data": data,
            "device": jax.devices()[0].device_kind}


if __name__ == "__main__":
    common.main(run)
