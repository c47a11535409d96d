"""GPU benchmark: the online SSR training step with a teacher about 4x the student, against a
span-corruption step, on one GPU.

Student: T5 1.1 base at 512/114, batch 64, bf16 activations (the gpu_mfu step, same program).
Teacher: T5 1.1 large held in bf16 (3.6x the student's attention + MLP weights, printed),
sampling top-p 0.9 after top-k 50 for the step's 64 SSR examples: 512-token teacher inputs
with 38 sentinels, up to 228 new tokens each (the SSR budget of a 512/114 slot; the
gpu_sampling program at batch 64, same shapes).
One online SSR step does what `ssr_jax.ssr.stage.SSRStage` makes the devices do per step, in
its order: dispatch the teacher for the next step, dispatch the student step, fetch the
fills to the host, wait for the student. The host's rewrite + packing is not included: its
module needs TensorFlow (absent on the GPU image) and in the loop it overlaps the student
step (bench/input_pipeline.py measures it per CPU core). Random weights rarely stop early,
so the teacher decodes about its whole budget: the worst case.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import gpu_card  # noqa: E402  pylint: disable=wrong-import-position
import gpu_mfu  # noqa: E402  pylint: disable=wrong-import-position
import gpu_sampling  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

SMOKE_STUDENT = (gpu_sampling.TINY, 4)
SMOKE_TEACHER = dict(gpu_sampling.TINY, d_model=128, d_kv=32, d_ff=256)  # 4x the attn + MLP
HEADERS = ["step", "s/step", "vs span corruption", "extra s/step", "student tokens/s"]


def layer_weights(config) -> int:
    """Attention + MLP kernel parameters of a T5Config (what 'Nx the student' compares)."""
    import math  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            EncoderDecoderModel(config).abstract_params()):
        name = jax.tree_util.keystr(path)
        if "kernel" in name and ("attention" in name or "'mlp'" in name):
            total += math.prod(leaf.shape)
    return total


def run(args):
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    import train_step  # pylint: disable=import-outside-toplevel
    title = "GPU online SSR step (teacher T5 1.1 large, student base) vs span corruption"
    gpu = gpu_card.on_gpu()
    if not gpu and not args.smoke:
        rows = [[name, "not measured", "-", "-", "-"] for name in (
                "span corruption", "online SSR", "teacher call alone")]
        return gpu_card.not_measured("gpu_ssr_step", title, HEADERS, rows,
                                     "no GPU on this machine; bench/gpu.sh on a GPU runs it.")
    dtype = "bfloat16" if gpu else "float32"
    if args.smoke:
        (student_o, batch_size), teacher_o = SMOKE_STUDENT, SMOKE_TEACHER
        li, lt = gpu_sampling.SMOKE_INPUTS, 8
        max_len = gpu_sampling.SMOKE_NEW
    else:
        student_o, batch_size = gpu_mfu.SIZES["base"]
        teacher_o = gpu_sampling.LARGE
        li, lt = gpu_mfu.INPUTS_LENGTH, gpu_mfu.TARGETS_LENGTH
        max_len = gpu_sampling.NEW_TOKENS
    student = T5Config(**student_o, dtype=dtype, attention_impl="dot_product_attention")
    teacher32 = T5Config(**teacher_o, dtype="float32", dropout_rate=0.0)
    teacher = teacher32.replace(dtype=dtype, param_dtype=dtype)
    ratio = layer_weights(teacher) / layer_weights(student)
    batch = train_step.random_batch(student.vocab_size, batch_size, 0, li, lt)
    student_step, _, _ = train_step.ours(student, batch)
    params = jax.device_put(jax.tree.map(
            lambda a: a.astype(dtype), common.random_params(EncoderDecoderModel(teacher32))))
    x, spans = gpu_sampling.teacher_inputs(teacher.vocab_size, batch_size, li, seed=1)
    teacher_call = gpu_sampling.TeacherCall(teacher, params, x, spans, max_len)

    def ssr_step():  # the loop's device work per step, in its order
        fills = teacher_call.dispatch()
        student_step()
        return teacher_call.fetch(fills)

    reps = 2 if args.smoke else 3
    times, _ = common.interleaved({"span corruption": student_step, "online SSR": ssr_step,
                                   "teacher call alone": teacher_call}, reps, warmup=1)
    base = common.median(times["span corruption"])
    tokens = batch_size * (li + lt)
    rows, data = [], {"measured": True, "teacher_to_student_weights": ratio, "dtype": dtype}
    for name in ("span corruption", "online SSR", "teacher call alone"):
        s = common.median(times[name])
        student_rate = "-" if name == "teacher call alone" else f"{tokens / s:,.0f}"
        rows.append([name, f"{s:.3f}", f"{s / base:.2f}x", f"{s - base:+.3f}", student_rate])
        data[name] = {"step_s": s, "times": times[name]}
    notes = [f"teacher:student attention + MLP weights {ratio:.1f}x; {dtype}; student batch "
             f"{batch_size} x {li}/{lt}; {batch_size} SSR examples per step, {li}-token "
             f"teacher inputs, up to {max_len} new tokens; medians of {reps} interleaved "
             "repetitions.",
             "online SSR = teacher dispatched, student step dispatched, fills fetched, "
             "student awaited (the loop's device work); host rewrite + packing not included."]
    return {"name": "gpu_ssr_step",
            "title": (title + f" on {gpu_card.card_name()}") if gpu else title + " (smoke)",
            "headers": HEADERS, "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    gpu_card.main(run)
