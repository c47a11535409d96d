"""SSR's rewrite step (pure numpy, shared by the online and offline paths).

Given the teacher's output `<extra_id_0> fill_0 <extra_id_1> fill_1 ... <extra_id_n>`, the
student's input is the context with span k written `<extra_id_k> fill_k <extra_id_k+1>`, then EOS.
Fill k is valid when `<extra_id_k>` is followed by `<extra_id_k+1>` as the next sentinel
(before EOS/padding); its first valid occurrence is used. A missing or malformed fill
(skipped or out-of-order sentinel, output cut by the length limit) falls back to the
empty fill `<extra_id_k> <extra_id_k+1>` for that span only, and is counted; so are
well-formed empty fills and fills dropped for the student's input length (RewriteStats).
`rewrite_examples` also offers the paper's policy (malformed='drop_example'): an example
with any such span is replaced by its span-corruption example.

The length budget that sizes the teacher's output is `ssr_preprocessors`' (module docstring).
"""
import dataclasses
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import seqio
import tensorflow as tf

from ssr_jax import vocab as vocab_lib
from ssr_jax.errors import UserError

# What to do with an example whose teacher output lacks a well-formed non-empty fill for some
# span (see `rewrite_examples`).
MALFORMED_POLICIES = ("empty_fill", "drop_example")


@dataclasses.dataclass
class RewriteStats:
    """Counts (and token totals) of rewritten spans; `merge` adds two, so the same type
    serves one batch, a logging window, a whole run and generate-spans' progress files.

    Every span is exactly one of: a non-empty fill, an empty fill (the teacher wrote
    `<x_k> <x_k+1>`), a fallback (no well-formed fill: rewritten with the empty fill) or
    truncated (a well-formed non-empty fill dropped for the student's input length), so
    spans = nonempty_fills + empty_fills + fallbacks + truncated. The span counts describe
    the teacher's outputs whatever the malformed policy; `dropped_examples` counts the
    examples that policy 'drop_example' replaced (`rewrite_examples`)."""

    spans: int = 0  # spans in the teacher inputs
    nonempty_fills: int = 0  # well-formed, non-empty fills the student sees
    empty_fills: int = 0  # well-formed empty fills (nothing between the sentinels)
    fallbacks: int = 0  # no well-formed fill (missing/malformed): rewritten empty
    truncated: int = 0  # well-formed non-empty fills dropped: the input would not fit
    exact_copies: int = 0  # non-empty fills identical to the original span (needs targets)
    overlong_inputs: int = 0  # rows still too long with empty fills (cut, EOS kept)
    fill_tokens: int = 0  # tokens of the non-empty fills the student sees
    original_spans: int = 0  # original spans read from the targets (needs targets)
    original_tokens: int = 0  # their tokens
    examples: int = 0  # rows with at least one span
    incomplete_examples: int = 0  # of those, rows with a span that is not a non-empty fill
    dropped_examples: int = 0  # incomplete rows replaced under malformed='drop_example'

    def merge(self, other: "RewriteStats") -> "RewriteStats":
        return RewriteStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                               for f in dataclasses.fields(self)})

    def to_json(self) -> dict:
        return {k: int(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: Optional[Mapping[str, int]], source: str = "SSR statistics"
                  ) -> "RewriteStats":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        if "valid_fills" in d:  # before empty fills were told apart from non-empty ones
            raise UserError(f"{source}: rewrite statistics from an older ssr-jax (valid_fills "
                            "counted empty and truncated fills as valid); regenerate into a "
                            "new OUTPUT_DIR.")
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"{source}: unknown rewrite statistics {unknown}.")
        return cls(**{k: int(v) for k, v in d.items()})

    def summary(self) -> Mapping[str, float]:
        """Scalars for logging. The four `*_fill_rate`/`fallback_rate`/`truncated_rate`
        shares of spans (non-empty, empty, fallback, truncated) add up to 1; exact copies and
        the mean fill length are over the non-empty fills; the complete and dropped example
        rates are over the examples."""
        spans = max(self.spans, 1)
        return {"ssr/spans": self.spans,
                "ssr/nonempty_fill_rate": self.nonempty_fills / spans,
                "ssr/empty_fill_rate": self.empty_fills / spans,
                "ssr/fallback_rate": self.fallbacks / spans,
                "ssr/truncated_rate": self.truncated / spans,
                "ssr/exact_copy_rate": self.exact_copies / max(self.nonempty_fills, 1),
                "ssr/mean_fill_length": (self.fill_tokens / self.nonempty_fills
                                         if self.nonempty_fills else 0.0),
                "ssr/mean_original_length": (self.original_tokens / self.original_spans
                                             if self.original_spans else 0.0),
                "ssr/overlong_inputs": self.overlong_inputs,
                "ssr/examples": self.examples,
                "ssr/complete_example_rate": ((self.examples - self.incomplete_examples)
                                              / max(self.examples, 1)),
                "ssr/dropped_examples": self.dropped_examples,
                "ssr/dropped_example_rate": self.dropped_examples / max(self.examples, 1)}


