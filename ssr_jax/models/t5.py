"""The T5 encoder-decoder network in Flax NNX (T5 1.0 and 1.1 from one T5Config).

Parameter tree (T5X names): token_embedder/embedding; encoder/{relpos_bias, layers_i,
encoder_norm}; decoder/{relpos_bias, layers_i, decoder_norm, logits_dense (untied only)}.
Each stack builds its attention inputs once, shared by all of its layers (`Attn`): for
the einsum attention the relative position bias and the masks folded into one fp32 bias,
for dot_product_attention the bias, the boolean mask and the causal flag apart (layers.py).
Packed inputs use segment ids for block-diagonal masks and positions (restarting per
segment) for the relative bias. The config's 'auto' fields are resolved here, on the
backend the module is built on (config.py).

Decoding uses an explicit cache pytree (no NNX cache variables): `init_decode_state` runs
the cross-attention key/value projections of the encoder output once, `decode_step`
advances one position for every row.
"""
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ssr_jax.models.config import T5Config
from ssr_jax.models.layers import (Dense, Embed, MlpBlock, MultiHeadAttention,
                                   RelativePositionBias, RMSNorm, causal_mask, constrain,
                                   dropout, mask_to_bias, split_key)

DecodeState = Dict[str, Any]

_ACT = ("batch", "length", "embed")


def _call_layer(layer, *args):
    return layer(*args)


def _layer_runner(remat_policy: str):
    if remat_policy == "full":
        # Keep only each layer's inputs; recompute its internals in the backward pass.
        return nnx.remat(_call_layer)
    if remat_policy == "none":
        return _call_layer
    raise ValueError(f"T5Config.remat_policy={remat_policy!r} is not supported; "
                     "use 'none' or 'full'.")


def _positions(tokens: jax.Array, positions: Optional[jax.Array]) -> jax.Array:
    if positions is not None:
        return positions
    return jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]


@struct.dataclass
class Attn:
    """One attention's inputs, shared by the layers of a stack (MultiHeadAttention.attend);
    `causal` is static (it picks the kernel), also through nnx.remat."""
    bias: Optional[jax.Array]
    mask: Optional[jax.Array] = None
    causal: bool = struct.field(pytree_node=False, default=False)


def _attn(fused: bool, relpos: Optional[jax.Array], mask: Optional[jax.Array],
          causal: bool = False) -> Attn:
    """The einsum path gets one fp32 bias with the masks folded in (causal included); the
    fused path gets them apart (cuDNN skips the causal half instead of masking it)."""
    if fused:
        return Attn(relpos, mask, causal)
    if causal:
        allowed = causal_mask(*relpos.shape[-2:])
        mask = allowed if mask is None else mask & allowed
    bias = relpos
    if mask is not None:
        bias = mask_to_bias(mask) if bias is None else bias + mask_to_bias(mask)
    return Attn(bias)


def _cross_mask(encoder_tokens: jax.Array, pad_id: int,
                decoder_segment_ids: Optional[jax.Array],
                encoder_segment_ids: Optional[jax.Array]) -> jax.Array:
    """[b, 1, q or 1, k]: encoder padding, plus same-segment when packed."""
    mask = (encoder_tokens != pad_id)[:, None, None, :]
    if decoder_segment_ids is not None and encoder_segment_ids is not None:
        mask = mask & (decoder_segment_ids[:, None, :, None]
                       == encoder_segment_ids[:, None, None, :])
    return mask


class EncoderLayer(nnx.Module):
    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        c = config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        self.dropout_rate = c.dropout_rate
        self.pre_attention_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon, dt, pdt, rngs)
        self.attention = MultiHeadAttention(c.d_model, c.num_heads, c.d_kv, c.dropout_rate, dt,
                                            pdt, rngs, c.attention_impl)
        self.pre_mlp_layer_norm = RMSNorm(c.d_model, c.layer_norm_epsilon, dt, pdt, rngs)
        self.mlp = MlpBlock(c.d_model, c.d_ff, c.feed_forward_proj, c.dropout_rate, dt, pdt,
                            rngs)

    def __call__(self, x, attn: Attn, dropout_key=None):
        k = split_key(dropout_key, 4)
        h = self.pre_attention_layer_norm(x)
        y = self.attention(h, h, attn.bias, k[0], attn.mask, attn.causal)
        x = x + dropout(y, self.dropout_rate, k[1])
        h = self.pre_mlp_layer_norm(x)
        x = x + dropout(self.mlp(h, k[2]), self.dropout_rate, k[3])
        return constrain(x, _ACT)


