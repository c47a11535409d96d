"""Bootstrap statistics of a task's metrics over its test examples, per pre-training arm.

`score_task` takes each arm's predictions for every fine-tuning seed and gives, per metric:
  - the point value: the metric on all examples for each seed, then the mean over seeds;
    the per-seed values and their sample standard deviation (ddof=1; None for one seed);
  - a 95% percentile bootstrap interval over examples: each resample draws n example
    indices with replacement, the same indices for every seed and every arm; a resample's
    statistic is the mean over seeds of the metric on the resampled examples;
  - for every arm but the baseline, the paired difference arm - baseline: its point value,
    the 95% percentile interval of the resampled differences (same indices for both arms)
    and a two-sided p-value 2 * min(P(d <= 0), P(d >= 0)), capped at 1, with each share
    counted as (k + 1) / (B + 1) over the B resamples (so that no p-value is 0 with finitely
    many resamples: the smallest is 2 / (B + 1)); |d| <= 1e-9 counts as d = 0 (float
    rounding). Identical arms give d = 0 on every resample and p = 1.
`verdict` turns a difference into 'better', 'worse' or 'within noise'.

Recomputing a metric B times must be fast, so the metric fns of `ssr_jax.data.metrics`
(bare or as functools.partial with keywords) are resampled from per-example sufficient
statistics, equal to the fn on any set of examples (tests/test_compare_scores.py):
  - rouge, exact_match: means over examples of the fn on each example alone;
  - bleu: sacrebleu's per-sentence statistics (lengths, matches, totals), summed over the
    resample and scored by sacrebleu with the fn's settings;
  - gleu: `gleu.sentence_stats` per example, summed over the resample and scored as
    `gleu.corpus_score`. With several references gleu averages rounds that each pick one
    reference per sentence; here each example keeps, in round j, the reference gleu picked
    for it in round j on the full set, and a resample's GLEU is the mean over those rounds.
    On the full set this is gleu exactly; on a resample it differs from calling gleu on
    the resampled list (which redraws the picks by position) only in which references the
    rounds pick, not in how they are drawn.
  - gleu_copy_source does not depend on the predictions: it is a floor, computed once on all
    examples and reported under 'floors'.
Any other fn is called on the first `generic_resamples` (200) resamples only (the same
indices), since each call recomputes the metric from the text; its keys say so in
'metrics'[key]['method'] == 'generic'. Keys ending in `_std` or holding `_ci95_` (gleu's
spread over its reference rounds) are not scores: they are listed in 'skipped_keys'.

Output of `score_task` (plain Python numbers, JSON-ready):
  {'num_examples': n, 'num_resamples': B, 'seed': seed, 'baseline': arm,
   'metrics': {key: {'method': 'rouge'|'exact_match'|'bleu'|'gleu'|'generic',
                     'resamples': B or generic_resamples}},
   'floors': {key: value}, 'skipped_keys': [key, ...],
   'arms': {arm: {key: {'mean': x, 'ci95': [lo, hi], 'seeds': [x_0, ...], 'seed_std': s,
                        'diff': {'mean': d, 'ci95': [lo, hi], 'p_value': p}}}},  # no 'diff'
                                                                                  # for baseline
   'extra': {name: {key: {'mean': x, 'ci95': [lo, hi]}}}}   # extra_predictions rows
"""
import functools
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ssr_jax.data import gleu as gleu_lib
from ssr_jax.data import metrics as metrics_lib
from ssr_jax.errors import UserError

NUM_RESAMPLES = 1000
GENERIC_RESAMPLES = 200
_LEVELS = (2.5, 97.5)  # percentiles of the 95% interval
_TIE = 1e-9


def verdict(diff_ci_low: float, diff_ci_high: float, p_value: float,
            higher_is_better: bool = True, alpha: float = 0.05) -> str:
    """'better' / 'worse' when the difference's interval excludes 0 and p < alpha (both, so
    that the two readings agree), else 'within noise'."""
    if p_value < alpha and diff_ci_low > 0:
        return "better" if higher_is_better else "worse"
    if p_value < alpha and diff_ci_high < 0:
        return "worse" if higher_is_better else "better"
    return "within noise"


