"""Multi-process runs: joining JAX's multi-controller runtime, and failing fast, not hanging.

One process per host (TPU VM worker) or per GPU/node (SLURM). Every process runs the same
program; each feeds its own slice of the global batch and writes its own checkpoint shards;
process 0 alone writes logs and TensorBoard. Which runtime to join, in order of precedence:
  1. explicit flags: --coordinator_address, --num_processes, --process_id;
  2. SSR_JAX_COORDINATOR_ADDRESS / SSR_JAX_NUM_PROCESSES / SSR_JAX_PROCESS_ID (what
     launch/local_multiprocess.sh sets);
  3. a cluster JAX detects itself: SLURM (SLURM_NTASKS > 1), a TPU pod listing its workers
     (TPU_WORKER_HOSTNAMES), or any cluster when --multiprocess=true / SSR_JAX_MULTIPROCESS=1
     (launch/tpu_pod.sh sets it: JAX then reads the pod from the TPU metadata);
  4. otherwise a single process: nothing to initialise.

Failure handling (a dead or stuck process must not leave the others hanging):
  * a process that DIES (killed, OOM, machine lost) stops sending heartbeats: JAX's
    coordination service declares it dead after --heartbeat_timeout_s and aborts every other
    process (a dead coordinator, process 0, is noticed at once through its closed socket);
  * a process that RAISES would otherwise wait at JAX's shutdown barrier (5 minutes) while
    the others block in a collective: `fail_fast` prints the error and exits at once, which
    turns it into the case above;
  * a process that is ALIVE BUT STUCK (deadlock, a collective that never completes) keeps
    heartbeating: `StepWatchdog` exits when no training step finished for --step_timeout_s
    (3x that for the first step, which compiles).
Every exit is non-zero; rerunning the same command resumes from the last checkpoint.
"""
import contextlib
import dataclasses
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from typing import Dict, Mapping, Optional

from ssr_jax.errors import UserError

# A dead peer is detected by missed heartbeats; the survivors then stop instead of hanging.
DEFAULT_HEARTBEAT_TIMEOUT_S = 60
# No loop iteration (a step, plus the log sync, eval and checkpoint save falling on it) may
# take longer than this in a multi-process run; the first one gets 3x (it compiles).
DEFAULT_STEP_TIMEOUT_S = 1800.0
FIRST_STEP_TIMEOUT_FACTOR = 3.0
EXIT_ERROR = 1  # an exception in a multi-process run (fail_fast)
EXIT_USER_ERROR = 2  # a UserError, as the CLI returns it
EXIT_WATCHDOG = 3  # no step finished in time
# A preempted run (SIGTERM, or the hosts agreed to stop) saved its checkpoint and stopped
# early: rerunning the same command resumes it. EX_TEMPFAIL ("try again"), distinct from 0
# (finished) so that the launchers' MAX_RESTARTS loops restart it.
EXIT_PREEMPTED = 75

# --name flags every multi-process-capable entry point accepts (the edge parses them).
FLAG_NAMES = ("coordinator_address", "num_processes", "process_id", "local_device_ids",
              "heartbeat_timeout_s", "step_timeout_s", "multiprocess")
_ENV_PREFIX = "SSR_JAX_"


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (None: from the environment)."""

    coordinator_address: Optional[str] = None  # host:port of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[str] = None  # comma list, e.g. "0,1,2,3" for one process/node
    heartbeat_timeout_s: Optional[int] = None  # default DEFAULT_HEARTBEAT_TIMEOUT_S
    step_timeout_s: Optional[float] = None  # default DEFAULT_STEP_TIMEOUT_S; 0 = no watchdog
    multiprocess: bool = False  # let jax.distributed detect the cluster (TPU pod, SLURM, ...)
    initialization_timeout_s: int = 300
    shutdown_timeout_s: int = 300
    cpu_collectives: str = "gloo"


# The config of the runtime this process joined (None: not initialised by us).
_ACTIVE: Optional[DistributedConfig] = None


def config_from_strings(values: Mapping[str, Optional[object]]) -> DistributedConfig:
    """From --name=value flags as strings (the CLI's parsed flags)."""
    def get(name, kind):
        value = values.get(name)
        if value is None or value == "":
            return None
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"--{name}={value!r} is not a valid {kind.__name__}.") from None
    return DistributedConfig(
            coordinator_address=get("coordinator_address", str),
            num_processes=get("num_processes", int),
            process_id=get("process_id", int),
            local_device_ids=get("local_device_ids", str),
            heartbeat_timeout_s=get("heartbeat_timeout_s", int),
            step_timeout_s=get("step_timeout_s", float),
            multiprocess=_truthy(values.get("multiprocess")))


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes") if value is not None else False