class DecoderLayer(nnx.Module):
    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        c = config
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        eps = c.layer_norm_epsilon
        self.dropout_rate = c.dropout_rate
        self.pre_self_attention_layer_norm = RMSNorm(c.d_model, eps, dt, pdt, rngs)
        self.self_attention = MultiHeadAttention(c.d_model, c.num_heads, c.d_kv, c.dropout_rate,
                                                 dt, pdt, rngs, c.attention_impl)
        self.pre_cross_attention_layer_norm = RMSNorm(c.d_model, eps, dt, pdt, rngs)
        self.encoder_decoder_attention = MultiHeadAttention(c.d_model, c.num_heads, c.d_kv,
                                                            c.dropout_rate, dt, pdt, rngs,
                                                            c.attention_impl)
        self.pre_mlp_layer_norm = RMSNorm(c.d_model, eps, dt, pdt, rngs)
        self.mlp = MlpBlock(c.d_model, c.d_ff, c.feed_forward_proj, c.dropout_rate, dt, pdt,
                            rngs)

    def __call__(self, x, encoded, self_attn: Attn, cross_attn: Attn, dropout_key=None):
        k = split_key(dropout_key, 6)
        h = self.pre_self_attention_layer_norm(x)
        y = self.self_attention(h, h, self_attn.bias, k[0], self_attn.mask, self_attn.causal)
        x = x + dropout(y, self.dropout_rate, k[1])
        h = self.pre_cross_attention_layer_norm(x)
        y = self.encoder_decoder_attention(h, encoded, cross_attn.bias, k[2], cross_attn.mask)
        x = x + dropout(y, self.dropout_rate, k[3])
        h = self.pre_mlp_layer_norm(x)
        x = x + dropout(self.mlp(h, k[4]), self.dropout_rate, k[5])
        return constrain(x, _ACT)

    def decode_step(self, x, cache, cross_kv, self_attn: Attn, cross_bias, step):
        h = self.pre_self_attention_layer_norm(x)
        y, cache = self.self_attention.decode_step(h, cache, step, self_attn.bias,
                                                   self_attn.mask)
        x = x + y
        h = self.pre_cross_attention_layer_norm(x)
        attn = self.encoder_decoder_attention
        x = x + attn.attend_cached(attn.project_q(h), cross_kv[0], cross_kv[1], cross_bias)
        x = x + self.mlp(self.pre_mlp_layer_norm(x))
        return x, cache


def _build_stack(stack: nnx.Module, c: T5Config, rngs: nnx.Rngs, layer_cls, num_layers: int,
                 bidirectional: bool, norm_name: str):
    """One relative position bias table (shared by the stack's layers), the layers, the final
    norm; created in this order (it fixes the init's key sequence)."""
    stack.config = c
    stack.relpos_bias = RelativePositionBias(c.num_heads, c.relative_attention_num_buckets,
                                             c.relative_attention_max_distance, bidirectional,
                                             jnp.dtype(c.param_dtype), rngs)
    for i in range(num_layers):
        setattr(stack, f"layers_{i}", layer_cls(c, rngs))
    setattr(stack, norm_name, RMSNorm(c.d_model, c.layer_norm_epsilon, jnp.dtype(c.dtype),
                                      jnp.dtype(c.param_dtype), rngs))


class Encoder(nnx.Module):
    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        _build_stack(self, config, rngs, EncoderLayer, config.num_encoder_layers, True,
                     "encoder_norm")

    def __call__(self, x, tokens, segment_ids=None, positions=None, dropout_key=None):
        c = self.config
        pos = _positions(tokens, positions)
        mask = (tokens != c.pad_id)[:, None, None, :]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        # Computed once, shared by all layers: bias [b or 1, heads, s, s] in fp32.
        attn = _attn(c.attention_impl == "dot_product_attention", self.relpos_bias(pos, pos),
                     mask)
        keys = split_key(dropout_key, c.num_encoder_layers + 2)
        run = _layer_runner(c.remat_policy)
        x = constrain(dropout(x, c.dropout_rate, keys[0]), _ACT)
        for i in range(c.num_encoder_layers):
            x = run(getattr(self, f"layers_{i}"), x, attn, keys[i + 1])
        x = self.encoder_norm(x)
        return constrain(dropout(x, c.dropout_rate, keys[-1]), _ACT)


