"""`ssr-jax plan --gin_file=...`: memory and FLOPs per device of a run, before launching it.

The sharded train step of the gin-configured run (model, optimizer, Partitioner mesh and
rules, global batch, microbatches) is compiled ahead of time on N fake CPU devices, from
abstract arguments only (`jax.eval_shape` of the train state, `ShapeDtypeStruct`s with
their shardings): nothing of the model is allocated. XLA's `memory_analysis()` of the
partitioned program gives per-device arguments, outputs, aliased (donated) bytes and
temporaries; `cost_analysis()` its FLOPs. For online SSR (`train.ssr = @ssr_online()`), the
teacher's sharded sampler is compiled the same way on the same mesh for one step's masked
examples.

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

The command (flags, device count, gin) is ssr_jax/cli/plan.py; this module takes plain
arguments: a BaseModel, an optimizer, a Partitioner, the DatasetConfig and the SsrSpec.
"""
import dataclasses
import math
import time
from typing import Any, Dict, List, Mapping, Tuple

from ssr_jax.errors import UserError
from ssr_jax.partitioning import shard_bytes
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


# --- building blocks --------------------------------------------------------------------------
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
    config = model.config_dict() or {}
    return ProgramPlan(
            name="student train step", num_devices=len(partitioner.mesh.devices.flat),
            mesh=dict(partitioner.mesh_sizes), num_params=num_params,
            params_bytes=shard_bytes(abstract.params, shardings.params),
            opt_state_bytes=shard_bytes(abstract.opt_state, shardings.opt_state),
            argument_bytes=args, output_bytes=out, alias_bytes=alias, activation_bytes=temp,
            peak_bytes=args + out - alias + temp, xla_flops_per_device=_flops(compiled),
            model_flops=model.train_flops(batch_size, li, lt), compile_seconds=seconds,
            details={"batch_size": batch_size, "lengths": [li, lt],
                     "num_microbatches": num_microbatches,
                     "dtype": config.get("dtype"), "remat_policy": config.get("remat_policy")})


def plan_teacher_generate(model, partitioner, num_examples: int,
                          slot_lengths: Tuple[int, int], decode) -> ProgramPlan:
    """Compiles the SSR teacher's sharded sampler (ssr_jax.ssr.teacher) from abstract
    arguments: its params in the teacher's dtype, one step's masked examples."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    abstract, shardings = partitioner.model_param_shardings(model)
    sampler = teacher_lib.sampler(model, decode, partitioner, shardings)
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
            model_flops=model.generate_flops(n, li, decode.max_decode_length),
            compile_seconds=seconds,
            details={"examples": n, "slot_lengths": list(slot_lengths),
                     "max_decode_length": decode.max_decode_length,
                     "dtype": (model.config_dict() or {}).get("dtype")})


def state_footprint(model, partitioner, optimizer=None) -> Dict[str, float]:
    """Exact per-device bytes of params (and optimizer state) and the parameter count, from
    shapes only (no compilation)."""
    import jax  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import train_state as ts  # pylint: disable=import-outside-toplevel
    if optimizer is None:
        params, shardings = partitioner.model_param_shardings(model)
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


def _layers(model) -> int:
    c = model.config_dict() or {}
    enc, dec = c.get("num_encoder_layers"), c.get("num_decoder_layers")
    if enc is None or enc != dec:
        raise UserError("--extrapolate_from_layers needs as many encoder as decoder layers "
                        f"(got {enc} and {dec}).")
    return enc


def _with_layers(model, n: int):
    return model.replace_config(num_encoder_layers=n, num_decoder_layers=n)


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


def make_plans(model, optimizer, partitioner, dataset, num_microbatches: int = 1, ssr=None,
               extrapolate_from_layers: int = 0) -> List[ProgramPlan]:
    """Plans of a run: the student's train step, and for online SSR (`ssr`, an SsrSpec) the
    teacher's sampler on the same mesh. extrapolate_from_layers=K: compile K and 2K layers
    per stack and extrapolate in depth (0: compile all layers)."""
    from ssr_jax.models.base import DecodeConfig  # pylint: disable=import-outside-toplevel
    k = int(extrapolate_from_layers)
    if k < 0:
        raise UserError(f"--extrapolate_from_layers={k} must be >= 0 (0: compile all layers).")
    lengths = dataset.task_feature_lengths
    li, lt = lengths["inputs"], lengths["targets"]

    def student_at(m):
        return plan_train_step(m, optimizer, partitioner, dataset.batch_size, lengths,
                               num_microbatches, dataset.pack)

    if k:
        plans = [extrapolate(lambda n: student_at(_with_layers(model, n)), _layers(model), k,
                             state_footprint(model, partitioner, optimizer),
                             model.train_flops(dataset.batch_size, li, lt))]
    else:
        plans = [student_at(model)]
    if ssr is None or ssr.mode != "online":
        return plans
    from ssr_jax.ssr import stage as stage_lib  # pylint: disable=import-outside-toplevel
    from ssr_jax.ssr import teacher as teacher_lib  # pylint: disable=import-outside-toplevel
    slots = stage_lib.plan_slots(lengths, dataset.batch_size, ssr.config, partitioner,
                                 num_microbatches)
    t = ssr.teacher
    decode = DecodeConfig(
            method="sample", max_decode_length=teacher_lib.static_decode_length(
                    *slots.slot_lengths, stage_lib.task_fill_ratio(dataset)),
            temperature=t.temperature, top_k=t.top_k, top_p=t.top_p)
    teacher = teacher_lib.teacher_model(t)

    def teacher_at(m):
        return plan_teacher_generate(m, partitioner, slots.ssr_examples, slots.slot_lengths,
                                     decode)

    if k:
        plans.append(extrapolate(
                lambda n: teacher_at(_with_layers(teacher, n)), _layers(teacher), k,
                state_footprint(teacher, partitioner),
                teacher.generate_flops(slots.ssr_examples, slots.slot_lengths[0],
                                       decode.max_decode_length)))
    else:
        plans.append(teacher_at(teacher))
    return plans
