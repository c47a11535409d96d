"""`ssr-jax plan`: the per-device plan of a tiny sharded train step against the same step
compiled from real arrays and executed on 8 fake devices; the CLI on gin files (student and
online-SSR teacher), its re-run with another device count, and its errors."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from ssr_jax import plan
from ssr_jax.cli import plan as plan_cli
from ssr_jax.data import packing
from ssr_jax.errors import UserError
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.train import optimizers, steps
from ssr_jax.train import train_state as ts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = T5Config(vocab_size=512, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                  num_encoder_layers=1, num_decoder_layers=1)
BATCH, LENGTHS = 8, {"inputs": 32, "targets": 8}
# Shrinks gin/models/t5_1_1/tiny.gin and the default runs to test size.
TINY_BINDINGS = [f"--gin.{scope}/T5Config.{k}={v}" for scope in ("t5_1_1_tiny", "ssr_student")
                 for k, v in (("d_model", 32), ("d_ff", 64), ("num_heads", 2), ("d_kv", 16))]


def packed_batch(rng, batch, li, lt, vocab):
    """Random examples packed by the trainer's packer (2 per row)."""
    examples = [{"inputs": rng.randint(2, vocab, li // 2 - 1).astype(np.int32),
                 "targets": rng.randint(2, vocab, lt // 2 - 1).astype(np.int32)}
                for _ in range(2 * batch)]
    out, left = packing.pack_examples(examples, batch, li, lt)
    assert not left
    return out


def device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
               for s in leaf.addressable_shards if s.device == device)


@pytest.mark.parametrize("mesh, rules", [({"data": 2, "fsdp": 2, "model": 2}, "fsdp"),
                                         ({"data": 2, "model": 4}, "standard")])
def test_plan_matches_the_compiled_and_executed_step(mesh, rules):
    assert jax.device_count() == 8
    model = EncoderDecoderModel(CONFIG)
    optimizer = optimizers.adafactor(learning_rate=1e-2)
    partitioner = Partitioner(mesh, rules)
    p = plan.plan_train_step(model, optimizer, partitioner, BATCH, LENGTHS)
    assert p.num_devices == 8 and p.num_params == sum(
            x.size for x in jax.tree.leaves(model.abstract_params()))

    # The real thing: state initialised in its shardings, a real batch, compiled, executed.
    abstract = ts.abstract_state(model, optimizer)
    shardings = ts.state_shardings(partitioner, model, abstract)
    state = ts.init_state(model, optimizer, partitioner, shardings, seed=0)
    batch = partitioner.make_global_batch(
            packed_batch(np.random.RandomState(0), BATCH, LENGTHS["inputs"],
                         LENGTHS["targets"], CONFIG.vocab_size))
    step = steps.make_train_step(model, optimizer, partitioner, shardings)
    with partitioner.activation_context():
        compiled = step.jitted.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    real_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                 - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    assert abs(p.peak_bytes - real_peak) <= 0.1 * real_peak
    assert abs(p.activation_bytes - mem.temp_size_in_bytes) <= 0.1 * mem.temp_size_in_bytes
    assert p.peak_bytes >= p.params_bytes + p.opt_state_bytes + p.activation_bytes

    # Live buffers on device 0 before and after a step: the plan's params and optimizer
    # state are exactly this device's shards, its arguments what the step is given.
    assert p.params_bytes == device0_bytes(state.params)
    assert p.opt_state_bytes == device0_bytes(state.opt_state)
    live_args = device0_bytes(state) + device0_bytes(batch)
    assert abs(p.argument_bytes - live_args) <= 0.1 * live_args
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss_sum"]))
    assert device0_bytes(new_state.params) == p.params_bytes
    assert device0_bytes(new_state.opt_state) == p.opt_state_bytes
    # Sharding really splits the model: one device holds well under all of the params.
    assert p.params_bytes < 0.75 * 4 * p.num_params
    # FLOPs: XLA's count of the partitioned step, over all devices, covers the matmuls.
    assert p.model_flops > 0 and p.xla_flops_total > 0.8 * p.model_flops


def test_cli_plans_student_and_online_ssr_teacher(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = plan_cli.main(["--gin_file=gin/experiments/default_student_ssr.gin", *TINY_BINDINGS,
                    "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, "
                    "'targets': 8}", "--gin.SSR_SPAN_CORRUPTION_EXAMPLES=8",
                    "--gin.Partitioner.mesh_shape={'data': 4, 'fsdp': 1, 'model': 2}",
                    "--gin.TEACHER_CHECKPOINT=None",
                    "--gin.TeacherConfig.model_config=@t5_1_1_tiny/T5Config()",
                    "--gin_file=gin/models/t5_1_1/tiny.gin",
                    "--gin.MODEL=@ssr_student/EncoderDecoderModel()",
                    "--gin.VOCAB_SIZE=4224", f"--json={out}"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan on 8 fake CPU devices" in text and "teacher generate" in text
    student, teacher = json.loads(out.read_text())
    assert student["name"] == "student train step" and teacher["name"] == "teacher generate"
    assert student["mesh"] == {"data": 4, "fsdp": 1, "model": 2}
    # 2 examples per row x 8 rows - 8 span-corruption examples = 8 masked examples of 16/4.
    assert teacher["details"]["examples"] == 8
    assert teacher["details"]["slot_lengths"] == [16, 4]
    assert teacher["opt_state_bytes"] == 0 and student["opt_state_bytes"] > 0
    # The tiny teacher (d_model 32, 2+2 layers, vocab 4224) on the model axis of 2.
    teacher_params = EncoderDecoderModel(T5Config(
            vocab_size=4224, d_model=32, num_heads=2, d_kv=16, d_ff=64, num_encoder_layers=2,
            num_decoder_layers=2)).abstract_params()
    assert teacher["num_params"] == sum(x.size for x in jax.tree.leaves(teacher_params))
    assert teacher["params_bytes"] < 4 * teacher["num_params"]
    for p in (student, teacher):
        assert p["peak_bytes"] >= p["params_bytes"] + p["activation_bytes"]


@pytest.mark.slow
def test_cli_reruns_itself_with_another_device_count(tmp_path):
    out = tmp_path / "plan.json"
    rc = plan_cli.main(["--gin_file=gin/experiments/tiny_default.gin", *TINY_BINDINGS,
                    "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, "
                    "'targets': 4}", "--gin.Partitioner.mesh_shape={'data': 2, 'model': 2}",
                    f"--json={out}"])
    assert rc == 0
    (student,) = json.loads(out.read_text())
    assert student["num_devices"] == 4 and student["mesh"]["model"] == 2


def test_bad_device_flags_are_one_line_errors():
    base = ["--gin_file=gin/experiments/tiny_default.gin"]
    with pytest.raises(UserError, match="--num_devices"):
        plan_cli.main(base + ["--gin.Partitioner.mesh_shape={'data': -1}"])
    with pytest.raises(UserError, match="not an integer"):
        plan_cli.main(base + ["--num_devices=many"])
    with pytest.raises(UserError, match="not divisible"):
        plan_cli.main(base + ["--num_devices=8", "--gin.BATCH_SIZE=12",
                          "--gin.Partitioner.mesh_shape={'data': 8}"])


def test_xl_xxl_example_gin_parses():
    """The example's bindings resolve (compiling it is the benchmark's job: minutes)."""
    import gin
    from ssr_jax.cli import flags as flags_lib
    from ssr_jax.cli import gin_registry
    from ssr_jax.cli.spec import RunSpec
    from ssr_jax.ssr import teacher as teacher_lib
    flags = flags_lib.parse_flags(["--gin_file=gin/experiments/plan_xl_xxl.gin",
                                   "--gin.MODEL_DIR='/tmp/unused'"])
    gin_registry.setup(flags)
    assert plan_cli._mesh_devices({}) == 64  # pylint: disable=protected-access
    model = gin_registry.query("train.model")
    assert model.config.d_model == 2048 and model.config.dtype == "bfloat16"
    ssr = gin_registry.query("train.ssr")
    teacher = teacher_lib.teacher_model_config(ssr.teacher)
    assert teacher.d_model == 4096 and teacher.param_dtype == "bfloat16"
    assert ssr.mode == "online" and ssr.config.examples_per_row == 1
    assert "model" in {f.name for f in dataclasses.fields(RunSpec)}
    gin.clear_config()

