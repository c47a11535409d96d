"""Span-length curriculum for SSR (the paper's v2: easier examples, i.e. shorter spans, first).

During the first `steps` training steps an SSR example is used only when its mean span length
(masked tokens / spans) is at most a limit that grows linearly from `start_max_mean_span` to
`end_max_mean_span`; afterwards every example is used. Rejected examples are consumed and
never revisited, so the data position stays "examples read" and the teacher batch keeps its
fixed size (every host still runs the teacher once per step: lockstep is unaffected, only
how many examples a host reads to fill its share varies). The limit depends only on the step,
so online and offline generation select the same examples.
"""
import dataclasses
from typing import List, Mapping, Optional, Tuple

import numpy as np

from ssr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SpanCurriculum:
    """steps = 0 turns the curriculum off."""

    steps: int = 0
    start_max_mean_span: float = 1.5
    end_max_mean_span: float = 5.0
    max_reads: int = 1000  # examples read per example kept before giving up (clear error)

    def __post_init__(self):
        if self.steps < 0 or self.start_max_mean_span < 1 or \
                self.end_max_mean_span < self.start_max_mean_span:
            raise UserError(f"bad SpanCurriculum {self}: need steps >= 0 and "
                            "1 <= start_max_mean_span <= end_max_mean_span.")

    def max_mean_span(self, step: int) -> Optional[float]:
        """The limit at a step (None: no limit)."""
        if step >= self.steps:
            return None
        frac = step / max(self.steps - 1, 1)
        return self.start_max_mean_span + frac * (self.end_max_mean_span -
                                                  self.start_max_mean_span)


def mean_span_length(example: Mapping[str, np.ndarray]) -> float:
    """Masked tokens per span of an SSR-masked example (the mask's own counts)."""
    spans = int(example["num_spans"])
    return int(example["masked_length"]) / spans if spans else 0.0


def take(pipeline, count: int, step: int, curriculum: Optional[SpanCurriculum]
         ) -> Tuple[List[Mapping[str, np.ndarray]], int]:
    """`count` examples for `step` from an InputPipeline (fewer at its end) and how many were
    read to find them."""
    limit = curriculum.max_mean_span(step) if curriculum else None
    if limit is None:
        got = pipeline.next_examples(count)
        return got, len(got)
    kept: List[Mapping[str, np.ndarray]] = []
    read = 0
    while len(kept) < count:
        got = pipeline.next_examples(1)  # one at a time: nothing is read ahead of need
        if not got:
            break
        read += 1
        if mean_span_length(got[0]) <= limit:
            kept.append(got[0])
        elif read > curriculum.max_reads * count:
            raise UserError(f"SpanCurriculum at step {step}: fewer than 1 in "
                            f"{curriculum.max_reads} examples has mean span length <= "
                            f"{limit:.2f}; raise start_max_mean_span.")
    return kept, read
