"""The narrow contract between the trainer and a model.

The trainer, the partitioner, the SSR teacher, `ssr-jax plan`, checkpoints and the HF
exporter see a model only through this interface.
Params are a plain nested dict of arrays (a pytree); their logical axis names come from
`param_logical_axes()`, a pytree of the same structure whose leaves are
`jax.sharding.PartitionSpec`s of *logical* names ('vocab', 'embed', 'mlp', 'heads', 'kv',
'joined_kv', 'relpos_buckets', ...). Only the partitioner maps them to mesh axes.

Batches are dicts of int32 arrays [batch, length] in T5X's encoder-decoder layout:
  encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights,
  and when packed: encoder_segment_ids, decoder_segment_ids, encoder_positions,
  decoder_positions.
"""
import abc
import dataclasses
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import jax

from ssr_jax.errors import UserError

Params = Any  # nested dict of arrays
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How token losses are formed. Sums are returned; the trainer normalises."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Autoregressive decoding. method: 'greedy' | 'beam' | 'sample'."""

    method: str = "greedy"
    max_decode_length: int = 64
    num_beams: int = 4
    brevity_alpha: float = 0.6  # T5X's ((5 + len) / 6) ** alpha length penalty
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    # n > 0: never emit a token that completes an n-gram already in the output (Hugging
    # Face's no_repeat_ngram_size, every method); 0 = off.
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        n = self.no_repeat_ngram_size
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise UserError(f"DecodeConfig.no_repeat_ngram_size={n!r}: use an integer >= 0 "
                            "(0 = off).")


class BaseModel(abc.ABC):
    """What the trainer needs from a model; it never imports the network itself."""

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> Params:
        """Fresh params (fp32), deterministic in rng."""

    @abc.abstractmethod
    def param_logical_axes(self) -> Params:
        """PartitionSpec of logical axis names for every param leaf (same tree as init)."""

    def abstract_params(self) -> Params:
        """jax.ShapeDtypeStruct per param (same tree as init), without allocating any."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0)))

    def config_dict(self) -> Optional[Dict[str, Any]]:
        """The model's configuration as JSON-able data (a checkpoint's model_config.json),
        or None when it has none; `from_config_dict` reads it back."""
        return None

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], source: str = "model config"
                         ) -> "BaseModel":
        """The model described by `config_dict()`; bad fields are a UserError naming
        `source`."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from {source}")

    def replace_config(self, **changes) -> "BaseModel":
        """The same kind of model with some config fields changed (e.g. fewer layers)."""
        return type(self).from_config_dict({**(self.config_dict() or {}), **changes})

    def train_flops(self, batch_size: int, inputs_length: int, targets_length: int) -> float:
        """Matmul FLOPs of one training step (forward + backward) on a batch of this static
        shape, padded positions included; NaN when unknown (then no MFU is reported)."""
        return float("nan")

    def generate_flops(self, batch_size: int, inputs_length: int,
                       decode_length: int) -> float:
        """Matmul FLOPs of decoding `decode_length` tokens for a batch; NaN when unknown."""
        return float("nan")

    @abc.abstractmethod
    def loss_fn(self, params: Params, batch: Batch,
                dropout_rng: Optional[jax.Array]) -> Tuple[jax.Array, Mapping[str, jax.Array]]:
        """Summed weighted token loss (cross-entropy + z-loss) and aux sums.

        Returns (loss_sum, aux) where aux has at least 'weight_sum', 'z_loss_sum',
        'cross_ent_sum', 'correct_sum' (all scalars, summed over weighted tokens). The
        trainer divides by the (global, accumulated) weight sum, which keeps gradient
        accumulation exact. dropout_rng=None means deterministic (no dropout).
        """

    @abc.abstractmethod
    def eval_fn(self, params: Params, batch: Batch) -> Mapping[str, jax.Array]:
        """Summed metrics for one batch without dropout (same keys as loss_fn's aux)."""

    @abc.abstractmethod
    def predict_batch(self, params: Params, batch: Batch, decode: DecodeConfig,
                      rng: Optional[jax.Array] = None,
                      stop_tokens: Optional[jax.Array] = None,
                      max_decode_lengths: Optional[jax.Array] = None
                      ) -> Tuple[jax.Array, jax.Array]:
        """Decode from batch['encoder_input_tokens'].

        Returns (tokens [batch, decode.max_decode_length], scores [batch]); positions after
        a row stops are pad (0). A row stops after emitting EOS, or its own stop token
        (stop_tokens[b], e.g. the last SSR sentinel), or after max_decode_lengths[b] tokens.
        Sampling: rng is either one key (row b uses fold_in(rng, b)) or one key per row
        (uint32 [batch, 2]) so that an example's sample depends only on its own key, not on
        the batch it lands in or how the batch is sharded.
        """
