"""TensorFlow's environment for every ssr-jax process (it only feeds data here)."""
import os


def quiet_tensorflow_env() -> None:
    """Before TensorFlow loads: no C++ logs below errors, and no oneDNN kernels. TF only
    feeds data here; on AVX-512 CPUs it turns oneDNN on by default and says so at every
    start (past TF_CPP_MIN_LOG_LEVEL), and its float ops would differ between machines."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # also E-level "failed call to cuInit"
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
