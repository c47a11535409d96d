"""The seeded error generator of the GEC-style task: each error is what it claims, every
kind occurs, and the output depends only on (sentence, seed, version). Pure python."""
import collections
import json
import math
import os
import random
import subprocess
import sys

import pytest

from ssr_jax.data import sentences
from ssr_jax.data import synthetic_errors as se

SENTENCES = [
    "Return the number of items in the queue.",
    "This method is called when a request cannot be fulfilled by the server.",
    "If the name is unbound, an exception is raised and the frame is closed.",
    "Create a new socket object for the given address family and protocol.",
    "The handlers are called in the order in which they were registered.",
    "Digits shifted into the coefficient are zeros.",
    "Helper class to quickly write a loop over all standard input files.",
    "Returns True if the record should be logged, or False otherwise.",
    "An iterator that returns the lines of a file, one at a time.",
    "Draw a circle with given radius.",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def single_errors(kind, draws=30):
    """(clean tokens, corrupted tokens, Edit) of one `kind` error on each test sentence,
    `draws` seeded draws each."""
    out = []
    for s in SENTENCES:
        for d in range(draws):
            res = se.apply_error(s.split(), kind, random.Random(d))
            if res is not None:
                out.append((s.split(), res[0], res[2]))
    assert out, kind
    return out


def differing_positions(a, b):
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y]


def test_drop_word_removes_one_function_word():
    for clean, bad, edit in single_errors("drop_word"):
        assert len(bad) == len(clean) - 1 and edit.after == ""
        assert bad[:edit.index] + [edit.before] + bad[edit.index:] == clean
        assert 0 < edit.index < len(clean) - 1  # never the first or the last word
        assert edit.before.lower() in {"the", "a", "an", "of", "to", "is", "are", "be", "that",
                                       "it", "and", "in", "for", "with", "by", "on", "as",
                                       "or", "was", "which"}


def test_repeat_word_writes_it_twice_in_a_row():
    for clean, bad, edit in single_errors("repeat_word"):
        assert bad[edit.index] == bad[edit.index + 1] == edit.before
        assert bad[:edit.index] + bad[edit.index + 1:] == clean


def test_swap_words_exchanges_two_neighbours():
    for clean, bad, edit in single_errors("swap_words"):
        i = edit.index
        assert differing_positions(clean, bad) == [i, i + 1]
        assert (bad[i], bad[i + 1]) == (clean[i + 1], clean[i])
        assert edit.before == f"{clean[i]} {clean[i + 1]}"


def _is_wrong_inflection(word, wrong):
    """Independent of the generator: a swap of a listed pair or of a listed suffix."""
    pairs = {("is", "are"), ("was", "were"), ("has", "have"), ("does", "do"),
             ("this", "these")}
    w, x = word.lower(), wrong.lower()
    if (w, x) in pairs or (x, w) in pairs:
        return True
    stem_swaps = [("ing", "ed"), ("ing", "s"), ("ed", "ing"), ("ed", "s"), ("ies", "y"),
                  ("s", ""), ("", "s")]
    return any(w.endswith(a) and x == w[:len(w) - len(a)] + b for a, b in stem_swaps)


def test_inflection_changes_one_word_form():
    seen = set()
    for clean, bad, edit in single_errors("inflection"):
        assert differing_positions(clean, bad) == [edit.index] and len(bad) == len(clean)
        before, after = (t.strip(".,;:()\"'") for t in (edit.before, edit.after))
        assert _is_wrong_inflection(before, after), (before, after)
        assert before[0].isupper() == after[0].isupper()  # case kept
        seen.add((before.lower(), after.lower()))
    # Both directions of agreement and of the suffixes occur on these sentences.
    assert ("is", "are") in seen and ("are", "is") in seen
    assert any(b.endswith("ed") for b, _ in seen) and any(b.endswith("s") for b, _ in seen)


@pytest.mark.parametrize("kind,words", [("article", {"a", "an", "the"}),
                                        ("preposition", {"in", "on", "at", "of", "for", "to",
                                                         "from", "with", "by", "into",
                                                         "about", "over"})])
def test_article_and_preposition_swaps(kind, words):
    for clean, bad, edit in single_errors(kind):
        assert differing_positions(clean, bad) == [edit.index]
        before, after = edit.before.lower().strip(".,"), edit.after.lower().strip(".,")
        assert before in words and after in words and before != after


def test_typos_swap_drop_or_double_a_letter():
    ops = collections.Counter()
    for clean, bad, edit in single_errors("typo", draws=40):
        assert differing_positions(clean, bad) == [edit.index]
        a, b = edit.before, edit.after
        assert a[0] == b[0]  # the first letter is kept
        ops[edit.detail] += 1
        if edit.detail == "swap":
            diff = differing_positions(a, b)
            assert len(a) == len(b) and len(diff) == 2 and diff[1] == diff[0] + 1
            assert (b[diff[0]], b[diff[1]]) == (a[diff[1]], a[diff[0]])
        elif edit.detail == "drop":
            assert len(b) == len(a) - 1
            assert any(a[:j] + a[j + 1:] == b for j in range(1, len(a)))
        else:
            assert edit.detail == "duplicate" and len(b) == len(a) + 1
            assert any(a[:j] + a[j] + a[j:] == b for j in range(1, len(a)))
    assert set(ops) == set(se.TYPO_OPS)


