"""`ssr-jax plan --gin_file=F [--gin.X=Y] [--num_devices=N] [--json=PATH]
[--extrapolate_from_layers=K]`: the per-device memory and FLOPs of the configured run,
before launching it (ssr_jax/plan.py)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from typing import List, Mapping, Optional

from ssr_jax.cli import flags as flags_lib
from ssr_jax.cli import gin_registry
from ssr_jax.errors import UserError

# plan's own flags -> (metavar, --help text).
OWN_FLAGS = {
        "num_devices": ("N", "devices to plan for (default: the product of "
                             "Partitioner.mesh_shape; needed when it has a -1 axis)"),
        "json": ("PATH", "also write the plan to this JSON file"),
        "extrapolate_from_layers": ("K", "compile K and 2K layers per stack and extrapolate "
                                         "linearly to the configured depth (default 0: compile "
                                         "all layers)"),
}
# Values `train` needs but a plan never reads; bound only when the user did not bind them.
UNUSED_REQUIRED = {"MODEL_DIR": "'/tmp/ssr_jax_plan_unused'"}


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
    mesh = gin_registry.query("Partitioner.mesh_shape", {"data": -1}) or {"data": -1}
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
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{gin_registry.WARNED_ENV: "1"})
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    cmd = [sys.executable, "-m", "ssr_jax.cli", "plan", *argv]
    return subprocess.run(cmd, env=env, check=False).returncode


def _extrapolation_layers(other: Mapping[str, str]) -> int:
    value = other.get("extrapolate_from_layers", "0")
    try:
        return int(value)
    except ValueError as e:
        raise UserError(f"--extrapolate_from_layers={value!r} is not an integer.") from e


def main(argv: List[str]) -> int:
    from ssr_jax import plan  # pylint: disable=import-outside-toplevel
    from ssr_jax.cli.train import run_spec  # pylint: disable=import-outside-toplevel
    gin_registry.quiet_logs()
    flags = flags_lib.parse_flags(argv, allowed_other=OWN_FLAGS)
    bound = {b.split("=")[0].strip() for b in flags.bindings}
    flags.bindings = [f"{k} = {v}" for k, v in UNUSED_REQUIRED.items() if k not in bound] + \
        flags.bindings
    gin_registry.setup(flags)
    n = _mesh_devices(flags.other)
    k = _extrapolation_layers(flags.other)
    rc = _ensure_devices(n, argv)
    if rc is not None:
        return rc
    spec = run_spec()
    plans = plan.make_plans(spec.model, spec.optimizer, spec.partitioner, spec.train_dataset,
                            spec.num_microbatches, spec.ssr, k)
    how = f", depth extrapolated from {k} and {2 * k} layers per stack" if k else ""
    print(f"plan on {n} fake CPU devices{how}:")
    print(plan.format_plan(plans), flush=True)
    if "json" in flags.other:
        with open(flags.other["json"], "w") as f:
            json.dump([dataclasses.asdict(p) for p in plans], f, indent=1)
    return 0
