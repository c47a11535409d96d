"""T5 model configuration as plain data (gin binds it at the edges, never inside layers).

Two fields may say 'auto' and are resolved where the network is built, on the backend it
runs on (`T5Config.resolved`), so one config (and a checkpoint's model_config.json) runs in
bf16 with fused attention on a GPU and in fp32 with the einsum attention on a CPU:
  * dtype 'auto': bfloat16 activations on GPU/TPU, float32 on CPU (params stay param_dtype);
  * attention_impl 'auto': 'dot_product_attention' (jax.nn.dot_product_attention, cuDNN's
    fused kernels where shapes and dtypes allow) on GPU when there is no dropout, else
    'einsum' (explicit scores + softmax; the reference, and what XLA:CPU/TPU run well).
"""
import dataclasses
from typing import Any, Mapping, Optional

from ssr_jax.errors import UserError

ACTIVATIONS = ("relu", "gated-gelu", "gated-relu", "gelu")
ATTENTION_IMPLS = ("auto", "einsum", "dot_product_attention")
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def default_backend() -> str:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.default_backend()


def resolve_dtype(dtype: str, backend: Optional[str] = None) -> str:
    """The activation dtype 'auto' stands for on `backend` (default: JAX's default backend):
    bfloat16 on accelerators, float32 on CPU; any other name is returned unchanged."""
    if dtype != "auto":
        return dtype
    backend = default_backend() if backend is None else backend
    return "bfloat16" if backend.lower() in ACCELERATORS else "float32"


def resolve_attention_impl(impl: str, dropout_rate: float = 0.0,
                           backend: Optional[str] = None) -> str:
    """The attention 'auto' stands for: the fused path on GPU (jax.nn.dot_product_attention
    has no attention-weights dropout, so only without dropout), the einsum path elsewhere."""
    if impl != "auto":
        return impl
    backend = default_backend() if backend is None else backend
    gpu = backend.lower() in ("gpu", "cuda", "rocm")
    return "dot_product_attention" if gpu and dropout_rate == 0.0 else "einsum"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and numerics of a T5 encoder-decoder. Defaults are T5 1.1 small."""

    vocab_size: int = 32128
    d_model: int = 512
    num_heads: int = 6
    d_kv: int = 64
    d_ff: int = 1024
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    # HF's names: "relu" (T5 1.0), "gated-gelu" (T5 1.1, tanh-approximate GELU).
    feed_forward_proj: str = "gated-gelu"
    # T5 1.0 ties input/output embeddings and scales logits by d_model**-0.5.
    tie_word_embeddings: bool = False
    # Activation dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params are always
    # kept in param_dtype (fp32).
    dtype: str = "auto"
    param_dtype: str = "float32"
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_token_id: int = 0
    # Rematerialisation of each layer in the backward pass: "none" | "full".
    remat_policy: str = "none"
    # "auto" | "einsum" | "dot_product_attention" (module docstring). Same params, same
    # results up to float rounding: a runtime choice like dtype.
    attention_impl: str = "auto"

    def __post_init__(self):
        if self.feed_forward_proj not in ACTIVATIONS:
            raise ValueError(
                    f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                    f"use one of {ACTIVATIONS}.")
        for name in ("d_model", "num_heads", "d_kv", "d_ff", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"T5Config.attention_impl={self.attention_impl!r} is not "
                             f"supported; use one of {ATTENTION_IMPLS}.")
        if self.attention_impl == "dot_product_attention" and self.dropout_rate > 0:
            raise ValueError(
                    f"T5Config.attention_impl='dot_product_attention' has no attention "
                    f"dropout but dropout_rate={self.dropout_rate}; set dropout_rate=0 or "
                    "attention_impl='einsum' (or 'auto', which picks einsum with dropout).")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    def resolved(self, backend: Optional[str] = None) -> "T5Config":
        """This config with 'auto' dtype / attention_impl made concrete for `backend`."""
        return self.replace(dtype=resolve_dtype(self.dtype, backend),
                            attention_impl=resolve_attention_impl(
                                    self.attention_impl, self.dropout_rate, backend))

    def replace(self, **kwargs) -> "T5Config":
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "model config") -> "T5Config":
        """A T5Config from `to_dict()` output; unknown or bad fields name `source`."""
        if not isinstance(d, Mapping):
            raise UserError(f"{source}: expected an object of T5Config fields, got "
                            f"{type(d).__name__}.")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown T5Config field(s) {', '.join(unknown)}.")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: {e}") from e
