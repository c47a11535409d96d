"""Downstream metrics: every reference counts (BLEU, ROUGE, exact match), and GLEU against
values computed by hand from its definition (JFLEG's scorer)."""
import math
import random

import pytest

from ssr_jax.data import gleu as gleu_lib
from ssr_jax.data import metrics
from ssr_jax.errors import UserError

# Two references for the first example, one for the second: the prediction matches the
# second reference of the first example, not its first.
TARGETS = [["the dog barked at the mailman this morning",
            "a cat sat on the warm mat by the door"],
           ["she reads a long book every night"]]
PREDICTIONS = ["a cat sat on the warm mat near the door", "she reads a book every night"]


def test_bleu_uses_every_reference():
    sacrebleu = pytest.importorskip("sacrebleu")
    expected = sacrebleu.corpus_bleu(
        PREDICTIONS, [[TARGETS[0][0], TARGETS[1][0]], [TARGETS[0][1], None]],
        smooth_method="exp", smooth_value=0.0, force=False, lowercase=False, tokenize="intl",
        use_effective_order=False).score
    first_only = sacrebleu.corpus_bleu(
        PREDICTIONS, [[t[0] for t in TARGETS]], smooth_method="exp", smooth_value=0.0,
        tokenize="intl").score
    assert metrics.bleu(TARGETS, PREDICTIONS)["bleu"] == pytest.approx(expected)
    assert expected > first_only + 10
    # A single string is one reference, as before; a GLEU mapping gives its references.
    single = [t[0] for t in TARGETS]
    assert metrics.bleu(single, PREDICTIONS)["bleu"] == pytest.approx(first_only)
    mapped = [{"source": "x", "references": t} for t in TARGETS]
    assert metrics.bleu(mapped, PREDICTIONS)["bleu"] == pytest.approx(expected)


def test_rouge_takes_the_best_reference():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
    got = metrics.rouge(TARGETS, PREDICTIONS)
    for key in ("rouge1", "rouge2", "rougeLsum"):
        per_example = [scorer.score_multi(t, p)[key].fmeasure
                       for t, p in zip(TARGETS, PREDICTIONS)]
        assert got[key] == pytest.approx(100 * sum(per_example) / 2)
    assert got["rouge1"] > metrics.rouge([t[0] for t in TARGETS], PREDICTIONS)["rouge1"] + 20


def test_exact_match_against_any_reference():
    assert metrics.exact_match([["a", "b"], "c"], ["b", "d"]) == {"exact_match": 50.0}


# Hand-computed GLEU. Sentence 1 copies its source, whose last word the reference changed:
#   n=1: h&r = a b c d e (5), minus h&(s \ r) = f (1) -> 4 of 6
#   n=2: 4 - 1 (ef) = 3 of 5;  n=3: 3 - 1 (def) = 2 of 4;  n=4: 2 - 1 (cdef) = 1 of 3
# Sentence 2's hypothesis is its reference (the source lacks its last word; nothing to
# penalise): 6/6, 5/5, 4/4, 3/3. Corpus: (10/12, 8/10, 6/8, 4/6), C = R = 12, so
# GLEU = (10/12 * 8/10 * 6/8 * 4/6) ** (1/4) = (1/3) ** (1/4).
SOURCES = ["a b c d e f", "p q r s t"]
REFS = ["a b c d e g", "p q r s t u"]
HYPS = ["a b c d e f", "p q r s t u"]