def resample_indices(num_examples: int, num_resamples: int = NUM_RESAMPLES,
                     seed: int = 0) -> np.ndarray:
    """(num_resamples, num_examples) example indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, num_examples,
                                                size=(num_resamples, num_examples))


def _counts(indices: np.ndarray, num_examples: int) -> np.ndarray:
    """How often each example occurs in each resample: (B, n) float64."""
    b = indices.shape[0]
    flat = (indices + num_examples * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * num_examples).reshape(b, num_examples).astype(
            np.float64)


def _unwrap(fn: Callable) -> Tuple[Callable, Dict[str, Any], bool]:
    """(the underlying function, the partial's keywords, whether it also binds positional
    arguments) of a possibly nested functools.partial."""
    keywords: Dict[str, Any] = {}
    positional = False
    while isinstance(fn, functools.partial):
        keywords = {**fn.keywords, **keywords}
        positional = positional or bool(fn.args)
        fn = fn.func
    return fn, keywords, positional


def _scalar(value: Any) -> float:
    return float(getattr(value, "value", value))  # seqio's metrics.Scalar has .value


def _is_score(key: str) -> bool:
    return not (key.endswith("_std") or "_ci95_" in key)


class _MeanScorer:
    """A metric that is a mean over examples of the fn on each example alone."""

    def __init__(self, fn: Callable, targets: Sequence, method: str):
        self.fn, self.targets, self.method = fn, targets, method

    def stats(self, predictions: Sequence[str]) -> Dict[str, np.ndarray]:
        rows = [self.fn([t], [p]) for t, p in zip(self.targets, predictions)]
        return {k: np.array([_scalar(r[k]) for r in rows]) for k in rows[0]}

    def values(self, stats, counts: np.ndarray, indices: np.ndarray) -> Dict[str, np.ndarray]:
        del indices
        return {k: counts @ v / counts.shape[1] for k, v in stats.items()}


class _GleuScorer:
    """metrics.gleu from per-example sentence statistics (see the module docstring)."""
    method = "gleu"

    def __init__(self, targets: Sequence, sources: Sequence[str], iterations: int, seed: int):
        self.sources = [str(s) for s in sources]
        self.refs = [metrics_lib.references(t) for t in targets]
        # gleu.gleu_scores' picks: round j draws one reference per sentence in order.
        rounds = iterations if any(len(r) > 1 for r in self.refs) else 1
        picks = []
        for j in range(rounds):
            rng = random.Random(seed + 101 * j)
            picks.append([rng.randint(0, len(r) - 1) for r in self.refs])
        self.picks = np.array(picks, dtype=np.int64)  # (rounds, n)
        self._used = np.zeros((len(self.refs), max(len(r) for r in self.refs)), bool)
        self._used[np.arange(len(self.refs))[None, :], self.picks] = True

    def stats(self, predictions: Sequence[str]) -> np.ndarray:
        """(n, rounds * width): example i's sentence stats against its round-j reference."""
        n, width = len(self.refs), 2 + 2 * gleu_lib.ORDER
        per_ref = np.zeros((n, max(len(r) for r in self.refs), width))
        for i, k in zip(*np.nonzero(self._used)):
            per_ref[i, k] = gleu_lib.sentence_stats(self.sources[i], str(predictions[i]),
                                                    self.refs[i][k])
        by_round = per_ref[np.arange(n)[None, :], self.picks]  # (rounds, n, width)
        return by_round.transpose(1, 0, 2).reshape(n, -1)

    def values(self, stats: np.ndarray, counts: np.ndarray,
               indices: np.ndarray) -> Dict[str, np.ndarray]:
        del indices
        width = 2 + 2 * gleu_lib.ORDER
        sums = (counts @ stats).reshape(counts.shape[0], -1, width)  # (B, rounds, width)
        return {"gleu": 100 * _gleu_corpus_scores(sums).mean(axis=1)}