def _stop_lengths(x: np.ndarray, stops: Sequence[int],
                  vocab_size: Optional[int] = None) -> np.ndarray:
    """Per row, the index of the first stop token (pad 0 / EOS, or an id outside
    [0, vocab_size) when given: a padded model vocabulary can emit those), or the width."""
    hit = np.isin(x, stops)
    if vocab_size is not None:
        hit |= (x >= vocab_size) | (x < 0)
    return np.where(hit.any(axis=1), hit.argmax(axis=1), x.shape[1])


def _sentinel_positions(x: np.ndarray, lengths: np.ndarray, vocab_size: int,
                        num_extra_ids: int) -> List[list]:
    """Per row, the positions (< its length) of sentinel tokens, vectorised over the batch."""
    in_row = np.arange(x.shape[1])[None, :] < lengths[:, None]
    rows, cols = np.nonzero(vocab_lib.is_sentinel(x, vocab_size, num_extra_ids) & in_row)
    counts = np.bincount(rows, minlength=x.shape[0])
    cols = cols.tolist()
    out, start = [], 0
    for c in counts.tolist():
        out.append(cols[start:start + c])
        start += c
    return out


def split_targets(target: Sequence[int], vocab_size: int, num_extra_ids: int) -> List[list]:
    """Original spans from a student target `orig_0 <x_1> orig_1 ... <x_n>` (no pad/EOS)."""
    lo, hi = vocab_lib.sentinel_range(vocab_size, num_extra_ids)
    spans, cur = [], []
    for tok in target:
        if lo <= tok < hi:
            spans.append(cur)
            cur = []
        else:
            cur.append(tok)
    return spans


def parse_teacher_output(output: Sequence[int], vocab_size: int, num_extra_ids: int,
                         positions: Optional[Sequence[int]] = None) -> dict:
    """{k: fill_k} for every well-formed fill (`<x_k> fill <x_k+1>`), first occurrence.

    output: tokens up to (excluding) EOS/pad; positions: its sentinel positions if known.
    """
    if positions is None:
        lo, hi = vocab_lib.sentinel_range(vocab_size, num_extra_ids)
        positions = [i for i, tok in enumerate(output) if lo <= tok < hi]
    fills = {}
    for a, b in zip(positions, positions[1:]):
        k = vocab_lib.sentinel_index(vocab_size, output[a])
        if vocab_lib.sentinel_index(vocab_size, output[b]) == k + 1 and k not in fills:
            fills[k] = list(output[a + 1:b])
    return fills


def rewrite_batch(teacher_inputs: np.ndarray, teacher_outputs: np.ndarray, vocab_size: int,
                  num_extra_ids: int = 100, eos_id: int = 1,
                  targets: Optional[np.ndarray] = None, max_length: Optional[int] = None,
                  pad_to: Optional[int] = None):
    """Student inputs from teacher inputs and outputs; pure numpy, never raises on content.

    Args:
      teacher_inputs: int [B, L], the teacher's inputs (context + sentinels + EOS), 0-padded.
      teacher_outputs: int [B, T], the teacher's outputs, 0-padded; read up to EOS, pad or
        the first id >= vocab_size (the model's padded vocabulary has unused ids).
      vocab_size: the vocabulary's size with extra ids (`vocab.vocab_size`, not padded).
      targets: optional int [B, S] student targets, for exact-copy and original-length stats.
      max_length: if set, a student input longer than this has its last non-empty fills
        replaced by empty fills until it fits (counted as `truncated`).
      pad_to: if set, return a 0-padded int32 [B, pad_to] array instead of a list.

    Returns:
      (student_inputs, RewriteStats); student inputs end with EOS. An all-padding row
      (e.g. the padding rows of a last, partial batch) gives just [EOS]: skip rows whose
      student target is empty before packing.
    """
    rows, _, stats = _rewrite_rows(teacher_inputs, teacher_outputs, vocab_size, num_extra_ids,
                                   eos_id, targets, max_length)
    if pad_to is None:
        return rows, stats
    padded = np.zeros((len(rows), pad_to), np.int32)
    for b, r in enumerate(rows):
        if len(r) > pad_to:
            raise ValueError(f"rewritten row {b} has {len(r)} tokens > pad_to={pad_to}; "
                             "pass max_length")
        padded[b, :len(r)] = r
    return padded, stats


