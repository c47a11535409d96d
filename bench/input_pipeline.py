"""Benchmark 3: the input pipeline's examples per CPU-second against what the trainer eats.

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

common.setup_env()

VOCAB_SIZE = 4224  # default_spm.model: 4000 pieces + 100 sentinels, padded to 128
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


def producers(quick: bool):
    from ssr_jax.data import packing  # pylint: disable=import-outside-toplevel
    from ssr_jax.data import ssr_preprocessors as ssr  # pylint: disable=C0415
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
        outputs = ssr.teacher_outputs_from_targets(targets, vocab.vocab_size, vocab.eos_id)
        rows, _ = ssr.rewrite_batch(inputs, outputs, vocab.vocab_size, vocab.extra_ids,
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


def run(quick: bool):
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
    rows, data = [], {}
    for name, (examples, wall, cpu, calls) in produced.items():
        per_core = examples / max(cpu, 1e-9)
        consumer, rate = consume[name]
        data[name] = {"examples": examples, "wall_s": wall, "cpu_s": cpu, "calls": calls,
                      "examples_per_cpu_s": per_core, "examples_per_wall_s": examples / wall,
                      "consumer": consumer, "consumer_examples_per_s": rate,
                      "ratio": per_core / rate}
        rows.append([name, f"{per_core:,.0f}", f"{examples / wall:,.0f}", consumer,
                     f"{rate:,.0f}", f"{per_core / rate:.1f}x"])
    data["tiny_step_s"], data["student_step_s"] = tiny_s, student_s
    data["span_corruption_examples_per_step"] = sc_per_step
    data["ssr_examples_per_step"] = SSR_PER_STEP
    notes = [f"tiny trainer: {sc_per_step} packed span-corruption examples per step of "
             f"{BATCH} x 128/32 rows, {tiny_s:.3f} s/step; SSR student: {SSR_PER_STEP} SSR + "
             f"{SC_PER_STEP} span-corruption examples per step, {student_s:.3f} s/step "
             "(student step only).",
             "per core = examples / process CPU seconds (all of tf.data's threads counted); "
             "the ratio is that rate over the trainer's examples/s on all cores, i.e. how many "
             "times over one core keeps the trainer fed.",
             "SSR masking and rewrite are compared here with the student step alone (as if the "
             "teacher were free); `make bench`'s target row uses the measured online SSR step "
             "(benchmark 4), the step that actually consumes masked examples.",
             "Profile: tf.data costs ~30-50 us of CPU per example per map stage on this "
             "machine (about 12 stages: tokenize, chunk, concat/split, mask, EOS, casts), "
             "more than the masking arithmetic; a tf.numpy_function per example costs more "
             "(~300 us) than the ~70 small TF ops it would replace."]
    return {"name": "input_pipeline",
            "title": "Input pipeline: examples per CPU-second vs the trainer's consumption",
            "headers": ["producer", "examples/CPU-s (per core)", "examples/s (wall)",
                        "consumer", "consumer examples/s", "per core / consumption"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
