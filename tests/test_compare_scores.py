"""Bootstrap statistics of `ssr-jax compare` (ssr_jax/compare/scores.py): fast paths equal
the metric fns, intervals and paired tests against direct recomputation with the fns."""
import functools
import random

import numpy as np
import pytest

from ssr_jax.compare import scores
from ssr_jax.data import gleu as gleu_lib
from ssr_jax.data import metrics
from ssr_jax.errors import UserError

WORDS = ("the a cat dog sat ran on under mat house big small red blue quickly slowly "
         "bird tree saw near").split()


def _sentence(rng, lo=6, hi=14):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _noisy(rng, text, rate=0.3):
    words = text.split()
    for i in range(len(words)):
        if rng.random() < rate:
            words[i] = rng.choice(WORDS)
    if rng.random() < 0.3:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def _data(n=40, seed=0):
    """Sources, 1-3 references each (mixed counts), and a prediction list near them."""
    rng = random.Random(seed)
    clean = [_sentence(rng) + ". " + _sentence(rng, 3, 6) + "." for _ in range(n)]
    sources = [_noisy(rng, c) for c in clean]
    refs = [[c] + [_noisy(rng, c, 0.1) for _ in range(rng.randint(0, 2))] for c in clean]
    preds = [c if rng.random() < 0.3 else _noisy(rng, c, 0.15) for c in clean]
    return sources, refs, preds


SOURCES, REFS, PREDS = _data()
N = len(SOURCES)
MAPPED = [{"source": s, "references": r} for s, r in zip(SOURCES, REFS)]
SINGLE = [{"source": s, "references": r[:1]} for s, r in zip(SOURCES, REFS)]


def _rows(indices):
    return [np.asarray(r) for r in indices]


@pytest.mark.parametrize("fn,targets", [
        (metrics.rouge, REFS),
        (functools.partial(metrics.rouge, score_keys=("rouge1", "rougeL")), REFS),
        (metrics.exact_match, REFS),
        (metrics.bleu, REFS),
        (metrics.gleu, SINGLE),
        (functools.partial(metrics.gleu, sources=SOURCES), [r[0] for r in REFS]),
])
def test_fast_paths_equal_the_metric_fns_on_all_examples_and_resamples(fn, targets):
    indices = np.concatenate([np.arange(N)[None, :], scores.resample_indices(N, 3, seed=5)])
    got = scores.resampled_metric(fn, targets, PREDS, indices)
    for b, row in enumerate(_rows(indices)):
        if "sources" in getattr(fn, "keywords", {}):  # the resample's own sources
            fn = functools.partial(metrics.gleu, sources=[SOURCES[i] for i in row])
        want = fn([targets[i] for i in row], [PREDS[i] for i in row])
        want = {k: v for k, v in want.items() if not k.endswith("_std") and "_ci95_" not in k}
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key][b] == pytest.approx(value, abs=1e-9), (key, b)
    assert 0 < got[next(iter(got))][0] < 100  # not a degenerate case


def test_gleu_with_several_references_keeps_the_full_set_picks():
    fn = functools.partial(metrics.gleu, iterations=40, seed=3)
    full = scores.resampled_metric(fn, MAPPED, PREDS, np.arange(N)[None, :])
    assert full["gleu"][0] == pytest.approx(fn(MAPPED, PREDS)["gleu"], abs=1e-9)
    assert scores.resampled_metric(metrics.gleu, MAPPED, PREDS, np.arange(N)[None, :])[
        "gleu"][0] == pytest.approx(metrics.gleu(MAPPED, PREDS)["gleu"], abs=1e-9)
    # On a resample: round j scores example i against the reference gleu drew for it in
    # round j on the full set, by gleu's own procedure; the result is the mean over rounds.
    picks = []
    for j in range(40):
        rng = random.Random(3 + 101 * j)
        picks.append([rng.randint(0, len(r) - 1) for r in REFS])
    indices = scores.resample_indices(N, 2, seed=9)
    got = scores.resampled_metric(fn, MAPPED, PREDS, indices)["gleu"]
    for b, row in enumerate(indices):
        rounds = []
        for j in range(40):
            total = [0] * 10
            for i in row:
                stats = gleu_lib.sentence_stats(SOURCES[i], PREDS[i], REFS[i][picks[j][i]])
                total = [a + s for a, s in zip(total, stats)]
            rounds.append(gleu_lib.corpus_score(total))
        assert got[b] == pytest.approx(100 * sum(rounds) / len(rounds), abs=1e-9)


