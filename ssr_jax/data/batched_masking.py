"""Span corruption and the SSR mask for a batch of segments per call (numpy), equal to the
per-example TF code example by example.

Why. tf.data runs a Python-free function per element, but each map stage still costs
~30-50 us of CPU per element here, and the per-example pipeline has about a dozen of them
per segment (and several per document). This path runs the per-document steps once per
group of documents and the mask once per batch of segments:

  documents --padded_batch--> drop empty documents (one map per read batch) --scan-->
  groups of 128 + chunk seeds --> chunk, concatenate, split (one map per group) -->
  batch(B) + mask seeds --> mask (one tf.numpy_function per batch) --unbatch--> examples

Only C++ dataset ops run per element between those calls (`padded_batch`, `batch` of
ragged elements, `unbatch`, `zip`; not `ragged_batch`, which runs a function per element).

Same examples as the per-example path. The seeds are the ones seqio's
`map_over_dataset(num_seeds=...)` would hand each element (`seed_datasets` follows its
allocation under `map_seed_manager` and zips them a batch at a time), and the masks draw
them through `philox`, the numpy twin of TF's stateless ops; so for the same seed a task
gives the very same examples as with `mask_batch_size=0` (the per-example TF path, kept as
the reference and the bench's baseline). The paper's sequential span acceptance (its length
kept while the start is redrawn up to max_tries times) runs for all rows in lock-step.
"""
from typing import Callable, Dict, Tuple

import numpy as np
import seqio
import tensorflow as tf

from ssr_jax.data import philox

DEFAULT_MASK_BATCH = 128  # segments per mask call
READ_BATCH = 64  # documents per empty-document drop (padded to the longest)


# ---- T5's noise mask and sentinels ---------------------------------------------------

def _segment_ends(num_items: np.ndarray, num_segments: np.ndarray, seeds: np.ndarray,
                  width: int) -> np.ndarray:
    """Cumulative ends [B, width] of `span_corruption.random_segmentation` per row: piece k
    covers items [ends[k-1], ends[k]); columns past a row's pieces hold num_items.

    The TF code shuffles the num_items - 1 gaps (the first num_segments - 1 of them cuts) by
    argsort of stateless uniform keys (ties keep index order, as top_k); a cut lands at
    every sorted position holding one of those first gaps. The keys sort as their integer
    mantissas, so one integer sort of (mantissa, index) gives that order; gaps past a row's
    end take the largest mantissa and, having the larger indices, sort last."""
    gaps = num_items - 1
    g = int(gaps.max(initial=0))
    bits = max(g - 1, 1).bit_length()
    in_row = np.arange(g)[None, :] < gaps[:, None]
    keys = np.where(in_row, philox.mantissas(seeds, g), np.uint64(0x7FFFFF)) << np.uint64(bits)
    keys |= np.arange(g, dtype=np.uint64)
    keys = keys.astype(np.uint32) if 23 + bits <= 32 else keys
    order = np.sort(keys, axis=1) & ((1 << bits) - 1)
    is_cut = in_row & (order < (num_segments - 1)[:, None])
    rows, cols = np.nonzero(is_cut)
    counts = is_cut.sum(1)
    rank = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ends = np.repeat(num_items[:, None], width, 1)
    ends[rows, rank] = cols + 1
    return ends


def t5_noise_mask(lengths: np.ndarray, seeds: np.ndarray, noise_density: float,
                  mean_noise_span_length: float) -> np.ndarray:
    """bool [B, max(lengths)]: `random_spans_noise_mask` of each row (False past its end).
    seeds: [B, 2, 2] (the noise and the non-noise split of each row)."""
    orig = np.asarray(lengths, np.int64)
    length = np.maximum(orig, 2)
    num_noise = np.clip(np.round(length.astype(np.float64) * noise_density).astype(np.int64),
                        1, length - 1)
    num_spans = np.maximum(np.round(num_noise / mean_noise_span_length).astype(np.int64), 1)
    s = int(num_spans.max())
    noise_ends = _segment_ends(num_noise, num_spans, seeds[:, 0], s)
    keep_ends = _segment_ends(length - num_noise, num_spans, seeds[:, 1], s)
    # Boundaries keep_0 | noise_0 | keep_1 | ...: noise span k starts after k + 1 keep pieces
    # and k noise pieces and ends after k + 1 of each. Each boundary flips the state, as the
    # TF code's cumsum of span starts mod 2; boundaries at or past the end flip nothing.
    starts = keep_ends + np.pad(noise_ends[:, :-1], ((0, 0), (1, 0)))
    stops = keep_ends + noise_ends
    bounds = np.concatenate([starts, stops], 1)
    w = int(length.max())
    flat = (np.arange(len(length))[:, None] * (w + 1) + np.minimum(bounds, w)).ravel()
    flips = np.bincount(flat, minlength=len(length) * (w + 1)).reshape(-1, w + 1)[:, :w]
    mask = (np.cumsum(flips, 1) % 2 == 1) & (np.arange(w)[None, :] < orig[:, None])
    return mask[:, :int(orig.max(initial=0))]


