"""ssr_jax: Sequence Span Rewriting pre-training for T5-style encoder-decoders in JAX."""

__version__ = "0.1.0"
