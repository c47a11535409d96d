"""T5's span corruption objective, written from its definition, on stateless seeds.

For a segment of L raw tokens (noise_density d, mean_noise_span_length m):
  num_noise = round(L * d) clamped to [1, L - 1]   (round half to even, as tf.round)
  num_spans = max(1, round(num_noise / m))
The noise and the non-noise token counts are each cut into `num_spans` non-empty pieces at
random (a uniformly random composition), and the pieces are interleaved starting with
non-noise: keep_0 noise_0 keep_1 noise_1 ... The inputs replace each noise span by one
sentinel and the targets replace each kept span by one sentinel. Sentinels count down from
the top of the vocabulary: the i-th sentinel of a sequence is `<extra_id_i>` =
vocab_size - 1 - i. EOS is appended to both after trimming.

`span_corruption_lengths(512)` gives the raw segment length 568 and the targets length 114:
568 tokens -> 85 noise in 28 spans -> inputs 483 + 28 + EOS = 512, targets 85 + 28 + EOS = 114.

The SeqIO preprocessor `span_corruption` follows T5's pipeline: a random chunk of at most
65,536 tokens per document, documents concatenated in groups of 128, split into segments of
the raw length, then noised. Its randomness comes from seqio's map seeds (`get_dataset(seed=)`),
so the same seed gives the same examples. By default it masks `mask_batch_size` segments per
call (`batched_masking`: numpy, the same examples as the per-example TF functions here,
which `mask_batch_size=0` runs one tf.data map per example, as the reference).
"""
import functools
from typing import Mapping, Optional, Sequence, Tuple

import seqio
import tensorflow as tf

from ssr_jax import vocab as vocab_lib
from ssr_jax.data import batched_masking as bm
from ssr_jax.errors import UserError

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
MAX_CHUNK_TOKENS = 65536
CONCAT_DOCUMENTS = 128


