"""Benchmark 3: the input pipeline's examples per CPU-second against what the trainer eats.

Masking (issue 14): span corruption and SSR masking at 128/32 and 512/114, from tokenized
documents of the default corpus to examples with EOS (the task's preprocessors after seqio's
cache placeholder: `span_corruption` / `ssr_mask`, then `append_eos_after_trim`), on the
per-example path (`mask_batch_size=0`, today's: a dozen tf.data map stages) and the batched
one (the default, `ssr_jax/data/batched_masking.py`), alternating rep by rep in one process.
Each measurement is a fresh iterator read for a fixed number of examples, then dropped (so
no path's read-ahead runs in the other's window; the prefetched rest of the last batch is
charged to it). The documents come from memory in corpus order with no function per
document (~5 us each, included). The paths' first examples are checked equal. Consumer: T5
1.1 base on one H100 at 45% MFU, computed (not measured): examples/s = 0.45 x 989 TFLOP/s
(H100 SXM dense bf16 peak) / `t5_train_flops` of one example (one row: the inputs fill it),
cores = that / examples per CPU-second.

Producers, on the default corpus tasks (tasks/default.py) as the default runs use them:
  * span corruption: `InputPipeline('ssr_default_span_corruption')`, packed 128/32 rows;
  * SSR masking: `InputPipeline('ssr_default_ssr_masked')`, unpacked 64/16 slots, read with
    `next_examples` as the online SSR stage does;
  * SSR rewrite + pack: the stage's host work after the teacher (`rewrite_batch` of teacher
    outputs into student inputs, then packing 2 per 128/32 row), pure numpy; the teacher's
    output is the "perfect teacher" (`teacher_outputs_from_targets`), same lengths.
Rates are examples per CPU-second of the whole process (tf.data's threads included), i.e.
per core. Consumers (all cores): the tiny T5 1.1 trainer of gin/experiments/tiny_default.gin
(batch 16 x 128/32, packed span-corruption rows), and the default SSR student of
gin/experiments/default_student_ssr.gin (d_model 64, batch 16 x 128/32 with 24 SSR + 8
span-corruption examples per step; its teacher's time is benchmark 4's subject).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

VOCAB_SIZE = 4224  # default_spm.model: 4000 pieces + 100 sentinels, padded to 128
MASK_SHAPES = {"128/32": {"inputs": 128, "targets": 32}, "512/114": {"inputs": 512, "targets": 114}}
H100_BF16_DENSE_FLOPS = 989e12  # H100 SXM, dense bf16 (no sparsity)
CONSUMER_MFU = 0.45
T5_1_1_BASE = dict(vocab_size=32128, d_model=768, num_heads=12, d_kv=64, d_ff=2048,
                   num_encoder_layers=12, num_decoder_layers=12)
READ = 100  # examples per padded batch read from a masking pipeline
DOCUMENTS = 2000  # corpus documents the masking rows cycle through
LENGTHS = {"inputs": 128, "targets": 32}
SLOT = {"inputs": 64, "targets": 16}
BATCH = 16
SSR_PER_STEP, SC_PER_STEP = 24, 8
TINY = dict(vocab_size=VOCAB_SIZE, d_model=128, num_heads=4, d_kv=32, d_ff=256,
            num_encoder_layers=2, num_decoder_layers=2)
STUDENT = dict(vocab_size=VOCAB_SIZE, d_model=64, num_heads=4, d_kv=16, d_ff=128,
               num_encoder_layers=2, num_decoder_layers=2)


def examples_in(batch) -> int:
    """Examples in a packed batch: distinct non-zero segment ids per row."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    seg = batch["decoder_segment_ids"]
    return int(sum(len(np.unique(r[r > 0])) for r in seg))


def measure(fn, min_seconds: float, min_calls: int = 3):
    """Calls fn (returning an example count) until min_seconds of wall time have passed;
    returns (examples, wall s, CPU s, calls)."""
    n, calls = 0, 0
    t0, c0 = time.perf_counter(), common.cpu_seconds()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        n += fn()
        calls += 1
    return n, time.perf_counter() - t0, common.cpu_seconds() - c0, calls


