"""GPU benchmark: SSR teacher sampling, new tokens/s, ours vs Hugging Face generate on the same
GPU, and against the memory-bandwidth bound.

The teacher: T5 1.1 large (the paper's teacher size) with random weights held in bf16 (params
and activations, `TeacherConfig.dtype='bfloat16'`), batch 64 and 256, 512-token inputs shaped
like SSR teacher inputs at 512/114 (38 sentinels, 7.5% of the length; EOS last), up to 228 new
tokens (the SSR budget of a 512/114 slot: fill_ratio 2 x 114). Both sides sample with the
paper's setting: top-p 0.9 after top-k 50, temperature 1 (ours: the teacher's jitted sampler,
`ssr_jax.ssr.teacher.Teacher`; HF: `generate(do_sample=True, top_p=0.9, top_k=50)`, the
implicit top_k made explicit, on the same weights in bf16). New tokens are counted per row up
to its first EOS (ours also its stop sentinel); random weights rarely stop early.

The bound: each decoding step must read, at least once, the decoder's weights used per step
(self-attention, cross-attention query/output, MLP, norms, the output layer; the
cross-attention keys/values are projected once), the self-attention cache up to the current
position and the cross-attention cache, at the card's memory bandwidth (gpu_card's table);
the encoder is left out, so the bound is an upper limit on new tokens/s.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import gpu_card  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

LARGE = dict(d_model=1024, num_heads=16, d_kv=64, d_ff=2816, num_encoder_layers=24,
             num_decoder_layers=24)
TINY = dict(vocab_size=512, d_model=64, num_heads=4, d_kv=16, d_ff=128, num_encoder_layers=2,
            num_decoder_layers=2)
BATCHES, INPUTS_LENGTH, NEW_TOKENS = (64, 256), 512, 228
SMOKE_BATCHES, SMOKE_INPUTS, SMOKE_NEW = (4, 8), 32, 8
TOP_P, TOP_K = 0.9, 50
HEADERS = ["impl", "batch", "new tokens/call", "call s", "new tokens/s", "vs HF",
           "bound tokens/s", "of bound"]


def teacher_inputs(vocab_size: int, batch: int, length: int, seed: int = 0):
    """(inputs [batch, length], spans per row): random ids with n = 7.5% of the length
    sentinels <extra_id_0..n-1> in order, EOS last (an SSR teacher input's layout)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax import vocab as vocab_lib  # pylint: disable=import-outside-toplevel
    rng = np.random.RandomState(seed)
    spans = max(1, round(0.075 * length))
    x = rng.randint(3, vocab_size - 100, (batch, length)).astype(np.int32)
    for b in range(batch):
        at = np.sort(rng.choice(np.arange(1, length - 1), spans, replace=False))
        x[b, at] = vocab_lib.sentinel(vocab_size, np.arange(spans))
    x[:, -1] = 1
    return x, np.full((batch,), spans, np.int64)


def decode_step_weights(model) -> int:
    """Parameters one decoding step reads: the decoder's, minus the cross-attention key/value
    kernels (projected once per call), plus the output layer (the embedding when tied)."""
    import math  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.abstract_params()):
        name = jax.tree_util.keystr(path)
        if "encoder_decoder_attention" in name and ("'key'" in name or "'value'" in name):
            continue
        tied_output = model.config.tie_word_embeddings and "token_embedder" in name
        if name.startswith("['decoder']") or tied_output:
            total += math.prod(leaf.shape)
    return total


def bandwidth_bound(model, batch: int, inputs_length: int, steps: int, bytes_per_value: int,
                    bandwidth: float):
    """{bytes, seconds, tokens_per_s} of `steps` decoding steps reading the per-step weights
    and the K/V caches (self-attention up to each step's position) once, at `bandwidth`."""
    c = model.config
    inner = c.num_heads * c.d_kv
    weights = decode_step_weights(model)
    total = 0
    for t in range(steps):
        kv = 2 * c.num_decoder_layers * batch * inner * ((t + 1) + inputs_length)
        total += (weights + kv + batch * c.d_model) * bytes_per_value  # + embedding rows
    seconds = total / bandwidth
    return {"bytes": total, "seconds": seconds, "tokens_per_s": batch * steps / seconds,
            "weights_per_step": weights}


class TeacherCall:
    """The teacher's jitted sampler on fixed inputs: `dispatch()` (async, fresh keys per
    call), `fetch(out)` -> new tokens on the host; calling it does both."""

    def __init__(self, config, params, x, spans, max_len: int):
        import jax  # pylint: disable=import-outside-toplevel
        import numpy as np  # pylint: disable=import-outside-toplevel
        from ssr_jax.models.base import DecodeConfig  # pylint: disable=C0415
        from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
        from ssr_jax.partitioning import Partitioner  # pylint: disable=C0415
        from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=C0415
        self.teacher_lib, self.x, self.max_len, self.calls = teacher_lib, x, max_len, 0
        model = EncoderDecoderModel(config)
        self.partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
        shardings = self.partitioner.param_shardings(model.abstract_params(),
                                                     model.param_logical_axes())
        decode = DecodeConfig(method="sample", max_decode_length=max_len, top_p=TOP_P,
                              top_k=TOP_K)
        self.teacher = teacher_lib.Teacher(model, params, self.partitioner, decode, shardings)
        self.stops = teacher_lib.stop_tokens(spans, config.vocab_size)
        self.g = self.partitioner.make_global_batch(
                {"inputs": x, "stops": self.stops,
                 "lens": np.full((x.shape[0],), max_len, np.int32)})

    def dispatch(self):
        self.calls += 1
        keys = self.partitioner.make_global_batch(
                {"k": self.teacher_lib.example_keys(self.x, self.calls)})["k"]
        g = self.g
        return self.teacher.generate(g["inputs"], keys, g["stops"], g["lens"])

    def fetch(self, out) -> int:
        import jax  # pylint: disable=import-outside-toplevel
        return common.new_tokens(jax.device_get(out), self.stops, self.max_len)

    def __call__(self) -> int:
        return self.fetch(self.dispatch())


