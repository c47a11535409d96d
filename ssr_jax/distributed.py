"""Starting JAX's multi-controller runtime (`jax.distributed`) from flags or the environment.

One process per host (TPU VM worker) or per GPU/node (SLURM). Every process runs the same
program; each feeds its own slice of the global batch and writes its own checkpoint shards.
Which runtime to join, in order of precedence:
  1. explicit flags: --coordinator_address, --num_processes, --process_id;
  2. SSR_JAX_COORDINATOR_ADDRESS / SSR_JAX_NUM_PROCESSES / SSR_JAX_PROCESS_ID (what
     launch/local_multiprocess.sh sets);
  3. a cluster JAX detects itself: SLURM (SLURM_NTASKS > 1) or a multi-host TPU VM pod;
  4. otherwise a single process: nothing to initialise.
"""
import dataclasses
import logging
import os
from typing import Optional

from ssr_jax.errors import UserError

# A dead peer is detected by missed heartbeats; the survivors then stop instead of hanging.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[str] = None  # comma list, e.g. one GPU per process
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    initialization_timeout_s: int = 300
    cpu_collectives: str = "gloo"


def add_flags(parser) -> None:
    """The distributed flags every multi-host-capable command accepts."""
    parser.add_argument("--coordinator_address", default=None,
                        help="host:port of process 0's coordinator")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--local_device_ids", default=None,
                        help="comma list of local device ids this process uses")
    parser.add_argument("--heartbeat_timeout_s", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                        help="seconds after which a silent peer is declared dead")


def config_from_flags(args) -> DistributedConfig:
    return DistributedConfig(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
        local_device_ids=args.local_device_ids,
        heartbeat_timeout_s=args.heartbeat_timeout_s)


def _from_env(cfg: DistributedConfig) -> DistributedConfig:
    env = os.environ
    return dataclasses.replace(
        cfg,
        coordinator_address=cfg.coordinator_address or env.get("SSR_JAX_COORDINATOR_ADDRESS"),
        num_processes=cfg.num_processes if cfg.num_processes is not None else
        _int_env("SSR_JAX_NUM_PROCESSES"),
        process_id=cfg.process_id if cfg.process_id is not None else
        _int_env("SSR_JAX_PROCESS_ID"))


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer.") from None


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    # Multi-host TPU VMs list their workers; a single-host TPU VM needs no runtime.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(cfg: DistributedConfig = DistributedConfig()) -> bool:
    """Joins the multi-controller runtime if this run has several processes.

    Must be called before anything touches jax devices. Returns True if initialised.
    """
    import jax

    cfg = _from_env(cfg)
    explicit = cfg.coordinator_address is not None or cfg.num_processes is not None
    if explicit:
        missing = [n for n in ("coordinator_address", "num_processes", "process_id")
                   if getattr(cfg, n) is None]
        if missing:
            raise UserError("multi-process run needs all of --coordinator_address, "
                            f"--num_processes, --process_id; missing: {', '.join(missing)}.")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise UserError(f"--process_id={cfg.process_id} is outside "
                            f"[0, --num_processes={cfg.num_processes}).")
        if cfg.num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    if jax.distributed.is_initialized():
        return True
    if _on_cpu():
        # CPU collectives across processes need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    local_ids = ([int(x) for x in cfg.local_device_ids.split(",")]
                 if cfg.local_device_ids else None)
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        local_device_ids=local_ids,
        initialization_timeout=cfg.initialization_timeout_s,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True


def _on_cpu() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0] == "cpu"
    # Without an explicit platform, a CUDA/TPU plugin decides; only default to CPU
    # collectives when neither is installed.
    import importlib.util
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                           "libtpu"))


def is_primary() -> bool:
    """Process 0 writes logs, TensorBoard and other single-writer files."""
    import jax
    return jax.process_index() == 0
