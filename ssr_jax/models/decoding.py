"""Autoregressive decoding in `lax.while_loop`: greedy, temperature/top-k/top-p sampling and
beam search with T5X's brevity penalty.

The decoders are model-agnostic: they drive a `step_fn(tokens [n], cache, step) ->
(logits [n, vocab], cache)` that consumes the token at position `step` and returns the
distribution of the token at that position's output, with a KV cache pytree carried
through the loop. Everything is traceable and meant to run under one `jax.jit`.

Stopping is per row: a row stops after emitting EOS, its own stop token
(stop_tokens[b]), or max_decode_lengths[b] tokens; later positions hold pad (0).
"""
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, Any, jax.Array], Tuple[jax.Array, Any]]

# Finite "minus infinity" for beam bookkeeping: -inf would give NaN in inf - inf.
NEG_INF = -1.0e9


def row_keys(rng: jax.Array, batch_size: int) -> jax.Array:
    """One PRNG key per row: fold_in(rng, b) for a single key, or the per-row keys as given.

    Accepts raw uint32 keys ([2] single / [batch, 2] per row) or typed keys ([] / [batch]).
    """
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    single = rng.ndim == (0 if typed else 1)
    if single:
        return jax.vmap(lambda b: jax.random.fold_in(rng, b))(jnp.arange(batch_size))
    if rng.shape[0] != batch_size:
        raise ValueError(f"rng has {rng.shape[0]} per-row keys for a batch of {batch_size}.")
    return rng