def test_gleu_by_hand():
    got = metrics.gleu(REFS, HYPS, sources=SOURCES)
    assert got["gleu"] == pytest.approx(100 * (1 / 3) ** 0.25)
    assert got["gleu_std"] == 0.0 and got["gleu_ci95_low"] == got["gleu_ci95_high"]
    # Sentence 1 alone: (4/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    assert metrics.gleu(REFS[:1], HYPS[:1], sources=SOURCES[:1])["gleu"] == \
        pytest.approx(100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # Repeated words are clipped to the reference's count: h = a a b c d, r = s = a b c d:
    # 4/5, 3/4, 2/3, 1/2; C = 5 > R = 4, no brevity penalty.
    assert metrics.gleu(["a b c d"], ["a a b c d"], sources=["a b c d"])["gleu"] == \
        pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # Brevity: h = x y z w matches all its n-grams, R = 6 > C = 4: exp(1 - 6/4).
    assert metrics.gleu(["x y z w v v"], ["x y z w"], sources=["x x y z w"])["gleu"] == \
        pytest.approx(100 * math.exp(-0.5))
    # Any zero count gives 0: a 3-word hypothesis has no 4-gram.
    assert metrics.gleu(["a b c"], ["a b c"], sources=["a b c"])["gleu"] == 0.0


def test_gleu_copy_source_is_the_floor():
    # Copying the sources: sentence 1 as above; sentence 2 is its source (5 words, all in
    # the reference): 5/5, 4/4, 3/3, 2/2. num (9, 7, 5, 3), den (11, 9, 7, 5), C = 11,
    # R = 12: exp(1 - 12/11) * (9/11 * 7/9 * 5/7 * 3/5) ** (1/4) = exp(-1/11) (3/11) ** (1/4).
    floor = metrics.gleu_copy_source(REFS, None, sources=SOURCES)["gleu_copy_source"]
    assert floor == pytest.approx(100 * math.exp(-1 / 11) * (3 / 11) ** 0.25)
    targets = [{"source": s, "references": r} for s, r in zip(SOURCES, REFS)]
    assert metrics.gleu_copy_source(targets, None) == {"gleu_copy_source": floor}
    assert metrics.gleu(targets, SOURCES)["gleu"] == pytest.approx(floor)


def test_gleu_samples_one_reference_per_sentence_per_round_seeded():
    # One sentence, two references: the hypothesis is reference 0 (GLEU 1) or, against
    # reference 1, sentence 1 above ((4/6 * 3/5 * 2/4 * 1/3) ** (1/4)). Round j picks
    # reference random.Random(101 j).randint(0, 1), as JFLEG's scorer (random.seed(j*101)).
    targets = [{"source": "a b c d e f", "references": ["a b c d e f", "a b c d e g"]}]
    low = (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    picks = [random.Random(101 * j).randint(0, 1) for j in range(500)]
    p = picks.count(0) / 500
    assert 0.3 < p < 0.7
    got = metrics.gleu(targets, ["a b c d e f"])
    assert got["gleu"] == pytest.approx(100 * (p + (1 - p) * low))
    std = 100 * (1 - low) * math.sqrt(p * (1 - p))
    assert got["gleu_std"] == pytest.approx(std)
    assert got["gleu_ci95_low"] == pytest.approx(got["gleu"] - 1.959964 * std)
    assert got["gleu_ci95_high"] == pytest.approx(got["gleu"] + 1.959964 * std)
    # Deterministic: the same seed gives the same rounds; another seed other rounds.
    scores = gleu_lib.gleu_scores(["a b c d e f"], ["a b c d e f"],
                                  [["a b c d e f", "a b c d e g"]])
    assert scores == gleu_lib.gleu_scores(["a b c d e f"], ["a b c d e f"],
                                          [["a b c d e f", "a b c d e g"]])
    assert scores == pytest.approx([1.0 if k == 0 else low for k in picks])
    assert gleu_lib.gleu_scores(["a b c d e f"], ["a b c d e f"],
                                [["a b c d e f", "a b c d e g"]], seed=7) != scores
    assert metrics.gleu(targets, ["a b c d e f"], seed=7)["gleu"] != got["gleu"]


def test_gleu_needs_the_source():
    with pytest.raises(UserError, match="source"):
        metrics.gleu(REFS, HYPS)
    post = metrics.source_and_references(prefix="gec: ", separator=" ||| ")
    example = {"inputs_pretokenized": b"gec: she go home", "targets_pretokenized": b"x"}
    assert post("she goes home ||| she went home", example=example, is_target=True) == {
        "source": "she go home", "references": ["she goes home", "she went home"]}
    assert post("she goes home", example=example, is_target=False) == "she goes home"


def test_gleu_two_sentences_with_two_references_each_by_hand():
    # Sentence A copies its source; reference 0 is the source, reference 1 changed its last
    # word. Stats [C, R, num_1, den_1, ..., num_4, den_4] (as in test_gleu_by_hand):
    #   A vs ref 0: 6, 6, 6/6, 5/5, 4/4, 3/3     A vs ref 1: 6, 6, 4/6, 3/5, 2/4, 1/3
    # Sentence B adds a word to its source; reference 0 is the hypothesis, reference 1 ends
    # in another word (the source has nothing reference 1 lacks, so nothing is penalised):
    #   B vs ref 0: 6, 6, 6/6, 5/5, 4/4, 3/3     B vs ref 1: 6, 6, 5/6, 4/5, 3/4, 2/3
    # Corpus (C = R = 12, no brevity penalty), product of the four precisions ** (1/4):
    #   (0, 0): 1;  (1, 0): (10*8*6*4)/(12*10*8*6) = 1/3;  (0, 1): (11*9*7*5)/5760;
    #   (1, 1): (9*7*5*3)/5760.
    by_picks = {(0, 0): 1.0, (1, 0): (1 / 3) ** 0.25, (0, 1): (3465 / 5760) ** 0.25,
                (1, 1): (945 / 5760) ** 0.25}
    sources = ["a b c d e f", "p q r s t"]
    hyps = ["a b c d e f", "p q r s t u"]
    refs = [["a b c d e f", "a b c d e g"], ["p q r s t u", "p q r s t v"]]
    for picks, want in by_picks.items():  # each combination alone: one reference each
        one = [[r[k]] for r, k in zip(refs, picks)]
        assert metrics.gleu(one, hyps, sources=sources)["gleu"] == pytest.approx(100 * want)
    # Round j draws one reference per sentence, in order, from random.Random(101 j).
    rounds = []
    for j in range(500):
        rng = random.Random(101 * j)
        rounds.append(by_picks[tuple(rng.randint(0, 1) for _ in refs)])
    assert len(set(rounds)) == 4  # every combination occurs
    mean = sum(rounds) / 500
    std = math.sqrt(sum((x - mean) ** 2 for x in rounds) / 500)
    targets = [{"source": s, "references": r} for s, r in zip(sources, refs)]
    got = metrics.gleu(targets, hyps)
    assert got["gleu"] == pytest.approx(100 * mean)
    assert got["gleu_std"] == pytest.approx(100 * std)
    assert got["gleu_ci95_low"] == pytest.approx(100 * (mean - 1.959964 * std))
    # Copying the sources: B's copy lacks a word: floor below the hypotheses' GLEU.
    assert metrics.gleu_copy_source(targets, None)["gleu_copy_source"] < got["gleu"]