def tokenized_documents():
    """The default corpus's first DOCUMENTS 'train' documents as int32 token arrays."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import seqio  # pylint: disable=import-outside-toplevel
    from ssr_jax.data.dataset import import_task_module  # pylint: disable=C0415
    import_task_module("tasks")
    task = seqio.get_mixture_or_task("ssr_default_span_corruption")
    vocab = task.output_features["targets"].vocabulary
    return vocab, [np.asarray(vocab.encode(ex["text"].decode("utf-8")), np.int32)
                   for ex in task.source.get_dataset("train", shuffle=False).take(DOCUMENTS)
                   .as_numpy_iterator()]


def document_source(docs):
    """{'targets'} documents in order, dense and variable-length as a tokenizer (or seqio's
    cache) hands them to the preprocessors, with no function per element: one dataset per
    document length, chosen from in corpus order."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    lengths = np.array([len(d) for d in docs])
    sizes, which = np.unique(lengths, return_inverse=True)
    parts = [tf.data.Dataset.from_tensor_slices(
        {"targets": np.stack([d for d in docs if len(d) == n]).reshape(-1, n)}) for n in sizes]
    return tf.data.Dataset.choose_from_datasets(
        parts, tf.data.Dataset.from_tensor_slices(which.astype(np.int64)))


def masking_dataset(objective: str, lengths, mask_batch_size: int, source, vocab):
    import seqio  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import span_corruption as sc  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import ssr_preprocessors as ssr  # pylint: disable=C0415
    features = {k: seqio.Feature(vocab) for k in ("inputs", "targets")}
    prep = sc.span_corruption if objective == "span corruption" else ssr.ssr_mask
    with seqio.map_seed_manager(0):
        ds = prep(source.repeat(), lengths, features, mask_batch_size=mask_batch_size)
        ds = seqio.preprocessors.append_eos_after_trim(ds, output_features=features)
    return ds.padded_batch(READ)