class Decoder(nnx.Module):
    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        c = config
        _build_stack(self, c, rngs, DecoderLayer, c.num_decoder_layers, False, "decoder_norm")
        if not c.tie_word_embeddings:
            self.logits_dense = Dense(
                    c.d_model, c.vocab_size, ("embed", "vocab"),
                    nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                    jnp.dtype(c.dtype), jnp.dtype(c.param_dtype), rngs)

    def _layers(self):
        return [getattr(self, f"layers_{i}") for i in range(self.config.num_decoder_layers)]

    def logits(self, x, embedder: Embed):
        """Final norm'd hidden states -> logits [.., vocab] in the activation dtype."""
        c = self.config
        if c.tie_word_embeddings:
            # T5 1.0: tied output layer with logits scaled by d_model**-0.5.
            logits = embedder.attend(x * (c.d_model ** -0.5))
        else:
            logits = self.logits_dense(x)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, x, encoded, encoder_tokens, embedder: Embed, decoder_segment_ids=None,
                 encoder_segment_ids=None, decoder_positions=None, dropout_key=None):
        c = self.config
        pos = _positions(x[..., 0], decoder_positions)
        mask = None
        if decoder_segment_ids is not None:
            mask = (decoder_segment_ids[:, None, :, None]
                    == decoder_segment_ids[:, None, None, :])
        fused = c.attention_impl == "dot_product_attention"
        self_attn = _attn(fused, self.relpos_bias(pos, pos), mask, causal=True)
        cross_attn = _attn(fused, None, _cross_mask(encoder_tokens, c.pad_id,
                                                    decoder_segment_ids, encoder_segment_ids))
        keys = split_key(dropout_key, c.num_decoder_layers + 2)
        run = _layer_runner(c.remat_policy)
        x = constrain(dropout(x, c.dropout_rate, keys[0]), _ACT)
        for i, layer in enumerate(self._layers()):
            x = run(layer, x, encoded, self_attn, cross_attn, keys[i + 1])
        x = dropout(self.decoder_norm(x), c.dropout_rate, keys[-1])
        return self.logits(x, embedder)

    def cross_kv(self, encoded):
        return {f"layers_{i}": layer.encoder_decoder_attention.project_kv_cache(encoded)
                for i, layer in enumerate(self._layers())}

    def decode_step(self, x, cache, cross_kv, cross_bias, step, embedder: Embed):
        """One position for every row: x [n, 1, d] -> (logits [n, vocab], new cache)."""
        layers = self._layers()
        max_len = cache["layers_0"][0].shape[layers[0].self_attention.cache_length_axis]
        kpos = jnp.arange(max_len, dtype=jnp.int32)
        qpos = jnp.reshape(step, (1, 1)).astype(jnp.int32)
        self_attn = _attn(self.config.attention_impl == "dot_product_attention",
                          self.relpos_bias(qpos, kpos[None, :]),
                          (kpos <= step)[None, None, None, :])
        new_cache = {}
        for i, layer in enumerate(layers):
            name = f"layers_{i}"
            x, new_cache[name] = layer.decode_step(x, cache[name], cross_kv[name], self_attn,
                                                   cross_bias, step)
        return self.logits(self.decoder_norm(x), embedder)[:, 0, :], new_cache


class T5Transformer(nnx.Module):
    """Shared token embedding + encoder + decoder."""

    def __init__(self, config: T5Config, rngs: nnx.Rngs):
        self.check_config(config)
        config = config.resolved()
        self.config = config
        self.token_embedder = Embed(config.vocab_size, config.d_model,
                                    jnp.dtype(config.dtype), jnp.dtype(config.param_dtype),
                                    rngs)
        self.encoder = Encoder(config, rngs)
        self.decoder = Decoder(config, rngs)

    @staticmethod
    def check_config(config: T5Config):
        """Rejects settings the network cannot run, before any tracing."""
        _layer_runner(config.remat_policy)
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(config.resolved("cpu"), name))
            except TypeError as e:
                raise ValueError(f"T5Config.{name}={getattr(config, name)!r} is not a dtype.") \
                    from e

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None,
               dropout_key=None):
        x = self.token_embedder(encoder_input_tokens)
        return self.encoder(x, encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            dropout_key)

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
               dropout_key=None):
        x = self.token_embedder(decoder_input_tokens)
        return self.decoder(x, encoded, encoder_input_tokens, self.token_embedder,
                            decoder_segment_ids, encoder_segment_ids, decoder_positions,
                            dropout_key)

    def __call__(self, encoder_input_tokens, decoder_input_tokens, encoder_segment_ids=None,
                 decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
                 dropout_key=None):
        """Teacher-forced logits [batch, decoder_length, vocab] (activation dtype)."""
        k_enc, k_dec = split_key(dropout_key, 2)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              k_enc)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions, k_dec)

    def init_decode_state(self, encoder_input_tokens, max_decode_length: int,
                          num_repeats: int = 1) -> DecodeState:
        """Run the encoder once and prepare everything `decode_step` needs.

        With num_repeats > 1 (beam search) each row is repeated num_repeats times
        (row-major: row b's copies are rows b*num_repeats ...).
        """
        c = self.config
        encoded = self.encode(encoder_input_tokens)
        cross = self.decoder.cross_kv(encoded)
        # Additive for both attention paths (dot_product_attention takes it as bias=).
        bias = mask_to_bias(_cross_mask(encoder_input_tokens, c.pad_id, None, None))
        if num_repeats > 1:
            rep = lambda a: jnp.repeat(a, num_repeats, axis=0)  # noqa: E731
            cross, bias = jax.tree.map(rep, (cross, bias))
        n = encoder_input_tokens.shape[0] * num_repeats
        shape = (n, c.num_heads, max_decode_length, c.d_kv)  # head-major (einsum)
        if c.attention_impl == "dot_product_attention":
            shape = (n, max_decode_length, c.num_heads, c.d_kv)
        zeros = lambda: jnp.zeros(shape, jnp.dtype(c.dtype))  # noqa: E731
        cache = {f"layers_{i}": (zeros(), zeros()) for i in range(c.num_decoder_layers)}
        return {"cache": cache, "cross_kv": cross, "cross_bias": bias}

    def decode_step(self, tokens, cache, cross_kv, cross_bias, step):
        """tokens [n] at position `step` -> (logits [n, vocab], updated cache)."""
        x = self.token_embedder(tokens[:, None])
        return self.decoder.decode_step(x, cache, cross_kv, cross_bias, step,
                                        self.token_embedder)