def _runs_to_sentinels(tokens: np.ndarray, mask: np.ndarray, valid: np.ndarray,
                       vocab_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """`replace_spans_with_sentinels` of each row: (flat values, row lengths)."""
    prev = np.pad(mask[:, :-1], ((0, 0), (1, 0)))
    first = mask & ~prev
    index = np.cumsum(first, 1) - 1
    values = np.where(first, vocab_size - 1 - index, tokens)
    keep = valid & ~(mask & prev)
    return values[keep], keep.sum(1)


def corrupt_batch(tokens: np.ndarray, lengths: np.ndarray, seeds: np.ndarray, vocab_size: int,
                  noise_density: float, mean_noise_span_length: float):
    """`corrupt_segment` for each row of tokens [B, W] (0-padded; lengths [B]).
    Returns (inputs flat, inputs lengths, targets flat, targets lengths)."""
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    mask = t5_noise_mask(lengths, seeds, noise_density, mean_noise_span_length)
    mask = np.pad(mask, ((0, 0), (0, tokens.shape[1] - mask.shape[1])))
    inputs, in_len = _runs_to_sentinels(tokens, mask, valid, vocab_size)
    targets, tgt_len = _runs_to_sentinels(tokens, valid & ~mask, valid, vocab_size)
    return inputs, in_len, targets, tgt_len


# ---- the SSR mask ----------------------------------------------------------------------

def t5_span_ids(lengths: np.ndarray, seeds: np.ndarray, config) -> np.ndarray:
    """`ssr_preprocessors.t5_span_ids` of each row: int64 [B, max(lengths)]."""
    mask = t5_noise_mask(lengths, seeds, config.noise_density, config.mean_span_length)
    first = mask & ~np.pad(mask[:, :-1], ((0, 0), (1, 0)))
    return np.cumsum(first, 1) * mask


def paper_span_ids(lengths: np.ndarray, seeds: np.ndarray, config, budget) -> np.ndarray:
    """`ssr_preprocessors.paper_span_ids` of each row: int64 [B, max(lengths)], 0 on
    context, k + 1 on span k. seeds: [B, 2]; config: SsrMaskConfig; budget: SsrLengths.

    The TF while loop, for all rows at once: each step takes the next start of every row
    still looking and accepts it where the span neither overlaps nor touches an accepted
    one and leaves the last token free; a row stops at its span count, after max_tries
    failed starts for one span, or at a span its budgets cannot hold."""
    n_tok = np.asarray(lengths, np.int64)
    rows = len(n_tok)
    max_spans, max_tries = budget.max_spans, config.max_tries
    sub = philox.split(seeds, 3)  # s_count, s_len, s_start
    base = np.round(np.float32(config.span_rate) * n_tok.astype(np.float32)).astype(np.int64)
    n_want = np.clip(base + philox.uniform_int(sub[:, 0], 1, -1, 2)[:, 0], 1, max_spans)
    span_len = np.maximum(1, philox.poisson(sub[:, 1], min(int(n_want.max()) + 1, max_spans),
                                            config.mean_span_length))
    attempts = n_want * max_tries
    n_f = n_tok.astype(np.float32)[:, None]
    starts_all = np.zeros((rows, 0), np.int64)

    def more_starts(upto):  # the uniforms are drawn lazily: most rows need few tries
        nonlocal starts_all
        have = starts_all.shape[1]
        want = min(max(upto, 2 * have, 64), max_spans * max_tries)
        u = philox.uniform_float32(sub[:, 2], want - have, first=have)
        new = np.minimum(np.floor(u * n_f).astype(np.int64), n_tok[:, None] - 1)
        starts_all = np.concatenate([starts_all, new], 1)

    starts = np.full((rows, max_spans), -10, np.int64)
    ends = starts.copy()
    t, n, tries, masked = (np.zeros(rows, np.int64) for _ in range(4))
    every = np.arange(rows)

    def looking():  # the loop condition, budgets included (`fits`)
        new_masked = masked + span_len[every, np.minimum(n, max_spans - 1)]
        return ((t < attempts) & (n < n_want) & (tries < max_tries)
                & (new_masked + n + 2 <= budget.targets_length)
                & (n_tok - new_masked + 2 * (n + 1) + 1 <= budget.inputs_length))

    active = looking()
    while active.any():
        if t[active].max() >= starts_all.shape[1]:
            more_starts(int(t[active].max()) + 1)
        s = starts_all[every, np.minimum(t, starts_all.shape[1] - 1)]
        ln = span_len[every, np.minimum(n, span_len.shape[1] - 1)]
        e = s + ln  # exclusive; touching: s == an end or e == a start
        upto = int(n.max()) or 1  # only accepted spans can clash
        clash = ((s[:, None] <= ends[:, :upto]) & (starts[:, :upto] <= e[:, None])).any(1)
        ok = active & ~clash & (e <= n_tok - 1)
        acc = every[ok]
        starts[acc, n[acc]], ends[acc, n[acc]] = s[ok], e[ok]
        t += active
        n += ok
        tries = np.where(ok, 0, tries + active)
        masked += ok * ln
        active &= looking()
    # Span ids: spans numbered left to right, +label at the start and -label at the end.
    taken = np.arange(max_spans)[None, :] < n[:, None]
    order = np.argsort(np.where(taken, starts, np.iinfo(np.int64).max), axis=1)
    label = np.empty_like(order)
    np.put_along_axis(label, order, np.arange(1, max_spans + 1)[None, :], 1)
    w = int(n_tok.max(initial=0))
    delta = np.zeros((rows, w + 1), np.int64)
    rr = np.nonzero(taken)
    delta[rr[0], starts[rr]] = label[rr]
    delta[rr[0], ends[rr]] = -label[rr]
    return np.cumsum(delta, 1)[:, :w]


def apply_span_ids(tokens: np.ndarray, span_ids: np.ndarray, lengths: np.ndarray,
                   vocab_size: int) -> Dict[str, np.ndarray]:
    """`ssr_preprocessors.apply_span_ids` of each row, as flat values and row lengths:
    inputs/inputs_len (teacher input), targets/targets_len, num_spans, masked_length."""
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    ids = np.pad(span_ids, ((0, 0), (0, tokens.shape[1] - span_ids.shape[1]))) * valid
    is_span = ids > 0
    first = is_span & (np.pad(ids[:, :-1], ((0, 0), (1, 0))) != ids)
    last = is_span & (np.pad(ids[:, 1:], ((0, 0), (0, 1))) != ids)
    sentinel = vocab_size - 1 - (ids - 1)  # <extra_id_k> of span k = id - 1
    teacher = np.where(first, sentinel, tokens)
    keep_teacher = valid & (~is_span | first)
    pairs = np.stack([tokens, sentinel - 1], -1)  # each span token, then <extra_id_k+1>
    keep_pairs = np.stack([is_span, last], -1)
    return {"inputs": teacher[keep_teacher], "inputs_len": keep_teacher.sum(1),
            "targets": pairs[keep_pairs], "targets_len": keep_pairs.sum((1, 2)),
            "num_spans": ids.max(1, initial=0), "masked_length": is_span.sum(1)}


def ssr_mask_batch(tokens: np.ndarray, lengths: np.ndarray, seeds: np.ndarray,
                   vocab_size: int, config, budget) -> Dict[str, np.ndarray]:
    """`ssr_preprocessors.mask_segment` of each row (seeds [B, 2, 2]), without the rows
    that got no span (the per-example path filters those out after the mask)."""
    if config.scheme == "t5":
        ids = t5_span_ids(lengths, seeds, config)
    else:
        ids = paper_span_ids(lengths, seeds[:, 0], config, budget)
    out = apply_span_ids(tokens, ids, lengths, vocab_size)
    keep = out["num_spans"] > 0
    for k in ("inputs", "targets"):
        out[k] = out[k][np.repeat(keep, out[k + "_len"])]
        out[k + "_len"] = out[k + "_len"][keep]
    for k in ("num_spans", "masked_length"):
        out[k] = out[k][keep]
    return out


# ---- tf.data plumbing ----------------------------------------------------------------

def seed_datasets(num_seeds: int, batch_size: int):
    """The seeds `seqio.map_over_dataset(num_seeds=num_seeds)` would hand the elements of a
    dataset at this point, batch_size elements' worth per element: ((a [b], b [b]), ...).

    seqio zips each element with `tf.data.Dataset.random` streams of consecutive map
    seeds (under `seqio.map_seed_manager`; without one, nondeterministic); element i of a
    batched stream is that of batch i of the elements, so zipping whole batches with
    batched streams hands every element its seqio seed at no per-element cost."""
    if not hasattr(seqio.utils, "_NEXT_MAP_SEED"):
        raise RuntimeError("this seqio no longer keeps _NEXT_MAP_SEED; pass "
                           "mask_batch_size=0 (the per-example path) or pin seqio==0.0.20.")
    start = seqio.utils._NEXT_MAP_SEED  # pylint: disable=protected-access
    if start is None:
        pairs = ((None, None),) * num_seeds
    else:
        pairs = tuple(tuple(p) for p in np.arange(start, start + 2 * num_seeds).reshape(-1, 2))
        seqio.utils._NEXT_MAP_SEED = start + 2 * num_seeds  # pylint: disable=protected-access
    return tf.nest.map_structure(lambda s: tf.data.Dataset.random(s).batch(batch_size), pairs)


def _stack_seeds(seeds, rows) -> tf.Tensor:
    """((a, b), ...) of [batch] int64 -> [rows, num_seeds, 2] (a last batch may be short)."""
    return tf.stack([tf.stack(list(pair), -1) for pair in seeds], 1)[:rows]


def _as_ragged(x) -> tf.RaggedTensor:
    return x if isinstance(x, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(x)


def document_groups(dataset: tf.data.Dataset, feature_key: str,
                    group_size: int) -> tf.data.Dataset:
    """The feature's non-empty documents in consecutive groups of group_size (the last may
    be short), each a RaggedTensor [docs, tokens]: what `filter(non-empty)` then
    `ragged_batch(group_size)` gives, without a function call per document.

    padded_batch (C++; ragged_batch runs a function per element) reads READ_BATCH documents
    padded with -1 (token ids are >= 0); one map drops the empty ones; a scan carries the
    documents of an unfinished group to the next read batch, and an end marker flushes the
    last group of a finite dataset."""
    spec = dataset.element_spec
    if not all(isinstance(v, tf.TensorSpec) for v in tf.nest.flatten(spec)):
        dataset = dataset.map(lambda x: {feature_key: x[feature_key]})  # rare: ragged extras
        spec = dataset.element_spec
    dtype = spec[feature_key].dtype
    pads = {k: tf.constant(-1, v.dtype) if k == feature_key else tf.zeros([], v.dtype)
            for k, v in spec.items()}

    def nonempty(x):  # tokens of the batch's documents back to back, non-zero lengths
        docs = x[feature_key]
        n = tf.reduce_sum(tf.cast(docs >= 0, tf.int32), 1)
        start = tf.range(tf.shape(docs)[0]) * tf.shape(docs)[1]
        index = tf.ragged.range(start, start + n).flat_values  # skips the padding: O(tokens)
        return (tf.gather(tf.reshape(docs, [-1]), index),
                tf.cast(tf.boolean_mask(n, n > 0), tf.int64), False)

    end = tf.data.Dataset.from_tensors((tf.zeros([0], dtype), tf.zeros([0], tf.int64), True))
    batches = dataset.padded_batch(READ_BATCH, padding_values=pads).map(
        nonempty, num_parallel_calls=tf.data.AUTOTUNE).concatenate(end)

    def regroup(state, batch):
        tokens, lengths = (tf.concat([a, b], 0) for a, b in zip(state, batch[:2]))
        n, size = tf.size(lengths, tf.int64), tf.constant(group_size, tf.int64)
        groups = tf.where(batch[2], (n + size - 1) // size, n // size)
        docs = tf.minimum(groups * size, n)
        used = tf.reduce_sum(lengths[:docs])
        sizes = tf.minimum(size, docs - tf.range(groups) * size)
        out = tf.RaggedTensor.from_nested_row_lengths(tokens[:used], [sizes, lengths[:docs]])
        return (tokens[used:], lengths[docs:]), out

    start = (tf.zeros([0], dtype), tf.zeros([0], tf.int64))
    return batches.scan(start, regroup).unbatch()


def chunked_segments(dataset: tf.data.Dataset, feature_key: str, segment_length: int,
                     max_chunk_tokens: int, concat_documents: int) -> tf.data.Dataset:
    """`select_random_chunk` + `concat_and_split` of tokenized documents, one map per group
    of concat_documents non-empty documents; yields segments (token tensors)."""
    grouped = tf.data.Dataset.zip((document_groups(dataset, feature_key, concat_documents),
                                   seed_datasets(1, concat_documents)))

    def chunk_start(arg):
        seed, num_chunks = arg
        return tf.random.stateless_uniform([], seed, 0, num_chunks, tf.int32)

    def split(docs, seeds):
        n = tf.cast(docs.row_lengths(), tf.int32)
        num_chunks = (n + max_chunk_tokens - 1) // max_chunk_tokens

        def chunk():  # rare: documents longer than a chunk, each with its own seed
            start = max_chunk_tokens * tf.map_fn(
                chunk_start, (_stack_seeds(seeds, tf.size(n))[:, 0], num_chunks),
                fn_output_signature=tf.int32)
            first = tf.cast(docs.row_starts(), tf.int32) + start
            index = tf.ragged.range(first, first + tf.minimum(n - start, max_chunk_tokens))
            return tf.gather(docs.flat_values, index.flat_values)

        tokens = tf.cond(tf.reduce_any(num_chunks > 1), chunk, lambda: docs.flat_values)
        size = tf.size(tokens)
        rows = tf.reshape(tf.pad(tokens, [[0, (-size) % segment_length]]), [-1, segment_length])
        rows = tf.ragged.boolean_mask(rows, rows > 0)  # id 0 is padding, never a token
        return tf.ragged.boolean_mask(rows, rows.row_lengths() > 0)

    return grouped.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def map_segment_batches(segments: tf.data.Dataset, num_seeds: int, batch_size: int,
                        fn: Callable, ragged: Dict[str, tf.DType],
                        scalars: Dict[str, tf.DType]) -> tf.data.Dataset:
    """Batches segments with seqio's per-element seeds and runs
    fn(tokens [B, W] 0-padded, lengths [B], seeds [B, num_seeds, 2]) -> dict of numpy
    arrays in one tf.numpy_function per batch: for each `ragged` key its flat values and
    `key_len` row lengths, for each `scalars` key a [B'] array (B' <= B: fn may drop rows).
    Yields the examples one by one."""
    names = [k for r in ragged for k in (r, r + "_len")] + list(scalars)
    dtypes = [d for r in ragged.values() for d in (r, tf.int64)] + list(scalars.values())

    def call(flat, row_lengths, seeds):
        lengths = row_lengths.astype(np.int64)
        tokens = np.zeros((len(lengths), int(lengths.max(initial=0))), flat.dtype)
        tokens[np.arange(tokens.shape[1])[None, :] < lengths[:, None]] = flat
        out = fn(tokens, lengths, seeds)
        return [np.asarray(out[k], d.as_numpy_dtype) for k, d in zip(names, dtypes)]

    def run(tokens, seeds):
        tokens = _as_ragged(tokens)
        got = tf.numpy_function(
            call, [tokens.flat_values, tokens.row_lengths(),
                   _stack_seeds(seeds, tokens.nrows())], dtypes, stateful=False)
        got = {k: tf.ensure_shape(v, [None]) for k, v in zip(names, got)}
        out = {k: tf.RaggedTensor.from_row_lengths(got[k], got[k + "_len"]) for k in ragged}
        out.update({k: got[k] for k in scalars})
        return out

    batched = tf.data.Dataset.zip((segments.batch(batch_size),
                                   seed_datasets(num_seeds, batch_size)))
    return batched.map(run, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def span_corruption_examples(dataset: tf.data.Dataset, vocab_size: int, raw_length: int,
                             noise_density: float, mean_noise_span_length: float,
                             max_chunk_tokens: int, concat_documents: int,
                             batch_size: int) -> tf.data.Dataset:
    """`span_corruption.span_corruption`'s examples, batch_size segments per mask call."""
    segments = chunked_segments(dataset, "targets", raw_length, max_chunk_tokens,
                                concat_documents)
    dtype = dataset.element_spec["targets"].dtype

    def corrupt(tokens, lengths, seeds):
        out = corrupt_batch(tokens, lengths, seeds, vocab_size, noise_density,
                            mean_noise_span_length)
        return dict(zip(("inputs", "inputs_len", "targets", "targets_len"), out))

    return map_segment_batches(segments, 2, batch_size, corrupt,
                               {"inputs": dtype, "targets": dtype}, {})


def ssr_mask_examples(dataset: tf.data.Dataset, vocab_size: int, config, budget,
                      max_chunk_tokens: int, concat_documents: int,
                      batch_size: int) -> tf.data.Dataset:
    """`ssr_preprocessors.ssr_mask`'s examples, batch_size segments per mask call."""
    segments = chunked_segments(dataset, "targets", budget.raw_length, max_chunk_tokens,
                                concat_documents)

    def mask(tokens, lengths, seeds):
        return ssr_mask_batch(tokens, lengths, seeds, vocab_size, config, budget)

    return map_segment_batches(segments, 2, batch_size, mask,
                               {"inputs": tf.int32, "targets": tf.int32},
                               {"num_spans": tf.int32, "masked_length": tf.int32})
