"""Shared helpers of the benchmarks: environment, machine description, interleaved timing,
model FLOP counts and tables.

Every benchmark is a script `bench/NAME.py` with `run(quick: bool) -> dict` returning
{"name", "title", "headers", "rows", "notes", "data"}; `python bench/NAME.py` prints the
table, `--json=PATH` also writes the dict. `bench/run_all.py` runs each in its own process
(clean thread pools and memory) and collects them.

The machine may be shared: every comparison alternates the contenders repetition by
repetition and reports medians, so a load change hits both sides alike.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def setup_env(module_name: str):
    """Before jax/tf/torch import: the process as `ssr-jax` runs: glibc malloc settings for
    XLA:CPU (re-executing once, ssr_jax.host_malloc; HF's torch in the same process gets
    them too), TF quiet and without oneDNN kernels (ssr_jax.cli.tf_env).

    Only a benchmark run as the program (`module_name == '__main__'`, the caller's
    `__name__`) re-executes: a benchmark imported by another program (the tests import
    several) would restart that program, e.g. pytest halfway through collecting, whose
    output then went to the capture file it held at that moment and was lost."""
    if module_name == "__main__":
        from ssr_jax import host_malloc  # pylint: disable=import-outside-toplevel
        host_malloc.reexec_if_needed()
    from ssr_jax.cli.tf_env import quiet_tensorflow_env  # pylint: disable=C0415
    quiet_tensorflow_env()


def torch_threads() -> int:
    """torch uses as many threads as XLA's CPU client: all cores."""
    import torch  # pylint: disable=import-outside-toplevel
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


# --- machine ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vector_units() -> str:
    """The CPU's widest vector extensions (they decide XLA's and torch's matmul rates)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)


def machine() -> Dict[str, str]:
    """What the numbers were measured on."""
    info = {"cpu": cpu_model(), "cores": str(os.cpu_count()), "python": platform.python_version(),
            "cpu_vector_units": cpu_vector_units(),
            "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "(none)")}
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        info["memory"] = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "tensorflow"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pylint: disable=broad-except
            info[mod] = "not installed"
    try:
        import jax  # pylint: disable=import-outside-toplevel
        dev = jax.devices()[0]
        info["jax_device"] = f"{jax.device_count()} x {dev.device_kind} ({dev.platform})"
    except Exception:  # pylint: disable=broad-except
        pass
    try:
        info["load_average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    return info


# --- timing -----------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads)."""
    t = os.times()
    return t[0] + t[1]


def interleaved(fns: Mapping[str, Callable[[], None]], reps: int, warmup: int = 1,
                budget_s: Optional[float] = None,
                warmups: Optional[Mapping[str, Callable[[], None]]] = None
                ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """(wall seconds, process CPU seconds) of each fn per repetition, the fns alternating
    (order rotated every repetition). Each fn must block until its work is done. Stops early
    (after at least 3 repetitions) when budget_s of measurement has been spent. `warmups`
    replaces a fn's warm-up call (e.g. a cheaper call that still compiles everything).

    CPU seconds are the work done whatever else runs on the machine (spinning thread pools
    included); wall seconds are what a user waits for."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            (warmups or {}).get(n, fns[n])()
    wall: Dict[str, List[float]] = {n: [] for n in names}
    cpu: Dict[str, List[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0, c0 = time.perf_counter(), cpu_seconds()
            fns[n]()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(cpu_seconds() - c0)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return wall, cpu


# --- sampling ------------------------------------------------------------------------------
def new_tokens(tokens, stop_ids, max_len: int, eos_id: int = 1) -> int:
    """Tokens emitted per row up to and including its first EOS / stop token."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    total = 0
    for row, stop in zip(np.asarray(tokens), stop_ids):
        hit = np.flatnonzero((row == eos_id) | (row == stop))
        total += int(hit[0]) + 1 if hit.size else min(max_len, row.shape[0])
    return total


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> float:
    """Relative half-range of the middle half: a rough +- of the median."""
    s = sorted(xs)
    if len(s) < 4:
        return (s[-1] - s[0]) / (2 * statistics.median(s)) if s else 0.0
    q1, q3 = s[len(s) // 4], s[(3 * len(s)) // 4]
    return (q3 - q1) / (2 * statistics.median(s))


# --- FLOPs ---------------------------------------------------------------------------------
def t5_train_flops(config, batch: int, inputs_length: int, targets_length: int) -> float:
    """Analytic matmul FLOPs of a train step (the count behind MFU and `ssr-jax plan`)."""
    from ssr_jax.models.flops import t5_train_flops as flops  # pylint: disable=C0415
    return flops(config, batch, inputs_length, targets_length)


def random_params(model, seed: int = 0):
    """T5-like random params as numpy, without compiling the model's jitted init (30 s for
    T5 small on this CPU): embeddings std 1, kernels std fan_in**-0.5, norm scales 1,
    relative position tables uniform(-0.1, 0.1)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if len(s.shape) == 1:
            return np.ones(s.shape, np.float32)
        if "relpos" in name:
            return rng.uniform(-0.1, 0.1, s.shape).astype(np.float32)
        std = 1.0 if "embedding" in name else s.shape[0] ** -0.5
        return (rng.standard_normal(s.shape, np.float32) * np.float32(std))

    return jax.tree_util.tree_map_with_path(draw, model.abstract_params())


def matmul_runner(n: int = 2048) -> Callable[[], None]:
    """A callable doing one fp32 n x n jnp.dot (to interleave with other measurements)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    return lambda: jax.block_until_ready(f(a, a))


# --- output -----------------------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    """Numbers with thousands separators / a few significant digits."""
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 100):
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-markdown table (also readable on a terminal)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def render(result: Mapping) -> str:
    text = f"### {result['title']}\n\n" + table(result["headers"], result["rows"])
    if result.get("notes"):
        text += "\n\n" + "\n".join(f"- {n}" for n in result["notes"])
    return text


def main(run: Callable[[bool], Dict]):
    """Command line of a benchmark script: --quick (fewer repetitions), --json=PATH."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    t0 = time.time()
    result = run(args.quick)
    result["seconds"] = time.time() - t0
    result.setdefault("machine", machine())
    print(render(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
