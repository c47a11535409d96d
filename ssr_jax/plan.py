"""`ssr-jax plan --gin_file=...`: memory and FLOPs per device of a run, before launching it.

The sharded train step of the gin-configured run (model, optimizer, Partitioner mesh and
rules, global batch, microbatches) is compiled ahead of time on N fake CPU devices, from
abstract arguments only (`jax.eval_shape` of the train state, `ShapeDtypeStruct`s with
their shardings): nothing of the model is allocated. XLA's `memory_analysis()` of the
partitioned program gives per-device arguments, outputs, aliased (donated) bytes and
temporaries; `cost_analysis()` its FLOPs. For online SSR (`train.input_stage_factory =
@ssr_online_stage()`), the teacher's sharded sampler is compiled the same way on the same
mesh for one step's masked examples.

Per device, for each program:
  params / opt state   bytes of this device's shards (from the shardings; exact),
  activations          XLA temporaries of the step (everything live inside it),
  peak                 arguments + outputs - aliased + temporaries (what the device holds
                       while the step runs; donated state is updated in place),
and FLOPs per step (XLA's count of the partitioned program, per device and times N) next to
the analytic model FLOPs (matmuls only). XLA counts a `while_loop` body once, so for the
teacher's sampler the analytic count of a full decode is the one to read.

Devices: N comes from --num_devices, else from the mesh (Partitioner.mesh_shape without -1).
The fake devices must be set before JAX starts its CPU backend; when this process already
runs JAX with another device count, the command re-runs itself in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N. Plans come from CPU compilation: the
partitioning is the same as on accelerators, buffer sizes are close (XLA:TPU/GPU may fuse and
schedule differently, so treat temporaries as an estimate within ~10-20%).

Deep models on a small CPU: --extrapolate_from_layers=K compiles the programs with K and 2K
layers per stack instead of all of them and extrapolates activations and XLA FLOPs linearly
in depth (params, optimizer state, arguments and analytic FLOPs stay exact). Compile time
grows faster than linearly with depth on CPU (T5 1.1 XL's 24+24 layers on 64 fake devices:
many minutes), and bench/plan.py measures the extrapolation's error on a model it can
compile fully.

Flags: --gin_file/--gin.X=Y as `train`, plus --num_devices=N, --json=PATH (write the plan)
and --extrapolate_from_layers=K.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ssr_jax.errors import UserError

OWN_FLAGS = ("num_devices", "json", "extrapolate_from_layers")
# Values `train` needs but a plan never reads; bound only when the user did not bind them.
UNUSED_REQUIRED = {"MODEL_DIR": "'/tmp/ssr_jax_plan_unused'"}
BATCH_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights")
PACKED_KEYS = ("encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
               "decoder_positions")


@dataclasses.dataclass
class ProgramPlan:
    """One compiled program's per-device footprint (bytes) and FLOPs."""

    name: str
    num_devices: int
    mesh: Dict[str, int]
    num_params: int
    params_bytes: int  # this device's shards of the params
    opt_state_bytes: int  # ... of the optimizer state (0 for the teacher)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    activation_bytes: int  # XLA temporaries
    peak_bytes: int
    xla_flops_per_device: float
    model_flops: float  # analytic, whole program, all devices
    compile_seconds: float
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def xla_flops_total(self) -> float:
        return self.xla_flops_per_device * self.num_devices


