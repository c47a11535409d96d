"""ssr_jax.host_malloc: glibc tunables for XLA:CPU processes, set by re-executing once."""
import json
import os
import platform
import subprocess
import sys

import pytest

from ssr_jax import host_malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def test_tunables_keep_the_users_own_values():
    assert host_malloc.tunables("") == OURS
    assert host_malloc.tunables("glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=off") == (
        "glibc.malloc.arena_max=4:glibc.cpu.x86_shstk=off:glibc.malloc.mmap_max=0:"
        "glibc.malloc.trim_threshold=1099511627776")


@pytest.mark.parametrize("environ, libc, accelerator, expected", [
    ({}, "glibc", False, True),
    ({"SSR_JAX_GLIBC_MALLOC": "0"}, "glibc", False, False),  # opted out
    ({"SSR_JAX_GLIBC_MALLOC_SET": "1"}, "glibc", False, False),  # re-executed already
    ({"GLIBC_TUNABLES": OURS}, "glibc", False, False),  # nothing to add
    ({}, "", False, False),  # musl or unknown libc: no glibc tunables
    ({}, "glibc", True, False),  # a GPU/TPU host: the input pipeline's threads keep arenas
    ({"JAX_PLATFORMS": "cpu"}, "glibc", True, True),  # ... unless XLA runs on its CPU
])
def test_wanted_only_where_xla_computes_on_glibc(environ, libc, accelerator, expected):
    if sys.platform != "linux":
        pytest.skip("Linux only")
    assert host_malloc.wanted(environ, libc, accelerator) is expected


_PROBE = r"""
import json, os, resource, sys
sys.path.insert(0, {repo!r})
from ssr_jax import host_malloc
host_malloc.reexec_if_needed()
import numpy as np
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # 256 MiB, freed, then again: reused, or mapped and faulted in anew
    np.ones(2 ** 25).sum()
before = faults()
for _ in range(3):
    np.ones(2 ** 25).sum()
print(json.dumps({{"tunables": os.environ.get("GLIBC_TUNABLES"), "pid": os.getpid(),
                  "faults": faults() - before}}))
"""


def test_without_takes_out_only_our_settings():
    env = host_malloc.without({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off:" + OURS,
                               "SSR_JAX_GLIBC_MALLOC_SET": "1", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off", "SSR_JAX_GLIBC_MALLOC": "0",
                   "PATH": "/bin"}
    assert "GLIBC_TUNABLES" not in host_malloc.without({"GLIBC_TUNABLES": OURS})


_GLIBC = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                            reason="glibc on Linux only")


def _env_that_wants_the_settings():
    return dict({k: v for k, v in os.environ.items()
                 if not k.startswith(("GLIBC_TUNABLES", "SSR_JAX_GLIBC"))}, JAX_PLATFORMS="cpu")


@_GLIBC
def test_reexecuted_process_reuses_freed_buffers_without_page_faults():
    runs = {}
    for name, extra in (("default", {"SSR_JAX_GLIBC_MALLOC": "0"}), ("ours", {})):
        proc = subprocess.run([sys.executable, "-c", _PROBE.format(repo=REPO)],
                              env=dict(_env_that_wants_the_settings(), **extra),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["default"]["tunables"] is None
    assert runs["ours"]["tunables"] == OURS
    # Each fresh 256 MiB mapping faults in at least one fault per page (2 MiB huge pages at
    # most): 3 of them >= 384; reused heap memory faults in nothing.
    assert runs["default"]["faults"] >= 3 * 2 ** 28 // 2 ** 21, runs
    assert runs["ours"]["faults"] <= runs["default"]["faults"] // 10, runs


@_GLIBC
@pytest.mark.parametrize("module_name, expected", [("__main__", "1"), ("gpu_sampling", "no")])
def test_a_benchmark_reexecutes_only_when_it_is_the_program(tmp_path, module_name, expected):
    script = tmp_path / "probe.py"
    script.write_text(
            "import os, sys\n"
            f"sys.path.insert(0, {os.path.join(REPO, 'bench')!r})\n"
            "import common\n"
            "common.setup_env(sys.argv[1])\n"
            f"print('ran with', os.environ.get({host_malloc.DONE!r}, 'no'))\n")
    proc = subprocess.run([sys.executable, str(script), module_name],
                          env=_env_that_wants_the_settings(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ran with")]
    assert len(lines) == 1 and lines[0].split()[2] == expected, proc.stdout


@_GLIBC
def test_collecting_the_benchmark_tests_keeps_pytests_output():
    # tests/test_gpu_bench.py imports bench modules: that once re-executed pytest during
    # collection, and the whole run's output went to a capture file nobody reads.
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests/test_gpu_bench.py"],
                          cwd=REPO, env=_env_that_wants_the_settings(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test_bandwidth_bound_against_closed_form" in proc.stdout, proc.stdout[-2000:]
    assert "collected" in proc.stdout, proc.stdout[-2000:]
