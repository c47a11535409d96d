"""`ssr-jax train | eval | infer`: the gin edge.

Each entry point parses gin flags, optionally joins a multi-process JAX cluster, writes the
parsed config to MODEL_DIR/config.gin and calls the gin-configured library function
(`train`, `evaluate`, `infer`). Bad input surfaces as `UserError` (one line).

Multi-process flags (ssr_jax.distributed): --coordinator_address=host:port --num_processes=N
--process_id=i, or the SSR_JAX_* environment, or a detected SLURM/TPU cluster
(--multiprocess=true forces JAX's cluster detection); --heartbeat_timeout_s, --step_timeout_s
and --local_device_ids tune it. In a multi-process run an error ends the process at once
(distributed.fail_fast) so the others stop too instead of hanging.
"""
import logging
import os
from typing import List, Sequence

from ssr_jax import distributed, gin_config

DISTRIBUTED_FLAGS = distributed.FLAG_NAMES


def _prepare(argv: Sequence[str]) -> gin_config.Flags:
    flags = gin_config.parse_flags(argv, allowed_other=DISTRIBUTED_FLAGS)
    _quiet_logs()
    gin_config.setup(flags)
    # Before anything touches jax devices.
    distributed.initialize(distributed.config_from_strings(flags.other))
    return flags


def _quiet_logs():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    with distributed.fail_fast("ssr-jax train"):
        return _train_main(argv)


def _train_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("train")
    result = gin_config.call("train")
    return 0 if result is not None else 1


def eval_main(argv: List[str]) -> int:
    with distributed.fail_fast("ssr-jax eval"):
        return _eval_main(argv)


def _eval_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("eval")
    gin_config.call("evaluate")
    return 0


def infer_main(argv: List[str]) -> int:
    with distributed.fail_fast("ssr-jax infer"):
        return _infer_main(argv)


def _infer_main(argv: List[str]) -> int:
    _prepare(argv)
    _write_config("infer")
    gin_config.call("infer")
    return 0
