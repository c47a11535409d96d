"""SSR statistics of a run: the stage's per-window and whole-run metrics, and the one line
that describes them (online training, generate-spans and the default run's summary)."""
import time
from typing import Dict, Mapping, Optional

from ssr_jax.data.ssr_rewrite import RewriteStats

# The run's SSR statistics at the end of training, beside its checkpoints.
SUMMARY_FILE = "ssr_summary.json"


class StageMetrics:
    """Rewrite counts and timings over some steps (this host's examples)."""

    def __init__(self):
        self.stats = RewriteStats()
        self.steps = 0
        self.waited = 0.0  # seconds the loop blocked on the teacher
        self.host_seconds = 0.0  # rewrite + pack
        self.first_result: Optional[float] = None
        self.last_result: Optional[float] = None
        self.teacher_seconds: Optional[float] = None  # the last probe

    def add(self, stats: Optional[RewriteStats], waited: float, host_seconds: float):
        now = time.perf_counter()
        if stats is not None:
            self.stats = self.stats.merge(stats)
        self.steps += 1
        self.waited += waited
        self.host_seconds += host_seconds
        self.first_result = self.first_result if self.first_result is not None else now
        self.last_result = now

    def scalars(self, ssr_examples: int, sc_examples: int, rewrites: bool) -> Dict[str, float]:
        """Logged scalars; `rewrites`: the stage rewrote examples itself (online)."""
        if not self.steps:
            return {}
        out: Dict[str, float] = {"ssr/steps": float(self.steps)}
        if rewrites:
            out.update({k: float(v) for k, v in self.stats.summary().items()})
            mean_orig = out["ssr/mean_original_length"]
            out["ssr/fill_to_original_length"] = (out["ssr/mean_fill_length"] / mean_orig
                                                  if mean_orig else 0.0)
        out["ssr/examples_per_step"] = float(ssr_examples)
        out["ssr/span_corruption_examples_per_step"] = float(sc_examples)
        out["ssr/host_seconds_per_step"] = self.host_seconds / self.steps
        if self.first_result is not None and self.last_result is not None and self.steps > 1:
            step_seconds = (self.last_result - self.first_result) / (self.steps - 1)
            out["ssr/step_seconds"] = step_seconds
            out["ssr/teacher_wait_share"] = min(1.0, self.waited / self.steps / step_seconds)
            if self.teacher_seconds is not None:
                out["ssr/teacher_seconds"] = self.teacher_seconds
                out["ssr/teacher_time_share"] = min(1.0, self.teacher_seconds / step_seconds)
        return out


def describe(summary: Mapping[str, float]) -> str:
    """One line of SSR statistics from `RewriteStats.summary()`-style scalars: every span
    is one of the four kinds, so their shares add up to 100%; then the examples whose every
    span has a non-empty fill, and those dropped by malformed='drop_example'."""
    if not summary.get("ssr/spans"):
        return "no spans rewritten"
    if "ssr/nonempty_fill_rate" not in summary:
        return "statistics written by an older ssr-jax (no split of empty fills)"
    line = (f"{int(summary['ssr/spans']):,} spans: {summary['ssr/nonempty_fill_rate']:.1%} "
            f"filled, {summary['ssr/empty_fill_rate']:.1%} empty fills, "
            f"{summary['ssr/fallback_rate']:.1%} fallbacks (no well-formed fill), "
            f"{summary['ssr/truncated_rate']:.1%} fills dropped for length; non-empty fills: "
            f"{summary['ssr/exact_copy_rate']:.1%} exact copies, mean "
            f"{summary['ssr/mean_fill_length']:.2f} tokens vs "
            f"{summary['ssr/mean_original_length']:.2f} original")
    if summary.get("ssr/examples"):  # written since examples were counted
        line += (f"; {int(summary['ssr/examples']):,} examples, "
                 f"{summary['ssr/complete_example_rate']:.1%} with every span filled")
        if summary.get("ssr/dropped_examples"):
            line += (f", {int(summary['ssr/dropped_examples']):,} dropped (malformed; span "
                     "corruption in their slots)")
    if "ssr/teacher_time_share" in summary:
        line += f", teacher {summary['ssr/teacher_time_share']:.0%} of the step time"
    return line