def _rewrite_rows(teacher_inputs, teacher_outputs, vocab_size: int, num_extra_ids: int,
                  eos_id: int, targets, max_length: Optional[int]):
    """rewrite_batch's rows (a list), whether each row is complete (it has spans and each
    has a non-empty fill the student sees), and the stats."""
    teacher_inputs = np.asarray(teacher_inputs)
    teacher_outputs = np.asarray(teacher_outputs)
    if teacher_inputs.ndim != 2 or teacher_outputs.ndim != 2 or (
            teacher_inputs.shape[0] != teacher_outputs.shape[0]):
        raise ValueError(f"rewrite_batch wants [B, L] and [B, T] arrays, got "
                         f"{teacher_inputs.shape} and {teacher_outputs.shape}")
    stats = RewriteStats()
    rows, complete = [], []
    in_len = _stop_lengths(teacher_inputs, (0,))
    in_pos = _sentinel_positions(teacher_inputs, in_len, vocab_size, num_extra_ids)
    out_len = _stop_lengths(teacher_outputs, (0, eos_id), vocab_size)
    out_pos = _sentinel_positions(teacher_outputs, out_len, vocab_size, num_extra_ids)
    tin_all, tout_all = teacher_inputs.tolist(), teacher_outputs.tolist()
    if targets is not None:
        targets = np.asarray(targets)
        tgt_len = _stop_lengths(targets, (0, eos_id))
        tgt_all = targets.tolist()
    for b in range(teacher_inputs.shape[0]):
        tin = tin_all[b][:in_len[b]]
        if tin and tin[-1] == eos_id:
            tin.pop()
        sent_pos = in_pos[b]
        fills = parse_teacher_output(tout_all[b][:out_len[b]], vocab_size, num_extra_ids,
                                     out_pos[b])
        origs = None
        if targets is not None:
            origs = split_targets(tgt_all[b][:tgt_len[b]], vocab_size, num_extra_ids)
            stats.original_spans += len(origs)
            stats.original_tokens += sum(len(o) for o in origs)
        ks = [vocab_lib.sentinel_index(vocab_size, tin[p]) for p in sent_pos]
        used = [fills.get(k) for k in ks]
        stats.spans += len(ks)
        stats.fallbacks += sum(u is None for u in used)
        stats.empty_fills += sum(u == [] for u in used)
        if max_length is not None:
            # Empty-fill length: context + 2 sentinels per span + EOS. Dropping an empty
            # fill saves nothing, so only non-empty ones are truncated.
            size = len(tin) + len(ks) + 1 + sum(len(u) for u in used if u)
            for i in range(len(used) - 1, -1, -1):
                if size <= max_length:
                    break
                if used[i]:
                    size -= len(used[i])
                    used[i] = None
                    stats.truncated += 1
        stats.nonempty_fills += sum(bool(u) for u in used)
        out, prev = [], 0
        for i, (p, k) in enumerate(zip(sent_pos, ks)):
            out.extend(tin[prev:p])
            out.append(tin[p])
            if used[i]:
                out.extend(used[i])
                stats.fill_tokens += len(used[i])
                if origs is not None and k < len(origs) and used[i] == origs[k]:
                    stats.exact_copies += 1
            out.append(vocab_lib.sentinel(vocab_size, k + 1))
            prev = p + 1
        out.extend(tin[prev:])
        out.append(eos_id)
        if max_length is not None and len(out) > max_length:
            stats.overlong_inputs += 1
            out = out[:max_length - 1] + [eos_id]
        rows.append(np.asarray(out, np.int32))
        done = bool(ks) and all(used)
        complete.append(done)
        stats.examples += bool(ks)
        stats.incomplete_examples += bool(ks) and not done
    return rows, complete, stats


