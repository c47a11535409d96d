"""TensorFlow's stateless random numbers (CPU, Philox) in numpy, for many seeds at once.

The masks are defined by TF's stateless ops with one seed per example
(`tf.random.stateless_uniform`, `stateless_split`, `stateless_poisson`); tf.data can only run
those one example per call. These are their numpy twins, vectorised over a batch of seeds,
so a batch of segments is masked in one call and gets the very numbers the per-example ops
give (tests/test_batched_masking.py checks them against TF bit for bit).

TF's recipe, as its kernels implement it:
  * seed [s0, s1] (int32 sign-extended or int64) -> Philox counter (s0 lo, s0 hi, s1 lo,
    s1 hi) under the fixed key (0x3ec8f720, 0x02461e29); one Philox4x32-10 call of that gives
    the key (words 0, 1) and the counter (0, 0, words 2, 3) of the stream;
  * block b of the stream is Philox(counter + b) (128-bit add), 4 uint32 words;
  * float32 uniform: word & 0x7fffff as the mantissa of [1, 2), minus 1; one word each;
  * int32 uniform in [lo, hi): lo + word % (hi - lo); int64 full range: w0 | w1 << 32;
  * Poisson (rate < 10, Knuth): output i skips to block 256 * i, draws float64 uniforms
    (2 words each, the second of a block's two first) and counts the draws before their
    running product falls to exp(-rate).
"""
import math

import numpy as np

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
_SEED_KEY = (0x3EC8F720, 0x02461E29)
POISSON_SKIP = 256  # Philox blocks reserved per Poisson output
KNUTH_MAX_RATE = 10.0  # TF switches to rejection sampling at this rate


