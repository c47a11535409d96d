"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests are dominated by compilation of tiny programs: skip XLA's slow backend passes.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
from ssr_jax.cli.tf_env import quiet_tensorflow_env  # noqa: E402  (no jax, no TF)

quiet_tensorflow_env()  # as every ssr-jax process
# One persistent compile cache for the whole run (subprocesses inherit it): many test files
# compile the same tiny programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ssr_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TF only feeds data; keep it off accelerators and away from JAX's threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~30 s on 2 CPU cores")


# Shared by the SSR test files: built once per run.
@pytest.fixture(scope="session")
def vocabulary():
    import tasks
    return tasks.default_vocabulary()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, vocabulary):
    """A tiny random teacher checkpoint with its vocabulary record."""
    from test_teacher import make_teacher_checkpoint
    return make_teacher_checkpoint(tmp_path_factory.mktemp("teacher"), vocabulary=vocabulary)