def span_corruption_target(target: Sequence[int], vocab_size: int, eos_id: int = 1
                           ) -> np.ndarray:
    """SSR target `orig_0 <x_1> ... orig_n-1 <x_n>` EOS -> T5's span-corruption target
    `<x_0> orig_0 <x_1> ... orig_n-1` EOS (same length; the teacher input is T5's input)."""
    body = [int(t) for t in target if t != eos_id and t != 0]
    return np.asarray([vocab_lib.sentinel(vocab_size, 0)] + body[:-1] + [eos_id], np.int32)


def rewrite_examples(teacher_inputs: np.ndarray, teacher_outputs: np.ndarray,
                     targets: np.ndarray, vocab_size: int, num_extra_ids: int = 100,
                     eos_id: int = 1, max_length: Optional[int] = None,
                     malformed: str = "empty_fill") -> Tuple[List[dict], RewriteStats]:
    """Student examples {'inputs', 'targets'} (unpadded int32) from a batch, with a policy
    for an example that has a span without a non-empty well-formed fill (missing,
    malformed, empty, or dropped for length):

      'empty_fill'   (default) keep it; each such span reads `<x_k> <x_k+1>` (rewrite_batch);
      'drop_example' the paper's data_gen.py: the example is not an SSR example. So that
                     the batch stays full and lockstep is untouched, its slot holds the
                     span-corruption example of the same segment (the teacher input and
                     `span_corruption_target`, no longer than the SSR example), counted
                     in `dropped_examples`.

    All-padding rows come back as {'inputs': [EOS], 'targets': []} (skip them)."""
    if malformed not in MALFORMED_POLICIES:
        raise UserError(f"SSR malformed={malformed!r}: use one of {MALFORMED_POLICIES}.")
    rows, complete, stats = _rewrite_rows(teacher_inputs, teacher_outputs, vocab_size,
                                          num_extra_ids, eos_id, targets, max_length)
    out = []
    for tin, tgt, row, done in zip(np.asarray(teacher_inputs), np.asarray(targets), rows,
                                   complete):
        tgt = np.asarray(tgt[:np.count_nonzero(tgt)], np.int32)  # pad only after the example
        if malformed == "drop_example" and not done and tgt.size:
            stats.dropped_examples += 1
            out.append({"inputs": np.asarray(tin[:np.count_nonzero(tin)], np.int32),
                        "targets": span_corruption_target(tgt, vocab_size, eos_id)})
        else:
            out.append({"inputs": row, "targets": tgt})
    return out, stats


def teacher_outputs_from_targets(targets: np.ndarray, vocab_size: int, eos_id: int = 1
                                 ) -> np.ndarray:
    """The perfect teacher: `<x_0> orig_0 <x_1> ... <x_n>` from student targets [B, S].
    Rewriting with it gives the original text with sentinels around each span (lossless)."""
    targets = np.asarray(targets)
    out = np.zeros((targets.shape[0], targets.shape[1] + 1), np.int32)
    out[:, 0] = vocab_lib.sentinel(vocab_size, 0)
    out[:, 1:] = np.where(targets == eos_id, 0, targets)
    return out


def rewrite_preprocessor(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                         sequence_length: Optional[Mapping[str, int]] = None,
                         teacher_outputs_key: str = "teacher_outputs") -> tf.data.Dataset:
    """SeqIO preprocessor for stored teacher outputs: {'inputs' (teacher input with EOS),
    teacher_outputs_key, 'targets'} -> {'inputs' (student input with EOS), 'targets'}.

    Runs `rewrite_batch` through tf.numpy_function (stateless, so tf.data checkpoints skip
    it safely); the student input is limited to sequence_length['inputs'].
    """
    vocab = output_features["inputs"].vocabulary
    vocab_size, extra, eos = vocab.vocab_size, vocab.extra_ids, vocab.eos_id
    max_length = (sequence_length or {}).get("inputs")

    def fn(tin, tout):
        rows, _ = rewrite_batch(tin[None], tout[None], vocab_size, extra, eos,
                                max_length=max_length)
        return rows[0]

    def rewrite(ex):
        student = tf.numpy_function(fn, [tf.cast(ex["inputs"], tf.int32),
                                         tf.cast(ex[teacher_outputs_key], tf.int32)],
                                    tf.int32, stateful=False)
        student.set_shape([None])
        return {"inputs": student, "targets": ex["targets"]}

    return dataset.map(rewrite, num_parallel_calls=tf.data.AUTOTUNE)
