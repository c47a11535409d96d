"""T5 building blocks in Flax NNX: RMSNorm, embeddings, dense kernels, relative position
bias, multi-head attention (with an explicit key/value cache) and the feed-forward block.

Every parameter carries logical axis names in its `out_sharding` metadata (read back by
`EncoderDecoderModel.param_logical_axes`); main activations are annotated with
`constrain`, a no-op unless a logical axis rules context is active. Parameters are kept in
param_dtype (fp32) and cast to the activation dtype where used; softmax runs in fp32.

Attention has two implementations with the same params and results (T5Config.attention_impl):
'einsum' takes one additive fp32 bias with the masks folded in (built once per stack) and
keeps decode caches head-major; 'dot_product_attention' calls jax.nn.dot_product_attention
with the relative-position bias (bias=), the padding/packing mask (mask=) and is_causal
apart, scale 1.0, and keeps caches [batch, length, heads, d_kv] (its layout), so on a GPU
cuDNN's fused kernels run where they apply (`fused_implementation`).
"""
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen import with_logical_constraint

# Large negative additive bias for masked attention logits: finite so that a fully masked
# row gives a uniform (not NaN) distribution.
MASK_VALUE = -1e10

Initializer = nnx.initializers.Initializer


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Logical sharding constraint on an activation.

    No-op unless called under `nnx.logical_axis_rules(rules)` (the same context as
    `flax.linen.partitioning.axis_rules`) inside a mesh context, where the names are mapped
    to mesh axes by the rules.
    """
    return with_logical_constraint(x, tuple(names))


def param(rngs: nnx.Rngs, init: Initializer, shape: Tuple[int, ...], dtype,
          names: Tuple[str, ...]) -> nnx.Param:
    """A parameter with logical axis names; never sharded eagerly (the model knows no mesh)."""
    assert len(names) == len(shape), (names, shape)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names,
                     eager_sharding=False)


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout; identity when key is None (deterministic) or rate is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_key(key: Optional[jax.Array], n: int):
    """n independent keys, or n Nones for deterministic calls."""
    if key is None:
        return [None] * n
    return list(jax.random.split(key, n))


class RMSNorm(nnx.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias; statistics in fp32."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return y * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [vocab, embed] (std 1.0 as in T5)."""

    def __init__(self, vocab_size: int, dim: int, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(stddev=1.0),
                               (vocab_size, dim), param_dtype, ("vocab", "embed"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # A gather is much cheaper than T5X's one-hot matmul on CPU/GPU.
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied output projection: x @ embedding^T."""
        return _rows_matmul(x, self.embedding[...].astype(self.dtype).T)


class Dense(nnx.Module):
    """Bias-free projection with a 2D kernel [in, out]."""

    def __init__(self, d_in: int, d_out: int, names: Tuple[str, str], init: Initializer,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, init, (d_in, d_out), param_dtype, names)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _rows_matmul(x, self.kernel[...].astype(self.dtype))


def _rows_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., d] @ kernel [d, f] as ONE 2-D matmul over the flattened leading dims.

    Same products and sums as the einsum "...d,df->...f", but the kernel's gradient then
    contracts a single row dimension: with the leading dims kept, XLA:CPU first copies the
    output gradient into a transposed layout (for the vocab projection a [vocab, tokens]
    copy) and runs the loss's backward twice; flattened, the logits + loss backward of the
    tiny T5 1.1 step takes half the time (bench/NOTES.md).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


def _fan_in(scale: float = 1.0, distribution: str = "normal") -> Initializer:
    return nnx.initializers.variance_scaling(scale, "fan_in", distribution)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bucketing of memory_position - query_position.

    Half of the buckets hold exact small distances, the other half log-spaced ones up to
    max_distance; bidirectional splits the buckets between past and future, causal maps
    every future position to bucket 0. The float32 arithmetic follows the reference
    implementations so that bucket boundaries agree exactly.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Clamp only the argument of the log: small distances take the exact branch anyway.
    scaled = (jnp.log(jnp.maximum(n, max_exact).astype(jnp.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = jnp.minimum(max_exact + scaled.astype(n.dtype), num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativePositionBias(nnx.Module):
    """One bias table [heads, buckets] per stack, shared by all of its layers."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int,
                 bidirectional: bool, param_dtype, rngs: nnx.Rngs):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.rel_embedding = param(
                rngs, nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                (num_heads, num_buckets), param_dtype, ("heads", "relpos_buckets"))

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """Bias [batch or 1, heads, q, k] in fp32 from positions [batch or 1, q] / [.., k]."""
        rel = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        table = self.rel_embedding[...].astype(jnp.float32)  # [heads, buckets]
        values = jnp.take(table.T, buckets, axis=0)  # [b, q, k, heads]
        return jnp.transpose(values, (0, 3, 1, 2))


ATTENTION_IMPLS = ("einsum", "dot_product_attention")


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask -> additive fp32 bias (0 where attended, MASK_VALUE elsewhere)."""
    return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)


def causal_mask(q_len: int, k_len: int) -> jax.Array:
    """[1, 1, q, k]: key position <= query position."""
    return (jnp.arange(k_len)[None, :] <= jnp.arange(q_len)[:, None])[None, None]


def fused_implementation(q: jax.Array, k: jax.Array) -> str:
    """jax.nn.dot_product_attention's implementation for q [b,t,h,d] / k [b,s,h,d]: 'cudnn'
    on a GPU where its fused kernels take the shapes (bf16/fp16, d_kv a multiple of 8 up to
    128, even lengths: its bias gradient needs them), 'xla' otherwise. One query row
    (cached decoding) stays on XLA: that step reads the cache once and is bound by memory
    bandwidth, which a flash kernel's tiling does not change."""
    t, s, d = q.shape[1], k.shape[1], q.shape[-1]
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and d % 8 == 0 and d <= 128 and t > 1 and t % 2 == 0 and s % 2 == 0):
        return "cudnn"
    return "xla"


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
                    mask: Optional[jax.Array], causal: bool) -> jax.Array:
    """jax.nn.dot_product_attention with T5's conventions: q/k/v [b,t|s,h,d], bias fp32
    [b|1, h, t, s] (relative positions), mask bool [b|1, 1, t|1, s], scale 1.0 (T5 folds
    1/sqrt(d_kv) into the query init)."""
    impl = fused_implementation(q, k)
    if impl == "cudnn":
        # cuDNN takes the bias in the inputs' dtype, with full query/key lengths (batch and
        # heads may broadcast); jax folds the mask into it.
        t, s = q.shape[1], k.shape[1]
        full = lambda x: jnp.broadcast_to(x, x.shape[:2] + (t, s))  # noqa: E731
        bias = None if bias is None else full(bias.astype(q.dtype))
        mask = None if mask is None else full(mask)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0,
                                        is_causal=causal, implementation=impl)


