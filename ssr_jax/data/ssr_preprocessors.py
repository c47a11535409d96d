"""Sequence Span Rewriting (SSR) as reusable SeqIO preprocessors, in token-id space.

SSR has two steps around a teacher (a pretrained T5):

1. mask (`ssr_mask`, a SeqIO preprocessor): choose spans of a raw segment and emit
     'inputs'  = the teacher's input: the context with `<extra_id_k>` in place of span k, EOS;
     'targets' = the student's target: orig_0 <extra_id_1> orig_1 ... orig_n-1 <extra_id_n>, EOS
                 (the layout of the paper's released code);
     'num_spans' (n, so the teacher can stop after `<extra_id_n>`) and 'masked_length' (M).
   Spans follow the paper by default: about `span_rate` = 7.5% of the tokens start a span
   (round(rate * N) + {-1, 0, +1}, at least 1), lengths max(1, Poisson(3)), starts uniform,
   spans never overlap nor touch and the last token is never masked; a span keeps its length
   while its start is redrawn, up to `max_tries` = 10 starts, after which no more spans are
   added (`paper_span_ids`). `scheme='t5'` uses T5's noise mask (15%, mean span 3).

2. rewrite (`ssr_rewrite.rewrite_batch`, pure numpy, shared by the online and offline paths):
   the student's input from the teacher's output; see `ssr_rewrite`.

Lengths. With a teacher input of length I (with EOS) and a well-formed teacher output of
length T, the student input has length I + T - 1. So the student input fits an inputs length
L exactly when T <= L + 1 - I. The teacher's max decode length for an example is therefore
    min(n + 1 + ceil(fill_ratio * M),  L + 1 - I)      (`teacher_decode_lengths`)
i.e. a budget of fill_ratio (default 2, the paper's "about twice the masked tokens") fill
tokens per masked token plus the n + 1 sentinels, capped by the room left in the student's
input. The mask never accepts a span that would leave no room for the empty fills
(I + n <= L) or that would make the student target longer than the targets length, and the
raw segment length is chosen (`ssr_lengths`) so that an average example gets its whole fill
budget: N + (fill_ratio - 1) * E[M] + 2 E[n] + 1 <= L. Documents are concatenated and cut
into segments of N tokens before masking, as in T5's span corruption.
"""
import dataclasses
import math
from typing import Mapping, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from ssr_jax.data import batched_masking as bm
from ssr_jax.data import philox
from ssr_jax.data import span_corruption as sc
from ssr_jax import vocab as vocab_lib
from ssr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SsrMaskConfig:
    """How SSR chooses spans. scheme: 'paper' (default) or 't5'."""

    scheme: str = "paper"
    span_rate: float = 0.075  # paper: spans per token
    mean_span_length: float = 3.0  # paper: Poisson mean; t5: mean noise span length
    max_tries: int = 10  # paper: starts drawn for one span (its length kept) before stopping
    noise_density: float = 0.15  # t5 scheme only
    fill_ratio: float = 2.0  # teacher budget: fill tokens per masked token

    def __post_init__(self):
        if self.scheme not in ("paper", "t5"):
            raise UserError(f"SsrMaskConfig.scheme={self.scheme!r}: use 'paper' or 't5'.")
        if self.max_tries < 1 or self.span_rate <= 0 or self.mean_span_length <= 0:
            raise UserError(f"bad SsrMaskConfig {self}: rates, lengths and tries must be > 0.")


@dataclasses.dataclass(frozen=True)
class SsrLengths:
    raw_length: int  # tokens per segment before masking (N)
    inputs_length: int  # student input limit (L)
    targets_length: int  # student target limit
    max_spans: int  # sentinel budget: n <= extra_ids - 1 (<extra_id_n> closes the target)


def _expected_rates(config: SsrMaskConfig) -> Tuple[float, float]:
    """(E[masked tokens] / N, E[spans] / N) for the paper scheme."""
    lam = config.mean_span_length
    mean_len = lam + math.exp(-lam)  # E[max(1, Poisson(lam))]
    return config.span_rate * mean_len, config.span_rate


