"""Span-length curriculum for SSR (the paper's v2: easier examples, i.e. shorter spans, first).

The curriculum changes the mask, not which examples are used. During the first `steps`
training steps every SSR example is masked again (`CurriculumMask`) with the paper's
procedure at a shorter mean span length: E[span length] grows linearly from
`start_mean_span` at step 0 to the task mask's own (E[max(1, Poisson(3))] = 3.05), and the
span rate grows in proportion (rate x 3.05 / mean), so the expected masked fraction stays the
task's (about 22%). More spans need more sentinels, so the segment is first cut to the raw
length whose expected mask fits the slot (`ssr_lengths` of the step's mask; at 512/114 and a
mean of 1.5, 296 of its 370 tokens); the rest of that segment is not used. From step `steps`
on the examples keep the task's mask. Nothing is read ahead or rejected: every step still
reads exactly its share of examples and runs the teacher once on a fixed batch (lockstep is
unaffected), and the mask depends only on the step, the example's tokens and the seed, so
online training and generate-spans (offline) mask identically, on any mesh and host count.
Masking again is numpy in the stage's prefetch thread, about 1 ms per 512-token example on
a busy 2-core machine, during the curriculum's steps only. Paper scheme only (the t5
scheme's mask is another procedure).

Why not select examples instead (this module's first design): with a fixed span count per
segment, an example's mean span length is the mean of ~28 Poisson draws at 512 tokens, so it
concentrates near 3 and a limit of 1.5 accepted 0 of 3000 examples at 512/114 and 256/57;
and choosing short-span examples lowers the masked fraction (fewer masked tokens for the
same spans), which the mask above keeps.

Teacher perplexity (the paper v2's other difficulty) is not implemented, on purpose. Ranking
by it needs the teacher's scores before the examples are chosen: either a second teacher pass
(teacher-forced scoring of c x n candidates, then sampling the n kept ones) or sampling c x n
examples and keeping the n easiest (the sampler's log-probabilities come with the tokens);
both multiply the teacher's cost, which already dominates an online step, by c during the
curriculum, and the selection within a host must still yield exactly n examples per step
(lockstep), so it can only rank within a host's fixed candidate set, not against a global
threshold. Selecting by perplexity also biases towards predictable text (copies, boilerplate)
rather than shorter spans. A span-length schedule gives the easy-first order at no teacher
cost.
"""
import dataclasses
import hashlib
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ssr_jax import vocab as vocab_lib
from ssr_jax.data.ssr_preprocessors import SsrLengths, SsrMaskConfig, ssr_lengths
from ssr_jax.data.ssr_rewrite import split_targets
from ssr_jax.errors import UserError

Example = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SpanCurriculum:
    """steps = 0 turns the curriculum off. start_mean_span: the mean span length at step 0
    (> 1: spans are at least one token), growing linearly to the task mask's mean at `steps`."""

    steps: int = 0
    start_mean_span: float = 1.5

    def __post_init__(self):
        if self.steps < 0 or not self.start_mean_span > 1.0:
            raise UserError(f"bad SpanCurriculum {self}: need steps >= 0 and "
                            "start_mean_span > 1 (the mean span length at step 0).")


def expected_span_length(poisson_mean: float) -> float:
    """E[max(1, Poisson(mean))] = mean + P(0) = mean + exp(-mean)."""
    return poisson_mean + math.exp(-poisson_mean)


def poisson_mean_for(span_length: float) -> float:
    """The Poisson mean whose max(1, Poisson) has this expected length (> 1), by bisection
    (expected_span_length is increasing on (0, inf))."""
    lo, hi = 0.0, float(span_length)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_span_length(mid) < span_length else (lo, mid)
    return (lo + hi) / 2


def paper_spans(n_tok: int, rng: np.random.Generator, config: SsrMaskConfig,
                lengths: SsrLengths) -> List[Tuple[int, int]]:
    """[(start, end)] (end exclusive, sorted) of the paper's mask of a segment of n_tok tokens:
    the numpy twin of ssr_preprocessors.paper_span_ids (same procedure and budgets, numpy's
    random numbers): each span's length drawn once, its start redrawn up to max_tries times,
    no overlap, no touching, the last token never masked; a failed span ends the mask."""
    n_want = int(np.clip(round(config.span_rate * n_tok) + rng.integers(-1, 2), 1,
                         lengths.max_spans))
    span_len = np.maximum(1, rng.poisson(config.mean_span_length, n_want))
    starts = rng.integers(0, max(n_tok, 1), (n_want, config.max_tries))
    taken = np.zeros(n_tok + 2, bool)  # taken[i + 1]: token i is masked
    spans: List[Tuple[int, int]] = []
    masked = 0
    for ln, tries in zip(span_len.tolist(), starts.tolist()):
        n = len(spans) + 1  # spans once this one is added
        if (masked + ln + n + 1 > lengths.targets_length
                or n_tok - masked - ln + 2 * n + 1 > lengths.inputs_length):
            break
        for s in tries:
            e = s + ln
            if e <= n_tok - 1 and not taken[s:e + 2].any():  # tokens s-1 .. e are free
                taken[s + 1:e + 1] = True
                spans.append((s, e))
                masked += ln
                break
        else:
            break
    return sorted(spans)