def _gleu_corpus_scores(sums: np.ndarray) -> np.ndarray:
    """gleu.corpus_score over the last axis of summed stats, vectorised."""
    c, r = sums[..., 0], sums[..., 1]
    num, den = sums[..., 2::2], sums[..., 3::2]
    ok = np.all(sums != 0, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_prec = np.log(num / den).sum(axis=-1) / num.shape[-1]
        score = np.exp(np.minimum(0.0, 1.0 - r / c) + log_prec)
    return np.where(ok, score, 0.0)


class _BleuScorer:
    """metrics.bleu from sacrebleu's per-sentence sufficient statistics."""
    method = "bleu"

    def __init__(self, targets: Sequence):
        try:
            import sacrebleu  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise UserError("BLEU needs `sacrebleu`: pip install sacrebleu") from e
        # The settings of metrics.bleu (T5's); tests check the two agree.
        self.metric = sacrebleu.metrics.BLEU(lowercase=False, force=True, tokenize="intl",
                                             smooth_method="exp", smooth_value=0.0,
                                             effective_order=False)
        refs = [metrics_lib.references(t) for t in targets]
        self.streams = [[r[i] if i < len(r) else None for r in refs]
                        for i in range(max((len(r) for r in refs), default=1))]

    def stats(self, predictions: Sequence[str]) -> np.ndarray:
        # Sentence-level statistics are what sacrebleu's own significance tests resample.
        stats = self.metric._extract_corpus_statistics(  # pylint: disable=protected-access
                [str(p) for p in predictions], self.streams)
        return np.array(stats, dtype=np.float64)

    def values(self, stats: np.ndarray, counts: np.ndarray,
               indices: np.ndarray) -> Dict[str, np.ndarray]:
        del indices
        sums = np.rint(counts @ stats).astype(np.int64)  # integer counts, exact in float64
        score = self.metric._compute_score_from_stats  # pylint: disable=protected-access
        return {"bleu": np.array([score(list(map(int, row))).score for row in sums])}


class _GenericScorer:
    """Any metric fn: called on each resampled list of examples (few resamples)."""
    method = "generic"

    def __init__(self, fn: Callable, targets: Sequence, max_resamples: int):
        self.fn, self.targets, self.max_resamples = fn, list(targets), max_resamples

    def stats(self, predictions: Sequence[str]) -> List[str]:
        return list(predictions)

    def values(self, stats: List[str], counts: np.ndarray,
               indices: np.ndarray) -> Dict[str, np.ndarray]:
        del counts
        rows = []
        for row in indices[:self.max_resamples]:
            out = self.fn([self.targets[i] for i in row], [stats[i] for i in row])
            rows.append({k: _scalar(v) for k, v in out.items() if _is_score(k)})
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}


def _scorer(fn: Callable, targets: Sequence, generic_resamples: int):
    """The fastest scorer for `fn`, or None for the floor gleu_copy_source."""
    base, keywords, positional = _unwrap(fn)
    if not positional:
        if base is metrics_lib.gleu_copy_source:
            return None
        if base is metrics_lib.rouge:
            return _MeanScorer(fn, targets, "rouge")
        if base is metrics_lib.exact_match:
            return _MeanScorer(fn, targets, "exact_match")
        if base is metrics_lib.bleu:
            return _BleuScorer(targets)
        if base is metrics_lib.gleu:
            sources = keywords.get("sources")
            if sources is None and all(isinstance(t, Mapping) and "source" in t
                                       for t in targets):
                sources = [t["source"] for t in targets]
            if sources is not None and len(sources) == len(targets):
                return _GleuScorer(targets, sources,
                                   keywords.get("iterations", gleu_lib.ITERATIONS),
                                   keywords.get("seed", 0))
            # No sources: the generic path calls gleu, which says what is missing.
    return _GenericScorer(fn, targets, generic_resamples)


def resampled_metric(metric_fn: Callable, targets: Sequence, predictions: Sequence[str],
                     indices: np.ndarray,
                     generic_resamples: int = GENERIC_RESAMPLES) -> Dict[str, np.ndarray]:
    """{key: value per row of `indices`}: the metric on the examples each row lists, by the
    fast path where `metric_fn` has one (a row of arange(n) is the metric on all examples)."""
    scorer = _scorer(metric_fn, list(targets), generic_resamples)
    if scorer is None:
        raise UserError(f"{getattr(metric_fn, '__name__', metric_fn)} does not depend on "
                        "the predictions: it is a floor, not resampled.")
    indices = np.asarray(indices, dtype=np.int64)
    return scorer.values(scorer.stats(list(predictions)), _counts(indices, len(targets)),
                         indices)


def _interval(values: np.ndarray) -> List[float]:
    return [float(x) for x in np.percentile(values, _LEVELS)]


def _p_value(diffs: np.ndarray) -> float:
    # Equal scores computed from different per-example sums can differ in the last bits;
    # metrics are 0..100, so a difference within 1e-9 is a tie.
    diffs = np.where(np.abs(diffs) <= _TIE, 0.0, diffs)
    b = len(diffs)
    low = (np.count_nonzero(diffs <= 0) + 1) / (b + 1)
    high = (np.count_nonzero(diffs >= 0) + 1) / (b + 1)
    return float(min(1.0, 2 * min(low, high)))