def ssr_lengths(inputs_length: int, targets_length: int, config: SsrMaskConfig = SsrMaskConfig(),
                num_extra_ids: int = 100) -> SsrLengths:
    """The raw segment length N for these feature lengths (see the module docstring)."""
    max_spans = num_extra_ids - 1
    if config.scheme == "t5":
        def fits(n_raw):
            masked, spans = sc.noise_counts(n_raw, config.noise_density, config.mean_span_length)
            student = n_raw - masked + math.ceil(config.fill_ratio * masked) + 2 * spans + 1
            return (student <= inputs_length and masked + spans + 1 <= targets_length
                    and spans <= max_spans)
    else:
        mask_rate, span_rate = _expected_rates(config)

        def fits(n_raw):
            student = n_raw * (1 + (config.fill_ratio - 1) * mask_rate + 2 * span_rate) + 1
            target = n_raw * (mask_rate + span_rate) + 1
            return (student <= inputs_length and target <= targets_length
                    and round(span_rate * n_raw) + 1 <= max_spans)
    raw = 1
    while raw + 1 <= inputs_length - 1 and fits(raw + 1):
        raw += 1
    if raw < 2:
        raise UserError(f"TASK_FEATURE_LENGTHS inputs={inputs_length}, targets={targets_length} "
                        "are too short for SSR; use at least 16 and 8.")
    return SsrLengths(raw, inputs_length, targets_length, max_spans)


def teacher_decode_lengths(teacher_input_lengths, num_spans, masked_lengths,
                           inputs_length: int, fill_ratio: float = 2.0) -> np.ndarray:
    """Per-example teacher max decode length (int32), see the module docstring.

    teacher_input_lengths: tokens of the teacher input including EOS (non-pad count).
    """
    n = np.asarray(num_spans, np.int64)
    want = n + 1 + np.ceil(fill_ratio * np.asarray(masked_lengths, np.float64)).astype(np.int64)
    room = inputs_length + 1 - np.asarray(teacher_input_lengths, np.int64)
    return np.maximum(np.minimum(want, room), n + 1).astype(np.int32)


# ---- mask (TensorFlow, stateless) ----------------------------------------------------