def original_tokens(example: Example, vocab_size: int, num_extra_ids: int,
                    eos_id: int) -> np.ndarray:
    """An SSR-masked example's segment: its teacher input with sentinel k replaced by span k
    of its target (`orig_0 <x_1> ... <x_n>` EOS)."""
    target = [t for t in np.asarray(example["targets"]).tolist() if t not in (0, eos_id)]
    spans = split_targets(target, vocab_size, num_extra_ids)
    lo, hi = vocab_lib.sentinel_range(vocab_size, num_extra_ids)
    out: List[int] = []
    for t in np.asarray(example["inputs"]).tolist():
        if lo <= t < hi:
            out.extend(spans[vocab_lib.sentinel_index(vocab_size, t)])
        elif t not in (0, eos_id):
            out.append(t)
    return np.asarray(out, np.int32)


def masked_example(tokens: np.ndarray, spans: Sequence[Tuple[int, int]], vocab_size: int,
                   eos_id: int) -> Dict[str, np.ndarray]:
    """The SSR-masked example (as the task's mask writes it, with EOS) of tokens and spans."""
    teacher, target, prev = [], [], 0
    for k, (s, e) in enumerate(spans):
        teacher += tokens[prev:s].tolist() + [vocab_lib.sentinel(vocab_size, k)]
        target += tokens[s:e].tolist() + [vocab_lib.sentinel(vocab_size, k + 1)]
        prev = e
    teacher += tokens[prev:].tolist()
    return {"inputs": np.asarray(teacher + [eos_id], np.int32),
            "targets": np.asarray(target + [eos_id], np.int32),
            "num_spans": np.asarray(len(spans), np.int32),
            "masked_length": np.asarray(sum(e - s for s, e in spans), np.int32)}


class CurriculumMask:
    """Masks a step's SSR examples again with the step's shorter spans (module docstring).

    mask: the task's SsrMaskConfig (paper scheme); slot_lengths: the masked examples' slot
    (inputs, targets); seed: mixed into every example's random numbers."""

    def __init__(self, curriculum: SpanCurriculum, mask: SsrMaskConfig,
                 slot_lengths: Tuple[int, int], vocab_size: int, num_extra_ids: int,
                 eos_id: int, seed: int = 0):
        if mask.scheme != "paper":
            raise UserError(f"SpanCurriculum needs the paper mask (SsrMaskConfig.scheme="
                            f"'paper'); the task masks with {mask.scheme!r}.")
        self.end_mean_span = expected_span_length(mask.mean_span_length)
        if curriculum.start_mean_span >= self.end_mean_span:
            raise UserError(f"SpanCurriculum.start_mean_span={curriculum.start_mean_span} must "
                            f"be below the task mask's mean span length "
                            f"{self.end_mean_span:.2f}.")
        self.curriculum, self.mask, self.slot_lengths = curriculum, mask, tuple(slot_lengths)
        self.vocab_size, self.num_extra_ids, self.eos_id = vocab_size, num_extra_ids, eos_id
        self.salt = int(seed).to_bytes(8, "little", signed=True)
        self._cache: Dict[int, Tuple[SsrMaskConfig, SsrLengths]] = {}

    def mean_span(self, step: int) -> Optional[float]:
        """The expected span length at a step (None: the task's own mask)."""
        c = self.curriculum
        if step >= c.steps:
            return None
        return c.start_mean_span + step / c.steps * (self.end_mean_span - c.start_mean_span)

    def step_mask(self, step: int) -> Optional[Tuple[SsrMaskConfig, SsrLengths]]:
        """The step's mask and its lengths (None after the curriculum): shorter spans, the
        span rate scaled to keep the expected masked fraction."""
        mean = self.mean_span(step)
        if mean is None:
            return None
        if step not in self._cache:
            config = dataclasses.replace(
                    self.mask, mean_span_length=poisson_mean_for(mean),
                    span_rate=self.mask.span_rate * self.end_mean_span / mean)
            self._cache = {step: (config, ssr_lengths(*self.slot_lengths, config,
                                                      self.num_extra_ids))}
        return self._cache[step]

    def rng(self, tokens: np.ndarray) -> np.random.Generator:
        """Random numbers from the segment's tokens and the seed (64-bit BLAKE2b)."""
        digest = hashlib.blake2b(np.asarray(tokens, "<i4").tobytes(), digest_size=8,
                                 key=self.salt).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))

    def apply(self, examples: Sequence[Example], step: int) -> List[Example]:
        """The examples masked for `step` (unchanged after the curriculum)."""
        got = self.step_mask(step)
        if got is None:
            return list(examples)
        config, lengths = got
        out = []
        for ex in examples:
            tokens = original_tokens(ex, self.vocab_size, self.num_extra_ids, self.eos_id)
            tokens = tokens[:lengths.raw_length]
            spans = paper_spans(len(tokens), self.rng(tokens), config, lengths)
            out.append(masked_example(tokens, spans, self.vocab_size, self.eos_id)
                       if spans else ex)  # a 1-token segment keeps its own mask
        return out