def _check_inputs(targets: Sequence, predictions_by_arm: Mapping, baseline: str,
                  extra_predictions: Optional[Mapping], num_resamples: int):
    if not targets:
        raise UserError("score_task: the task has no test examples to score.")
    if num_resamples < 2:
        raise UserError(f"score_task: num_resamples={num_resamples}; use at least 2 "
                        f"(e.g. {NUM_RESAMPLES}).")
    if baseline not in predictions_by_arm:
        raise UserError(f"score_task: baseline arm {baseline!r} has no predictions (arms: "
                        f"{sorted(predictions_by_arm)}).")
    for arm, seeds in predictions_by_arm.items():
        if not seeds:
            raise UserError(f"score_task: arm {arm!r} has no fine-tuning seeds.")
        for s, preds in enumerate(seeds):
            if len(preds) != len(targets):
                raise UserError(f"score_task: arm {arm!r} seed {s} has {len(preds)} "
                                f"predictions for {len(targets)} targets.")
    for name, preds in (extra_predictions or {}).items():
        if len(preds) != len(targets):
            raise UserError(f"score_task: extra row {name!r} has {len(preds)} predictions "
                            f"for {len(targets)} targets.")


def score_task(metric_fns: Sequence[Callable], targets: Sequence,
               predictions_by_arm: Mapping[str, Sequence[Sequence[str]]], baseline: str,
               num_resamples: int = NUM_RESAMPLES, seed: int = 0,
               extra_predictions: Optional[Mapping[str, Sequence[str]]] = None,
               generic_resamples: int = GENERIC_RESAMPLES) -> Dict[str, Any]:
    """Point values, bootstrap intervals and paired tests of every arm (module docstring).

    targets: post-processed targets as the metric fns take them; predictions_by_arm[arm][s]:
    fine-tuning seed s's predictions, in the targets' order; extra_predictions: rows with
    one prediction list each (e.g. 'copy the input'), scored the same way without seeds."""
    targets = list(targets)
    _check_inputs(targets, predictions_by_arm, baseline, extra_predictions, num_resamples)
    n = len(targets)
    indices = resample_indices(n, num_resamples, seed)
    counts = _counts(indices, n)
    full_indices, full_counts = np.arange(n)[None, :], np.ones((1, n))

    scorers, floors = [], {}
    for fn in metric_fns:
        scorer = _scorer(fn, targets, min(generic_resamples, num_resamples))
        if scorer is None:
            floors.update({k: _scalar(v) for k, v in fn(targets, None).items()})
        else:
            scorers.append(scorer)

    owners: Dict[str, Any] = {}  # key -> the scorer that reports it
    skipped: set = set()

    def run(predictions: Sequence[str]) -> Tuple[Dict[str, float], Dict[str, np.ndarray]]:
        """(full-set value, resampled values) per key of one prediction list."""
        point, boot = {}, {}
        for scorer in scorers:
            stats = scorer.stats(list(predictions))
            if isinstance(scorer, _GenericScorer):
                out = scorer.fn(targets, list(predictions))
                skipped.update(k for k in out if not _is_score(k))
                full = {k: _scalar(v) for k, v in out.items() if _is_score(k)}
            else:
                full = {k: float(v[0]) for k, v in
                        scorer.values(stats, full_counts, full_indices).items()}
            for key in full:
                if owners.setdefault(key, scorer) is not scorer:
                    raise UserError(f"score_task: two metric fns both report {key!r}; give "
                                    "each key once.")
            point.update(full)
            boot.update(scorer.values(stats, counts, indices))
        return point, boot

    arms: Dict[str, Dict[str, Any]] = {}
    boots: Dict[str, Dict[str, np.ndarray]] = {}
    for arm, seeds in predictions_by_arm.items():
        per_seed = [run(preds) for preds in seeds]
        arms[arm], boots[arm] = {}, {}
        for key in per_seed[0][0]:
            values = [p[key] for p, _ in per_seed]
            boots[arm][key] = np.mean([b[key] for _, b in per_seed], axis=0)
            arms[arm][key] = {
                    "mean": float(np.mean(values)), "ci95": _interval(boots[arm][key]),
                    "seeds": values,
                    "seed_std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    for arm in arms:
        if arm == baseline:
            continue
        for key, entry in arms[arm].items():
            diffs = boots[arm][key] - boots[baseline][key]
            entry["diff"] = {"mean": entry["mean"] - arms[baseline][key]["mean"],
                             "ci95": _interval(diffs), "p_value": _p_value(diffs)}
    extra = {}
    for name, preds in (extra_predictions or {}).items():
        point, boot = run(preds)
        extra[name] = {k: {"mean": point[k], "ci95": _interval(boot[k])} for k in point}
    return {"num_examples": n, "num_resamples": num_resamples, "seed": seed,
            "baseline": baseline,
            "metrics": {k: {"method": o.method,
                            "resamples": (o.max_resamples if isinstance(o, _GenericScorer)
                                          else num_resamples)}
                        for k, o in owners.items()},
            "floors": floors, "skipped_keys": sorted(skipped), "arms": arms, "extra": extra}
