"""GLEU, the grammatical-error-correction metric of JFLEG (Napoles et al. 2015, 2016).

A faithful port of the reference scorer (github.com/keisks/jfleg, `gleu.py` and
`compute_gleu`): corpus level, whitespace tokens, n = 1..4. Per sentence with source s,
hypothesis h and reference r:
    num_n = max(0, |ngrams(h) & ngrams(r)| - |ngrams(h) & (ngrams(s) minus every n-gram
            type present in r)|)         (multiset intersections)
    den_n = max(0, len(h) + 1 - n)
summed over the corpus; GLEU = exp(min(0, 1 - R/C)) * exp(mean_n log(num_n / den_n)), C and R
the summed hypothesis and reference lengths, 0 when any count is 0. Unlike BLEU it
penalises n-grams copied from the source that the reference changed, but an unchanged copy
of the source still scores well above 0: `copy_source_floor` gives that floor.

With several references, each of `iterations` (500) rounds picks one reference per sentence
uniformly at random (round j seeded with seed + 101 * j, as the reference does with seed 0,
so seed=0 reproduces its numbers) and the result is the mean, the (population) standard
deviation and a normal 95% interval over the rounds; with one reference per sentence there
is one round. Scores here are x 100, like BLEU and ROUGE in `metrics`.
"""
import collections
import math
import random
from typing import Dict, List, Sequence, Tuple

ORDER = 4
ITERATIONS = 500
_Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975)


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) + 1 - n))


def sentence_stats(source: str, hypothesis: str, reference: str,
                   order: int = ORDER) -> List[int]:
    """[len(h), len(r), num_1, den_1, ..., num_order, den_order] for one sentence."""
    s, h, r = source.split(), hypothesis.split(), reference.split()
    stats = [len(h), len(r)]
    for n in range(1, order + 1):
        h_grams, r_grams = _ngrams(h, n), _ngrams(r, n)
        s_not_r = collections.Counter({g: c for g, c in _ngrams(s, n).items()
                                       if g not in r_grams})
        matched = sum((h_grams & r_grams).values()) - sum((h_grams & s_not_r).values())
        stats += [max(matched, 0), max(len(h) + 1 - n, 0)]
    return stats


def corpus_score(stats: Sequence[int]) -> float:
    """GLEU (0..1) of summed sentence stats."""
    if any(x == 0 for x in stats):
        return 0.0
    c, r = stats[:2]
    order = (len(stats) - 2) // 2
    log_prec = sum(math.log(x / y) for x, y in zip(stats[2::2], stats[3::2])) / order
    return math.exp(min(0.0, 1.0 - r / c) + log_prec)


def gleu_scores(sources: Sequence[str], hypotheses: Sequence[str],
                references: Sequence[Sequence[str]], iterations: int = ITERATIONS,
                seed: int = 0, order: int = ORDER) -> List[float]:
    """Corpus GLEU (0..1) of each round of reference sampling (one round when every
    sentence has a single reference)."""
    if not len(sources) == len(hypotheses) == len(references):
        raise ValueError(f"{len(sources)} sources, {len(hypotheses)} hypotheses and "
                         f"{len(references)} reference sets: one each per sentence")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every sentence needs at least one reference")
    rounds = iterations if any(len(refs) > 1 for refs in references) else 1
    picks = []
    for j in range(rounds):
        rng = random.Random(seed + 101 * j)
        picks.append([rng.randint(0, len(refs) - 1) for refs in references])
    totals = [[0] * (2 + 2 * order) for _ in range(rounds)]
    for i, (s, h, refs) in enumerate(zip(sources, hypotheses, references)):
        cache: Dict[int, List[int]] = {}
        for j in range(rounds):
            k = picks[j][i]
            if k not in cache:
                cache[k] = sentence_stats(s, h, refs[k], order)
            totals[j] = [a + b for a, b in zip(totals[j], cache[k])]
    return [corpus_score(t) for t in totals]


def summary(scores: Sequence[float]) -> Tuple[float, float, Tuple[float, float]]:
    """(mean, population std, normal 95% interval) of the rounds' scores."""
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((x - mean) ** 2 for x in scores) / len(scores))
    return mean, std, (mean - _Z95 * std, mean + _Z95 * std)
