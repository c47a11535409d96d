"""Benchmark 4: what online SSR costs per training step, against plain span corruption.

The real training loop (`ssr_jax.train.trainer.train`) runs the default SSR student
(gin/experiments/default_student_ssr.gin: d_model 64, 2+2 layers, vocabulary 4224, batch 16
x 128/32, 2 examples per row: 24 SSR + 8 span-corruption examples per step) with
  * span corruption only (the baseline: the same student, batch and lengths), and
  * online SSR (`ssr_jax.ssr.spec.online`, what the gin objective binds) with a teacher of the
    student's size (1x) and one 4x its non-embedding parameters (the tiny T5 1.1 shape of
    the default teacher: d_model 128, 2+2 layers).
Teachers are random-weight checkpoints written for the run; they sample top-p 0.9 up to
their per-example budgets (random weights rarely stop early, so this is the worst case).
Step time = wall seconds per step over the log windows after the first (which compiles).
"""
import contextlib
import io
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position
import input_pipeline  # noqa: E402  pylint: disable=wrong-import-position

common.setup_env(__name__)

STUDENT = input_pipeline.STUDENT
TEACHERS = {"1x": STUDENT, "4x": input_pipeline.TINY}
LENGTHS = input_pipeline.LENGTHS
BATCH = input_pipeline.BATCH


def layer_params(overrides) -> int:
    """Parameters outside the embedding / output tables."""
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    c = T5Config(**overrides)
    inner = c.num_heads * c.d_kv
    mlp = 3 * c.d_model * c.d_ff
    return (c.num_encoder_layers * (4 * c.d_model * inner + mlp)
            + c.num_decoder_layers * (8 * c.d_model * inner + mlp))


def write_teacher(root: str, overrides) -> str:
    import dataclasses  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
    config = T5Config(**overrides)
    params = common.random_params(EncoderDecoderModel(config), seed=1)
    checkpoints.save_params(os.path.join(root, "1"), params, dataclasses.asdict(config))
    return root


def train_seconds_per_step(task: str, steps: int, log_every: int, factory=None):
    """Median wall seconds per step of the log windows after the first."""
    from ssr_jax.models.config import T5Config  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.partitioning import Partitioner  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import optimizers, trainer  # pylint: disable=import-outside-toplevel
    from ssr_jax.train.checkpoints import CheckpointConfig  # pylint: disable=C0415
    from ssr_jax.data.dataset import DatasetConfig  # pylint: disable=C0415
    with tempfile.TemporaryDirectory() as model_dir, contextlib.redirect_stdout(io.StringIO()):
        result = trainer.train(
                model=EncoderDecoderModel(T5Config(**STUDENT)), model_dir=model_dir,
                train_dataset=DatasetConfig(task, LENGTHS, batch_size=BATCH, module="tasks"),
                train_steps=steps, optimizer=optimizers.adafactor(learning_rate=1e-3),
                partitioner=Partitioner({"data": -1}),
                checkpoint=CheckpointConfig(save_every=10 ** 9, keep=1, async_save=False),
                eval_every=0, log_every=log_every, input_stage_factory=factory)
    windows = [1.0 / m["timing/steps_per_second"] for m in result.train_metrics[1:]
               if m["step"] % log_every == 0]
    return common.median(windows), windows


def run(quick: bool):
    from ssr_jax.data.dataset import DatasetConfig  # pylint: disable=C0415
    from ssr_jax.ssr import spec as ssr_spec  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr.stage import SsrStageConfig  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr.teacher import TeacherConfig  # pylint: disable=import-outside-toplevel
    log_every = 4 if quick else 8
    steps = log_every * (3 if quick else 4)
    stage = SsrStageConfig(examples_per_row=2, span_corruption_examples=8,
                           span_corruption_task="ssr_default_span_corruption", probe_every=0)
    rows, data = [], {}
    base_s, base_w = train_seconds_per_step("ssr_default_span_corruption", steps, log_every)
    data["span corruption"] = {"step_s": base_s, "windows": base_w}
    rows.append(["span corruption (baseline)", "-", f"{base_s:.3f}", "1.00x", "-"])
    student_layers = layer_params(STUDENT)
    with tempfile.TemporaryDirectory() as root:
        for name, overrides in TEACHERS.items():
            path = write_teacher(os.path.join(root, name), overrides)
            spec = ssr_spec.online(TeacherConfig(checkpoint_path=path, top_p=0.9), stage,
                                   input_pipeline.VOCAB_SIZE)
            factory = ssr_spec.input_stage_factory(spec, DatasetConfig(
                    "ssr_default_ssr_masked", LENGTHS, batch_size=BATCH, module="tasks"))
            s, w = train_seconds_per_step("ssr_default_ssr_masked", steps, log_every, factory)
            ratio = layer_params(overrides) / student_layers
            data[f"online SSR teacher {name}"] = {"step_s": s, "windows": w,
                                                  "teacher_layer_params_ratio": ratio}
            rows.append([f"online SSR, teacher {name}", f"{ratio:.1f}", f"{s:.3f}",
                         f"{s / base_s:.2f}x", f"{s - base_s:.3f}"])
    notes = [f"{steps} steps per run, windows of {log_every}; the first window (compilation) "
             "is left out; step s = median over the other windows.",
             "teacher size = its non-embedding parameters over the student's (embedding "
             "tables: 2x for the 4x teacher).",
             "SSR steps include the teacher's sampling of 24 examples (dispatched before the "
             "student step, overlapped by JAX's async dispatch), the host rewrite and packing."]
    return {"name": "online_ssr",
            "title": "Online SSR: step time vs span corruption (default student, CPU)",
            "headers": ["objective", "teacher:student params", "step s", "vs span corruption",
                        "extra s/step"],
            "rows": rows, "notes": notes, "data": data}


if __name__ == "__main__":
    common.main(run)
