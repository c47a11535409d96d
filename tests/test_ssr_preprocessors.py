"""SSR mask (statistics, the paper's retries, layout), rewrite (layout, fallbacks, the malformed
policies, losslessness), lengths, and the span-length curriculum's mask."""
import dataclasses
import math
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ssr_jax.data import ssr_preprocessors as sp  # noqa: E402
from ssr_jax.data import ssr_rewrite as sr  # noqa: E402

VS = 4100  # vocabulary size with 100 extra ids
EOS = 1


def X(k):
    """<extra_id_k>"""
    return VS - 1 - k


@pytest.fixture(scope="module")
def vocab():
    import tasks
    return tasks.default_vocabulary()


@pytest.fixture(scope="module")
def masked_batch():
    """1000 paper-scheme masks of a 92-token segment (the 128/32 raw length)."""
    config = sp.SsrMaskConfig()
    lengths = sp.ssr_lengths(128, 32, config)
    n = lengths.raw_length

    def one(i):
        seed = tf.stack([tf.cast(i, tf.int32), 17])
        ids = sp.paper_span_ids(n, seed, config, lengths)
        out = sp.apply_span_ids(tf.range(10, 10 + n), ids, VS)
        return ids, out

    ds = tf.data.Dataset.range(1000).map(one, num_parallel_calls=2)
    return lengths, list(ds.as_numpy_iterator())


def runs(span_ids):
    """[(span id, start, length)] of the spans in a span-id row."""
    out = []
    for i, s in enumerate(span_ids.tolist()):
        if s and (not out or out[-1][0] != s or out[-1][1] + out[-1][2] != i):
            out.append([s, i, 1])
        elif s:
            out[-1][2] += 1
    return out


def test_lengths_plan():
    lengths = sp.ssr_lengths(128, 32)
    assert lengths.raw_length == 92 and lengths.max_spans == 99
    assert sp.ssr_lengths(512, 114).raw_length == 370
    # t5 scheme: the largest N whose student input with a full fill budget (2 per masked
    # token) fits: N - M + 2M + 2n + 1 <= 128, with M, n from T5's counts.
    from ssr_jax.data.span_corruption import noise_counts

    def student(n_raw):
        m, n = noise_counts(n_raw)
        return n_raw - m + 2 * m + 2 * n + 1

    t5 = sp.ssr_lengths(128, 32, sp.SsrMaskConfig(scheme="t5"))
    assert student(t5.raw_length) <= 128 < student(t5.raw_length + 1)
    assert sum(noise_counts(t5.raw_length)) + 1 <= 32


def test_mask_statistics(masked_batch):
    lengths, examples = masked_batch
    n = lengths.raw_length
    span_counts, span_lengths = [], []
    for ids, out in examples:
        spans = runs(ids)
        # Spans are numbered 1.. left to right, never overlap nor touch.
        assert [s[0] for s in spans] == list(range(1, len(spans) + 1))
        for a, b in zip(spans, spans[1:]):
            assert a[1] + a[2] < b[1], "spans touch or overlap"
        span_counts.append(len(spans))
        span_lengths += [s[2] for s in spans]
        assert out["num_spans"] == len(spans)
        assert out["masked_length"] == sum(s[2] for s in spans)
        # Budgets: the student target and the empty-fill student input fit.
        assert out["masked_length"] + len(spans) + 1 <= lengths.targets_length
        assert n - out["masked_length"] + 2 * len(spans) + 1 <= lengths.inputs_length
        assert 1 <= len(spans) <= round(0.075 * n) + 1
    start_rate = np.mean(span_counts) / n
    assert 0.065 < start_rate < 0.08, start_rate
    # Lengths follow max(1, Poisson(3)) (slightly shortened by the budgets).
    pmf = {k: math.exp(-3) * 3 ** k / math.factorial(k) for k in range(30)}
    ref = {1: pmf[0] + pmf[1], **{k: pmf[k] for k in range(2, 30)}}
    hist = np.bincount(span_lengths, minlength=30)[:30] / len(span_lengths)
    tv = 0.5 * sum(abs(hist[k] - ref.get(k, 0.0)) for k in range(1, 30))
    assert tv < 0.08, (tv, hist[:10])
    assert 2.6 < np.mean(span_lengths) < 3.2
    masked = np.mean([out["masked_length"] for _, out in examples]) / n
    assert 0.17 < masked < 0.26  # the paper: about 20-25% of tokens


