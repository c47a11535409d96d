"""Benchmark 2: teacher sampling (nucleus, top-p 0.9), new tokens per second.

Ours: the SSR teacher's jitted sampler (`ssr_jax.ssr.teacher.Teacher.generate`: encoder
once, KV-cached decoder steps in one `lax.while_loop`, the sort-free bisection top-p filter,
per-example keys and stop tokens), and for reference the model's generic
`predict_batch(method='sample')` (sort-based top-p). Hugging Face: `generate(do_sample=True,
top_p=0.9, top_k=0)` of transformers' T5 in PyTorch with the same weights (exported by our
converter) on the same inputs. All interleaved repetition by repetition.

Inputs look like SSR teacher inputs: 64 tokens with 3 sentinels and EOS; up to 32 new
tokens per row (the default run's teacher budget for a 64-token slot). New tokens are
counted per row up to and including its first EOS (or, for ours, its stop sentinel).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import train_step  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env()

SHAPES = {"tiny": train_step.SHAPES["tiny"][0], "small": train_step.SHAPES["small"][0]}
BATCH, INPUTS_LENGTH, NEW_TOKENS, NUM_SPANS = 32, 64, 32, 3
TOP_P = 0.9


def teacher_inputs(vocab_size: int, seed: int = 0):
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    x = rng.randint(3, vocab_size - 100, (BATCH, INPUTS_LENGTH)).astype(np.int32)
    for k in range(NUM_SPANS):  # <extra_id_k> = vocab_size - 1 - k, in order
        x[:, (k + 1) * INPUTS_LENGTH // (NUM_SPANS + 2)] = vocab_size - 1 - k
    x[:, -1] = 1
    return x


def new_tokens(tokens, stop_ids, max_len: int, eos_id: int = 1) -> int:
    """Tokens emitted per row up to and including its first EOS / stop token."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    total = 0
    for row, stop in zip(np.asarray(tokens), stop_ids):
        hit = np.flatnonzero((row == eos_id) | (row == stop))
        total += int(hit[0]) + 1 if hit.size else min(max_len, row.shape[0])
    return total


def ours(config, params, x):
    """{name: callable returning new tokens} for the teacher sampler and predict_batch."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.base import DecodeConfig  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    model = EncoderDecoderModel(config)
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    shardings = partitioner.param_shardings(model.abstract_params(), model.param_logical_axes())
    params = jax.device_put(params, shardings)
    decode = DecodeConfig(method="sample", max_decode_length=NEW_TOKENS, top_p=TOP_P)
    teacher = teacher_lib.Teacher(model, params, partitioner, decode, shardings)
    stops = teacher_lib.stop_tokens(np.full((BATCH,), NUM_SPANS), config.vocab_size)
    host = {"inputs": x, "keys": teacher_lib.example_keys(x, 0), "stops": stops,
            "lens": np.full((BATCH,), NEW_TOKENS, np.int32)}
    g = partitioner.make_global_batch(host)
    counter = {"calls": 0}

    def teacher_run():
        counter["calls"] += 1
        keys = partitioner.make_global_batch(
                {"k": teacher_lib.example_keys(x, counter["calls"])})["k"]
        out = teacher.generate(g["inputs"], keys, g["stops"], g["lens"])
        return new_tokens(jax.device_get(out), stops, NEW_TOKENS)

    def predict_run():
        counter["calls"] += 1
        out, _ = model.predict_batch(params, {"encoder_input_tokens": g["inputs"]}, decode,
                                     rng=jax.random.PRNGKey(counter["calls"]),
                                     stop_tokens=g["stops"], max_decode_lengths=g["lens"])
        return new_tokens(jax.device_get(out), stops, NEW_TOKENS)

    return {"ours teacher": teacher_run, "ours predict_batch": predict_run}, stops


def huggingface(config, params, x):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    model = train_step.hf_model(config, params)
    model.eval()
    ids = torch.from_numpy(x.astype(np.int64))
    mask = torch.ones_like(ids)

    def generate(max_new_tokens):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 top_p=TOP_P, top_k=0, temperature=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=config.eos_id,
                                 pad_token_id=config.pad_id,
                                 decoder_start_token_id=config.decoder_start_token_id)
        # Drop the start token; rows stop at EOS (no per-row stop sentinel in HF).
        return new_tokens(out[:, 1:].numpy(), [-1] * BATCH, max_new_tokens)

    return (lambda: generate(NEW_TOKENS)), (lambda: generate(2))


def run(quick: bool):
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    threads = common.torch_threads()
    reps = 3 if quick else 7
    rows, data = [], {}
    for shape, overrides in SHAPES.items():
        config = T5Config(**overrides)
        params = common.random_params(EncoderDecoderModel(config))
        x = teacher_inputs(config.vocab_size)
        fns, stops = ours(config, params, x)
        fns["hf generate"], hf_warmup = huggingface(config, params, x)
        if shape != "tiny":  # the generic sampler once is enough
            del fns["ours predict_batch"]
        counts = {k: [] for k in fns}

        def counted(name):
            return lambda: counts[name].append(fns[name]())

        times, cpu = common.interleaved({k: counted(k) for k in fns}, reps, warmup=1,
                                        budget_s=60 if quick else 150,
                                        warmups={"hf generate": hf_warmup})
        rate = {k: sum(counts[k][-len(times[k]):]) / sum(times[k]) for k in fns}
        for name in fns:
            s = common.median(times[name])
            toks = sum(counts[name][-len(times[name]):]) / len(times[name])
            data[f"{shape} {name}"] = {"call_s": s, "new_tokens_per_call": toks,
                                       "new_tokens_per_s": rate[name],
                                       "vs_hf": rate[name] / rate["hf generate"],
                                       "times": times[name], "cpu_times": cpu[name]}
            rows.append([shape, name, BATCH, f"{toks:.0f}", f"{s:.3f}",
                         f"{rate[name]:,.0f}", f"{rate[name] / rate['hf generate']:.2f}x",
                         f"{common.median(cpu[name]):.2f}"])
    notes = [f"batch {BATCH}, {INPUTS_LENGTH}-token inputs with {NUM_SPANS} sentinels, up to "
             f"{NEW_TOKENS} new tokens, top-p {TOP_P} (HF: top_k=0), randomly initialised "
             "weights shared by both (rows rarely stop early, so both decode about the full "
             "budget).",
             "new tokens/s = emitted tokens (per row up to its first EOS/stop) summed over the "
             "timed calls / their wall time; a call includes the encoder and host transfer.",
             f"torch threads {threads}; medians of up to {reps} interleaved repetitions."]
    return {"name": "teacher_sampling",
            "title": "Teacher sampling (top-p 0.9): new tokens/s, ours vs HF generate",
            "headers": ["shape", "impl", "batch", "new tokens/call", "call s", "new tokens/s",
                        "vs HF", "CPU s"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
