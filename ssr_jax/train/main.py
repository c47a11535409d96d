"""`ssr-jax train | eval | infer`: the gin edge.

Each entry point parses gin flags, optionally joins a multi-process JAX cluster, writes the
parsed config to MODEL_DIR/config.gin and calls the gin-configured library function
(`train`, `evaluate`, `infer`). Bad input surfaces as `UserError` (one line).

Multi-process flags: --coordinator_address=host:port --num_processes=N --process_id=i
(or --multiprocess=true to let `jax.distributed.initialize()` detect a TPU/SLURM cluster).
"""
import logging
import os
from typing import List, Sequence

from ssr_jax import gin_config
from ssr_jax.errors import UserError

DISTRIBUTED_FLAGS = ("coordinator_address", "num_processes", "process_id", "multiprocess")


def _prepare(argv: Sequence[str]) -> gin_config.Flags:
    flags = gin_config.parse_flags(argv, allowed_other=DISTRIBUTED_FLAGS)
    _quiet_logs()
    gin_config.setup(flags)
    _maybe_initialize_distributed(flags.other)
    return flags


def _quiet_logs():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _maybe_initialize_distributed(other: dict):
    if not other:
        return
    import jax  # pylint: disable=import-outside-toplevel
    if other.get("multiprocess", "").lower() in ("1", "true", "yes") and \
            "coordinator_address" not in other:
        jax.distributed.initialize()
        return
    try:
        num, pid = int(other["num_processes"]), int(other["process_id"])
        address = other["coordinator_address"]
    except (KeyError, ValueError) as e:
        raise UserError("multi-process runs need --coordinator_address=host:port, "
                        "--num_processes=N and --process_id=i (integers).") from e
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=num, process_id=pid)


def _write_config(kind: str):
    """The parsed gin config, next to the run's outputs (process 0)."""
    import gin  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    model_dir = gin_config.query_macro("MODEL_DIR")
    if not isinstance(model_dir, str) or jax.process_index() != 0:
        return
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, f"{kind}_config.gin" if kind != "train"
                           else "config.gin"), "w") as f:
        f.write(gin.config_str())


def train_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("train")
    result = gin_config.call("train")
    return 0 if result is not None else 1


def eval_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("eval")
    gin_config.call("evaluate")
    return 0


def infer_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("infer")
    gin_config.call("infer")
    return 0