def masking(quick: bool):
    """({name: {path: per-rep examples/CPU-s}}, the source's docs/CPU-s, mean doc tokens)."""
    import gc  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    vocab, docs = tokenized_documents()
    source = document_source(docs)
    reps = 2 if quick else 3
    paths = {"per-example": 0, "batched": 128}
    count = {"128/32": {"per-example": 1000, "batched": 4000},
             "512/114": {"per-example": 300, "batched": 2000}}
    if quick:
        count = {k: {p: n // 3 for p, n in v.items()} for k, v in count.items()}
    datasets, rates = {}, {}
    for shape, lengths in MASK_SHAPES.items():
        for objective in ("span corruption", "SSR masking"):
            name = f"{objective} {shape}"
            datasets[name] = {p: masking_dataset(objective, lengths, b, source, vocab)
                              for p, b in paths.items()}
            first = [next(iter(ds)) for ds in datasets[name].values()]
            for key in first[0]:  # same seed, same examples on both paths
                np.testing.assert_array_equal(first[0][key], first[1][key])
            rates[name] = {p: [] for p in paths}

    def read(ds, n):
        it = iter(ds)
        c0 = common.cpu_seconds()
        for _ in range(n // READ):
            next(it)
        del it
        gc.collect()
        return n / max(common.cpu_seconds() - c0, 1e-9)

    for rep in range(reps):
        for name, by_path in datasets.items():
            order = list(by_path) if rep % 2 == 0 else list(by_path)[::-1]
            for path in order:
                rates[name][path].append(read(by_path[path], count[name.split()[-1]][path]))
    it = iter(source.repeat().padded_batch(512))
    next(it)
    c0 = common.cpu_seconds()
    for _ in range(100):
        next(it)
    source_rate = 51200 / (common.cpu_seconds() - c0)
    return rates, source_rate, float(np.mean([len(d) for d in docs]))


def consumer_examples_per_s(lengths) -> float:
    """Examples/s one H100 takes training T5 1.1 base at CONSUMER_MFU (computed)."""
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    flops = common.t5_train_flops(T5Config(**T5_1_1_BASE), 1, lengths["inputs"],
                                  lengths["targets"])
    return CONSUMER_MFU * H100_BF16_DENSE_FLOPS / flops


def masking_rows(rates, source_rate, mean_doc):
    """Table rows, data and notes of the masking measurements."""
    from ssr_jax.data import span_corruption as sc  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import ssr_preprocessors as ssr  # pylint: disable=C0415
    rows, data = [], {}
    for name, by_path in rates.items():
        lengths = MASK_SHAPES[name.split()[-1]]
        need = consumer_examples_per_s(lengths)
        raw = (sc.span_corruption_lengths(lengths["inputs"])[0] if name.startswith("span")
               else ssr.ssr_lengths(lengths["inputs"], lengths["targets"]).raw_length)
        base = common.median(by_path["per-example"])
        for path, xs in by_path.items():
            rate = common.median(xs)
            label = ("per-example (today, mask_batch_size=0)" if path == "per-example"
                     else "batched (default, 128 segments per call)")
            data[f"{name} {path}"] = {"examples_per_cpu_s": rate, "reps": xs,
                                      "vs_per_example": rate / base,
                                      "consumer_examples_per_s": need, "cores": need / rate,
                                      "raw_length": raw, "docs_per_example": raw / mean_doc}
            rows.append([name, label, f"{rate:,.0f} (+-{100 * common.spread(xs):.0f}%)",
                         f"{rate / base:.1f}x", "T5 1.1 base, 1 H100 @ 45% MFU (computed)",
                         f"{need:,.0f}", f"{need / rate:.2f}"])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    notes = [f"masking rows: tokenized documents of the default corpus (mean {mean_doc:.0f} "
             f"tokens, so ~{568 / mean_doc:.0f} documents per 512/114 span-corruption "
             "example) -> examples with EOS, through the task's preprocessors; medians of "
             "the reps (+- half the interquartile range); the memory source reads "
             f"{source_rate:,.0f} documents/CPU-s (included). Load average at the end: "
             f"{load} (a shared machine inflates CPU seconds too, both paths alike: they "
             "alternate).",
             "consumer (computed, not measured): 0.45 x 989e12 FLOP/s (H100 SXM dense bf16) "
             "/ t5_train_flops(T5 1.1 base, vocab 32128, one row of the shape); cores = that "
             "/ the row's examples per CPU-second. SSR masking feeds the SSR student (one "
             "student example per masked example), its teacher's cost not counted."]
    return rows, data, notes


def producers(quick: bool):
    from ssr_jax.data import packing  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import ssr_rewrite as sr  # pylint: disable=C0415
    from ssr_jax.data.dataset import import_task_module  # pylint: disable=C0415
    from ssr_jax.data.pipeline import InputPipeline  # pylint: disable=C0415
    from ssr_jax.ssr.stage import pad_rows  # pylint: disable=import-outside-toplevel
    import_task_module("tasks")
    seconds = 8 if quick else 25
    out = {}
    sc = InputPipeline("ssr_default_span_corruption", "train", LENGTHS, BATCH, seed=0)
    for _ in range(3):  # builds the corpus on first use, fills tf.data's buffers
        first = next(sc)
    out["span corruption (packed 128/32)"] = measure(lambda: examples_in(next(sc)), seconds)
    masked = InputPipeline("ssr_default_ssr_masked", "train", SLOT, SSR_PER_STEP, seed=0,
                           pack=False)
    masked.next_examples(3 * SSR_PER_STEP)
    kept = []

    def read_masked():
        exs = masked.next_examples(SSR_PER_STEP)
        if len(kept) < 20:
            kept.append(exs)
        return len(exs)

    out["SSR masking (slots 64/16)"] = measure(read_masked, seconds)
    vocab = masked.provider.output_features["inputs"].vocabulary
    steps = [(pad_rows([e["inputs"] for e in exs], SLOT["inputs"]),
              pad_rows([e["targets"] for e in exs], SLOT["targets"])) for exs in kept]
    state = {"i": 0}

    def rewrite_and_pack():
        inputs, targets = steps[state["i"] % len(steps)]
        state["i"] += 1
        outputs = sr.teacher_outputs_from_targets(targets, vocab.vocab_size, vocab.eos_id)
        rows, _ = sr.rewrite_batch(inputs, outputs, vocab.vocab_size, vocab.extra_ids,
                                    vocab.eos_id, targets=targets, max_length=SLOT["inputs"])
        examples = [{"inputs": r, "targets": t[t > 0]} for r, t in zip(rows, targets)]
        _, left = packing.pack_examples(examples, BATCH, LENGTHS["inputs"],
                                        LENGTHS["targets"])
        assert not left
        return len(examples)

    out["SSR rewrite + pack (host, numpy)"] = measure(rewrite_and_pack, seconds / 2)
    return out, first


def consumer_step_s(overrides, batch, reps: int):
    """Median wall seconds of our jitted train step on `batch` (one device, all cores)."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    import train_step  # pylint: disable=import-outside-toplevel
    fn, _, _ = train_step.ours(T5Config(**overrides), batch)
    times, _ = common.interleaved({"step": fn}, reps, warmup=1)
    del jax
    return common.median(times["step"])


def masking_as_on_accelerator_hosts(quick: bool):
    """`masking(quick)` in a child process without the CPU trainer's glibc malloc settings
    (ssr_jax.host_malloc, not applied on GPU/TPU hosts, whose accelerators these rows are
    about): with one malloc arena tf.data's threads contend (0.6-0.7x the examples per
    CPU-second at 512/114, bench/NOTES.md). In this process when the settings are off."""
    import json  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    from ssr_jax import host_malloc  # pylint: disable=import-outside-toplevel
    if not os.environ.get(host_malloc.DONE):
        return masking(quick)
    env = host_malloc.without(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import input_pipeline; "
            f"print(json.dumps(input_pipeline.masking({quick!r})))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"masking in a child process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool):
    # First: no other pipeline's threads yet.
    rates, source_rate, mean_doc = masking_as_on_accelerator_hosts(quick)
    produced, sc_batch = producers(quick)
    reps = 3 if quick else 6
    tiny_s = consumer_step_s(TINY, sc_batch, reps)
    student_s = consumer_step_s(STUDENT, sc_batch, reps)
    sc_per_step = examples_in(sc_batch)
    consume = {  # examples/s each trainer takes from each producer
            "span corruption (packed 128/32)": ("tiny T5 1.1 (tiny_default.gin)",
                                                sc_per_step / tiny_s),
            "SSR masking (slots 64/16)": ("SSR student (default_student_ssr.gin)",
                                          SSR_PER_STEP / student_s),
            "SSR rewrite + pack (host, numpy)": ("SSR student (default_student_ssr.gin)",
                                                 SSR_PER_STEP / student_s),
    }
    rows, masking_data, mask_notes = masking_rows(rates, source_rate, mean_doc)
    mask_notes.append("masking rows run without the CPU trainer's glibc malloc settings, as "
                      "on the GPU/TPU hosts they are about (masking_as_on_accelerator_hosts); "
                      "InputPipeline rows and their CPU consumers run with them (GLIBC_TUNABLES "
                      "in the machine block), as `ssr-jax train` on a CPU.")
    data = {"masking": masking_data, "source_docs_per_cpu_s": source_rate}
    for name, (examples, wall, cpu, calls) in produced.items():
        per_core = examples / max(cpu, 1e-9)
        consumer, rate = consume[name]
        data[name] = {"examples": examples, "wall_s": wall, "cpu_s": cpu, "calls": calls,
                      "examples_per_cpu_s": per_core, "examples_per_wall_s": examples / wall,
                      "consumer": consumer, "consumer_examples_per_s": rate,
                      "ratio": per_core / rate}
        rows.append([name, "InputPipeline (task default)", f"{per_core:,.0f}", "-", consumer,
                     f"{rate:,.0f}", f"{rate / per_core:.2f}"])
    data["tiny_step_s"], data["student_step_s"] = tiny_s, student_s
    data["span_corruption_examples_per_step"] = sc_per_step
    data["ssr_examples_per_step"] = SSR_PER_STEP
    notes = mask_notes + [
             "InputPipeline rows: the whole per-host pipeline (TFDS source, tokenizer, "
             f"preprocessors, Python reads, packing). Tiny trainer: {sc_per_step} packed "
             f"span-corruption examples per step of {BATCH} x 128/32 rows, {tiny_s:.3f} "
             f"s/step; SSR student: {SSR_PER_STEP} SSR + {SC_PER_STEP} span-corruption "
             f"examples per step, {student_s:.3f} s/step (student step only).",
             "per core = examples / process CPU seconds (all of tf.data's threads counted); "
             "cores to feed it = the consumer's examples/s over that.",
             "SSR masking and rewrite are compared here with the student step alone (as if the "
             "teacher were free); `make bench`'s target row uses the measured online SSR step "
             "(benchmark 4), the step that actually consumes masked examples.",
             "Profile: a tf.data map stage costs ~30-50 us of CPU per element here; the "
             "per-example masking path has about a dozen per example (and four per "
             "document); the batched path runs one map per 64 documents, one per group of "
             "128 documents and one tf.numpy_function per 128 segments, so what is left per "
             "example is the numpy masking itself, seqio's EOS map and the C++ batching."]
    return {"name": "input_pipeline",
            "title": "Input pipeline: examples per CPU-second and the cores a consumer needs",
            "headers": ["producer", "path", "examples/CPU-s (per core)", "vs per-example",
                        "consumer", "consumer examples/s", "cores to feed it"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