def test_mask_layout(masked_batch):
    _, examples = masked_batch
    for ids, out in examples[:50]:
        tokens = np.arange(10, 10 + ids.shape[0])
        teacher, target = out["inputs"].tolist(), out["targets"].tolist()
        spans = runs(ids)
        expected_teacher, expected_target, prev = [], [], 0
        for k, (_, start, length) in enumerate(spans):
            expected_teacher += tokens[prev:start].tolist() + [X(k)]
            expected_target += tokens[start:start + length].tolist() + [X(k + 1)]
            prev = start + length
        expected_teacher += tokens[prev:].tolist()
        assert teacher == expected_teacher
        assert target == expected_target


def paper_data_gen_mask(n, rate, mean, tries, rng, keep_length=True):
    """The paper's data_gen.py mask, transcribed (python sets, its verify and its loop);
    keep_length=False redraws the length with every start (this repository's old mask).
    Returns the span lengths, or None if a span touched, overlapped or took the last token."""
    def verify(start, length, masked):
        if start - 1 in masked:
            return False
        return all(start + i not in masked and start + i < n for i in range(length + 1))

    masked, spans = set(), []
    for _ in range(max(1, rng.randint(round(n * rate) - 1, round(n * rate) + 1))):
        length = max(1, rng_poisson(rng, mean))
        for trial in range(tries):
            if trial and not keep_length:
                length = max(1, rng_poisson(rng, mean))
            start = rng.randrange(n)
            if verify(start, length, masked):
                break
        else:
            break
        masked.update(range(start, start + length))
        spans.append(length)
    return spans