def paper_span_ids(length: tf.Tensor, seed: tf.Tensor, config: SsrMaskConfig,
                   lengths: SsrLengths) -> tf.Tensor:
    """int32 [length]: 0 on context, k + 1 on span k (spans numbered left to right).

    The paper's procedure (its data_gen.py, docs/FACTS.md): n_want = max(1, round(rate N) +
    {-1, 0, +1}) spans, one after the other; each span's length max(1, Poisson(mean)) is
    drawn once and kept while its start is drawn uniformly from [0, N) up to max_tries
    times; a start is accepted when the span and the token after it lie inside the segment
    (so the last token is never masked) and it neither overlaps nor touches an accepted
    span. When every try fails, no more spans are added (the paper's `break`). A span that
    would overflow the student target or the empty-fill student input also ends the mask:
    those budgets do not depend on the start, so redrawing it could never help.
    """
    n_tok = tf.convert_to_tensor(length, tf.int32)
    s_count, s_len, s_start = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    base = tf.cast(tf.round(config.span_rate * tf.cast(n_tok, tf.float32)), tf.int32)
    jitter = tf.random.stateless_uniform([], s_count, -1, 2, tf.int32)
    n_want = tf.clip_by_value(base + jitter, 1, lengths.max_spans)
    span_len = tf.maximum(1, tf.random.stateless_poisson([lengths.max_spans], s_len,
                                                         config.mean_span_length, tf.int32))
    attempts = n_want * config.max_tries
    u = tf.random.stateless_uniform([lengths.max_spans * config.max_tries], s_start)
    starts_all = tf.minimum(tf.cast(tf.floor(u * tf.cast(n_tok, tf.float32)), tf.int32),
                            n_tok - 1)
    max_spans = lengths.max_spans
    empty = tf.fill([max_spans], -10)

    def fits(n, masked):  # the budgets for span n (0-based) of its kept length
        new_masked = masked + span_len[tf.minimum(n, max_spans - 1)]
        target_len = new_masked + (n + 1) + 1
        student_empty = (n_tok - new_masked) + 2 * (n + 1) + 1
        return tf.logical_and(target_len <= lengths.targets_length,
                              student_empty <= lengths.inputs_length)

    def cond(t, n, tries, masked, starts, ends):
        return tf.reduce_all(tf.stack([t < attempts, n < n_want, tries < config.max_tries,
                                       fits(n, masked)]))

    def body(t, n, tries, masked, starts, ends):
        s, ln = starts_all[t], span_len[n]
        e = s + ln  # exclusive; touching means s == ends[j] or e == starts[j]
        clash = tf.reduce_any(tf.logical_and(s <= ends, starts <= e))
        ok = tf.logical_and(tf.logical_not(clash), e <= n_tok - 1)
        idx = tf.reshape(n, [1, 1])
        starts = tf.where(ok, tf.tensor_scatter_nd_update(starts, idx, [s]), starts)
        ends = tf.where(ok, tf.tensor_scatter_nd_update(ends, idx, [e]), ends)
        ok_i = tf.cast(ok, tf.int32)
        return (t + 1, n + ok_i, (tries + 1) * (1 - ok_i), masked + ok_i * ln, starts, ends)

    _, n, _, _, starts, ends = tf.while_loop(
        cond, body, (0, 0, 0, 0, empty, empty),
        shape_invariants=(tf.TensorShape([]),) * 4 + (tf.TensorShape([max_spans]),) * 2)
    starts, ends = starts[:n], ends[:n]
    order = tf.argsort(starts)
    starts, ends = tf.gather(starts, order), tf.gather(ends, order)
    label = tf.range(1, n + 1)
    delta = tf.math.unsorted_segment_sum(tf.concat([label, -label], 0),
                                         tf.concat([starts, ends], 0), n_tok + 1)
    return tf.cumsum(delta)[:n_tok]


def t5_span_ids(length: tf.Tensor, seeds: Sequence[tf.Tensor],
                config: SsrMaskConfig) -> tf.Tensor:
    """T5's noise mask as span ids (0 context, k + 1 on span k)."""
    mask = sc.random_spans_noise_mask(length, seeds, config.noise_density,
                                      config.mean_span_length)
    first = tf.logical_and(mask, tf.logical_not(tf.pad(mask[:-1], [[1, 0]])))
    return tf.cumsum(tf.cast(first, tf.int32)) * tf.cast(mask, tf.int32)


def apply_span_ids(tokens: tf.Tensor, span_ids: tf.Tensor, vocab_size: int
                   ) -> Mapping[str, tf.Tensor]:
    """Teacher input and student target (both without EOS), num_spans, masked_length."""
    is_span = span_ids > 0
    prev = tf.pad(span_ids[:-1], [[1, 0]])
    nxt = tf.pad(span_ids[1:], [[0, 1]])
    first = tf.logical_and(is_span, tf.not_equal(prev, span_ids))
    last = tf.logical_and(is_span, tf.not_equal(nxt, span_ids))
    tokens = tf.cast(tokens, tf.int32)
    k = span_ids - 1
    teacher = tf.boolean_mask(tf.where(first, vocab_lib.sentinel(vocab_size, k), tokens),
                              tf.logical_or(tf.logical_not(is_span), first))
    pairs = tf.reshape(tf.stack([tokens, vocab_lib.sentinel(vocab_size, k + 1)], axis=1), [-1])
    keep = tf.reshape(tf.stack([is_span, last], axis=1), [-1])
    return {"inputs": teacher, "targets": tf.boolean_mask(pairs, keep),
            "num_spans": tf.maximum(tf.reduce_max(tf.pad(span_ids, [[0, 1]])), 0),
            "masked_length": tf.reduce_sum(tf.cast(is_span, tf.int32))}