def _from_env(cfg: DistributedConfig) -> DistributedConfig:
    """Fills every unset field from its SSR_JAX_<NAME> environment variable."""
    updates: Dict[str, object] = {}
    for name, kind in (("coordinator_address", str), ("num_processes", int),
                       ("process_id", int), ("local_device_ids", str),
                       ("heartbeat_timeout_s", int), ("step_timeout_s", float)):
        if getattr(cfg, name) is None:
            updates[name] = _env(_ENV_PREFIX + name.upper(), kind)
    if not cfg.multiprocess:
        updates["multiprocess"] = _truthy(os.environ.get(_ENV_PREFIX + "MULTIPROCESS"))
    return dataclasses.replace(cfg, **updates)


def _env(name: str, kind):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not a valid "
                        f"{kind.__name__}.") from None


def _cluster_detected() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    # Multi-host TPU VMs list their workers; a single-host TPU VM needs no runtime.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
            "TPU_PROCESS_ADDRESSES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def initialize(cfg: DistributedConfig = DistributedConfig()) -> bool:
    """Joins the multi-controller runtime if this run has several processes.

    Must be called before anything touches jax devices; calling it again is a no-op.
    Returns True if this process is (now) part of a multi-process runtime.
    """
    global _ACTIVE
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
            _ACTIVE = cfg
            return False
    elif not (cfg.multiprocess or _cluster_detected()):
        _ACTIVE = cfg
        return False
    if jax.distributed.is_initialized():
        return True
    if _on_cpu():
        # CPU collectives across processes need an implementation; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    local_ids = ([int(x) for x in cfg.local_device_ids.split(",") if x.strip()]
                 if cfg.local_device_ids else None)
    heartbeat = cfg.heartbeat_timeout_s or DEFAULT_HEARTBEAT_TIMEOUT_S
    try:
        jax.distributed.initialize(
                coordinator_address=cfg.coordinator_address,
                num_processes=cfg.num_processes,
                process_id=cfg.process_id,
                local_device_ids=local_ids,
                initialization_timeout=cfg.initialization_timeout_s,
                heartbeat_timeout_seconds=heartbeat,
                shutdown_timeout_seconds=cfg.shutdown_timeout_s)
    except (ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"could not join the multi-process run ({first}); check "
                        "--coordinator_address/--num_processes/--process_id (or the cluster's "
                        "environment) and that process 0 is running.") from e
    _ACTIVE = cfg
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()} "
          f"(pid {os.getpid()}), {jax.local_device_count()} local / {jax.device_count()} "
          f"global devices; heartbeat timeout {heartbeat} s", flush=True)
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


def _process_count() -> int:
    import jax
    return jax.process_count() if jax.distributed.is_initialized() else 1


def _whoami() -> str:
    import jax
    return f"process {jax.process_index()} of {jax.process_count()} (pid {os.getpid()})"