def test_casing_lowers_the_first_letter_or_capitalises_a_word():
    details = set()
    for clean, bad, edit in single_errors("casing"):
        assert differing_positions(clean, bad) == [edit.index]
        a, b = edit.before, edit.after
        assert a.lower() == b.lower() and a != b
        if edit.detail == "lower_first":
            assert edit.index == 0 and a[0].isupper() and b[0].islower()
        else:
            assert edit.index > 0 and a.islower() and b == a[0].upper() + a[1:]
        details.add(edit.detail)
    assert details == {"lower_first", "capitalize"}


def test_corrupt_gives_errors_in_proportion_to_length_of_every_kind():
    kinds, per_sentence = collections.Counter(), {}
    for s in SENTENCES:
        counts = []
        for version in range(60):
            c = se.corrupt(s, seed=0, version=version)
            assert c.target == s and c.source != s
            assert 1 <= len(c.edits) <= len(s.split())
            counts.append(len(c.edits))
            kinds.update(e.kind for e in c.edits)
        per_sentence[s] = sum(counts) / len(counts)
    assert set(kinds) == set(se.KINDS)
    longest = max(SENTENCES, key=lambda s: len(s.split()))
    shortest = min(SENTENCES, key=lambda s: len(s.split()))
    assert per_sentence[longest] > per_sentence[shortest] >= 1
    # error_count is Binomial(words, rate) floored at one: its mean against the exact one.
    rng, rate = random.Random(0), se.ERROR_RATE
    for words in (5, 12, 40):
        draws = [se.error_count(words, rng) for _ in range(4000)]
        exact = sum(max(1, k) * math.comb(words, k) * rate ** k * (1 - rate) ** (words - k)
                    for k in range(words + 1))
        assert abs(sum(draws) / len(draws) - exact) < 0.1, (words, exact)
        assert min(draws) == 1
    assert sum(se.error_count(40, rng, rate=0.5) for _ in range(200)) / 200 > 15
    # A single error of a given kind: the corruption is that edit (positions line up).
    c = se.corrupt(SENTENCES[0], kinds=("repeat_word",), num_errors=1)
    (edit,) = c.edits
    tokens = c.source.split()
    assert tokens[edit.index] == tokens[edit.index + 1] == edit.before


def test_deterministic_and_independent_of_the_hash_seed():
    first = [se.corrupt(s, seed=3, version=v) for s in SENTENCES for v in range(3)]
    assert first == [se.corrupt(s, seed=3, version=v) for s in SENTENCES for v in range(3)]
    assert [c.source for c in first] != [se.corrupt(s, seed=4, version=v).source
                                         for s in SENTENCES for v in range(3)]
    code = ("import json, sys; from ssr_jax.data import synthetic_errors as se; "
            "print(json.dumps([se.corrupt(s, seed=3, version=v).source "
            "for s in json.loads(sys.argv[1]) for v in range(3)]))")
    outs = [subprocess.run([sys.executable, "-c", code, json.dumps(SENTENCES)], cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": h}, check=True,
                           capture_output=True, text=True).stdout for h in ("1", "2")]
    assert json.loads(outs[0]) == json.loads(outs[1]) == [c.source for c in first]


def test_corrupted_pairs_versions_are_distinct_corruptions():
    pairs = se.corrupted_pairs(SENTENCES, versions=4, seed=0)
    by_target = collections.defaultdict(list)
    for p in pairs:
        assert p["inputs"] != p["targets"]
        by_target[p["targets"]].append(p["inputs"])
    assert set(by_target) == set(SENTENCES)
    for target, inputs in by_target.items():
        assert 1 <= len(inputs) <= 4 and len(set(inputs)) == len(inputs)
        assert inputs[0] == se.corrupt(target, 0, 0).source
    assert len(pairs) > 3 * len(SENTENCES)
    assert se.corrupted_pairs(SENTENCES, versions=1) == [
        {"inputs": se.corrupt(s).source, "targets": s} for s in SENTENCES]


def test_sentence_splitting_and_prose_filter():
    text = ("Return the value, e.g. a string. It is cached by Mr. Smith and J. Doe! "
            "Is it? (Yes.) lower case here.\nSecond paragraph.")
    assert sentences.split(text) == [
        "Return the value, e.g. a string.", "It is cached by Mr. Smith and J. Doe!",
        "Is it?", "(Yes.) lower case here.", "Second paragraph."]
    assert sentences.is_prose("Return the number of items in the queue.")
    assert not sentences.is_prose("Return the number of items.", min_words=6)  # 5 words
    assert not sentences.is_prose("Call os.path.join() to build the path name.")
    assert not sentences.is_prose("return the number of items in the queue.")
    assert not sentences.is_prose("Return the number of items in the queue")
    assert sentences.is_prose("Consumers that can rely on Python 3.11 should use it.")


def test_trivial_predictions_strip_the_prefix():
    got = sentences.trivial_predictions(["fix: a b c. D e f.", b"fix: x y", "no prefix."],
                                        prefix="fix: ")
    assert got == {"copy_input": ["a b c. D e f.", "x y", "no prefix."],
                   "first_sentence": ["a b c.", "x y", "no prefix."]}
    assert sentences.trivial_predictions([""]) == {"copy_input": [""], "first_sentence": [""]}
