"""ssr-jax: Sequence Span Rewriting pre-training for T5-style models in JAX."""
import setuptools

# Tested ranges: the lower bound is the version the suite passes with (constraints.txt, which
# `make install` installs exactly); the upper bound stops before the next release line whose
# APIs may move (minor for 0.x and for TensorFlow, major otherwise; seqio 0.0.x: the patch).
# tests/test_install.py checks every pin in constraints.txt lies in these ranges.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "seqio>=0.0.20,<0.0.21",
    "tensorflow>=2.21,<2.22",  # imported directly (data sources), not only through seqio
    "tensorflow-datasets>=4.9.10,<5",
    "sentencepiece>=0.2.3,<0.3",
    "gin-config>=0.5,<0.6",
    "importlib_resources>=7.1,<8",  # TFDS needs it to build the embedded corpus
    "rouge-score>=0.1.2,<0.2",  # seqio metrics for downstream tasks
    "sacrebleu>=2.6,<3",
    "numpy>=2.4,<3",
    "tensorboard>=2.21,<3",  # `make run` ends by suggesting `tensorboard --logdir`
    "matplotlib>=3.11.2,<4",  # `ssr-jax compare` plots (imported lazily)
]

EXTRAS = {
    # CPU build of torch lies on disk here; pinning keeps pip from pulling a CUDA build.
    "hf": ["torch==2.13.0", "transformers>=5.24,<6", "safetensors>=0.8,<0.9"],
    "test": ["pytest>=9.2,<10"],
    # Accelerators: jax's own extras, in the same tested range as INSTALL_REQUIRES's jax.
    "cuda": ["jax[cuda13]>=0.10.2,<0.11"],  # NVIDIA GPUs, CUDA 13 wheels (cuDNN included)
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],  # Cloud TPU VMs (libtpu)
}
EXTRAS["test"] = EXTRAS["test"] + EXTRAS["hf"]

setuptools.setup(
    name="ssr_jax",
    version="0.1.0",
    description="Sequence Span Rewriting (SSR) pre-training for T5 in JAX/Flax",
    packages=setuptools.find_packages(include=["ssr_jax", "ssr_jax.*", "tasks", "tasks.*"]),
    package_data={"tasks": ["assets/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["ssr-jax=ssr_jax.cli:main"]},
)