def _exit_now(code: int):
    """Exits without Python's shutdown (atexit would wait at JAX's shutdown barrier while the
    peers are blocked in a collective). Peers notice through the coordination service."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # pylint: disable=broad-except
            pass
    os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def fail_fast(command: str = "ssr-jax"):
    """In a multi-process run, an exception escaping the block ends this process at once
    (status 2 for a UserError, 1 otherwise) after printing it; single-process runs re-raise."""
    try:
        yield
    except BaseException as e:  # pylint: disable=broad-except
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        if _process_count() <= 1:
            raise
        if isinstance(e, UserError):
            print(f"{command}: error: {e}", file=sys.stderr)
            code = EXIT_USER_ERROR
        else:
            traceback.print_exc()
            code = EXIT_ERROR
        print(f"{command}: {_whoami()} failed; exiting now so that the other processes stop "
              "too (rerun the same command to resume from the last checkpoint).",
              file=sys.stderr)
        _exit_now(code)


class StepWatchdog:
    """Ends the process when `kick()` is not called for `timeout_s` seconds (`first_timeout_s`
    before the first kick): a stuck collective or a hung peer then fails the job instead of
    freezing it. Use as a context manager around the training loop; kick once per step."""

    def __init__(self, timeout_s: float, first_timeout_s: Optional[float] = None,
                 what: str = "training step"):
        if timeout_s <= 0:
            raise ValueError(f"watchdog timeout {timeout_s} must be > 0")
        self.timeout_s = float(timeout_s)
        self.first_timeout_s = float(first_timeout_s or timeout_s)
        self.what = what
        self._last = time.monotonic()
        self._step: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "StepWatchdog":
        self._last = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return False

    def kick(self, step: Optional[int] = None):
        self._step = step
        self._last = time.monotonic()

    def _limit(self) -> float:
        return self.first_timeout_s if self._step is None else self.timeout_s

    def _watch(self):
        poll = max(0.05, min(5.0, self.timeout_s / 10))
        while not self._stop.wait(poll):
            waited = time.monotonic() - self._last
            if waited > self._limit():
                self._expire(waited)

    def _expire(self, waited: float):
        last = "none yet" if self._step is None else f"step {self._step}"
        print(f"ERROR: {_whoami()}: no {self.what} finished in {waited:.0f} s (limit "
              f"{self._limit():.0f} s; last finished: {last}). Another process is probably "
              "stuck or dead, or a collective cannot complete. Exiting with status "
              f"{EXIT_WATCHDOG}; rerun the same command to resume from the last checkpoint "
              "(raise --step_timeout_s if steps are legitimately this slow). Stacks:",
              file=sys.stderr, flush=True)
        try:
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except Exception:  # pylint: disable=broad-except
            pass
        _exit_now(EXIT_WATCHDOG)


class _NoWatchdog:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def kick(self, step: Optional[int] = None):
        del step


def step_watchdog(what: str = "training step"):
    """The watchdog for a training loop: a StepWatchdog in multi-process runs (or when a step
    timeout was set explicitly), else one that does nothing."""
    cfg = _from_env(_ACTIVE or DistributedConfig())
    timeout = cfg.step_timeout_s
    if timeout is None:
        timeout = DEFAULT_STEP_TIMEOUT_S if _process_count() > 1 else 0.0
    if timeout <= 0:
        return _NoWatchdog()
    return StepWatchdog(timeout, FIRST_STEP_TIMEOUT_FACTOR * timeout, what)


# --- cross-host agreements -------------------------------------------------------------------
# Every host calls these at the same point of its loop thread (they are collectives when
# multi-process; a single process answers alone). Values are small host numbers or JSON.
def _multihost_utils():
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils


def allgather(value):
    """This host's numpy value stacked with every other host's: [process_count, ...]."""
    import jax
    import numpy as np
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    return np.asarray(_multihost_utils().process_allgather(value))


def any_host(flag: bool) -> bool:
    """True when the flag is set on at least one host."""
    import numpy as np
    return bool(np.any(allgather(np.array([bool(flag)]))))


def min_over_hosts(value: int) -> int:
    """The smallest of every host's integer."""
    import numpy as np
    return int(np.min(allgather(np.array([int(value)], np.int64))))


def barrier(name: str) -> None:
    """Returns once every host has reached the barrier of this name."""
    import jax
    if jax.process_count() > 1:
        _multihost_utils().sync_global_devices(name)


def gather_json(value) -> list:
    """Every host's JSON-able value, in process order."""
    import json
    import jax
    import numpy as np
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = allgather(np.array([raw.size], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:raw.size] = raw
    everyone = allgather(padded)
    return [json.loads(bytes(everyone[i][:int(lengths[i][0])]).decode())
            for i in range(jax.process_count())]


def jax_handles_sigterm() -> bool:
    """Whether JAX's preemption service catches SIGTERM (multi-process, service enabled): it
    installs a C-level handler at initialize() and makes the hosts agree on a step to stop
    at. A Python handler installed later would replace it, so no host would ever learn of
    the signal (found under a real SLURM: the run trained on after `scancel --signal=TERM`)."""
    import jax
    return _process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


def reached_preemption_sync_point(step: int) -> Optional[bool]:
    """Whether the hosts agreed to stop at this step after a preemption notice (JAX's
    preemption service); None when that service is not available (single process)."""
    import jax
    if jax.process_count() == 1:
        return None
    try:
        return bool(_multihost_utils().reached_preemption_sync_point(step))
    except Exception:  # pylint: disable=broad-except
        return None
