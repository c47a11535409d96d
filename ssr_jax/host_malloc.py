"""glibc malloc settings for processes whose XLA programs run on the CPU.

XLA:CPU allocates each execution's temporary buffers afresh. With glibc's defaults every
buffer above the mmap threshold (at most 32 MiB) is a new mapping, so each train step
page-faults its whole working set in again and unmaps it at the end: 650k minor faults and
1.2 s of kernel time per step of a d_model 384 T5 at 512/114 (2.4 s; bench/NOTES.md). With
one arena, no mmap'd chunks and no trimming, freed buffers are reused: no faults, 1.6 s.
(tcmalloc, which T5X/MaxText users preload, does the same; this needs nothing installed.)

The settings are glibc tunables, read when a process starts, so `ssr-jax` re-executes itself
once with GLIBC_TUNABLES extended (`reexec_if_needed`, before anything is imported); child
processes inherit them. Only where XLA computes on the host: not on a machine with a GPU or
TPU (there the host runs the input pipeline, whose many threads want their own arenas) unless
JAX_PLATFORMS=cpu. Opt out with SSR_JAX_GLIBC_MALLOC=0; a setting already in GLIBC_TUNABLES
is kept. The cost: the process keeps its peak heap (a training process does anyway).
"""
import os
import platform
import sys
from typing import Mapping, MutableMapping, Optional, Sequence

SETTINGS = (("glibc.malloc.arena_max", "1"), ("glibc.malloc.mmap_max", "0"),
            ("glibc.malloc.trim_threshold", str(2 ** 40)))
OPT_OUT = "SSR_JAX_GLIBC_MALLOC"
DONE = "SSR_JAX_GLIBC_MALLOC_SET"  # in the re-executed process: never exec twice
# Device files of the accelerators JAX drives (NVIDIA GPUs; TPU VMs' accel / vfio devices).
ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/accel0", "/dev/vfio/0")


def tunables(current: str) -> str:
    """GLIBC_TUNABLES with SETTINGS added after `current`'s entries (its own values win)."""
    entries = [e for e in current.split(":") if e]
    names = {e.split("=", 1)[0] for e in entries}
    return ":".join(entries + [f"{k}={v}" for k, v in SETTINGS if k not in names])


def wanted(environ: Mapping[str, str], libc: Optional[str] = None,
           accelerator: Optional[bool] = None) -> bool:
    """Whether this process should run with SETTINGS (and does not yet)."""
    if environ.get(OPT_OUT, "1") == "0" or environ.get(DONE):
        return False
    libc = platform.libc_ver()[0] if libc is None else libc
    if sys.platform != "linux" or libc != "glibc":
        return False
    if tunables(environ.get("GLIBC_TUNABLES", "")) == environ.get("GLIBC_TUNABLES", ""):
        return False  # every setting already there
    if accelerator is None:
        accelerator = any(os.path.exists(p) for p in ACCELERATOR_DEVICES)
    platforms = environ.get("JAX_PLATFORMS", "")
    return not accelerator or platforms.strip().lower() == "cpu"


def apply(environ: MutableMapping[str, str]) -> None:
    """Puts SETTINGS into `environ` (for a child process started with it)."""
    environ["GLIBC_TUNABLES"] = tunables(environ.get("GLIBC_TUNABLES", ""))
    environ[DONE] = "1"


def without(environ: Mapping[str, str]) -> dict:
    """A copy of `environ` for a child process that runs with glibc's defaults: SETTINGS'
    entries taken out of GLIBC_TUNABLES (the user's own kept) and opted out."""
    ours = {f"{k}={v}" for k, v in SETTINGS}
    env = {k: v for k, v in environ.items() if k not in ("GLIBC_TUNABLES", DONE)}
    kept = [e for e in environ.get("GLIBC_TUNABLES", "").split(":") if e and e not in ours]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    env[OPT_OUT] = "0"
    return env


def reexec_if_needed(argv: Optional[Sequence[str]] = None) -> None:
    """Re-executes this Python process with SETTINGS when `wanted`; returns otherwise. Call
    first thing in a program's entry point: the new process starts from the beginning (same
    pid, so launchers and signals are unaffected)."""
    if not wanted(os.environ):
        return
    apply(os.environ)
    args = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, args)
    except OSError:
        pass  # could not exec: run on with glibc's defaults