def huggingface(hf, config, x, max_len: int, device):
    """(callable -> new tokens of one generate call, a 2-token warm-up)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    ids = torch.from_numpy(x.astype(np.int64)).to(device)
    mask = torch.ones_like(ids)

    def generate(n):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=TOP_P,
                              top_k=TOP_K, temperature=1.0, max_new_tokens=n,
                              eos_token_id=config.eos_id, pad_token_id=config.pad_id,
                              decoder_start_token_id=config.decoder_start_token_id)
        return common.new_tokens(out[:, 1:].cpu().numpy(), [-1] * len(x), n)
    return (lambda: generate(max_len)), (lambda: generate(2))


def run(args):
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    title = "GPU teacher sampling (T5 1.1 large, bf16): ours vs HF generate vs bandwidth bound"
    gpu = gpu_card.on_gpu()
    if not gpu and not args.smoke:
        rows = [[impl, b] + ["not measured"] + ["-"] * 5 for b in BATCHES
                for impl in ("ours teacher", "hf generate")]
        return gpu_card.not_measured("gpu_sampling", title, HEADERS, rows,
                                     "no GPU on this machine; bench/gpu.sh on a GPU runs it.")
    import torch  # pylint: disable=import-outside-toplevel
    import train_step  # pylint: disable=import-outside-toplevel
    batches, length, max_len = ((SMOKE_BATCHES, SMOKE_INPUTS, SMOKE_NEW) if args.smoke
                                else (BATCHES, INPUTS_LENGTH, NEW_TOKENS))
    dtype = "bfloat16" if gpu else "float32"
    config32 = T5Config(**(TINY if args.smoke else LARGE), dtype="float32", dropout_rate=0.0)
    config = config32.replace(dtype=dtype, param_dtype=dtype)  # as teacher_model_config
    params32 = common.random_params(EncoderDecoderModel(config32))
    device = "cuda" if gpu else "cpu"
    hf = train_step.hf_model(config32, params32).to(device=device,
                                                    dtype=getattr(torch, dtype)).eval()
    params = jax.device_put(jax.tree.map(lambda a: a.astype(dtype), params32))
    del params32
    card = gpu_card.card_name()
    bw = gpu_card.bandwidth(card, args.bandwidth_tb_s) if (gpu or args.bandwidth_tb_s) else None
    model = EncoderDecoderModel(config)
    reps = 2 if args.smoke else 3
    rows, data = [], {"measured": True, "card": card, "bandwidth": bw, "dtype": dtype}
    for batch in batches:
        x, spans = teacher_inputs(config.vocab_size, batch, length, seed=batch)
        fns = {"ours teacher": TeacherCall(config, params, x, spans, max_len)}
        fns["hf generate"], hf_warmup = huggingface(hf, config, x, max_len, device)
        counts = {k: [] for k in fns}
        counted = {k: (lambda k=k: counts[k].append(fns[k]())) for k in fns}
        times, _ = common.interleaved(counted, reps, warmup=1,
                                      warmups={"hf generate": hf_warmup})
        rate = {k: sum(counts[k][-len(times[k]):]) / sum(times[k]) for k in fns}
        bound = None
        if bw:
            bound = bandwidth_bound(model, batch, length, max_len,
                                    np.dtype(jax.numpy.dtype(dtype)).itemsize, bw)
        for name in fns:
            s = common.median(times[name])
            toks = sum(counts[name][-len(times[name]):]) / len(times[name])
            entry = {"call_s": s, "new_tokens_per_call": toks, "new_tokens_per_s": rate[name],
                     "vs_hf": rate[name] / rate["hf generate"], "times": times[name]}
            if bound:
                entry.update(bound_tokens_per_s=bound["tokens_per_s"],
                             of_bound=rate[name] / bound["tokens_per_s"])
            data[f"{batch} {name}"] = entry
            rows.append([name, batch, f"{toks:.0f}", f"{s:.3f}", f"{rate[name]:,.0f}",
                         f"{entry['vs_hf']:.2f}x",
                         f"{bound['tokens_per_s']:,.0f}" if bound else "-",
                         f"{100 * entry['of_bound']:.0f}%" if bound else "-"])
        if bound:
            data[f"{batch} bound"] = bound
        gpu_card.write_partial(args, {"name": "gpu_sampling", "title": title,
                                      "headers": HEADERS, "rows": rows, "data": data,
                                      "notes": []})
    notes = [f"{dtype} params and activations on both sides; inputs {length} tokens; up to "
             f"{max_len} new tokens; top-p {TOP_P} after top-k {TOP_K}; medians of {reps} "
             "interleaved calls after a warm-up (a call includes the encoder and the host "
             "fetch).",
             (f"bound at {bw / 1e12:.2f} TB/s ({card}; gpu_card's table or --bandwidth_tb_s): "
              "per step the decoder's per-step weights + self-attention K/V up to the step + "
              "cross-attention K/V, read once; encoder not included.") if bw else
             f"no memory bandwidth known for {card}: no bound (pass --bandwidth_tb_s)."]
    return {"name": "gpu_sampling", "title": title.replace("large, bf16", "tiny, smoke")
            if args.smoke else f"{title} on {card}",
            "headers": HEADERS, "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    gpu_card.main(run)