def _round_half_even(x: float) -> int:
    return int(round(x))  # Python's round is half-to-even, like tf.round


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> Tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a segment of `length` raw tokens."""
    length = max(length, 2)
    num_noise = min(max(_round_half_even(length * noise_density), 1), length - 1)
    num_spans = max(_round_half_even(num_noise / mean_noise_span_length), 1)
    return num_noise, num_spans


def span_corruption_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> Tuple[int, int]:
    """(raw tokens per segment, targets length) so that the inputs fill `inputs_length`.

    The raw length is the largest one whose inputs (kept tokens + one sentinel per span +
    EOS) still fit; the targets length is then noise tokens + sentinels + EOS.
    """
    def lengths(raw):
        noise, spans = noise_counts(raw, noise_density, mean_noise_span_length)
        return raw - noise + spans + 1, noise + spans + 1

    raw = max(inputs_length - 1, 1)
    while lengths(raw + 1)[0] <= inputs_length:
        raw += 1
    return raw, lengths(raw)[1]


def stateless_shuffle(values: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """A permutation of a 1-D tensor that depends only on `seed`."""
    keys = tf.random.stateless_uniform(tf.shape(values), seed=seed)
    return tf.gather(values, tf.argsort(keys))


def random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                        seed: tf.Tensor) -> tf.Tensor:
    """Lengths [num_segments] of a uniformly random split of num_items into non-empty parts.

    Choose num_segments - 1 of the num_items - 1 gaps between items as cut points.
    """
    gaps = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    first_in_segment = tf.pad(stateless_shuffle(gaps, seed), [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.unsorted_segment_sum(tf.ones_like(segment_id), segment_id, num_segments)


def random_spans_noise_mask(length: tf.Tensor, seeds: Sequence[tf.Tensor],
                            noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                            ) -> tf.Tensor:
    """T5's noise mask: bool [length], True on noise; spans interleave keep, noise, keep...

    seeds: two stateless seeds (int32 [2] each), for the noise and the non-noise split.
    """
    orig_length = tf.convert_to_tensor(length, tf.int32)
    length = tf.maximum(orig_length, 2)
    length_f = tf.cast(length, tf.float64)
    num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length),
                        tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    noise_lengths = random_segmentation(num_noise, num_spans, seeds[0])
    keep_lengths = random_segmentation(length - num_noise, num_spans, seeds[1])
    interleaved = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
    span_starts = tf.cumsum(interleaved)[:-1]
    start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts,
                                                   length)
    is_noise = tf.equal(tf.math.floormod(tf.cumsum(start_indicator), 2), 1)
    return is_noise[:orig_length]


def replace_spans_with_sentinels(tokens: tf.Tensor, span_mask: tf.Tensor,
                                 vocab_size: int) -> tf.Tensor:
    """Each maximal run of True in span_mask becomes one sentinel, numbered 0, 1, ..."""
    prev = tf.pad(span_mask[:-1], [[1, 0]])
    first = tf.logical_and(span_mask, tf.logical_not(prev))
    rest = tf.logical_and(span_mask, prev)
    index = tf.cumsum(tf.cast(first, tokens.dtype)) - 1
    sentinels = tf.cast(vocab_lib.sentinel(vocab_size, index), tokens.dtype)
    tokens = tf.where(first, sentinels, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(rest))


def corrupt_segment(tokens: tf.Tensor, seeds: Sequence[tf.Tensor], vocab_size: int,
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                    ) -> Tuple[tf.Tensor, tf.Tensor]:
    """(inputs, targets) without EOS for one segment of raw token ids."""
    mask = random_spans_noise_mask(tf.size(tokens), seeds, noise_density,
                                   mean_noise_span_length)
    inputs = replace_spans_with_sentinels(tokens, mask, vocab_size)
    targets = replace_spans_with_sentinels(tokens, tf.logical_not(mask), vocab_size)
    return inputs, targets


# ---- SeqIO preprocessors -------------------------------------------------------------

@seqio.map_over_dataset(num_seeds=1)
def _select_random_chunk(features, seed, feature_key: str, max_length: int):
    tokens = features[feature_key]
    n = tf.size(tokens)
    num_chunks = (n + max_length - 1) // max_length
    start = max_length * tf.random.stateless_uniform([], seed, 0, num_chunks, tf.int32)
    return {feature_key: tokens[start:tf.minimum(start + max_length, n)]}


def select_random_chunk(dataset: tf.data.Dataset, feature_key: str = "targets",
                        max_length: int = MAX_CHUNK_TOKENS) -> tf.data.Dataset:
    """Keeps one random aligned chunk of at most max_length tokens per non-empty document."""
    dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
    return _select_random_chunk(dataset, feature_key=feature_key, max_length=max_length)


def concat_and_split(dataset: tf.data.Dataset, segment_length: int,
                     feature_key: str = "targets",
                     concat_documents: int = CONCAT_DOCUMENTS) -> tf.data.Dataset:
    """Concatenates groups of documents and cuts them into segments of segment_length.

    Token id 0 is padding and never a real token, so padding the last segment and then
    dropping zeros restores its true length.
    """
    dataset = dataset.map(lambda x: {feature_key: x[feature_key]})
    dataset = dataset.ragged_batch(concat_documents)

    def split(x):
        tokens = x[feature_key].flat_values
        n = tf.size(tokens)
        padded = tf.pad(tokens, [[0, (-n) % segment_length]])
        return {feature_key: tf.reshape(padded, [-1, segment_length])}

    dataset = dataset.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    dataset = dataset.map(
        lambda x: {feature_key: tf.boolean_mask(x[feature_key], x[feature_key] > 0)})
    return dataset.filter(lambda x: tf.size(x[feature_key]) > 0)


@seqio.map_over_dataset(num_seeds=2)
def _denoise(features, seeds, vocab_size, noise_density, mean_noise_span_length):
    inputs, targets = corrupt_segment(features["targets"], seeds, vocab_size, noise_density,
                                      mean_noise_span_length)
    return {"inputs": inputs, "targets": targets}


def check_sentinel_budget(vocabulary: seqio.Vocabulary, num_sentinels: int, what: str):
    extra = getattr(vocabulary, "extra_ids", 0) or 0
    if num_sentinels > extra:
        raise UserError(
            f"{what} needs up to {num_sentinels} sentinels but the vocabulary has {extra} "
            "extra ids; use shorter TASK_FEATURE_LENGTHS or a vocabulary with more extra ids.")


def check_mask_batch_size(mask_batch_size) -> int:
    if isinstance(mask_batch_size, bool) or not isinstance(mask_batch_size, int) or (
            mask_batch_size < 0):
        raise UserError(f"mask_batch_size={mask_batch_size!r}: give the segments masked per "
                        "call (e.g. 128), or 0 for the per-example path.")
    return mask_batch_size


def span_corruption(dataset: tf.data.Dataset,
                    sequence_length: Mapping[str, int],
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                    max_chunk_tokens: int = MAX_CHUNK_TOKENS,
                    concat_documents: int = CONCAT_DOCUMENTS,
                    mask_batch_size: int = bm.DEFAULT_MASK_BATCH) -> tf.data.Dataset:
    """SeqIO preprocessor: tokenized {'targets'} documents -> T5 span-corruption examples.

    Outputs {'inputs', 'targets'} without EOS (add `seqio.preprocessors.append_eos_after_trim`
    next, as T5 does); with sequence_length['inputs'] = L the inputs are exactly L with EOS
    for every full segment. mask_batch_size: segments masked per call (0: one tf.data map
    per example; the same examples either way).
    """
    vocabulary = output_features["targets"].vocabulary
    raw_length, _ = span_corruption_lengths(sequence_length["inputs"], noise_density,
                                            mean_noise_span_length)
    check_sentinel_budget(vocabulary, noise_counts(raw_length, noise_density,
                                                   mean_noise_span_length)[1] + 1,
                          f"span corruption with inputs length {sequence_length['inputs']}")
    if check_mask_batch_size(mask_batch_size):
        return bm.span_corruption_examples(dataset, vocabulary.vocab_size, raw_length,
                                           noise_density, mean_noise_span_length,
                                           max_chunk_tokens, concat_documents, mask_batch_size)
    dataset = select_random_chunk(dataset, "targets", max_chunk_tokens)
    dataset = concat_and_split(dataset, raw_length, "targets", concat_documents)
    return _denoise(dataset, vocab_size=vocabulary.vocab_size, noise_density=noise_density,
                    mean_noise_span_length=mean_noise_span_length)


def span_corruption_feature_lengths(inputs_length: int,
                                    noise_density: float = NOISE_DENSITY,
                                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                                    ) -> Mapping[str, int]:
    """TASK_FEATURE_LENGTHS that fit span corruption exactly: {'inputs': L, 'targets': T}."""
    return {"inputs": inputs_length,
            "targets": span_corruption_lengths(inputs_length, noise_density,
                                               mean_noise_span_length)[1]}


def with_noise(noise_density: Optional[float] = None,
               mean_noise_span_length: Optional[float] = None):
    """span_corruption with other noise settings, for a Task's preprocessor list."""
    kwargs = {}
    if noise_density is not None:
        kwargs["noise_density"] = noise_density
    if mean_noise_span_length is not None:
        kwargs["mean_noise_span_length"] = mean_noise_span_length
    return functools.partial(span_corruption, **kwargs)
