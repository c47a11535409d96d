"""ssr-jax: Sequence Span Rewriting pre-training for T5-style models in JAX."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.35",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "seqio",
    "tensorflow-datasets",
    "sentencepiece",
    "gin-config",
    "importlib_resources",  # TFDS needs it to build the embedded corpus
    "rouge-score",  # seqio metrics for downstream tasks
    "sacrebleu",
    "numpy",
]

EXTRAS = {
    # CPU build of torch lies on disk here; pinning keeps pip from pulling a CUDA build.
    "hf": ["torch==2.13.0", "transformers>=4.40", "safetensors"],
    "test": ["pytest"],
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
