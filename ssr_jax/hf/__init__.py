"""Hugging Face T5 export/import (transformers' PyTorch T5ForConditionalGeneration layout)."""
from ssr_jax.hf.convert import export_hf, import_hf  # noqa: F401
