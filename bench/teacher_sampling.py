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

common.setup_env(__name__)


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


def call_matmuls(config, batch: int, length: int, steps: int, decode: bool = True):
    """A callable doing the matmuls of one teacher call at their own shapes and nothing
    else: the encoder's projections, attention products and MLP over [batch * length] rows,
    the cross-attention keys/values, and (decode=True) `steps` decoder steps over [batch]
    rows in a `fori_loop` (self-attention over a steps-long cache, cross-attention, MLP,
    the vocabulary projection). Products are scaled to stay finite; no softmax, norm,
    sampling or cache write. Its time is the call's bound at this CPU's FLOP/s for the
    small per-step matmuls (batch rows), which a 2048^3 matmul overstates."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    c = config
    d, h, dk, inner = c.d_model, c.num_heads, c.d_kv, c.num_heads * c.d_kv
    ff = (2 if c.is_gated else 1) * c.d_ff
    drawn = [0]

    def w(*shape):  # a new key per weight, however many layers
        drawn[0] += 1
        key = jax.random.fold_in(jax.random.PRNGKey(1), drawn[0])
        return jax.random.normal(key, shape, jnp.float32) * shape[0] ** -0.5

    enc = [dict(qkv=w(d, 3 * inner), o=w(inner, d), wi=w(d, ff), wo=w(c.d_ff, d))
           for _ in range(c.num_encoder_layers)]
    dec = [dict(qkv=w(d, 3 * inner), so=w(inner, d), ckv=w(d, 2 * inner), cq=w(d, inner),
                co=w(inner, d), wi=w(d, ff), wo=w(c.d_ff, d))
           for _ in range(c.num_decoder_layers)]
    emb = w(d, c.vocab_size)
    x0, y0 = w(batch * length, d), w(batch, d)
    cache = w(batch, h, steps, dk)

    def mlp(x, p):
        hid = x @ p["wi"]
        hid = hid[:, :c.d_ff] * hid[:, c.d_ff:] if c.is_gated else hid
        return 0.5 * (x + hid @ p["wo"])

    def attend(q, k, v, n):  # q [b,(q,)h,dk] against k/v [b,n,h,dk]
        s = jnp.einsum("b...hd,bnhd->b...hn", q, k) / (n * dk)
        return jnp.einsum("b...hn,bnhd->b...hd", s, v)

    # Every product feeds a full sum, so that XLA cannot narrow a matmul to the slice used.
    def call(x, y):
        for p in enc:
            q, k, v = jnp.split((x @ p["qkv"]).reshape(batch, length, 3 * h, dk), 3, axis=2)
            x = 0.5 * (x + attend(q, k, v, length).reshape(-1, inner) @ p["o"])
            x = mlp(x, p)
        cross = [jnp.split((x @ p["ckv"]).reshape(batch, length, 2 * h, dk), 2, axis=2)
                 for p in dec]
        total = jnp.sum(x) + sum(jnp.sum(k) + jnp.sum(v) for k, v in cross)
        if not decode:
            return total
        self_kv = jnp.swapaxes(cache, 1, 2)

        def step(_, carry):
            yy, acc = carry
            for p, (ck, cv) in zip(dec, cross):
                q, k, v = jnp.split((yy @ p["qkv"]).reshape(batch, 3 * h, dk), 3, axis=1)
                acc = acc + jnp.sum(k) + jnp.sum(v)  # the real step writes them to its cache
                yy = 0.5 * (yy + attend(q, self_kv, self_kv, steps).reshape(batch, inner)
                            @ p["so"])
                cq = (yy @ p["cq"]).reshape(batch, h, dk)
                yy = 0.5 * (yy + attend(cq, ck, cv, length).reshape(batch, inner) @ p["co"])
                yy = mlp(yy, p)
            acc = acc + jnp.sum(yy @ emb)
            return y + 1e-30 * acc, acc

        return jax.lax.fori_loop(0, steps, step, (y, total))[1]

    f = jax.jit(call)
    jax.block_until_ready(f(x0, y0))
    return lambda: jax.block_until_ready(f(x0, y0))


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
    timed["own matmuls"] = call_matmuls(config, batch, length, NEW_TOKENS)
    timed["encoder matmuls"] = call_matmuls(config, batch, length, NEW_TOKENS, decode=False)
    times, cpu = common.interleaved(timed, REPS, warmup=1, warmups=warmups)
    print(f"{name}: {time.perf_counter() - t0:.0f} s ({compile_s:.0f} s compiling)",
          file=sys.stderr, flush=True)
    matmul_flops = 2.0 * n ** 3 / common.median(times["matmul"])
    bound_s = t5_generate_flops(config, batch, length, NEW_TOKENS) / matmul_flops
    rate = {k: sum(counts[k][-len(times[k]):]) / sum(times[k]) for k in fns}
    own_s, enc_s = common.median(times["own matmuls"]), common.median(times["encoder matmuls"])
    step_flops = (t5_generate_flops(config, batch, length, NEW_TOKENS)
                  - t5_generate_flops(config, batch, length, 0))
    data[name] = {"config": overrides, "batch": batch, "inputs_length": length,
                  "compute_bound_s": bound_s, "matmul_flops": matmul_flops,
                  "own_matmuls_s": own_s, "encoder_matmuls_s": enc_s,
                  "step_matmul_flops": step_flops / max(own_s - enc_s, 1e-9),
                  "compile_s": compile_s}
    for k in fns:
        sampler, impl = k.split("|")
        hf_key = f"{'default' if sampler == BEFORE else sampler}|hf generate"
        s = common.median(times[k])
        toks = sum(counts[k][-len(times[k]):]) / len(times[k])
        data[f"{name} {sampler} {impl}"] = {
                "call_s": s, "new_tokens_per_call": toks, "new_tokens_per_s": rate[k],
                "vs_hf": rate[k] / rate[hf_key], "of_bound": bound_s / s,
                "of_own_matmuls": own_s / s,
                "hf_call_s": common.median(times[hf_key]), "times": times[k],
                "cpu_times": cpu[k]}
        rows.append([name, sampler, impl, batch, length, f"{toks:.0f}", f"{s:.2f}",
                     f"{rate[k]:,.0f}", f"{rate[k] / rate[hf_key]:.2f}x",
                     f"{100 * bound_s / s:.0f}%", f"{100 * own_s / s:.0f}%",
                     f"{common.median(cpu[k]):.2f}"])


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
             "of own matmuls = the call's matmuls alone at their own shapes (call_matmuls: "
             "the encoder over batch x inputs rows, then each decoding step over batch rows, "
             "timed in the same loop) / call s: what bounds a call on this CPU is the FLOP/s "
             "of the decoder's batch-row matmuls, far below 2048^3's; the rest of the call "
             "is the sampler, softmax, norms and cache writes.",
             f"torch threads {threads}; medians (means) of {REPS} interleaved repetitions per "
             "shape."]
    for name in names:
        d = data[name]
        notes.append(
                f"{name}: its matmuls take {d['own_matmuls_s']:.2f} s at their own shapes "
                f"({d['encoder_matmuls_s']:.2f} s encoder + cross keys, the {NEW_TOKENS} "
                f"decoding steps at {d['step_matmul_flops'] / 1e9:.0f} GFLOP/s against "
                f"{d['matmul_flops'] / 1e9:.0f} for 2048^3) against "
                f"{d['compute_bound_s']:.2f} s at the 2048^3 rate.")
    return {"name": "teacher_sampling",
            "title": "Teacher sampling grid: new tokens/s, ours vs HF generate vs compute bound",
            "headers": ["shape", "sampler", "impl", "batch", "inputs", "new tokens/call",
                        "call s", "new tokens/s", "vs HF", "of bound", "of own matmuls",
                        "CPU s"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