# --- analytic FLOPs ---------------------------------------------------------------------------
def t5_forward_flops(config, batch: int, inputs_length: int, targets_length: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one teacher-forced forward pass: projections,
    attention scores and weighted sums, the output layer (no norms, softmax, gathers)."""
    c = config
    s, t = inputs_length, targets_length
    inner = c.num_heads * c.d_kv
    mlp = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    attn_proj = 4 * c.d_model * inner
    enc_layer = s * (attn_proj + mlp) + 2 * s * s * inner
    dec_layer = t * (2 * attn_proj + mlp) + 2 * t * t * inner + 2 * t * s * inner
    output = t * c.d_model * c.vocab_size
    return 2.0 * batch * (c.num_encoder_layers * enc_layer + c.num_decoder_layers * dec_layer
                          + output)


def t5_train_flops(config, batch: int, inputs_length: int, targets_length: int) -> float:
    """Forward + backward (3x the forward's matmul FLOPs)."""
    return 3.0 * t5_forward_flops(config, batch, inputs_length, targets_length)


def t5_generate_flops(config, batch: int, inputs_length: int, decode_length: int) -> float:
    """Encoder once + `decode_length` cached decoder steps (cross K/V projected once)."""
    c = config
    inner = c.num_heads * c.d_kv
    mlp = (3 if c.is_gated else 2) * c.d_model * c.d_ff
    enc_layer = inputs_length * (4 * c.d_model * inner + mlp) + 2 * inputs_length ** 2 * inner
    cross_kv = c.num_decoder_layers * inputs_length * 2 * c.d_model * inner
    per_token = 0.0
    for step in range(decode_length):
        layer = 6 * c.d_model * inner + mlp + 2 * (step + 1) * inner + 2 * inputs_length * inner
        per_token += c.num_decoder_layers * layer + c.d_model * c.vocab_size
    return 2.0 * batch * (c.num_encoder_layers * enc_layer + cross_kv + per_token)


# --- building blocks --------------------------------------------------------------------------
def _nbytes(shape, dtype) -> int:
    import numpy as np  # pylint: disable=import-outside-toplevel
    return int(math.prod(shape)) * np.dtype(dtype).itemsize


def shard_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of abstract arrays with these shardings (the
    largest device's share; shards are even unless a dimension does not divide)."""
    import jax  # pylint: disable=import-outside-toplevel
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += _nbytes(sharding.shard_shape(leaf.shape), leaf.dtype)
    return total


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_batch(partitioner, batch_size: int, inputs_length: int, targets_length: int,
                   packed: bool = True) -> Dict[str, Any]:
    """The global int32 batch as ShapeDtypeStructs with the batch sharding."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    sharding = partitioner.batch_sharding()
    keys = BATCH_KEYS + (PACKED_KEYS if packed else ())
    return {k: jax.ShapeDtypeStruct(
            (batch_size, inputs_length if k.startswith("encoder") else targets_length),
            jnp.int32, sharding=sharding) for k in keys}


def _memory(compiled) -> Tuple[int, int, int, int]:
    m = compiled.memory_analysis()
    if m is None:
        raise UserError("this JAX backend gives no memory analysis of compiled programs; run "
                        "the plan on CPU (JAX_PLATFORMS=cpu).")
    return (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
            int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def plan_train_step(model, optimizer, partitioner, batch_size: int,
                    task_feature_lengths: Mapping[str, int], num_microbatches: int = 1,
                    packed: bool = True) -> ProgramPlan:
    """Compiles the sharded train step from abstract arguments and reads its footprint."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import steps  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import train_state as ts  # pylint: disable=import-outside-toplevel
    partitioner.data_layout(batch_size, num_microbatches)  # same checks as the trainer
    li, lt = int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"])
    t0 = time.perf_counter()
    abstract = ts.abstract_state(model, optimizer)
    shardings = ts.state_shardings(partitioner, model, abstract)
    step = steps.make_train_step(model, optimizer, partitioner, shardings, num_microbatches)
    batch = abstract_batch(partitioner, batch_size, li, lt, packed)
    with partitioner.activation_context():
        compiled = step.jitted.lower(_with_shardings(abstract, shardings), batch).compile()
    seconds = time.perf_counter() - t0
    args, out, alias, temp = _memory(compiled)
    num_params = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    config = getattr(model, "config", None)
    model_flops = (t5_train_flops(config, batch_size, li, lt) if config is not None
                   else float("nan"))
    return ProgramPlan(
            name="student train step", num_devices=len(partitioner.mesh.devices.flat),
            mesh=dict(partitioner.mesh_sizes), num_params=num_params,
            params_bytes=shard_bytes(abstract.params, shardings.params),
            opt_state_bytes=shard_bytes(abstract.opt_state, shardings.opt_state),
            argument_bytes=args, output_bytes=out, alias_bytes=alias, activation_bytes=temp,
            peak_bytes=args + out - alias + temp, xla_flops_per_device=_flops(compiled),
            model_flops=model_flops, compile_seconds=seconds,
            details={"batch_size": batch_size, "lengths": [li, lt],
                     "num_microbatches": num_microbatches,
                     "dtype": getattr(config, "dtype", None),
                     "remat_policy": getattr(config, "remat_policy", None)})


def plan_teacher_generate(teacher_config, partitioner, num_examples: int,
                          slot_lengths: Tuple[int, int], decode) -> ProgramPlan:
    """Compiles the SSR teacher's sharded sampler (ssr_jax.ssr.teacher) from abstract
    arguments: its params in the teacher's dtype, one step's masked examples."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    model = EncoderDecoderModel(teacher_config)
    abstract = model.param_shapes()
    shardings = partitioner.param_shardings(abstract, model.param_logical_axes())
    sampler = teacher_lib._sampler(model, decode, partitioner, shardings)  # pylint: disable=W0212
    batch = partitioner.batch_sharding()
    n, li = num_examples, slot_lengths[0]
    args = (_with_shardings(abstract, shardings),
            jax.ShapeDtypeStruct((n, li), jnp.int32, sharding=batch),
            jax.ShapeDtypeStruct((n, 2), jnp.uint32, sharding=batch),
            jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch),
            jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch))
    with partitioner.activation_context():
        compiled = sampler.lower(*args).compile()
    seconds = time.perf_counter() - t0
    a, out, alias, temp = _memory(compiled)
    return ProgramPlan(
            name="teacher generate", num_devices=len(partitioner.mesh.devices.flat),
            mesh=dict(partitioner.mesh_sizes),
            num_params=sum(int(math.prod(x.shape)) for x in jax.tree.leaves(abstract)),
            params_bytes=shard_bytes(abstract, shardings), opt_state_bytes=0,
            argument_bytes=a, output_bytes=out, alias_bytes=alias, activation_bytes=temp,
            peak_bytes=a + out - alias + temp, xla_flops_per_device=_flops(compiled),
            model_flops=t5_generate_flops(teacher_config, n, li, decode.max_decode_length),
            compile_seconds=seconds,
            details={"examples": n, "slot_lengths": list(slot_lengths),
                     "max_decode_length": decode.max_decode_length,
                     "dtype": teacher_config.dtype})


def state_footprint(model, partitioner, optimizer=None) -> Dict[str, float]:
    """Exact per-device bytes of params (and optimizer state) and the parameter count, from
    shapes only (no compilation)."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import train_state as ts  # pylint: disable=import-outside-toplevel
    if optimizer is None:
        params = model.param_shapes()
        shardings = partitioner.param_shardings(params, model.param_logical_axes())
        opt_bytes = 0
    else:
        abstract = ts.abstract_state(model, optimizer)
        state_shardings = ts.state_shardings(partitioner, model, abstract)
        params, shardings = abstract.params, state_shardings.params
        opt_bytes = shard_bytes(abstract.opt_state, state_shardings.opt_state)
    return {"params_bytes": shard_bytes(params, shardings), "opt_state_bytes": opt_bytes,
            "num_params": sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))}


def extrapolate(plan_at, num_layers: int, k: int, exact: Mapping[str, float],
                model_flops: float) -> ProgramPlan:
    """The plan of a model with `num_layers` layers per stack from compiles with k and 2k.

    plan_at(n) compiles the same program for n encoder and n decoder layers. Activations
    (XLA temporaries) and XLA FLOPs are extrapolated linearly in n; params and optimizer
    state are exact (`exact`, from shapes), and so are the arguments, outputs and aliased
    bytes, which are the k-layer program's minus its state plus the full state. Much faster
    than compiling deep models for many devices on a small CPU; the slope per layer is kept
    in details."""
    small, large = plan_at(k), plan_at(2 * k)
    scale = (num_layers - k) / k
    out = dataclasses.replace(small, details=dict(small.details))
    out.activation_bytes = int(small.activation_bytes
                               + scale * (large.activation_bytes - small.activation_bytes))
    out.xla_flops_per_device = small.xla_flops_per_device + scale * (
            large.xla_flops_per_device - small.xla_flops_per_device)
    delta = (exact["params_bytes"] + exact["opt_state_bytes"]
             - small.params_bytes - small.opt_state_bytes)
    out.argument_bytes = int(small.argument_bytes + delta)
    # Outputs hold the new state (train step) and aliases the donated one; the teacher's
    # sampler outputs tokens only.
    if small.opt_state_bytes:
        out.output_bytes = int(small.output_bytes + delta)
        out.alias_bytes = int(small.alias_bytes + delta)
    out.params_bytes = int(exact["params_bytes"])
    out.opt_state_bytes = int(exact["opt_state_bytes"])
    out.num_params = int(exact["num_params"])
    out.peak_bytes = (out.argument_bytes + out.output_bytes - out.alias_bytes
                      + out.activation_bytes)
    out.model_flops = model_flops
    out.compile_seconds = small.compile_seconds + large.compile_seconds
    out.details.update(extrapolated_from_layers=[k, 2 * k],
                       activation_bytes_per_layer=(large.activation_bytes
                                                   - small.activation_bytes) / k)
    return out


def _layers(config) -> int:
    if config.num_encoder_layers != config.num_decoder_layers:
        raise UserError("--extrapolate_from_layers needs as many encoder as decoder layers "
                        f"(got {config.num_encoder_layers} and {config.num_decoder_layers}).")
    return config.num_encoder_layers


def _with_layers(config, n: int):
    return config.replace(num_encoder_layers=n, num_decoder_layers=n)


# --- gin edge ---------------------------------------------------------------------------------
def _evaluate(selector: str, default: Any = None) -> Any:
    """The value gin would pass for `selector` (a configurable reference is called)."""
    import gin  # pylint: disable=import-outside-toplevel
    try:
        value = gin.query_parameter(selector)
    except ValueError:
        return default
    for _ in range(10):  # macros may point at macros
        if not isinstance(value, gin.config.ConfigurableReference):
            return value
        value = value.scoped_configurable_fn() if value._evaluate else (  # pylint: disable=W0212
                value.scoped_configurable_fn)
        if isinstance(value, gin.config.ConfigurableReference):
            continue
        return value
    return value


def _teacher_settings():
    """(TeacherConfig, SsrStageConfig) when the run uses the online SSR stage, else None."""
    import gin  # pylint: disable=import-outside-toplevel
    try:
        factory = gin.query_parameter("train.input_stage_factory")
    except ValueError:
        return None
    if not isinstance(factory, gin.config.ConfigurableReference) or \
            "ssr_online_stage" not in factory.selector:
        return None
    return _evaluate("ssr_online_stage.teacher"), _evaluate("ssr_online_stage.config")


def _teacher_t5_config(cfg):
    """The teacher's T5Config: TeacherConfig.model_config if bound (no checkpoint needed),
    else its checkpoint's model_config.json; in the teacher's dtype, without dropout."""
    if cfg.model_config is None:
        from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=C0415
        return teacher_lib.teacher_model_config(cfg)
    return cfg.model_config.replace(dropout_rate=0.0, dtype=cfg.dtype, param_dtype=cfg.dtype)


def _mesh_devices(flags_other: Mapping[str, str]) -> int:
    if "num_devices" in flags_other:
        try:
            n = int(flags_other["num_devices"])
        except ValueError as e:
            raise UserError(f"--num_devices={flags_other['num_devices']!r} is not an "
                            "integer.") from e
        if n < 1:
            raise UserError(f"--num_devices={n} must be >= 1.")
        return n
    mesh = _evaluate("Partitioner.mesh_shape", {"data": -1}) or {"data": -1}
    if any(int(v) == -1 for v in mesh.values()):
        raise UserError(f"Partitioner.mesh_shape={dict(mesh)} has a -1 axis; pass "
                        "--num_devices=N (the devices of the run to plan).")
    return int(math.prod(int(v) for v in mesh.values()))


def _ensure_devices(n: int, argv: List[str]) -> Optional[int]:
    """Makes JAX see n CPU devices. Returns None to continue in this process, or the exit
    code of a subprocess that ran the plan with n fake devices."""
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
        return None
    if jax.device_count() == n and jax.devices()[0].platform == "cpu":
        return None
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    cmd = [sys.executable, "-m", "ssr_jax.cli", "plan", *argv]
    return subprocess.run(cmd, env=env, check=False).returncode


def _gib(x: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def _flop(x: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} FLOP"


def format_plan(plans: List[ProgramPlan]) -> str:
    rows = [("", *[p.name for p in plans])]

    def row(label, fn):
        rows.append((label, *[fn(p) for p in plans]))

    row("mesh", lambda p: " x ".join(f"{k}={v}" for k, v in p.mesh.items()))
    row("parameters", lambda p: f"{p.num_params / 1e6:,.1f} M")
    row("params / device", lambda p: _gib(p.params_bytes))
    row("optimizer state / device", lambda p: _gib(p.opt_state_bytes))
    row("activations / device (XLA temps)", lambda p: _gib(p.activation_bytes))
    row("arguments / outputs / aliased", lambda p: f"{_gib(p.argument_bytes)} / "
        f"{_gib(p.output_bytes)} / {_gib(p.alias_bytes)}")
    row("peak / device", lambda p: _gib(p.peak_bytes))
    row("XLA FLOPs / device / call", lambda p: _flop(p.xla_flops_per_device))
    row("XLA FLOPs / call (all devices)", lambda p: _flop(p.xla_flops_total))
    row("model FLOPs / call (analytic)", lambda p: _flop(p.model_flops))
    row("compile time", lambda p: f"{p.compile_seconds:.1f} s")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if len(plans) > 1:
        both = sum(p.peak_bytes for p in plans)
        lines.append(f"student peak + teacher peak (upper bound, both programs' buffers live "
                     f"at once): {_gib(both)} / device")
    if any(p.name == "teacher generate" for p in plans):
        lines.append("teacher: XLA counts the sampler's while_loop body once; the analytic "
                     "count covers the full decode.")
    return "\n".join(lines)


def make_plans(flags) -> List[ProgramPlan]:
    """Plans of the configured run (gin already parsed, devices already set)."""
    from ssr_jax.models.base import DecodeConfig  # pylint: disable=import-outside-toplevel
    from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # pylint: disable=C0415
    model = _evaluate("train.model")
    optimizer = _evaluate("train.optimizer")
    partitioner = _evaluate("train.partitioner")
    dataset = _evaluate("train.train_dataset")
    if model is None or optimizer is None or partitioner is None or dataset is None:
        raise UserError("the gin config does not bind train.model, train.optimizer, "
                        "train.partitioner and train.train_dataset; include a run-mode file "
                        "such as runs/pretrain.gin.")
    microbatches = int(_evaluate("train.num_microbatches", 1) or 1)
    k = _extrapolation_layers(flags.other)
    lengths = dataset.task_feature_lengths

    def student_at(config):
        return plan_train_step(EncoderDecoderModel(config, model.loss), optimizer, partitioner,
                               dataset.batch_size, lengths, microbatches, dataset.pack)

    if k:
        config = model.config
        plans = [extrapolate(lambda n: student_at(_with_layers(config, n)), _layers(config), k,
                             state_footprint(model, partitioner, optimizer),
                             t5_train_flops(config, dataset.batch_size, lengths["inputs"],
                                            lengths["targets"]))]
    else:
        plans = [plan_train_step(model, optimizer, partitioner, dataset.batch_size, lengths,
                                 microbatches, dataset.pack)]
    teacher = _teacher_settings()
    if teacher is not None:
        from ssr_jax.ssr import online  # pylint: disable=import-outside-toplevel
        from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=C0415
        teacher_cfg, stage_cfg = teacher
        slots = online.plan_slots(lengths, dataset.batch_size, stage_cfg, partitioner,
                                  microbatches)
        decode = DecodeConfig(
                method="sample", max_decode_length=teacher_lib.static_decode_length(
                        *slots.slot_lengths, teacher_cfg.fill_ratio),
                temperature=teacher_cfg.temperature, top_k=teacher_cfg.top_k,
                top_p=teacher_cfg.top_p)
        config = _teacher_t5_config(teacher_cfg)

        def teacher_at(c):
            return plan_teacher_generate(c, partitioner, slots.ssr_examples,
                                         slots.slot_lengths, decode)

        if k:
            plans.append(extrapolate(
                    lambda n: teacher_at(_with_layers(config, n)), _layers(config), k,
                    state_footprint(EncoderDecoderModel(config), partitioner),
                    t5_generate_flops(config, slots.ssr_examples, slots.slot_lengths[0],
                                      decode.max_decode_length)))
        else:
            plans.append(teacher_at(config))
    return plans


def _extrapolation_layers(other: Mapping[str, str]) -> int:
    value = other.get("extrapolate_from_layers", "0")
    try:
        k = int(value)
    except ValueError as e:
        raise UserError(f"--extrapolate_from_layers={value!r} is not an integer.") from e
    if k < 0:
        raise UserError(f"--extrapolate_from_layers={k} must be >= 0 (0: compile all layers).")
    return k


def main(argv: List[str]) -> int:
    """`ssr-jax plan --gin_file=F [--gin.X=Y] [--num_devices=N] [--json=PATH]`."""
    from ssr_jax import gin_config  # pylint: disable=import-outside-toplevel
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    flags = gin_config.parse_flags(argv, allowed_other=OWN_FLAGS)
    bound = {b.split("=")[0].strip() for b in flags.bindings}
    flags.bindings = [f"{k} = {v}" for k, v in UNUSED_REQUIRED.items() if k not in bound] + \
        flags.bindings
    try:
        from ssr_jax.ssr import gin_bindings  # pylint: disable=import-outside-toplevel
        gin_bindings.register()
    except ImportError:
        pass
    gin_config.setup(flags)
    n = _mesh_devices(flags.other)
    rc = _ensure_devices(n, argv)
    if rc is not None:
        return rc
    plans = make_plans(flags)
    k = _extrapolation_layers(flags.other)
    how = f", depth extrapolated from {k} and {2 * k} layers per stack" if k else ""
    print(f"plan on {n} fake CPU devices{how}:")
    print(format_plan(plans), flush=True)
    if "json" in flags.other:
        with open(flags.other["json"], "w") as f:
            json.dump([dataclasses.asdict(p) for p in plans], f, indent=1)
    return 0