def brevity_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """T5X / GNMT length penalty ((5 + length) / 6) ** alpha."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def argmax_last(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) (the first maximal index) as a max and a min over indices: XLA:CPU
    runs argmax's (value, index) reduce unvectorised, ~30x slower than these two; over the
    vocabulary at every decoding step that was a sixth of T5 small's sampling time."""
    top = jnp.max(x, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, ids, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # a NaN row matches nothing


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """jax.random.categorical(key, logits) for one row (the same Gumbel noise, so the same
    samples), with `argmax_last`."""
    return argmax_last(logits + jax.random.gumbel(key, logits.shape, logits.dtype))


def ban_repeated_ngrams(logits: jax.Array, tokens: jax.Array, length: jax.Array,
                        n: int) -> jax.Array:
    """Hugging Face's no_repeat_ngram_size: -inf for every token that would complete an
    n-gram already present in the sequence decoded so far.

    tokens [rows, T] holds each row's sequence (for an encoder-decoder HF's decoder
    input_ids: the start token, then the emitted tokens); only its first `length` (scalar
    or [rows]) positions count, so padding or stale tokens beyond never ban anything. Row
    by row, O(T * n): the windows tokens[j:j+n-1] equal to the last n-1 tokens ban
    tokens[j+n-1], for the complete n-grams j + n <= length. n <= 0 changes nothing.
    """
    rows, total = tokens.shape
    if n <= 0 or total < n:
        return logits
    length = jnp.broadcast_to(jnp.asarray(length, jnp.int32), (rows,))
    starts = total - n + 1  # window start positions j
    vocab = logits.shape[-1]

    def row(row_logits, toks, cur):
        last = toks[jnp.clip(cur - (n - 1) + jnp.arange(n - 1), 0, total - 1)]
        hit = jnp.arange(starts) <= cur - n
        for k in range(n - 1):  # over the n-gram's positions, not the sequence's
            hit = hit & (toks[k:k + starts] == last[k])
        banned = jnp.where(hit, toks[n - 1:], vocab)  # vocab: out of range, dropped
        return row_logits.at[banned].set(-jnp.inf, mode="drop")

    return jax.vmap(row)(logits, tokens.astype(jnp.int32), length)


def _ban_in_output(logits: jax.Array, out: jax.Array, step: jax.Array, start_id: int,
                   n: int) -> jax.Array:
    """ban_repeated_ngrams on a decoder's output buffer out [rows, L] at `step`: the
    sequence so far is the start token then out[:, :step], as HF's decoder input_ids."""
    if n <= 0:
        return logits
    start = jnp.full((out.shape[0], 1), start_id, out.dtype)
    return ban_repeated_ngrams(logits, jnp.concatenate([start, out], axis=1), step + 1, n)


def _sorted_nucleus(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Keep-mask of the top-p nucleus over logits sorted in descending order: a token is
    kept while the probability mass strictly before it is below top_p (the first always)."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    return jnp.cumsum(probs, axis=-1) - probs < top_p


# Chunk width of `top_k_candidates`; below CHUNKED_FROM * k * CHUNK tokens one top_k is as cheap.
CHUNK, CHUNKED_FROM = 32, 4


def _last(sorted_desc: jax.Array) -> jax.Array:
    """[rows, 1] the last (smallest) of top_k values, as a min: XLA:CPU runs `lax.top_k` as
    its fast TopK kernel only while every use of the sort it lowers to is a [0:k] slice;
    vals[:, -1:] folds into a slice [k-1:k] of the sort, which then runs in full (30x
    slower at 64 x 4096)."""
    return jnp.min(sorted_desc, axis=-1, keepdims=True)


def top_k_candidates(logits: jax.Array, k: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(values [rows, k] in descending order, their token ids [rows, k], clean [rows]):
    `jax.lax.top_k(logits, k)` without running it over the vocabulary (on XLA:CPU, 10.6 ms
    per decoding step at batch 64 x 32128 tokens; this way 4.4 ms, bench/NOTES.md).

    The vocabulary is cut into chunks of CHUNK tokens; every one of the k largest logits
    lies in one of the k chunks with the largest maxima (a chunk outside them has k larger
    maxima above its own), so one max per chunk, a top_k over the chunk maxima, a gather
    of k chunks and a top_k over k * CHUNK candidates give the same k values (and, when
    clean, the same k tokens; equal values may come in another order).

    clean[b] says that no token outside the k ties with the k-th value (so "keep every
    token >= the k-th value", Hugging Face's TopKLogitsWarper, keeps exactly these k): all
    chunks with a maximum >= the k-th value were gathered and no other gathered candidate
    equals it. Both checks run on the small arrays, not the vocabulary.
    """
    rows, vocab = logits.shape
    if vocab < CHUNKED_FROM * k * CHUNK:
        vals, ids = jax.lax.top_k(logits, k)
        clean = jnp.sum(logits >= _last(vals), axis=-1) == k
        return vals, ids, clean
    pad = (-vocab) % CHUNK
    padded = jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf) if pad else logits
    chunks = padded.reshape(rows, -1, CHUNK)
    chunk_max = jnp.max(chunks, axis=-1)
    top_max, chunk_ids = jax.lax.top_k(chunk_max, k)
    cand = jnp.take_along_axis(chunks, chunk_ids[:, :, None], axis=1).reshape(rows, k * CHUNK)
    vals, pos = jax.lax.top_k(cand, k)
    ids = jnp.take_along_axis(chunk_ids, pos // CHUNK, axis=-1) * CHUNK + pos % CHUNK
    kth = _last(vals)
    # No chunk left out reaches the k-th value, and no other candidate does. A -inf k-th
    # value (fewer than k finite logits) fails the second: padding is -inf.
    clean = ((jnp.sum(chunk_max >= kth, axis=-1) == jnp.sum(top_max >= kth, axis=-1))
             & (jnp.sum(cand >= kth, axis=-1) == k))
    return vals, ids, clean


def _nucleus_threshold(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """[rows, 1] the smallest logit kept by the top-p nucleus of descending sorted_logits
    (keeping it keeps the tokens tied with the last one the nucleus needs)."""
    kept = jnp.sum(_sorted_nucleus(sorted_logits, top_p), axis=-1, keepdims=True)
    return jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)


def _bisect_nucleus(logits: jax.Array, top_p: float, iterations: int) -> jax.Array:
    """The top-p nucleus of softmax(logits) over the whole vocabulary without a sort: {p >=
    t*} with t* the largest threshold whose kept mass still reaches top_p, by bisection on
    [0, max p] (`iterations` halvings, to ~1e-9 of max p): a few passes over the vocabulary
    instead of a full sort (~30x cheaper on CPU). Ties with the last kept token are kept."""
    probs = jax.nn.softmax(logits, axis=-1)
    top = jnp.max(probs, axis=-1, keepdims=True)

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0), -1, keepdims=True) >= top_p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros_like(top), top))
    return jnp.where(probs >= jnp.minimum(lo, top), logits, -jnp.inf)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0,
                  iterations: int = 32) -> jax.Array:
    """Set logits outside the top-k and then outside the top-p nucleus to -inf.

    Hugging Face's semantics: top-k keeps every token >= the k-th largest logit (ties
    included, as TopKLogitsWarper), then top-p keeps the most likely of the renormalised
    survivors until their mass reaches top_p (the first always, so a tiny top_p is greedy;
    tokens tied with the last kept one are kept). Rows whose top k is `clean` take the
    nucleus over the k sorted candidates; others (ties at the k-th value) bisect over the
    whole vocabulary (`_bisect_nucleus`).
    """
    logits = logits.astype(jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        vals, _, clean = top_k_candidates(logits, top_k)
        top_k_kept = jnp.where(logits >= _last(vals), logits, -jnp.inf)
        if top_p >= 1.0:
            return top_k_kept
        fast = jnp.where(logits >= _nucleus_threshold(vals, top_p), logits, -jnp.inf)
        return jnp.where(clean[:, None], fast, _bisect_nucleus(top_k_kept, top_p, iterations))
    if top_p >= 1.0:
        return logits
    return _bisect_nucleus(logits, top_p, iterations)


def sample_tokens(keys: jax.Array, logits: jax.Array, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """One token per row (keys [rows] of PRNG keys, logits [rows, vocab]) from the
    renormalised top-k-then-top-p distribution (`filter_logits`).

    With top_k, a row whose top k is clean (no tie with the k-th value outside it: always,
    short of exactly equal logits) draws among the k candidates of `top_k_candidates` (the
    nucleus and the Gumbel noise over k values, not the vocabulary): the same distribution
    at the cost of one max per chunk and two small top_k. Other rows draw from
    `filter_logits` over the vocabulary, computed only when some row needs it (a
    `lax.cond`); a clean row's token is the same either way, so it never depends on its
    neighbours."""
    logits = logits.astype(jnp.float32)
    if not (top_k and top_k < logits.shape[-1]):
        return jax.vmap(categorical)(keys, filter_logits(logits, 0, top_p))
    vals, ids, clean = top_k_candidates(logits, top_k)
    kept = vals if top_p >= 1.0 else jnp.where(
            vals >= _nucleus_threshold(vals, top_p), vals, -jnp.inf)
    pick = jax.vmap(categorical)(keys, kept)
    fast = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]

    def vocabulary(_):
        slow = jax.vmap(categorical)(keys, filter_logits(logits, top_k, top_p))
        return jnp.where(clean, fast, slow)

    return jax.lax.cond(jnp.all(clean), lambda _: fast, vocabulary, None)


def _stop_inputs(batch_size: int, max_decode_length: int, stop_tokens: Optional[jax.Array],
                 max_decode_lengths: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array]:
    if stop_tokens is None:
        stop_tokens = jnp.full((batch_size,), -1, jnp.int32)
    if max_decode_lengths is None:
        max_decode_lengths = jnp.full((batch_size,), max_decode_length, jnp.int32)
    max_decode_lengths = jnp.clip(max_decode_lengths.astype(jnp.int32), 1, max_decode_length)
    return stop_tokens.astype(jnp.int32), max_decode_lengths


def sample_decode(step_fn: StepFn, cache: Any, batch_size: int, max_decode_length: int, *,
                  eos_id: int, start_id: int = 0, keys: Optional[jax.Array] = None,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  stop_tokens: Optional[jax.Array] = None,
                  max_decode_lengths: Optional[jax.Array] = None,
                  no_repeat_ngram_size: int = 0) -> Tuple[jax.Array, jax.Array]:
    """Greedy (keys=None or temperature=0) or ancestral sampling.

    Row b at step t samples with fold_in(keys[b], t), so its tokens depend only on its own
    key. Returns (tokens [batch, max_decode_length], scores [batch]) where scores are the
    sum of the model's (untempered, unfiltered) log-probabilities of the emitted tokens.
    no_repeat_ngram_size > 0 bans repeated n-grams (`ban_repeated_ngrams`) before the
    temperature and the top-k/top-p filter, as in HF.
    """
    greedy = keys is None or temperature == 0.0
    stop_tokens, max_lens = _stop_inputs(batch_size, max_decode_length, stop_tokens,
                                         max_decode_lengths)

    def choose(logits, step):
        if greedy:
            return argmax_last(logits).astype(jnp.int32)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
        return sample_tokens(step_keys, logits / temperature, top_k, top_p).astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_decode_length) & ~jnp.all(done)

    def body(state):
        step, cur, cache, out, done, score = state
        logits, cache = step_fn(cur, cache, step)
        logits = logits.astype(jnp.float32)
        allowed = _ban_in_output(logits, out, step, start_id, no_repeat_ngram_size)
        tok = jnp.where(done, 0, choose(allowed, step))
        logp = (jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
                - jax.nn.logsumexp(logits, axis=-1))
        score = score + jnp.where(done, 0.0, logp)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
        done = done | (tok == eos_id) | (tok == stop_tokens) | (step + 1 >= max_lens)
        return step + 1, tok, cache, out, done, score

    state = (jnp.asarray(0, jnp.int32), jnp.full((batch_size,), start_id, jnp.int32), cache,
             jnp.zeros((batch_size, max_decode_length), jnp.int32),
             jnp.zeros((batch_size,), bool), jnp.zeros((batch_size,), jnp.float32))
    _, _, _, out, _, score = jax.lax.while_loop(cond, body, state)
    return out, score


def beam_search(step_fn: StepFn, cache: Any, batch_size: int, num_beams: int,
                max_decode_length: int, *, eos_id: int, start_id: int = 0,
                alpha: float = 0.6, stop_tokens: Optional[jax.Array] = None,
                max_decode_lengths: Optional[jax.Array] = None,
                no_repeat_ngram_size: int = 0) -> Tuple[jax.Array, jax.Array]:
    """Beam search; the cache's leading axis is batch * num_beams (row-major by batch).

    A candidate finishes on EOS, its row's stop token, or at its row's max length, and is
    scored log_prob / ((5 + length) / 6) ** alpha. Each row keeps the num_beams best
    finished and the num_beams best unfinished hypotheses; decoding stops when no
    unfinished hypothesis can beat the worst kept finished one (the penalty grows with
    length and log-probs only fall). Returns the best (tokens [batch, length], score [batch]).
    no_repeat_ngram_size > 0 bans, in each beam, the tokens that would repeat an n-gram of
    that beam's own sequence (HF's processor on the log-probs; allowed ones keep theirs).
    """
    B, K, L = batch_size, num_beams, max_decode_length
    stop_tokens, max_lens = _stop_inputs(B, L, stop_tokens, max_decode_lengths)
    max_penalty = brevity_penalty(max_lens, alpha)

    def gather_beams(x, idx):  # x [B, K, ...], idx [B, M] -> [B, M, ...]
        return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def reorder_cache(cache, origin):  # origin [B, K] beam each new beam continues
        flat = (jnp.arange(B)[:, None] * K + origin).reshape(-1)
        return jax.tree.map(lambda c: jnp.take(c, flat, axis=0), cache)

    def cond(state):
        step, _, alive_lp, _, fin_scores, _, _ = state
        best_alive = alive_lp[:, 0] / max_penalty
        worst_fin = jnp.min(fin_scores, axis=1)
        done = best_alive < worst_fin
        return (step < L) & ~jnp.all(done)

    def body(state):
        step, alive_seqs, alive_lp, fin_seqs, fin_scores, last, cache = state
        logits, cache = step_fn(last.reshape(B * K), cache, step)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        logp = _ban_in_output(logp, alive_seqs.reshape(B * K, L), step, start_id,
                              no_repeat_ngram_size).reshape(B, K, -1)
        vocab = logp.shape[-1]
        cand = (alive_lp[:, :, None] + logp).reshape(B, K * vocab)
        vals, idx = jax.lax.top_k(cand, 2 * K)
        origin, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        seqs = gather_beams(alive_seqs, origin)
        seqs = jax.lax.dynamic_update_slice(seqs, tok[:, :, None], (0, 0, step))
        ended = ((tok == eos_id) | (tok == stop_tokens[:, None])
                 | (step + 1 >= max_lens[:, None]))
        # Finished pool: old finished + newly ended candidates, keep the K best.
        new_fin = jnp.where(ended, vals / brevity_penalty(step + 1, alpha), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_fin], axis=1)
        all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
        fin_scores, keep = jax.lax.top_k(all_scores, K)
        fin_seqs = gather_beams(all_seqs, keep)
        # Alive pool: the K best candidates that did not end.
        alive_vals, keep = jax.lax.top_k(jnp.where(ended, NEG_INF, vals), K)
        alive_seqs = gather_beams(seqs, keep)
        last = gather_beams(tok, keep)
        cache = reorder_cache(cache, gather_beams(origin, keep))
        return step + 1, alive_seqs, alive_vals, fin_seqs, fin_scores, last, cache

    init_lp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (K - 1), jnp.float32), (B, 1))
    state = (jnp.asarray(0, jnp.int32), jnp.zeros((B, K, L), jnp.int32), init_lp,
             jnp.zeros((B, K, L), jnp.int32), jnp.full((B, K), NEG_INF, jnp.float32),
             jnp.full((B, K), start_id, jnp.int32), cache)
    _, alive_seqs, alive_lp, fin_seqs, fin_scores, _, _ = jax.lax.while_loop(cond, body, state)
    # A row with no finished hypothesis (cannot happen once max length is reached, but
    # keep it safe) falls back to its best alive one.
    has_fin = fin_scores[:, 0] > NEG_INF / 2
    tokens = jnp.where(has_fin[:, None], fin_seqs[:, 0], alive_seqs[:, 0])
    scores = jnp.where(has_fin, fin_scores[:, 0], alive_lp[:, 0] / max_penalty)
    return tokens, scores
