"""Benchmark 2: teacher sampling over a grid of T5 shapes, new tokens per second.

Ours: the SSR teacher's jitted sampler (`ssr_jax.ssr.teacher.Teacher.generate`: encoder
once, KV-cached decoder steps in one `lax.while_loop`, per-example keys and stop tokens)
with the teacher's default sampler (top-k 50, then top-p 0.9 on the renormalised k: the
paper's HF generate(do_sample=True, top_p=0.9) with its implicit top_k=50) and with top-p
0.9 alone. Hugging Face: `generate(do_sample=True, top_k=50, top_p=0.9)` /
`(top_k=0, top_p=0.9)` of transformers' T5 in PyTorch with the same weights (exported by
our converter) on the same inputs. On full runs also the default sampler with one
`jax.lax.top_k` over the vocabulary (the path before `decoding.top_k_candidates`).

Each shape's contenders run interleaved repetition by repetition together with a plain
fp32 matmul, whose FLOP/s turn the call's analytic FLOPs (encoder, cross-attention keys,
every decoding step: `flops.t5_generate_flops`) into a compute bound in seconds.

Inputs look like SSR teacher inputs (3 sentinels, EOS last); up to 48 new tokens per row.
New tokens are counted per row up to and including its first EOS (or, for ours, its stop
sentinel: HF has no per-row stop token and decodes on).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import train_step  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env()


def _t5(version, d_model, heads, d_ff, layers, vocab):
    """T5Config overrides: '1.0' (ReLU, tied embeddings) or '1.1' (gated GELU, untied)."""
    arch = (dict(feed_forward_proj="relu", tie_word_embeddings=True) if version == "1.0"
            else dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    return dict(arch, d_model=d_model, num_heads=heads, d_kv=64 if d_model >= 256 else 32,
                d_ff=d_ff, num_encoder_layers=layers, num_decoder_layers=layers,
                vocab_size=vocab)


SHAPES = {
        # name: (T5Config overrides, batch, inputs length)
        "1.1 d256 v8k (issue 14)": (_t5("1.1", 256, 4, 1024, 4, 8192), 64, 128),
        "1.0 d128 v4k": (_t5("1.0", 128, 4, 512, 2, 4096), 32, 128),
        "1.1 d128 v32k": (_t5("1.1", 128, 4, 256, 2, 32128), 64, 128),
        "1.0 d512 v16k": (_t5("1.0", 512, 8, 2048, 2, 16384), 32, 128),
        "1.1 d768 v32k": (_t5("1.1", 768, 12, 2048, 2, 32128), 32, 128),
        "1.1 d256 v8k L512": (_t5("1.1", 256, 4, 1024, 4, 8192), 32, 512),
}
QUICK_SHAPES = ("1.1 d256 v8k (issue 14)", "1.0 d128 v4k")
REPS = 2  # HF generate takes up to a minute a call here: the budget allows two
NEW_TOKENS, NUM_SPANS = 48, 3
SAMPLERS = {"default": (50, 0.9), "top-p": (0, 0.9)}  # name: (top_k, top_p)
BEFORE = "default, one lax.top_k"  # the previous top-k path, full runs only, on these:
BEFORE_SHAPES = ("1.1 d256 v8k (issue 14)", "1.1 d128 v32k", "1.1 d768 v32k")


def teacher_inputs(vocab_size: int, batch: int, length: int, seed: int = 0):
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    x = rng.randint(3, vocab_size - 100, (batch, length)).astype(np.int32)
    for k in range(NUM_SPANS):  # <extra_id_k> = vocab_size - 1 - k, in order
        x[:, (k + 1) * length // (NUM_SPANS + 2)] = vocab_size - 1 - k
    x[:, -1] = 1
    return x


def ours(config, params, x, top_k: int, top_p: float, one_top_k: bool = False):
    """A callable returning the new tokens of one teacher call. one_top_k compiles the
    sampler with `top_k_candidates` taking its one-`lax.top_k` branch at every vocabulary
    size (the previous top-k path, plus its tie check)."""
    import functools  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.models import decoding  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.base import DecodeConfig  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    model = EncoderDecoderModel(config)
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    shardings = partitioner.param_shardings(model.abstract_params(), model.param_logical_axes())
    params = jax.device_put(params, shardings)
    decode = DecodeConfig(method="sample", max_decode_length=NEW_TOKENS, top_k=top_k,
                          top_p=top_p)
    batch = x.shape[0]
    stops = teacher_lib.stop_tokens(np.full((batch,), NUM_SPANS), config.vocab_size)
    g = partitioner.make_global_batch({"inputs": x, "stops": stops,
                                       "lens": np.full((batch,), NEW_TOKENS, np.int32)})
    keys = lambda call: partitioner.make_global_batch(  # noqa: E731
            {"k": teacher_lib.example_keys(x, call)})["k"]
    # A fresh jit (not teacher_lib.sampler's cache), compiled here: the variant's constant
    # only has to hold while tracing.
    bs = partitioner.batch_sharding()
    jitted = jax.jit(functools.partial(teacher_lib._sample, model, decode),  # pylint: disable=W0212
                     in_shardings=(shardings, bs, bs, bs, bs), out_shardings=bs)
    saved = decoding.CHUNKED_FROM
    decoding.CHUNKED_FROM = 10**9 if one_top_k else saved
    try:
        with partitioner.activation_context():
            compiled = jitted.lower(params, g["inputs"], keys(0), g["stops"],
                                    g["lens"]).compile()
    finally:
        decoding.CHUNKED_FROM = saved
    counter = {"calls": 0}

    def run():
        counter["calls"] += 1
        out = compiled(params, g["inputs"], keys(counter["calls"]), g["stops"], g["lens"])
        return common.new_tokens(jax.device_get(out), stops, NEW_TOKENS)

    return run


def huggingface(model, config, x, top_k: int, top_p: float):
    """(call returning new tokens, a cheap warm-up call) of HF generate."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    ids = torch.from_numpy(x.astype(np.int64))
    mask = torch.ones_like(ids)

    def generate(max_new_tokens):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 top_p=top_p, top_k=top_k, temperature=1.0,
                                 max_new_tokens=max_new_tokens, eos_token_id=config.eos_id,
                                 pad_token_id=config.pad_id,
                                 decoder_start_token_id=config.decoder_start_token_id)
        # Drop the start token; rows stop at EOS (no per-row stop sentinel in HF).
        return common.new_tokens(out[:, 1:].numpy(), [-1] * x.shape[0], max_new_tokens)

    return (lambda: generate(NEW_TOKENS)), (lambda: generate(2))