def mask_segment(tokens: tf.Tensor, seeds: Sequence[tf.Tensor], vocab_size: int,
                 config: SsrMaskConfig, lengths: SsrLengths) -> Mapping[str, tf.Tensor]:
    """SSR mask of one segment of raw token ids; seeds: two stateless seeds."""
    n = tf.size(tokens)
    if config.scheme == "t5":
        span_ids = t5_span_ids(n, seeds, config)
    else:
        span_ids = paper_span_ids(n, seeds[0], config, lengths)
    return apply_span_ids(tokens, span_ids, vocab_size)


@seqio.map_over_dataset(num_seeds=2)
def _mask(features, seeds, vocab_size, config, lengths):
    return mask_segment(features["targets"], seeds, vocab_size, config, lengths)


def ssr_mask(dataset: tf.data.Dataset, sequence_length: Mapping[str, int],
             output_features: Mapping[str, seqio.Feature],
             config: SsrMaskConfig = SsrMaskConfig(),
             max_chunk_tokens: int = sc.MAX_CHUNK_TOKENS,
             concat_documents: int = sc.CONCAT_DOCUMENTS,
             mask_batch_size: int = bm.DEFAULT_MASK_BATCH) -> tf.data.Dataset:
    """SeqIO preprocessor: tokenized {'targets'} documents -> SSR mask examples.

    Outputs 'inputs' (teacher input), 'targets' (student target), both without EOS (follow
    with `seqio.preprocessors.append_eos_after_trim`), and int32 scalars 'num_spans',
    'masked_length'. Examples with no span (a segment of one token) are dropped.
    mask_batch_size: segments masked per call (`batched_masking`); 0, or a Poisson mean
    >= 10 (past the numpy twin), masks one example per map; the same examples either way.
    """
    vocabulary = output_features["targets"].vocabulary
    extra = getattr(vocabulary, "extra_ids", 0) or 0
    if extra < 2:
        raise UserError("SSR needs a vocabulary with extra ids (sentinels); got "
                        f"{extra}. Use get_vocabulary(path, extra_ids=100).")
    lengths = ssr_lengths(sequence_length["inputs"], sequence_length["targets"], config, extra)
    if sc.check_mask_batch_size(mask_batch_size) and (
            config.scheme == "t5" or config.mean_span_length < philox.KNUTH_MAX_RATE):
        return bm.ssr_mask_examples(dataset, vocabulary.vocab_size, config, lengths,
                                    max_chunk_tokens, concat_documents, mask_batch_size)
    dataset = sc.select_random_chunk(dataset, "targets", max_chunk_tokens)
    dataset = sc.concat_and_split(dataset, lengths.raw_length, "targets", concat_documents)
    dataset = _mask(dataset, vocab_size=vocabulary.vocab_size, config=config, lengths=lengths)
    return dataset.filter(lambda x: x["num_spans"] > 0)


def task_mask_config(task) -> SsrMaskConfig:
    """The SsrMaskConfig an SSR-masked SeqIO task (or every task of a mixture) masks with.

    Its fill_ratio is the one length budget of SSR: the mask sizes raw segments for it and
    the teacher decodes up to it, so the teacher reads it from here rather than holding a
    second copy that could disagree."""
    tasks = list(getattr(task, "tasks", None) or [task])
    found = set()
    for t in tasks:
        for step in getattr(t, "preprocessors", ()):
            if getattr(step, "func", None) is ssr_mask:
                found.add(step.keywords.get("config", SsrMaskConfig()))
    if not found:
        raise UserError(f"task {task.name!r} has no SSR mask (ssr_mask preprocessor); the "
                        "online SSR teacher needs an SSR-masked task such as "
                        "'ssr_default_ssr_masked' (objective 'ssr_masked').")
    if len(found) > 1:
        raise UserError(f"the tasks of mixture {task.name!r} mask with different "
                        f"SsrMaskConfigs {sorted(map(str, found))}; use one.")
    return found.pop()


def scalar_feature() -> seqio.Feature:
    """Output feature spec for the int32 scalars 'num_spans' and 'masked_length'."""
    return seqio.Feature(seqio.PassThroughVocabulary(size=0), add_eos=False, required=False,
                         dtype=tf.int32, rank=0)