def rng_poisson(rng, mean):
    """Knuth's Poisson draw from a random.Random (so the simulation needs no numpy seed)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def test_mask_retries_follow_the_paper():
    """On a crowded segment (40 tokens, 20% span rate) where retries matter, the mask's span
    count, masked count and span length agree with the paper's procedure (length kept over
    10 starts), and not with redrawing the length at every try."""
    import random
    n, config = 40, sp.SsrMaskConfig(span_rate=0.2)
    assert config.max_tries == 10
    lengths = sp.SsrLengths(n, 1000, 1000, 99)  # budgets that never bind here

    def one(i):
        return sp.paper_span_ids(n, tf.stack([tf.cast(i, tf.int32), 5]), config, lengths)

    ids = list(tf.data.Dataset.range(3000).map(one, num_parallel_calls=2).as_numpy_iterator())
    ours = []
    for row in ids:
        spans = runs(row)
        for a, b in zip(spans, spans[1:]):
            assert a[1] + a[2] < b[1], "spans touch or overlap"
        assert row[-1] == 0  # the last token is never masked
        ours.append([s[2] for s in spans])
    rng = random.Random(0)
    kept = [paper_data_gen_mask(n, 0.2, 3.0, 10, rng) for _ in range(3000)]
    redrawn = [paper_data_gen_mask(n, 0.2, 3.0, 10, rng, keep_length=False)
               for _ in range(3000)]

    def stats(masks):
        return (np.mean([len(m) for m in masks]), np.mean([sum(m) for m in masks]),
                np.mean([x for m in masks for x in m]))

    got, want, other = stats(ours), stats(kept), stats(redrawn)
    tolerance = (0.14, 0.6, 0.08)  # ~4 standard errors of 3000 masks
    assert all(abs(g - w) < t for g, w, t in zip(got, want, tolerance)), (got, want)
    assert abs(got[0] - other[0]) > 3 * tolerance[0], (got, other)  # the test can tell
    assert abs(got[2] - other[2]) > 3 * tolerance[2], (got, other)
    # The distribution of the span count, too (total variation).
    hist = lambda masks: np.bincount([len(m) for m in masks], minlength=12)[:12] / 3000  # noqa
    assert 0.5 * np.abs(hist(ours) - hist(kept)).sum() < 0.05


def test_mask_is_seeded():
    config, lengths = sp.SsrMaskConfig(), sp.ssr_lengths(128, 32)
    a = sp.paper_span_ids(92, tf.constant([3, 4]), config, lengths).numpy()
    b = sp.paper_span_ids(92, tf.constant([3, 4]), config, lengths).numpy()
    c = sp.paper_span_ids(92, tf.constant([3, 5]), config, lengths).numpy()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_t5_scheme_counts():
    config = sp.SsrMaskConfig(scheme="t5")
    lengths = sp.ssr_lengths(128, 32, config)
    out = sp.mask_segment(tf.range(10, 110), [tf.constant([1, 2]), tf.constant([3, 4])], VS,
                          config, lengths)
    assert int(out["masked_length"]) == 15 and int(out["num_spans"]) == 5
    assert len(out["targets"].numpy()) == 15 + 5


def design_example(vocab):
    enc = vocab.encode
    parts = {w: enc(w) for w in ("The", " quick brown", " fox jumps over the", " lazy", " dog",
                                 " big red", " sleepy")}
    return parts


def test_rewrite_design_example(vocab):
    p = design_example(vocab)
    vs = vocab.vocab_size
    x = lambda k: vs - 1 - k  # noqa: E731
    teacher_in = p["The"] + [x(0)] + p[" fox jumps over the"] + [x(1)] + p[" dog"] + [EOS]
    teacher_out = [x(0)] + p[" big red"] + [x(1)] + p[" sleepy"] + [x(2)]
    target = p[" quick brown"] + [x(1)] + p[" lazy"] + [x(2)] + [EOS]
    rows, stats = sr.rewrite_batch(np.array([teacher_in]), np.array([teacher_out]), vs,
                                   targets=np.array([target]))
    assert vocab.decode(rows[0].tolist()) == ("The <extra_id_0> big red <extra_id_1> fox jumps "
                                              "over the <extra_id_1> sleepy <extra_id_2> dog")
    assert rows[0][-1] == EOS
    assert (stats.spans, stats.nonempty_fills, stats.empty_fills, stats.fallbacks,
            stats.exact_copies) == (2, 2, 0, 0, 0)
    assert stats.original_spans == 2
    assert stats.original_tokens == len(p[" quick brown"]) + len(p[" lazy"])
    spaced = re.sub(r"\s*(<extra_id_\d+>)\s*", r" \1 ", vocab.decode(target[:-1])).split()
    assert spaced == "quick brown <extra_id_1> lazy <extra_id_2>".split()


# teacher input: a <x0> b <x1> c <x2> d EOS   (context ids 5..8, fills 20..)
TIN = [5, X(0), 6, X(1), 7, X(2), 8, EOS]


def rewrite_one(teacher_out, **kw):
    rows, stats = sr.rewrite_batch(np.array([TIN]), np.array([teacher_out + [0, 0]]), VS, **kw)
    return rows[0].tolist(), stats


def student(f0, f1, f2):
    return [5, X(0)] + f0 + [X(1), 6, X(1)] + f1 + [X(2), 7, X(2)] + f2 + [X(3), 8, EOS]


@pytest.mark.parametrize("teacher_out,fills,nonempty,empty", [
    ([X(0), 20, X(1), 21, 22, X(2), 23, X(3)], ([20], [21, 22], [23]), 3, 0),  # well formed
    ([X(0), 20, X(2), 23, X(3)], ([], [], [23]), 1, 0),  # skipped <x1>
    ([X(1), 21, X(0), 20, X(1)], ([20], [], []), 1, 0),  # out of order
    ([X(0), 20, X(1), 21, X(2), 23, 24], ([20], [21], []), 2, 0),  # ran out of length
    ([X(0), 20, X(1), EOS, 21, X(2)], ([20], [], []), 1, 0),  # EOS ends the output
    ([], ([], [], []), 0, 0),  # nothing
    ([20, 21, 22], ([], [], []), 0, 0),  # no sentinel at all
    ([X(0), X(1), 21, X(2), X(3)], ([], [21], []), 1, 2),  # empty fills: well formed
    ([X(0), 20, X(1), 21, VS + 5, X(2)], ([20], [], []), 1, 0),  # id beyond the vocabulary
    ([X(0), 20, X(1), X(0), 30, X(1), 21, X(2)], ([20], [21], []), 2, 0),  # first occurrence
    ([X(0), X(1), X(0), 30, X(1), X(2)], ([], [], []), 0, 2),  # first occurrence: empty
])
def test_rewrite_fallbacks(teacher_out, fills, nonempty, empty):
    row, stats = rewrite_one(teacher_out)
    assert row == student(*fills)
    assert (stats.spans, stats.nonempty_fills, stats.empty_fills, stats.fallbacks,
            stats.truncated) == (3, nonempty, empty, 3 - nonempty - empty, 0)


def test_rewrite_max_length_drops_last_fills():
    out = [X(0), 20, 20, X(1), 21, 21, X(2), 23, 23, X(3)]
    full, _ = rewrite_one(out)
    row, stats = rewrite_one(out, max_length=len(full) - 1)
    assert row == student([20, 20], [21, 21], [])
    assert stats.truncated == 1 and len(row) <= len(full) - 1
    assert (stats.nonempty_fills, stats.empty_fills, stats.fallbacks) == (2, 0, 0)
    row, stats = rewrite_one(out, max_length=5)  # cannot fit even empty fills: cut, EOS kept
    assert len(row) == 5 and row[-1] == EOS and stats.overlong_inputs == 1


def test_rewrite_pads_and_counts_copies():
    target = [30, X(1), 31, 32, X(2), 33, X(3), EOS]
    out = [X(0), 30, X(1), 31, 99, X(2), 33, X(3)]
    padded, stats = sr.rewrite_batch(np.array([TIN, TIN]), np.array([out, out]), VS,
                                     targets=np.array([target, target]), pad_to=24)
    assert padded.shape == (2, 24) and padded.dtype == np.int32
    assert padded[0].tolist()[:len(student([30], [31, 99], [33]))] == student([30], [31, 99],
                                                                              [33])
    assert stats.exact_copies == 4 and (stats.original_spans, stats.original_tokens) == (6, 8)
    assert stats.summary()["ssr/nonempty_fill_rate"] == 1.0
    assert stats.summary()["ssr/exact_copy_rate"] == 4 / 6


def test_rewrite_stats_count_each_kind_of_span_apart():
    """Hand-built teacher outputs with known counts: a non-empty fill, an empty fill
    (`<x_k> <x_k+1>`), a fallback (no well-formed fill) and a fill dropped for length are
    four kinds; their shares add up to 1 and describe() names each."""
    from ssr_jax.ssr import stats as stats_lib
    target = [30, X(1), 31, X(2), 33, X(3), EOS]
    outs = [[X(0), 30, X(1), 31, 32, X(2), X(3)],  # copy, non-empty, empty
            [X(0), X(1), X(2), 40, X(3)],  # empty, empty, non-empty
            [X(0), 30, X(1), 50, X(3), X(2), 41, 42, X(3)],  # copy, fallback, non-empty
            [X(0), 20, 20, 20, X(1), 21, 21, 21, X(2), 22, 22, 22, X(3)]]  # last ones cut
    width = max(map(len, outs))
    tout = np.array([o + [0] * (width - len(o)) for o in outs])
    # With empty fills a row is 7 + 3 + 1 = 11 tokens; row 4's fills add 9, and 14 leaves
    # room for its first fill only (rows 1-3 fit).
    rows, stats = sr.rewrite_batch(np.array([TIN] * 4), tout, VS, max_length=14,
                                   targets=np.array([target] * 4))
    assert rows[3].tolist() == student([20, 20, 20], [], [])
    assert (stats.spans, stats.nonempty_fills, stats.empty_fills, stats.fallbacks,
            stats.truncated) == (12, 6, 3, 1, 2)
    assert stats.exact_copies == 2 and stats.fill_tokens == 1 + 2 + 1 + 1 + 2 + 3
    s = stats.summary()
    assert "ssr/valid_fill_rate" not in s
    shares = [s[f"ssr/{k}_rate"] for k in ("nonempty_fill", "empty_fill", "fallback",
                                           "truncated")]
    assert shares == [6 / 12, 3 / 12, 1 / 12, 2 / 12]
    assert sum(shares) == pytest.approx(1.0, abs=1e-12)
    assert s["ssr/exact_copy_rate"] == 2 / 6 and s["ssr/mean_fill_length"] == 10 / 6
    line = stats_lib.describe(s)
    for part in ("12 spans", "50.0% filled", "25.0% empty fills", "8.3% fallbacks",
                 "16.7% fills dropped for length", "33.3% exact copies", "mean 1.67 tokens",
                 "vs 1.00 original"):
        assert part in line, (part, line)
    # Progress files (to_json/from_json) keep every kind; merge adds them.
    again = sr.RewriteStats.from_json(stats.to_json())
    assert again == stats and again.merge(stats).empty_fills == 6
    with pytest.raises(sp.UserError, match="older ssr-jax"):
        sr.RewriteStats.from_json({"spans": 3, "valid_fills": 3}, "progress-00000-of-00001.json")


def strip_sentinels(row, vs):
    return [t for t in row if t < vs - 100 and t != EOS]


def test_perfect_teacher_is_lossless(vocab):
    text = ("A version number consists of two or three dot-separated numeric components, "
            "with an optional pre-release tag on the end. The pre-release tag consists of the "
            "letter 'a' or 'b' followed by a number.")
    tokens = vocab.encode(text)
    vs = vocab.vocab_size
    lengths = sp.ssr_lengths(128, 48)
    rows_in, rows_tgt, originals = [], [], []
    for i in range(20):
        out = sp.mask_segment(tf.constant(tokens), [tf.constant([i, 1]), tf.constant([i, 2])],
                              vs, sp.SsrMaskConfig(), lengths)
        rows_in.append(out["inputs"].numpy().tolist() + [EOS])
        rows_tgt.append(out["targets"].numpy().tolist() + [EOS])
        # The target's spans are exactly the masked text.
        pieces = sr.split_targets(rows_tgt[-1][:-1], vs, 100)
        assert len(pieces) == int(out["num_spans"])
        originals.append(pieces)
    width = max(map(len, rows_in))
    tin = np.array([r + [0] * (width - len(r)) for r in rows_in])
    twidth = max(map(len, rows_tgt))
    tgt = np.array([r + [0] * (twidth - len(r)) for r in rows_tgt])
    teacher_out = sr.teacher_outputs_from_targets(tgt, vs)
    rows, stats = sr.rewrite_batch(tin, teacher_out, vs, targets=tgt)
    assert stats.fallbacks == 0 and stats.exact_copies == stats.spans
    for row in rows:
        restored = strip_sentinels(row.tolist(), vs)
        assert restored == tokens
        assert vocab.decode(restored) == vocab.decode(tokens)
    # Teacher input + target decode back to the text when the spans are put back in place.
    for tin_row, pieces in zip(rows_in, originals):
        merged = []
        for t in tin_row[:-1]:
            merged += pieces[vs - 1 - t] if t >= vs - 100 else [t]
        assert vocab.decode(merged) == vocab.decode(tokens)


def test_teacher_budget_keeps_student_within_inputs_length(masked_batch):
    lengths, examples = masked_batch
    rng = np.random.default_rng(0)
    tin, tout = [], []
    for _, out in examples[:200]:
        teacher = out["inputs"].tolist() + [EOS]
        n, m = int(out["num_spans"]), int(out["masked_length"])
        budget = sp.teacher_decode_lengths([len(teacher)], [n], [m], lengths.inputs_length)[0]
        assert budget >= n + 1
        fill_total = budget - (n + 1)
        cuts = np.sort(rng.integers(0, fill_total + 1, size=n - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [fill_total]]))
        gen = []
        for k, size in enumerate(sizes):
            gen += [X(k)] + rng.integers(3, 4000, size=size).tolist()
        gen += [X(n)]
        assert len(gen) == budget
        tin.append(teacher)
        tout.append(gen)
    pad = lambda rows: np.array([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])  # noqa
    rows, stats = sr.rewrite_batch(pad(tin), pad(tout), VS, max_length=lengths.inputs_length)
    assert stats.truncated == 0 and stats.fallbacks == 0
    for row, t, g in zip(rows, tin, tout):
        assert len(row) == len(t) + len(g) - 1 <= lengths.inputs_length


def test_rewrite_batch_of_many_rows():
    """A 2000-row batch comes back padded, every fill used (speed: bench/input_pipeline.py)."""
    rng = np.random.default_rng(0)
    b = 2000
    tin = rng.integers(3, 4000, size=(b, 128))
    tout = np.zeros((b, 40), np.int64)
    for k in range(8):
        tin[:, 5 + 12 * k] = X(k)
        tout[:, 4 * k] = X(k)
        tout[:, 4 * k + 1:4 * k + 4] = rng.integers(3, 4000, size=(b, 3))
    tout[:, 32] = X(8)
    tin[:, -1] = EOS
    rows, stats = sr.rewrite_batch(tin, tout, VS, pad_to=160)
    assert stats.nonempty_fills == 8 * b and stats.fallbacks == 0
    assert rows.shape == (b, 160) and rows.dtype == np.int32
    # 127 context-and-sentinel tokens + 8 closing sentinels + 24 fill tokens + EOS.
    assert ((rows > 0).sum(axis=1) == 127 + 8 + 24 + 1).all()
    i = 7
    expect = tin[i, :5].tolist() + [X(0)] + tout[i, 1:4].tolist() + [X(1)]
    assert rows[i, :len(expect)].tolist() == expect


def test_rewrite_preprocessor_in_tf(vocab):
    import seqio
    feats = {"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)}
    vs = vocab.vocab_size
    x = lambda k: vs - 1 - k  # noqa: E731
    ds = tf.data.Dataset.from_tensors({
        "inputs": tf.constant([5, x(0), 6, EOS]), "teacher_outputs": tf.constant([x(0), 9, x(1)]),
        "targets": tf.constant([7, x(1), EOS])})
    ex = next(iter(sr.rewrite_preprocessor(ds, feats, {"inputs": 16, "targets": 8})))
    assert ex["inputs"].numpy().tolist() == [5, x(0), 9, x(1), 6, EOS]


# --- malformed teacher outputs: the two policies -----------------------------------------------
def test_rewrite_examples_policies():
    """Complete rows are rewritten under both policies; a row with an empty fill or a
    fallback keeps its empty fills ('empty_fill') or becomes the span-corruption example of
    its segment ('drop_example'), of the same length; padding rows count nowhere."""
    from ssr_jax.ssr import stats as stats_lib
    target = [30, X(1), 31, X(2), 33, X(3), EOS]
    outs = [[X(0), 30, X(1), 31, X(2), 33, X(3)],  # complete
            [X(0), 30, X(1), X(2), 33, X(3)],  # span 1 empty
            [X(0), 30, X(1), 31, X(2), 33],  # cut before <x3>: span 2 is a fallback
            []]  # a padding row (no teacher input)
    tin = np.array([TIN, TIN, TIN, [0] * len(TIN)])
    tout = np.array([o + [0] * (8 - len(o)) for o in outs])
    tgt = np.array([target] * 3 + [[0] * len(target)])
    rows, _ = sr.rewrite_batch(tin, tout, VS, targets=tgt)
    kept, stats = sr.rewrite_examples(tin, tout, tgt, VS)
    assert [e["inputs"].tolist() for e in kept] == [r.tolist() for r in rows]
    assert [e["targets"].tolist() for e in kept] == [target] * 3 + [[]]
    assert (stats.examples, stats.incomplete_examples, stats.dropped_examples) == (3, 2, 0)
    dropped, dstats = sr.rewrite_examples(tin, tout, tgt, VS, malformed="drop_example")
    assert dropped[0]["inputs"].tolist() == student([30], [31], [33])
    sc_target = [X(0), 30, X(1), 31, X(2), 33, EOS]  # T5's layout: <x_k> before span k
    for e in dropped[1:3]:
        assert e["inputs"].tolist() == TIN and e["targets"].tolist() == sc_target
        assert len(e["targets"]) == len(target)
    assert dropped[3]["targets"].size == 0
    assert (dstats.examples, dstats.incomplete_examples, dstats.dropped_examples) == (3, 2, 2)
    # The span counts describe the teacher's outputs, whatever the policy.
    assert dataclasses.replace(dstats, dropped_examples=0) == stats
    assert (stats.spans, stats.nonempty_fills, stats.empty_fills, stats.fallbacks) == (9, 7, 1, 1)
    s = dstats.summary()
    assert s["ssr/complete_example_rate"] == 1 / 3 and s["ssr/dropped_example_rate"] == 2 / 3
    line = stats_lib.describe(s)
    assert "3 examples, 33.3% with every span filled, 2 dropped" in line, line
    assert "dropped (malformed" not in stats_lib.describe(stats.summary())
    with pytest.raises(sp.UserError, match="malformed='skip'"):
        sr.rewrite_examples(tin, tout, tgt, VS, malformed="skip")
    # Progress files written before examples were counted still load.
    old = {k: v for k, v in stats.to_json().items() if "examples" not in k}
    assert sr.RewriteStats.from_json(old).examples == 0


# --- the span-length curriculum (ssr_jax/ssr/curriculum.py) ------------------------------------
def task_masks(slot, count=300):
    """The task's own mask (TF) of `count` random segments of the slot's raw length."""
    config = sp.SsrMaskConfig()
    lengths = sp.ssr_lengths(*slot, config)

    def one(i):
        seeds = [tf.stack([tf.cast(i, tf.int32), 1]), tf.stack([tf.cast(i, tf.int32), 2])]
        tokens = tf.random.stateless_uniform([lengths.raw_length], seeds[1], 3, 4000, tf.int32)
        out = sp.mask_segment(tokens, seeds, VS, config, lengths)
        return dict(out, inputs=tf.concat([out["inputs"], [EOS]], 0),
                    targets=tf.concat([out["targets"], [EOS]], 0), tokens=tokens)

    ds = tf.data.Dataset.range(count).map(one, num_parallel_calls=2)
    return config, lengths, list(ds.as_numpy_iterator())


@pytest.mark.parametrize("slot", [(128, 32), (256, 57), (512, 114)])
def test_curriculum_keeps_the_masked_fraction_and_lengthens_spans(slot):
    from ssr_jax.ssr.curriculum import CurriculumMask, SpanCurriculum, original_tokens
    config, lengths, examples = task_masks(slot)
    density = lambda exs: np.mean([int(e["masked_length"]) / len(  # noqa: E731
            original_tokens(e, VS, 100, EOS)) for e in exs])
    mean_span = lambda exs: np.mean([int(e["masked_length"]) / int(e["num_spans"])  # noqa
                                     for e in exs])
    # Why selecting examples stalled: the task's examples almost never average <= 1.5.
    if slot != (128, 32):
        assert np.mean([int(e["masked_length"]) <= 1.5 * int(e["num_spans"])
                        for e in examples]) < 0.01
    base = density(examples)
    curriculum = CurriculumMask(SpanCurriculum(steps=4, start_mean_span=1.5), config, slot,
                                VS, 100, EOS, seed=7)
    spans = []
    for step in range(5):
        got = curriculum.apply(examples, step)
        assert len(got) == len(examples)
        assert abs(density(got) - base) < 0.08 * base, (step, density(got), base)
        spans.append(mean_span(got))
        for ex, old in zip(got[:100], examples):
            n, m = int(ex["num_spans"]), int(ex["masked_length"])
            orig = original_tokens(ex, VS, 100, EOS)
            # A prefix of the segment, masked in the task's layout, within the slot.
            assert orig.tolist() == old["tokens"][:len(orig)].tolist()
            assert len(ex["targets"]) == m + n + 1 <= slot[1]
            assert len(ex["inputs"]) - 1 + n + 1 <= slot[0]  # the empty-fill student input
            assert ex["inputs"][-1] == EOS and ex["targets"][-1] == EOS
    assert abs(spans[0] - 1.5) < 0.1 and abs(spans[4] - mean_span(examples)) < 1e-9
    assert spans == sorted(spans), spans  # the spans grow with the step
    # The mask depends only on the step, the tokens and the seed (online == offline).
    again = CurriculumMask(SpanCurriculum(steps=4, start_mean_span=1.5), config, slot, VS,
                           100, EOS, seed=7).apply(examples[::-1], 1)[::-1]
    first = curriculum.apply(examples, 1)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(again, first))
    other = CurriculumMask(SpanCurriculum(steps=4, start_mean_span=1.5), config, slot, VS,
                           100, EOS, seed=8).apply(examples, 1)
    assert any(not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(other, first))


def test_curriculum_mask_follows_the_paper_procedure():
    """The curriculum's numpy mask at the task's own settings has the TF mask's statistics
    (span count, masked count, span length; 2000 masks of the crowded 40-token segment)."""
    import random
    from ssr_jax.ssr.curriculum import paper_spans, poisson_mean_for, expected_span_length
    assert abs(expected_span_length(poisson_mean_for(1.7)) - 1.7) < 1e-9
    config = sp.SsrMaskConfig(span_rate=0.2)
    lengths = sp.SsrLengths(40, 1000, 1000, 99)
    rng = np.random.default_rng(0)
    ours = []
    for _ in range(3000):
        spans = paper_spans(40, rng, config, lengths)
        for (_, e), (s, _) in zip(spans, spans[1:]):
            assert e < s, spans  # neither overlap nor touch
        assert not spans or spans[-1][1] <= 39  # the last token is never masked
        ours.append([e - s for s, e in spans])
    kept = [paper_data_gen_mask(40, 0.2, 3.0, 10, random.Random(i)) for i in range(3000)]
    for got, want, tol in zip(
            (np.mean([len(m) for m in ours]), np.mean([sum(m) for m in ours]),
             np.mean([x for m in ours for x in m])),
            (np.mean([len(m) for m in kept]), np.mean([sum(m) for m in kept]),
             np.mean([x for m in kept for x in m])), (0.14, 0.6, 0.08)):
        assert abs(got - want) < tol, (got, want)
    # Budgets end the mask: a 12-token target budget fits at most M + n + 1 <= 12.
    tight = sp.SsrLengths(40, 1000, 12, 99)
    for _ in range(200):
        spans = paper_spans(40, rng, config, tight)
        assert sum(e - s for s, e in spans) + len(spans) + 1 <= 12