def _arm(seed, rate):
    rng = random.Random(seed)
    return [r[0] if rng.random() < 0.4 else _noisy(rng, r[0], rate) for r in REFS]


def test_point_values_seed_spread_and_intervals_against_direct_recomputation():
    arms = {"sc": [_arm(s, 0.3) for s in range(3)], "ssr": [_arm(10 + s, 0.2) for s in range(3)]}
    out = scores.score_task([metrics.exact_match, metrics.rouge], REFS, arms, "sc",
                            num_resamples=300, seed=1)
    assert out["num_examples"] == N and out["baseline"] == "sc"
    assert out["metrics"]["exact_match"] == {"method": "exact_match", "resamples": 300}
    assert out["metrics"]["rougeLsum"]["method"] == "rouge"
    for arm, seeds in arms.items():
        for key in ("exact_match", "rouge1", "rougeLsum"):
            row = out["arms"][arm][key]
            fn = metrics.exact_match if key == "exact_match" else metrics.rouge
            per_seed = [fn(REFS, p)[key] for p in seeds]
            assert row["seeds"] == pytest.approx(per_seed, abs=1e-9)
            assert row["mean"] == pytest.approx(np.mean(per_seed), abs=1e-9)
            assert row["seed_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-9)
            assert row["ci95"][0] <= row["mean"] <= row["ci95"][1]
            assert row["ci95"][0] < row["ci95"][1]
    # The exact-match interval and paired test, recomputed resample by resample with the fn.
    indices = scores.resample_indices(N, 300, seed=1)

    def stat(arm):
        return np.array([np.mean([metrics.exact_match([REFS[i] for i in row],
                                                      [p[i] for i in row])["exact_match"]
                                  for p in arms[arm]]) for row in indices])
    sc, ssr = stat("sc"), stat("ssr")
    assert out["arms"]["sc"]["exact_match"]["ci95"] == pytest.approx(
            np.percentile(sc, [2.5, 97.5]), abs=1e-9)
    d = ssr - sc
    diff = out["arms"]["ssr"]["exact_match"]["diff"]
    assert diff["ci95"] == pytest.approx(np.percentile(d, [2.5, 97.5]), abs=1e-9)
    d = np.where(np.isclose(d, 0, atol=1e-9), 0, d)  # float rounding is no difference
    p = min(1.0, 2 * min((np.sum(d <= 0) + 1) / 301, (np.sum(d >= 0) + 1) / 301))
    assert diff["p_value"] == pytest.approx(p)
    assert diff["mean"] == pytest.approx(out["arms"]["ssr"]["exact_match"]["mean"]
                                         - out["arms"]["sc"]["exact_match"]["mean"])
    assert "diff" not in out["arms"]["sc"]["exact_match"]


def test_identical_arms_are_within_noise_with_p_one():
    same = [_arm(s, 0.3) for s in range(3)]
    out = scores.score_task([metrics.rouge, metrics.bleu], REFS, {"sc": same, "ssr": same},
                            "sc", num_resamples=200)
    for key in ("rouge1", "rougeLsum", "bleu"):
        diff = out["arms"]["ssr"][key]["diff"]
        assert diff["p_value"] == 1.0 and diff["mean"] == 0.0 and diff["ci95"] == [0.0, 0.0]
        assert scores.verdict(*diff["ci95"], diff["p_value"]) == "within noise"


def test_an_arm_better_on_every_example_is_better():
    good = [[r[0] for r in REFS]] * 2  # every prediction is a reference
    bad = [[_noisy(random.Random(i), r[0], 0.6) + " extra words" for i, r in enumerate(REFS)]] * 2
    out = scores.score_task([metrics.exact_match, metrics.rouge], REFS,
                            {"sc": bad, "ssr": good}, "sc", num_resamples=500)
    for key in ("exact_match", "rouge1"):
        diff = out["arms"]["ssr"][key]["diff"]
        assert diff["p_value"] == pytest.approx(2 / 501) and diff["ci95"][0] > 0
        assert scores.verdict(*diff["ci95"], diff["p_value"]) == "better"
        assert scores.verdict(*diff["ci95"], diff["p_value"], higher_is_better=False) == "worse"
    assert out["arms"]["ssr"]["exact_match"]["seed_std"] == 0.0


def test_verdict():
    assert scores.verdict(0.1, 2.0, 0.01) == "better"
    assert scores.verdict(-2.0, -0.1, 0.01) == "worse"
    assert scores.verdict(-2.0, -0.1, 0.01, higher_is_better=False) == "better"
    assert scores.verdict(-0.5, 2.0, 0.3) == "within noise"
    assert scores.verdict(0.1, 2.0, 0.06) == "within noise"  # p and interval must agree
    assert scores.verdict(0.1, 2.0, 0.02, alpha=0.01) == "within noise"


def test_gleu_floor_skipped_keys_and_trivial_baseline_rows():
    arms = {"sc": [_arm(s, 0.3) for s in range(2)], "ssr": [_arm(7, 0.3)]}
    out = scores.score_task([metrics.gleu, metrics.exact_match, metrics.gleu_copy_source],
                            SINGLE, arms, "sc", num_resamples=200,
                            extra_predictions={"copy the input": SOURCES})
    floor = metrics.gleu_copy_source(SINGLE, None)["gleu_copy_source"]
    assert out["floors"] == {"gleu_copy_source": pytest.approx(floor)}
    assert out["skipped_keys"] == []  # fast GLEU reports only 'gleu'
    assert set(out["arms"]["sc"]) == {"gleu", "exact_match"}
    assert out["arms"]["ssr"]["gleu"]["seed_std"] is None  # one seed
    copy_row = out["extra"]["copy the input"]
    assert copy_row["gleu"]["mean"] == pytest.approx(floor, abs=1e-9)
    assert copy_row["gleu"]["ci95"][0] <= floor <= copy_row["gleu"]["ci95"][1]
    assert "seeds" not in copy_row["gleu"]
    for seeds, arm in ((arms["sc"], "sc"), (arms["ssr"], "ssr")):
        want = np.mean([metrics.gleu(SINGLE, p)["gleu"] for p in seeds])
        assert out["arms"][arm]["gleu"]["mean"] == pytest.approx(want, abs=1e-9)


def test_generic_metric_fns_use_fewer_resamples_and_skip_spread_keys():
    def words(targets, predictions):
        del targets
        n = np.mean([len(p.split()) for p in predictions])
        return {"words": n, "words_std": 0.0, "words_ci95_low": n}

    arms = {"sc": [_arm(0, 0.3)], "ssr": [_arm(1, 0.3)]}
    out = scores.score_task([words], REFS, arms, "sc", num_resamples=300,
                            generic_resamples=50)
    assert out["metrics"] == {"words": {"method": "generic", "resamples": 50}}
    assert out["skipped_keys"] == ["words_ci95_low", "words_std"]
    indices = scores.resample_indices(N, 300, seed=0)[:50]
    stat = np.array([np.mean([len(arms["sc"][0][i].split()) for i in row]) for row in indices])
    assert out["arms"]["sc"]["words"]["mean"] == pytest.approx(words(REFS, arms["sc"][0])["words"])
    assert out["arms"]["sc"]["words"]["ci95"] == pytest.approx(np.percentile(stat, [2.5, 97.5]))
    # gleu without sources anywhere takes the generic path, which says what is missing.
    with pytest.raises(UserError, match="source"):
        scores.score_task([metrics.gleu], REFS, arms, "sc", num_resamples=10)


def test_bad_inputs_name_the_problem():
    arms = {"sc": [PREDS]}
    with pytest.raises(UserError, match="baseline arm 'span'"):
        scores.score_task([metrics.rouge], REFS, arms, "span")
    with pytest.raises(UserError, match="seed 0 has 39 predictions for 40"):
        scores.score_task([metrics.rouge], REFS, {"sc": [PREDS[:-1]]}, "sc")
    with pytest.raises(UserError, match="no fine-tuning seeds"):
        scores.score_task([metrics.rouge], REFS, {"sc": [PREDS], "ssr": []}, "sc")
    with pytest.raises(UserError, match="'rouge1'"):
        scores.score_task([metrics.rouge, metrics.rouge], REFS, arms, "sc", num_resamples=10)
    with pytest.raises(UserError, match="floor"):
        scores.resampled_metric(metrics.gleu_copy_source, SINGLE, PREDS, np.zeros((1, N), int))