def measure_shape(name, overrides, batch, length, quick, rows, data):
    import time  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.models.flops import t5_generate_flops  # pylint: disable=C0415
    config = T5Config(**overrides)
    params = common.random_params(EncoderDecoderModel(config))
    x = teacher_inputs(config.vocab_size, batch, length)
    t0 = time.perf_counter()
    fns = {}
    for sampler, (top_k, top_p) in SAMPLERS.items():
        fns[f"{sampler}|ours"] = ours(config, params, x, top_k, top_p)
    if not quick and name in BEFORE_SHAPES:
        fns[f"{BEFORE}|ours"] = ours(config, params, x, *SAMPLERS["default"], one_top_k=True)
    compile_s = time.perf_counter() - t0
    warmups = {k: (lambda: None) for k in fns}  # compiled above
    hf = train_step.hf_model(config, params)
    hf.eval()
    for sampler, (top_k, top_p) in SAMPLERS.items():
        key = f"{sampler}|hf generate"
        fns[key], warmups[key] = huggingface(hf, config, x, top_k, top_p)
    matmul, n = common.matmul_runner(), 2048
    counts = {k: [] for k in fns}

    def counted(k):
        return lambda: counts[k].append(fns[k]())

    timed = {k: counted(k) for k in fns}
    timed["matmul"] = matmul
    times, cpu = common.interleaved(timed, REPS, warmup=1, warmups=warmups)
    print(f"{name}: {time.perf_counter() - t0:.0f} s ({compile_s:.0f} s compiling)",
          file=sys.stderr, flush=True)
    matmul_flops = 2.0 * n ** 3 / common.median(times["matmul"])
    bound_s = t5_generate_flops(config, batch, length, NEW_TOKENS) / matmul_flops
    rate = {k: sum(counts[k][-len(times[k]):]) / sum(times[k]) for k in fns}
    data[name] = {"config": overrides, "batch": batch, "inputs_length": length,
                  "compute_bound_s": bound_s, "matmul_flops": matmul_flops,
                  "compile_s": compile_s}
    for k in fns:
        sampler, impl = k.split("|")
        hf_key = f"{'default' if sampler == BEFORE else sampler}|hf generate"
        s = common.median(times[k])
        toks = sum(counts[k][-len(times[k]):]) / len(times[k])
        data[f"{name} {sampler} {impl}"] = {
                "call_s": s, "new_tokens_per_call": toks, "new_tokens_per_s": rate[k],
                "vs_hf": rate[k] / rate[hf_key], "of_bound": bound_s / s,
                "hf_call_s": common.median(times[hf_key]), "times": times[k],
                "cpu_times": cpu[k]}
        rows.append([name, sampler, impl, batch, length, f"{toks:.0f}", f"{s:.2f}",
                     f"{rate[k]:,.0f}", f"{rate[k] / rate[hf_key]:.2f}x",
                     f"{100 * bound_s / s:.0f}%", f"{common.median(cpu[k]):.2f}"])


def run(quick: bool):
    threads = common.torch_threads()
    names = QUICK_SHAPES if quick else tuple(SHAPES)
    rows, data = [], {"shapes": list(names)}
    for name in names:
        measure_shape(name, *SHAPES[name], quick, rows, data)
    notes = [f"up to {NEW_TOKENS} new tokens per row, {NUM_SPANS} sentinels in each input, "
             "randomly initialised weights shared by both sides; shapes are T5 version, "
             "d_model, vocabulary (L512: 512-token inputs, else 128); "
             "1.0 = ReLU + tied embeddings, 1.1 = gated GELU; see SHAPES in "
             "bench/teacher_sampling.py for heads, d_ff and layers.",
             "default = top-k 50 then top-p 0.9 (HF top_k=50, top_p=0.9); top-p = top-p 0.9 "
             "alone (HF top_k=0). vs HF compares with HF's row of the same sampler."
             + ("" if quick else f" '{BEFORE}': the default sampler compiled with one "
                "jax.lax.top_k over the vocabulary (the previous path; on 3 shapes)."),
             "new tokens/s = emitted tokens (per row up to its first EOS/stop) summed over the "
             "timed calls / their wall time; a call includes the encoder and host transfer.",
             "of bound = compute bound / call s, the bound being the call's analytic matmul "
             "FLOPs (flops.t5_generate_flops: encoder, cross-attention keys, every step) at "
             "the FLOP/s of a 2048^3 fp32 jnp.dot timed in the same interleaved loop.",
             f"torch threads {threads}; medians (means) of {REPS} interleaved repetitions per "
             "shape."]
    return {"name": "teacher_sampling",
            "title": "Teacher sampling grid: new tokens/s, ours vs HF generate vs compute bound",
            "headers": ["shape", "sampler", "impl", "batch", "inputs", "new tokens/call",
                        "call s", "new tokens/s", "vs HF", "of bound", "CPU s"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
