"""T5 model configuration as plain data (gin binds it at the edges, never inside layers)."""
import dataclasses
from typing import Any, Mapping

from ssr_jax.errors import UserError

ACTIVATIONS = ("relu", "gated-gelu", "gated-relu", "gelu")


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
    # Activation dtype; params are always kept in param_dtype (fp32).
    dtype: str = "float32"
    param_dtype: str = "float32"
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_token_id: int = 0
    # Rematerialisation of each layer in the backward pass: "none" | "full".
    remat_policy: str = "none"

    def __post_init__(self):
        if self.feed_forward_proj not in ACTIVATIONS:
            raise ValueError(
                    f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                    f"use one of {ACTIVATIONS}.")
        for name in ("d_model", "num_heads", "d_kv", "d_ff", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}.")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

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
