"""EncoderDecoderModel: the T5 network behind the trainer-facing BaseModel contract.

Params are a plain nested dict of fp32 arrays (the pure-dict form of the NNX state). The
model keeps the NNX graph definition and an abstract state template and re-assembles the
module inside each (traced) function, so only arrays cross jit boundaries.
"""
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from ssr_jax.models import decoding, flops, losses
from ssr_jax.models.base import Batch, BaseModel, DecodeConfig, LossConfig, Params
from ssr_jax.models.config import T5Config
from ssr_jax.models.t5 import T5Transformer

DECODE_METHODS = ("greedy", "beam", "sample")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


class EncoderDecoderModel(BaseModel):
    """T5 encoder-decoder (1.0 or 1.1 by config) with losses and decoding."""

    def __init__(self, config: T5Config, loss: LossConfig = LossConfig()):
        self.config = config
        self.loss = loss
        T5Transformer.check_config(config)
        self._predict_jit = jax.jit(self._predict, static_argnames=("decode",))

    @functools.cached_property
    def _split(self):
        # Built on first use: tracing the module of a large model takes seconds.
        abstract = nnx.eval_shape(lambda: T5Transformer(self.config, nnx.Rngs(0)))
        return nnx.split(abstract)

    @property
    def _graphdef(self):
        return self._split[0]

    @property
    def _template(self):
        return self._split[1]

    # -- params ------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        """Fresh params (a nested dict of param_dtype arrays), deterministic in rng."""
        return _init_params(self.config, rng)

    def param_logical_axes(self) -> Params:
        def spec(v):
            names = v.get_metadata().get("out_sharding") or ()
            return PartitionSpec(*names)
        return jax.tree.map(spec, self._template, is_leaf=_is_var).to_pure_dict()

    def abstract_params(self) -> Params:
        return self._template.to_pure_dict()

    def config_dict(self) -> Dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], source: str = "model config",
                         loss: LossConfig = LossConfig()) -> "EncoderDecoderModel":
        return cls(T5Config.from_dict(config, source), loss)

    def replace_config(self, **changes) -> "EncoderDecoderModel":
        return EncoderDecoderModel(self.config.replace(**changes), self.loss)

    def train_flops(self, batch_size: int, inputs_length: int, targets_length: int) -> float:
        return flops.t5_train_flops(self.config, batch_size, inputs_length, targets_length)

    def generate_flops(self, batch_size: int, inputs_length: int,
                       decode_length: int) -> float:
        return flops.t5_generate_flops(self.config, batch_size, inputs_length, decode_length)

    def module(self, params: Params) -> T5Transformer:
        """The NNX module holding `params` (call inside traced functions)."""
        state = jax.tree.map(lambda x: x, self._template)  # fresh Variables
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self._graphdef, state)

    # -- forward -----------------------------------------------------------------------
    def logits(self, params: Params, batch: Batch,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits [batch, decoder_length, vocab] in the activation dtype."""
        return self.module(params)(
                batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                encoder_segment_ids=batch.get("encoder_segment_ids"),
                decoder_segment_ids=batch.get("decoder_segment_ids"),
                encoder_positions=batch.get("encoder_positions"),
                decoder_positions=batch.get("decoder_positions"),
                dropout_key=dropout_rng if self.config.dropout_rate > 0 else None)

    def loss_fn(self, params: Params, batch: Batch, dropout_rng: Optional[jax.Array]
                ) -> Tuple[jax.Array, Mapping[str, jax.Array]]:
        logits = self.logits(params, batch, dropout_rng)
        return losses.summed_metrics(logits, batch["decoder_target_tokens"],
                                     batch.get("decoder_loss_weights"), self.loss.z_loss,
                                     self.loss.label_smoothing)

    def eval_fn(self, params: Params, batch: Batch) -> Mapping[str, jax.Array]:
        return self.loss_fn(params, batch, None)[1]

    # -- decoding ----------------------------------------------------------------------
    def predict_batch(self, params: Params, batch: Batch, decode: DecodeConfig,
                      rng: Optional[jax.Array] = None,
                      stop_tokens: Optional[jax.Array] = None,
                      max_decode_lengths: Optional[jax.Array] = None
                      ) -> Tuple[jax.Array, jax.Array]:
        if decode.method not in DECODE_METHODS:
            raise ValueError(f"DecodeConfig.method={decode.method!r}; use one of "
                             f"{DECODE_METHODS}.")
        if decode.method == "sample" and rng is None:
            raise ValueError("DecodeConfig.method='sample' needs an rng.")
        if decode.method != "sample":
            rng = None
        return self._predict_jit(params, batch["encoder_input_tokens"], decode, rng,
                                 stop_tokens, max_decode_lengths)

    def _predict(self, params, encoder_input_tokens, decode: DecodeConfig, rng, stop_tokens,
                 max_decode_lengths):
        c = self.config
        model = self.module(params)
        batch_size = encoder_input_tokens.shape[0]
        beams = decode.num_beams if decode.method == "beam" else 1
        state = model.init_decode_state(encoder_input_tokens, decode.max_decode_length, beams)
        cross_kv, cross_bias = state["cross_kv"], state["cross_bias"]

        def step_fn(tokens, cache, step):
            logits, cache = model.decode_step(tokens, cache, cross_kv, cross_bias, step)
            return logits.astype(jnp.float32), cache

        if decode.method == "beam":
            return decoding.beam_search(
                    step_fn, state["cache"], batch_size, beams, decode.max_decode_length,
                    eos_id=c.eos_id, start_id=c.decoder_start_token_id,
                    alpha=decode.brevity_alpha, stop_tokens=stop_tokens,
                    max_decode_lengths=max_decode_lengths,
                    no_repeat_ngram_size=decode.no_repeat_ngram_size)
        keys = None if rng is None else decoding.row_keys(rng, batch_size)
        return decoding.sample_decode(
                step_fn, state["cache"], batch_size, decode.max_decode_length,
                eos_id=c.eos_id, start_id=c.decoder_start_token_id, keys=keys,
                temperature=decode.temperature, top_k=decode.top_k, top_p=decode.top_p,
                stop_tokens=stop_tokens, max_decode_lengths=max_decode_lengths,
                no_repeat_ngram_size=decode.no_repeat_ngram_size)

    def score_batch(self, params: Params, batch: Batch) -> jax.Array:
        """Per-example sum of target log-likelihoods under decoder_loss_weights."""
        logits = self.logits(params, batch).astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        weights = (targets > 0) if weights is None else weights
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(ll * weights.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: T5Config, rng: jax.Array) -> Params:
    # One compiled init per config: eager NNX init dispatches one op per parameter.
    model = T5Transformer(config, nnx.Rngs(params=rng))
    return nnx.state(model, nnx.Param).to_pure_dict()