def _rounds(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint64 word arrays (< 2**32) that broadcast together, in place:
    the rounds are memory-bound. Lay a per-stream word out as [1, B] (varying along the
    last axis), so that broadcasting runs along the outer axis, numpy's fast case."""
    shape = np.broadcast_shapes(*(np.shape(x) for x in (c0, c1, c2, c3, k0, k1)))
    c0, c1, c2, c3 = (np.array(np.broadcast_to(x, shape), np.uint64) for x in (c0, c1, c2, c3))
    k0, k1 = np.ascontiguousarray(k0, np.uint64), np.ascontiguousarray(k1, np.uint64)
    p0, p1 = np.empty_like(c0), np.empty_like(c0)
    for _ in range(10):
        np.multiply(c0, _M0, out=p0)  # < 2**64: both factors are 32-bit
        np.multiply(c2, _M1, out=p1)
        np.right_shift(p1, _32, out=c0)
        c0 ^= c1
        c0 ^= k0
        np.right_shift(p0, _32, out=c2)
        c2 ^= c3
        c2 ^= k1
        np.bitwise_and(p1, _LO, out=c1)
        np.bitwise_and(p0, _LO, out=c3)
        k0, k1 = (k0 + _W0) & _LO, (k1 + _W1) & _LO
    return c0, c1, c2, c3


def philox(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Philox4x32-10. counter: uint [..., 4] words; key: uint [..., 2] (broadcasts).
    Returns uint64 [..., 4], each word < 2**32."""
    return np.stack(_rounds(*(counter[..., i] for i in range(4)), key[..., 0], key[..., 1]), -1)


def key_counter(seeds):
    """(key uint64 [B, 2], counter uint64 [B, 4]) of each stateless seed in seeds [..., 2]
    (flattened to B seeds)."""
    seeds = np.asarray(seeds)
    if seeds.dtype not in (np.int32, np.int64) or seeds.shape[-1:] != (2,):
        raise ValueError(f"stateless seeds must be int32/int64 [..., 2], got {seeds.dtype} "
                         f"{seeds.shape}")
    s = seeds.reshape(-1, 2).astype(np.int64).view(np.uint64)  # int32 sign-extends, as TF
    s0, s1 = s[..., 0], s[..., 1]
    counter = np.stack([s0 & _LO, s0 >> _32, s1 & _LO, s1 >> _32], -1)
    mix = philox(counter, np.array(_SEED_KEY, np.uint64))
    zero = np.zeros_like(mix[..., 0])
    return mix[..., :2], np.stack([zero, zero, mix[..., 2], mix[..., 3]], -1)


def blocks(key: np.ndarray, counter: np.ndarray, start, num: int) -> np.ndarray:
    """uint64 [B, num, 4]: blocks start .. start + num - 1 of each stream (start: int or [B])."""
    offset = (np.asarray(start, np.uint64).reshape(1, -1)
              + np.arange(num, dtype=np.uint64)[:, None])
    c = [counter[:, i][None, :] for i in range(4)]  # [1, B]: see _rounds
    c[0] = c[0] + offset  # [num, B]
    if (c[0] >> _32).any() or (offset >> _32).any():  # 128-bit carries: never at our sizes
        c[1] = c[1] + (offset >> _32) + (c[0] >> _32)
        c[2] = c[2] + (c[1] >> _32)
        c[3] = c[3] + (c[2] >> _32)
        c = [x & _LO for x in c]
    out = np.stack(_rounds(*c, key[:, 0][None, :], key[:, 1][None, :]), -1)  # [num, B, 4]
    return np.ascontiguousarray(out.transpose(1, 0, 2))


def words(seeds, num: int, first: int = 0) -> np.ndarray:
    """uint64 [B, num]: words first .. first + num - 1 of each seed's stream."""
    key, counter = key_counter(seeds)
    b0 = first // 4
    out = blocks(key, counter, b0, (first + num + 3) // 4 - b0).reshape(len(key), -1)
    return out[:, first - 4 * b0:first - 4 * b0 + num]


def mantissas(seeds, num: int, first: int = 0) -> np.ndarray:
    """uint64 [B, num] < 2**23: the mantissas of `uniform_float32`, which they order."""
    return words(seeds, num, first) & np.uint64(0x7FFFFF)


def uniform_float32(seeds, num: int, first: int = 0) -> np.ndarray:
    """float32 [B, num]: elements first.. of `stateless_uniform([n], seed)` (n > first + num)."""
    bits = mantissas(seeds, num, first) | np.uint64(127 << 23)
    return bits.astype(np.uint32).view(np.float32) - np.float32(1.0)


def uniform_int(seeds, num: int, minval: int, maxval: int) -> np.ndarray:
    """int64 [B, num]: `stateless_uniform([num], seed, minval, maxval, tf.int32)`."""
    span = np.uint64(maxval - minval)
    return minval + (words(seeds, num) % span).astype(np.int64)


def split(seeds, num: int) -> np.ndarray:
    """`tf.random.experimental.stateless_split(seed, num)` for each seed: [B, num, 2] of the
    seeds' dtype (int32 seeds take one word per value, int64 seeds two)."""
    seeds = np.asarray(seeds)
    if seeds.dtype == np.int32:
        return words(seeds, 2 * num).astype(np.uint32).view(np.int32).reshape(-1, num, 2)
    w = words(seeds, 4 * num).reshape(-1, 2 * num, 2)
    return (w[..., 0] | (w[..., 1] << _32)).view(np.int64).reshape(-1, num, 2)


def _doubles(bl: np.ndarray) -> np.ndarray:
    """float64 uniforms [..., 2 * n] in the order Poisson draws them from blocks [..., n, 4]."""
    def to_double(hi, lo):
        mantissa = ((hi & np.uint64(0xFFFFF)) << _32) | lo
        return (mantissa | np.uint64(1023 << 52)).view(np.float64) - 1.0
    pair = np.stack([to_double(bl[..., 2], bl[..., 3]), to_double(bl[..., 0], bl[..., 1])], -1)
    return pair.reshape(pair.shape[:-2] + (-1,))


def poisson(seeds, num: int, rate: float, chunk_blocks: int = 2) -> np.ndarray:
    """int64 [B, num]: `stateless_poisson([n], seed, rate, tf.int32)[:num]` (n >= num), for a
    rate (float32, as TF receives a Python float) below KNUTH_MAX_RATE."""
    rate = float(np.float32(rate))
    if not 0 < rate < KNUTH_MAX_RATE:
        raise ValueError(f"numpy Poisson twin covers rates in (0, {KNUTH_MAX_RATE}), got {rate}")
    limit = math.exp(-rate)  # std::exp, as the kernel's exp of a double
    key, counter = key_counter(seeds)
    rows = len(key)
    key = np.repeat(key, num, 0)
    counter = np.repeat(counter, num, 0)
    skip = np.tile(np.arange(num, dtype=np.uint64) * np.uint64(POISSON_SKIP), rows)
    out = np.zeros(rows * num, np.int64)
    todo = np.arange(rows * num)
    prod = np.ones(rows * num)
    drawn = 0  # uniforms already used by every output still in `todo`
    while todo.size:
        u = _doubles(blocks(key[todo], counter[todo], skip[todo] + np.uint64(drawn // 2),
                            chunk_blocks))
        # Running product from the carried one: a sequential float64 product, as the kernel.
        run = np.cumprod(np.concatenate([prod[todo, None], u], 1), 1)[:, 1:]
        hit = run <= limit
        done = hit.any(1)
        out[todo[done]] = drawn + hit[done].argmax(1)
        prod[todo] = run[:, -1]
        todo = todo[~done]
        drawn += 2 * chunk_blocks
    return out.reshape(rows, num)