class MultiHeadAttention(nnx.Module):
    """T5 attention: no biases and no 1/sqrt(d_kv) scaling (folded into the query init)."""

    def __init__(self, d_model: int, num_heads: int, d_kv: int, dropout_rate: float, dtype,
                 param_dtype, rngs: nnx.Rngs, attention_impl: str = "einsum"):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r}: use one of "
                             f"{ATTENTION_IMPLS} (T5Config.resolved() makes 'auto' concrete).")
        self.num_heads = num_heads
        self.d_kv = d_kv
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        self.attention_impl = attention_impl
        inner = num_heads * d_kv
        qkv = ("embed", "joined_kv")
        self.query = Dense(d_model, inner, qkv, _fan_in(1.0 / d_kv), dtype, param_dtype, rngs)
        self.key = Dense(d_model, inner, qkv, _fan_in(), dtype, param_dtype, rngs)
        self.value = Dense(d_model, inner, qkv, _fan_in(), dtype, param_dtype, rngs)
        self.out = Dense(inner, d_model, ("joined_kv", "embed"), _fan_in(), dtype, param_dtype,
                         rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        y = x.reshape(x.shape[:-1] + (self.num_heads, self.d_kv))
        return constrain(y, ("batch", "length", "heads", "kv"))

    def project_q(self, inputs_q: jax.Array) -> jax.Array:
        """Queries [batch, length, heads, d_kv]."""
        return self._heads(self.query(inputs_q))

    def project_kv(self, inputs_kv: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Keys and values [batch, length, heads, d_kv]."""
        return self._heads(self.key(inputs_kv)), self._heads(self.value(inputs_kv))

    @property
    def fused(self) -> bool:
        return self.attention_impl == "dot_product_attention"

    @property
    def cache_length_axis(self) -> int:
        """The length axis of this layer's decode caches: 2 head-major (einsum), else 1."""
        return 1 if self.fused else 2

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
               dropout_key: Optional[jax.Array], mask: Optional[jax.Array] = None,
               causal: bool = False) -> jax.Array:
        """Attention of q [b,q,h,d] over k/v [b,k,h,d]: fp32 additive bias, boolean mask
        (True = attended), causal (key position <= query position). The einsum path is
        given the masks folded into `bias` by its stack (one bias for all layers)."""
        if self.fused:
            if dropout_key is not None and self.dropout_rate > 0:
                raise ValueError("attention_impl='dot_product_attention' has no attention "
                                 "dropout; use 'einsum' with dropout_rate > 0.")
            return self._merge_heads(fused_attention(q, k, v, bias, mask, causal))
        # fp32 scores (bf16 inputs accumulate in fp32), softmax in fp32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = _masked(logits, bias, mask, causal)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = dropout(weights, self.dropout_rate, dropout_key)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self._merge_heads(out)

    def project_kv_cache(self, inputs_kv: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Keys and values in the decode caches' layout: head-major [batch, heads, length,
        d_kv] for einsum, [batch, length, heads, d_kv] for dot_product_attention."""
        k, v = self.project_kv(inputs_kv)
        if self.fused:
            return k, v
        return _head_major(k), _head_major(v)

    def attend_cached(self, q: jax.Array, k: jax.Array, v: jax.Array,
                      bias: Optional[jax.Array], mask: Optional[jax.Array] = None
                      ) -> jax.Array:
        """`attend` of q [b,q,h,d] over caches k/v (`project_kv_cache`'s layout; incremental
        decoding, no dropout). Head-major, each (row, head) is a plain matrix-vector product
        over a contiguous cache; with [b,k,h,d] caches XLA:CPU first transposed them with a
        slow element-wise copy (the cross-attention caches: a quarter of T5 small's
        sampling)."""
        if self.fused:
            return self._merge_heads(fused_attention(q, k, v, bias, mask, False))
        logits = jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(_masked(logits, bias, mask, False), axis=-1).astype(self.dtype)
        return self._merge_heads(jnp.einsum("bhqk,bhkd->bqhd", weights, v))

    def _merge_heads(self, out: jax.Array) -> jax.Array:
        out = out.reshape(out.shape[:2] + (self.num_heads * self.d_kv,))
        out = constrain(out, ("batch", "length", "joined_kv"))
        return self.out(out)

    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: Optional[jax.Array],
                 dropout_key: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
                 causal: bool = False) -> jax.Array:
        q = self.project_q(inputs_q)
        k, v = self.project_kv(inputs_kv)
        return self.attend(q, k, v, bias, dropout_key, mask, causal)

    def decode_step(self, x: jax.Array, cache: Tuple[jax.Array, jax.Array], step: jax.Array,
                    bias: Optional[jax.Array], mask: Optional[jax.Array] = None
                    ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
        """Self-attention of one new position x [b,1,d] written into the cache at `step`.

        cache: preallocated keys/values (`project_kv_cache`'s layout, max_len long); bias
        [.., 1, max_len] (and/or mask) must mask the positions after `step`.
        """
        q = self.project_q(x)
        k_new, v_new = self.project_kv_cache(x)
        k_cache, v_cache = cache
        start = [0, 0, 0, 0]
        start[self.cache_length_axis] = step
        k_cache = jax.lax.dynamic_update_slice(k_cache, k_new.astype(k_cache.dtype), start)
        v_cache = jax.lax.dynamic_update_slice(v_cache, v_new.astype(v_cache.dtype), start)
        return self.attend_cached(q, k_cache, v_cache, bias, mask), (k_cache, v_cache)


def _masked(logits: jax.Array, bias: Optional[jax.Array], mask: Optional[jax.Array],
            causal: bool) -> jax.Array:
    """fp32 logits [b,h,q,k] + bias, with masked positions pushed to MASK_VALUE."""
    if bias is not None:
        logits = logits + bias
    if causal:
        allowed = causal_mask(*logits.shape[-2:])
        mask = allowed if mask is None else (mask & allowed)
    if mask is not None:
        logits = logits + mask_to_bias(mask)
    return logits


def _head_major(x: jax.Array) -> jax.Array:
    """[batch, length, heads, d_kv] -> [batch, heads, length, d_kv]."""
    return constrain(jnp.swapaxes(x, 1, 2), ("batch", "heads", "length", "kv"))


ACTIVATION_FNS = {
        "relu": jax.nn.relu,
        # T5 1.1 / HF "gated-gelu" use the tanh approximation ("gelu_new").
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        # HF's plain "gelu" is the exact erf form.
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MlpBlock(nnx.Module):
    """Feed-forward block: ReLU (`wi`, T5 1.0) or gated (`wi_0` * `wi_1`, T5 1.1)."""

    def __init__(self, d_model: int, d_ff: int, feed_forward_proj: str, dropout_rate: float,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.gated = feed_forward_proj.startswith("gated-")
        act = feed_forward_proj.split("-")[-1]
        self.act_name = "gelu_tanh" if feed_forward_proj == "gated-gelu" else act
        self.dropout_rate = dropout_rate
        init = _fan_in(1.0, "truncated_normal")
        names = ("embed", "mlp")
        if self.gated:
            self.wi_0 = Dense(d_model, d_ff, names, init, dtype, param_dtype, rngs)
            self.wi_1 = Dense(d_model, d_ff, names, init, dtype, param_dtype, rngs)
        else:
            self.wi = Dense(d_model, d_ff, names, init, dtype, param_dtype, rngs)
        self.wo = Dense(d_ff, d_model, ("mlp", "embed"), init, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        act = ACTIVATION_FNS[self.act_name]
        if self.gated:
            h = act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = act(self.wi(x))
        h = constrain(h, ("batch", "length", "mlp"))
        h = dropout(h, self.dropout_rate, dropout_key)
        return self.wo(h)
