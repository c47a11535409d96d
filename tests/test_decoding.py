"""Decoding: beam search against exhaustive search, sampling filters and reproducibility,
per-row stopping, and the model's predict_batch end to end.

Most tests drive the decoders with a synthetic step function, a small Markov model whose
next-token logits depend on the previous token and on a state carried in the cache (so a
beam search that reorders its cache wrongly gives wrong scores)."""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.models import decoding
from ssr_jax.models.base import DecodeConfig
from ssr_jax.models.config import T5Config
from ssr_jax.models.encoder_decoder import EncoderDecoderModel
import helpers

V, S = 6, 5  # vocab (0 = pad, 1 = EOS), cache states
EOS = 1
_rng = np.random.RandomState(0)
TOKEN_LOGITS = _rng.standard_normal((V, V)).astype(np.float32) * 2.0
STATE_LOGITS = _rng.standard_normal((S, V)).astype(np.float32) * 2.0
ROWS = 16  # batch of the sampling tests (one shared compilation per setting)
ROW_LOGITS = _rng.standard_normal((ROWS, V)).astype(np.float32)


def make_step_fn(batch_size, repeats=1):
    """Logits = f(prev token, cache state, row); the cache state follows the sequence."""
    rows = jnp.repeat(jnp.arange(batch_size), repeats)

    def step_fn(tokens, cache, step):
        logits = (jnp.asarray(TOKEN_LOGITS)[tokens] + jnp.asarray(STATE_LOGITS)[cache]
                  + jnp.asarray(ROW_LOGITS)[rows])
        return logits, (cache * 3 + tokens + 1) % S
    return step_fn


def reference_logits(row, prefix):
    """The step function's logits after `prefix`, in plain numpy."""
    cache, prev = 0, 0
    for tok in prefix:
        cache, prev = (cache * 3 + prev + 1) % S, tok
    return TOKEN_LOGITS[prev] + STATE_LOGITS[cache] + ROW_LOGITS[row]


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def sequence_logprob(row, seq):
    return sum(log_softmax(reference_logits(row, seq[:t]))[tok] for t, tok in enumerate(seq))


def exhaustive_best(row, max_len, alpha, stop=-1, row_max=None):
    row_max = row_max or max_len
    best, best_seq = -np.inf, None
    for length in range(1, row_max + 1):
        for seq in itertools.product(range(V), repeat=length):
            ends = [t in (EOS, stop) for t in seq]
            if any(ends[:-1]) or (not ends[-1] and length < row_max):
                continue
            score = sequence_logprob(row, seq) / ((5 + length) / 6) ** alpha
            if score > best:
                best, best_seq = score, seq
    return best, best_seq


def run_beam(batch, beams, max_len, alpha, stop_tokens=None, max_lens=None):
    fn = jax.jit(lambda cache, stop, lens: decoding.beam_search(
            make_step_fn(batch, beams), cache, batch, beams, max_len, eos_id=EOS, alpha=alpha,
            stop_tokens=stop, max_decode_lengths=lens))
    return fn(jnp.zeros((batch * beams,), jnp.int32), stop_tokens, max_lens)


def test_beam_search_equals_exhaustive_search():
    # With (V-1)**(L-1) beams nothing is ever pruned, so beam search must be exact.
    batch, max_len, alpha = 3, 4, 0.6
    beams = (V - 1) ** (max_len - 1)
    stop = jnp.asarray([-1, 4, -1], jnp.int32)
    lens = jnp.asarray([4, 4, 3], jnp.int32)
    tokens, scores = run_beam(batch, beams, max_len, alpha, stop, lens)
    for b in range(batch):
        want_score, want_seq = exhaustive_best(b, max_len, alpha, int(stop[b]), int(lens[b]))
        got = [int(t) for t in tokens[b]]
        assert got == list(want_seq) + [0] * (max_len - len(want_seq)), b
        np.testing.assert_allclose(float(scores[b]), want_score, rtol=1e-5)


def test_small_beam_is_valid_and_no_worse_than_greedy():
    batch, max_len, alpha = 3, 6, 0.6
    tokens, scores = run_beam(batch, 3, max_len, alpha)
    greedy, greedy_lp = sample(ROWS, max_len, None)
    for b in range(batch):
        seq = [int(t) for t in tokens[b]]
        n = next((i + 1 for i, t in enumerate(seq) if t == EOS), max_len)
        assert all(t == 0 for t in seq[n:])
        score = sequence_logprob(b, seq[:n]) / ((5 + n) / 6) ** alpha
        np.testing.assert_allclose(float(scores[b]), score, rtol=1e-5)
        g = [int(t) for t in greedy[b]]
        gn = next((i + 1 for i, t in enumerate(g) if t == EOS), max_len)
        np.testing.assert_allclose(float(greedy_lp[b]), sequence_logprob(b, g[:gn]), rtol=1e-5)
        assert float(scores[b]) >= float(greedy_lp[b]) / ((5 + gn) / 6) ** alpha - 1e-6


def test_filter_logits():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: np.isfinite(np.asarray(decoding.filter_logits(logits, **kw)))[0]  # noqa
    np.testing.assert_array_equal(kept(top_k=2), [True, True, False, False])
    np.testing.assert_array_equal(kept(top_p=0.75), [True, True, False, False])
    np.testing.assert_array_equal(kept(top_p=0.85), [True, True, True, False])
    np.testing.assert_array_equal(kept(top_p=1e-6), [True, False, False, False])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.4), [True, False, False, False])
    np.testing.assert_array_equal(kept(), [True] * 4)


@functools.lru_cache(maxsize=None)
def _sampler(batch, max_len, greedy, **kw):
    # Cached so that tests share compilations; stop/length inputs are always arrays.
    return jax.jit(lambda k, stop, lens: decoding.sample_decode(
            make_step_fn(batch), jnp.zeros(batch, jnp.int32), batch, max_len, eos_id=EOS,
            keys=None if greedy else k, stop_tokens=stop, max_decode_lengths=lens, **kw))


def sample(batch, max_len, keys, stop_tokens=None, max_decode_lengths=None, **kw):
    if stop_tokens is None:
        stop_tokens = jnp.full((batch,), -1, jnp.int32)
    if max_decode_lengths is None:
        max_decode_lengths = jnp.full((batch,), max_len, jnp.int32)
    fn = _sampler(batch, max_len, keys is None, **kw)
    if keys is None:
        keys = jnp.zeros((batch, 2), jnp.uint32)
    return fn(keys, stop_tokens, max_decode_lengths)


def test_top_k_restricts_every_step_to_k_tokens():
    batch, max_len = ROWS, 6
    keys = decoding.row_keys(jax.random.PRNGKey(0), batch)
    tokens, _ = sample(batch, max_len, keys, top_k=2)
    tokens = np.asarray(tokens)
    second_choices = 0
    for b in range(batch):
        for t in range(max_len):
            if t and tokens[b, t - 1] == EOS:
                break
            top2 = np.argsort(-reference_logits(b, list(tokens[b, :t])))[:2]
            assert tokens[b, t] in top2
            second_choices += int(tokens[b, t] == top2[1])
    assert second_choices > 0  # it samples, it is not greedy


def test_tiny_top_p_equals_greedy_and_same_keys_same_samples():
    batch, max_len = ROWS, 6
    keys = decoding.row_keys(jax.random.PRNGKey(1), batch)
    greedy, greedy_lp = sample(batch, max_len, None)
    nucleus, nucleus_lp = sample(batch, max_len, keys, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
    np.testing.assert_allclose(nucleus_lp, greedy_lp)
    a, _ = sample(batch, max_len, keys)
    b, _ = sample(batch, max_len, keys)
    c, _ = sample(batch, max_len, decoding.row_keys(jax.random.PRNGKey(2), batch))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # A row's sample depends only on its own key (and row), not on its neighbours.
    shuffled = keys.at[1:].set(decoding.row_keys(jax.random.PRNGKey(3), batch - 1))
    d, _ = sample(batch, max_len, shuffled)
    np.testing.assert_array_equal(np.asarray(d)[0], np.asarray(a)[0])
    # One key is expanded as fold_in(rng, b).
    single = decoding.row_keys(jax.random.PRNGKey(1), batch)
    np.testing.assert_array_equal(single[5], jax.random.fold_in(jax.random.PRNGKey(1), 5))


def test_sampling_follows_the_distribution():
    batch = 2000
    keys = decoding.row_keys(jax.random.PRNGKey(4), batch)
    step_fn = lambda tokens, cache, step: (jnp.tile(  # noqa: E731
            jnp.asarray(TOKEN_LOGITS[0]), (tokens.shape[0], 1)), cache)
    tokens, _ = jax.jit(lambda k: decoding.sample_decode(
            step_fn, jnp.zeros(batch, jnp.int32), batch, 1, eos_id=EOS, keys=k,
            temperature=2.0))(keys)
    freq = np.bincount(np.asarray(tokens)[:, 0], minlength=V) / batch
    probs = np.exp(log_softmax(TOKEN_LOGITS[0] / 2.0))
    np.testing.assert_allclose(freq, probs, atol=0.04)


def test_per_row_stop_tokens_and_max_lengths():
    batch, max_len = ROWS, 6
    greedy, _ = sample(batch, max_len, None)
    greedy = np.asarray(greedy)
    # Stop each row on the token it emits at step 2 (unless it ended earlier).
    stop = jnp.asarray(greedy[:, 2], jnp.int32)
    lens = jnp.asarray(np.arange(batch) % 7, jnp.int32).at[0].set(6)  # 0 means 1 token
    tokens, _ = sample(batch, max_len, None, stop_tokens=stop, max_decode_lengths=lens)
    tokens = np.asarray(tokens)
    for b in range(batch):
        row = list(greedy[b])
        ends = [i + 1 for i, t in enumerate(row) if t in (EOS, int(stop[b]))]
        n = min(ends[0] if ends else max_len, max(int(lens[b]), 1))
        assert list(tokens[b, :n]) == row[:n]
        assert not tokens[b, n:].any()


# --- the model's predict_batch ----------------------------------------------------------------
CONFIG = T5Config(vocab_size=32, d_model=32, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                  num_decoder_layers=1, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def model_and_params():
    model = EncoderDecoderModel(CONFIG)
    params = helpers.random_params(CONFIG, 0, scale=2.0)
    rng = np.random.RandomState(1)
    enc = rng.randint(2, CONFIG.vocab_size, (4, 9))
    enc[1, 5:] = 0
    return model, params, {"encoder_input_tokens": jnp.asarray(enc, jnp.int32)}


def test_predict_batch_methods(model_and_params):
    model, params, batch = model_and_params
    max_len = 7
    greedy, greedy_scores = model.predict_batch(params, batch, DecodeConfig(
            method="greedy", max_decode_length=max_len))
    # top_p tiny is greedy.
    nucleus, _ = model.predict_batch(params, batch, DecodeConfig(
            method="sample", max_decode_length=max_len, top_p=1e-6),
            rng=decoding.row_keys(jax.random.PRNGKey(0), 4))
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
    # Beam scores are the length-penalised log-likelihoods of the returned tokens.
    beam_cfg = DecodeConfig(method="beam", max_decode_length=max_len, num_beams=3)
    stop = jnp.asarray([-1, -1, int(greedy[2, 1]), -1], jnp.int32)
    tokens, scores = model.predict_batch(params, batch, beam_cfg, stop_tokens=stop,
                                         max_decode_lengths=jnp.asarray([7, 7, 7, 2]))
    tokens = np.asarray(tokens)
    lengths = []
    for b, row in enumerate(tokens):
        ends = [i + 1 for i, t in enumerate(row) if t in (CONFIG.eos_id, int(stop[b]))]
        lengths.append(min(ends[0] if ends else max_len, 2 if b == 3 else max_len))
        assert not row[lengths[-1]:].any()
    targets = np.where(np.arange(max_len)[None] < np.asarray(lengths)[:, None], tokens, 0)
    score_batch = dict(batch, decoder_target_tokens=jnp.asarray(targets),
                       decoder_input_tokens=jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1]),
                       decoder_loss_weights=jnp.asarray(targets > 0) | (
                               jnp.arange(max_len)[None] < jnp.asarray(lengths)[:, None]))
    ll = np.asarray(jax.jit(model.score_batch)(params, score_batch))
    penalty = ((5.0 + np.asarray(lengths)) / 6.0) ** 0.6
    np.testing.assert_allclose(np.asarray(scores), ll / penalty, rtol=1e-4)
    # Greedy scores are log-likelihoods too, and beam search does at least as well.
    g = np.asarray(greedy)
    g_len = [next((i + 1 for i, t in enumerate(r) if t == 1), max_len) for r in g]
    for b in (0, 1):
        assert float(scores[b]) >= float(greedy_scores[b]) / ((5 + g_len[b]) / 6) ** 0.6 - 1e-5
    with pytest.raises(ValueError, match="method"):
        model.predict_batch(params, batch, dataclasses.replace(beam_cfg, method="nucleus"))


# --- no_repeat_ngram_size ---------------------------------------------------------------------
def ngram_bans(seq, n):
    """The tokens HF's no_repeat_ngram_size bans after `seq` (plain python)."""
    seen = {}
    for j in range(len(seq) - n + 1):
        seen.setdefault(tuple(seq[j:j + n - 1]), set()).add(seq[j + n - 1])
    return seen.get(tuple(seq[len(seq) - n + 1:]), set()) if len(seq) >= n else set()


def banned_by(logits, tokens, length, n):
    out = np.asarray(jax.jit(decoding.ban_repeated_ngrams, static_argnums=3)(
            jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(length), n))
    return [set(np.flatnonzero(np.isneginf(row))) for row in out]


def has_repeated_ngram(seq, n):
    grams = [tuple(seq[j:j + n]) for j in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def test_ban_repeated_ngrams_equals_reference_on_random_sequences():
    rng = np.random.RandomState(5)
    vocab, rows, total = 7, 64, 20
    for n in (1, 2, 3, 4):
        # Few token values, so that repeats are frequent; garbage after each row's length.
        tokens = rng.randint(0, max(2, 5 - n), (rows, total))
        lengths = rng.randint(0, total + 1, rows)
        logits = rng.standard_normal((rows, vocab)).astype(np.float32)
        got = banned_by(logits, tokens, lengths, n)
        want = [ngram_bans(list(tokens[b, :lengths[b]]), n) for b in range(rows)]
        assert got == want, n
        assert 10 < sum(map(bool, want)) < rows  # rows with and without bans
        out = np.asarray(decoding.ban_repeated_ngrams(jnp.asarray(logits), jnp.asarray(tokens),
                                                      jnp.asarray(lengths), n))
        kept = ~np.isneginf(out)
        np.testing.assert_array_equal(out[kept], logits[kept])  # allowed tokens untouched
    # One length for all rows (a decoding step), and n = 0 or n > length change nothing.
    assert banned_by(logits, tokens, 9, 2) == [ngram_bans(list(r[:9]), 2) for r in tokens]
    np.testing.assert_array_equal(decoding.ban_repeated_ngrams(
            jnp.asarray(logits), jnp.asarray(tokens), 9, 0), logits)
    np.testing.assert_array_equal(decoding.ban_repeated_ngrams(
            jnp.asarray(logits), jnp.asarray(tokens[:, :3]), 3, 4), logits)


def test_ban_repeated_ngrams_equals_hugging_face():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.RandomState(6)
    vocab, rows = 9, 32
    for n in (1, 2, 3):
        for length in (1, 2, 5, 12):
            tokens = rng.randint(0, 5, (rows, length))
            scores = rng.standard_normal((rows, vocab)).astype(np.float32)
            hf = transformers.NoRepeatNGramLogitsProcessor(n)(
                    torch.as_tensor(tokens), torch.as_tensor(scores)).numpy()
            want = [set(np.flatnonzero(np.isneginf(r))) for r in hf]
            padded = np.pad(tokens, ((0, 0), (0, 4)), constant_values=3)
            assert banned_by(scores, padded, length, n) == want, (n, length)


CYCLE_V = 50


def cycle_step_fn(tokens, cache, step):
    """A degenerate model: after token t it prefers t's successor in a 3-cycle (2 -> 3 -> 4
    -> 2), then fixed random preferences; EOS is never likely, so it fills every position."""
    base = jnp.asarray(np.random.RandomState(7).standard_normal((CYCLE_V, CYCLE_V)),
                       jnp.float32)
    nxt = jnp.where((tokens >= 2) & (tokens <= 4), (tokens - 1) % 3 + 2, 2)
    logits = base[tokens] + 10.0 * jax.nn.one_hot(nxt, CYCLE_V)
    return logits.at[:, EOS].set(-20.0), cache


def greedy_reference(step_fn, batch, max_len, n):
    """Greedy decoding step by step in numpy, the bans taken from `ngram_bans`."""
    out = np.zeros((batch, max_len), np.int64)
    for b in range(batch):
        seq = [0]
        for t in range(max_len):
            logits = np.array(step_fn(jnp.asarray([seq[-1]]), None, t)[0][0])
            if n:
                logits[list(ngram_bans(seq, n))] = -np.inf
            seq.append(int(np.argmax(logits)))
            if seq[-1] == EOS:
                break
        out[b, :len(seq) - 1] = seq[1:]
    return out


def test_greedy_no_repeat_ngram_stops_a_degenerate_cycle():
    batch, max_len = 2, 30
    run = lambda **kw: jax.jit(lambda c: decoding.sample_decode(  # noqa: E731
            cycle_step_fn, c, batch, max_len, eos_id=EOS, **kw))(jnp.zeros(batch, jnp.int32))
    plain, plain_scores = run()
    off, off_scores = run(no_repeat_ngram_size=0)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))  # off is today's output
    np.testing.assert_array_equal(np.asarray(off_scores), np.asarray(plain_scores))
    np.testing.assert_array_equal(np.asarray(plain), greedy_reference(cycle_step_fn, batch,
                                                                      max_len, 0))
    assert list(np.asarray(plain)[0, :6]) == [2, 3, 4, 2, 3, 4]
    for n in (2, 3):
        tokens, scores = run(no_repeat_ngram_size=n)
        tokens = np.asarray(tokens)
        np.testing.assert_array_equal(tokens, greedy_reference(cycle_step_fn, batch, max_len, n))
        for row in tokens:
            assert not has_repeated_ngram([0] + list(row), n)
            assert row.all()  # every position is filled: the cycle is broken, not stopped
        # Scores stay the model's log-probabilities of the emitted tokens.
        seq = [0] + list(tokens[0])
        want = sum(log_softmax(cycle_step_fn(jnp.asarray([seq[t]]), None, t)[0][0])[seq[t + 1]]
                   for t in range(max_len))
        np.testing.assert_allclose(float(scores[0]), want, rtol=1e-5)


def test_sampling_bans_before_top_k_and_never_repeats():
    batch, max_len = ROWS, 6
    keys = decoding.row_keys(jax.random.PRNGKey(8), batch)
    greedy, _ = sample(batch, max_len, None, no_repeat_ngram_size=2)
    # top_k=1 after the ban is greedy with the ban (before it, a banned best token would
    # leave nothing to sample).
    top1, _ = sample(batch, max_len, keys, top_k=1, no_repeat_ngram_size=2)
    np.testing.assert_array_equal(np.asarray(top1), np.asarray(greedy))
    tokens, _ = sample(batch, max_len, keys, no_repeat_ngram_size=2)
    tokens, plain = np.asarray(tokens), np.asarray(sample(batch, max_len, keys)[0])
    for b in range(batch):
        n = next((i + 1 for i, t in enumerate(tokens[b]) if t == EOS), max_len)
        assert not has_repeated_ngram([0] + list(tokens[b, :n]), 2), b
    assert any(has_repeated_ngram([0] + list(r), 2) for r in plain)  # the ban did something


def test_beam_search_no_repeat_ngram_equals_exhaustive_search():
    # Nothing is pruned with (V-1)**(L-1) beams, so beam search must find the best sequence
    # among those whose n-grams (start token included, as in HF) are all distinct.
    batch, max_len, alpha = 6, 4, 0.6
    beams = (V - 1) ** (max_len - 1)
    plain, _ = run_beam(batch, beams, max_len, alpha)
    changed = 0
    for n in (1, 2):
        fn = jax.jit(lambda cache: decoding.beam_search(
                make_step_fn(batch, beams), cache, batch, beams, max_len, eos_id=EOS,
                alpha=alpha, no_repeat_ngram_size=n))
        tokens, scores = fn(jnp.zeros((batch * beams,), jnp.int32))
        for b in range(batch):
            best, best_seq = -np.inf, None
            for length in range(1, max_len + 1):
                for seq in itertools.product(range(V), repeat=length):
                    if (EOS in seq[:-1] or (seq[-1] != EOS and length < max_len)
                            or has_repeated_ngram((0,) + seq, n)):
                        continue
                    score = sequence_logprob(b, seq) / ((5 + length) / 6) ** alpha
                    if score > best:
                        best, best_seq = score, seq
            got = [int(t) for t in tokens[b]]
            assert got == list(best_seq) + [0] * (max_len - len(best_seq)), (n, b)
            np.testing.assert_allclose(float(scores[b]), best, rtol=1e-5)
            changed += got != [int(t) for t in plain[b]]
    assert changed  # the unconstrained best repeats an n-gram in some row


def test_predict_batch_no_repeat_ngram(model_and_params):
    model, params, batch = model_and_params
    max_len = 12
    for method in ("greedy", "beam"):
        cfg = DecodeConfig(method=method, max_decode_length=max_len, num_beams=3)
        plain, plain_scores = model.predict_batch(params, batch, cfg)
        off, off_scores = model.predict_batch(params, batch, dataclasses.replace(
                cfg, no_repeat_ngram_size=0))
        np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))
        np.testing.assert_array_equal(np.asarray(off_scores), np.asarray(plain_scores))
        assert any(has_repeated_ngram(list(r), 2) for r in np.asarray(plain))  # degenerate
        tokens, _ = model.predict_batch(params, batch, dataclasses.replace(
                cfg, no_repeat_ngram_size=2))
        for row in np.asarray(tokens):
            ids = [int(t) for t in row]
            n = next((i + 1 for i, t in enumerate(ids) if t == CONFIG.eos_id), max_len)
            assert not has_repeated_ngram([0] + ids[:n], 2), (method, ids)


def test_decode_config_rejects_a_negative_ngram_size():
    from ssr_jax.errors import UserError
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="no_repeat_ngram_size"):
            DecodeConfig(no_repeat_ngram_size=bad)
    assert DecodeConfig().no_repeat_ngram_size == 0


# --- top-k then top-p (the SSR teacher's sampler) ---------------------------------------------
def top_k_top_p_reference(logits, top_k, top_p):
    """HF's semantics in float64 with a full sort: keep every logit >= the k-th largest
    (TopKLogitsWarper keeps its ties), renormalise, keep the most likely of those until
    their mass reaches top_p (and the ties of the last kept); returns the distribution."""
    logits = np.asarray(logits, np.float64)
    if top_k and top_k < logits.size:
        logits = np.where(logits >= np.sort(logits)[::-1][top_k - 1], logits, -np.inf)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    kept = ((np.cumsum(probs) - probs) < top_p) & (probs > 0)
    kept |= logits[order] >= logits[order][kept].min()  # ties of the last kept token
    out = np.zeros_like(logits)
    out[order[kept]] = probs[kept] / probs[kept].sum()
    return out


@pytest.mark.parametrize("top_k,top_p", [(50, 0.9), (50, 1.0), (7, 0.5), (3, 1e-6), (0, 0.9)])
def test_filter_logits_top_k_then_top_p_matches_sorted_reference(top_k, top_p):
    logits = np.random.RandomState(2).standard_normal((6, 500)).astype(np.float32) * 3
    ours = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k, top_p))
    for row in range(logits.shape[0]):
        want = top_k_top_p_reference(logits[row], top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(ours[row]), want > 0)
        # Kept logits are untouched, so softmax(filtered) is the renormalised distribution.
        np.testing.assert_allclose(np.exp(log_softmax(ours[row])), want, atol=1e-6)


def test_top_k_top_p_sampling_follows_the_renormalised_distribution():
    """20,000 one-step draws through sample_decode (temperature 1.5, top_k 8, top_p 0.8 on a
    20-token vocabulary): the support is exactly the reference's and the frequencies match
    its probabilities (4 standard errors)."""
    vocab, batch, temperature, top_k, top_p = 20, 20000, 1.5, 8, 0.8
    row = np.random.RandomState(9).standard_normal(vocab).astype(np.float32) * 2
    want = top_k_top_p_reference(row / temperature, top_k, top_p)
    assert 2 < (want > 0).sum() < top_k  # the nucleus cuts inside the top k
    keys = decoding.row_keys(jax.random.PRNGKey(5), batch)
    step_fn = lambda tokens, cache, step: (jnp.tile(  # noqa: E731
            jnp.asarray(row), (tokens.shape[0], 1)), cache)
    tokens, _ = jax.jit(lambda k: decoding.sample_decode(
            step_fn, jnp.zeros(batch, jnp.int32), batch, 1, eos_id=-1, keys=k,
            temperature=temperature, top_k=top_k, top_p=top_p))(keys)
    freq = np.bincount(np.asarray(tokens)[:, 0], minlength=vocab) / batch
    np.testing.assert_array_equal(freq > 0, want > 0)
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / batch))
    # Filtering the whole vocabulary (filter_logits) and drawing from it gives the same
    # distribution as the candidates path sample_decode takes.
    full = np.asarray(jax.jit(jax.vmap(decoding.categorical))(keys, decoding.filter_logits(
            jnp.tile(jnp.asarray(row / temperature), (batch, 1)), top_k, top_p)))
    np.testing.assert_allclose(np.bincount(full, minlength=vocab) / batch, want,
                               atol=4 * np.sqrt(0.25 / batch))


# --- top-k by chunks (top_k_candidates) ---------------------------------------------------------
def tied_logits(rows, vocab, seed):
    """Rounded logits (many exact ties, at the k-th value too) with some -inf (bans)."""
    rng = np.random.RandomState(seed)
    x = np.round(rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    x[rng.rand(rows, vocab) < 0.05] = -np.inf
    x[0, 5:] = -np.inf  # fewer finite logits than k
    x[1] = rng.standard_normal(vocab)  # no ties
    return x


@pytest.mark.parametrize("chunk", [2, 4, 32])
@pytest.mark.parametrize("vocab,top_k", [(501, 3), (512, 50), (40, 7)])
def test_top_k_candidates_equal_a_full_sort(monkeypatch, chunk, vocab, top_k):
    monkeypatch.setattr(decoding, "CHUNK", chunk)
    logits = np.concatenate([tied_logits(6, vocab, 3), np.random.RandomState(4).standard_normal(
            (6, vocab)).astype(np.float32)])
    vals, ids, clean = jax.jit(decoding.top_k_candidates, static_argnums=1)(logits, top_k)
    vals, ids, clean = np.asarray(vals), np.asarray(ids), np.asarray(clean)
    for row, x in enumerate(logits):
        want = np.sort(x)[::-1][:top_k]
        np.testing.assert_array_equal(vals[row], want)
        np.testing.assert_array_equal(x[ids[row]], want)
        assert len(set(ids[row])) == top_k
        assert clean[row] == ((x >= want[-1]).sum() == top_k), row  # no tie outside the k
    assert clean[6:].all() and clean[1] and (top_k <= 5 or not clean[0])


@pytest.mark.parametrize("chunk", [4, 32])
@pytest.mark.parametrize("top_k,top_p", [(3, 0.9), (3, 1.0), (50, 0.5), (600, 0.9), (1, 0.9)])
def test_filter_logits_with_ties_and_bans_matches_hf_semantics(monkeypatch, chunk, top_k, top_p):
    monkeypatch.setattr(decoding, "CHUNK", chunk)
    logits = tied_logits(8, 501, 5)
    ours = np.asarray(decoding.filter_logits(jnp.asarray(logits), top_k, top_p))
    for row in range(logits.shape[0]):
        want = top_k_top_p_reference(logits[row], top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(ours[row]), want > 0)
        np.testing.assert_allclose(np.exp(log_softmax(ours[row])), want, atol=1e-6)


def test_top_k_sampling_with_ties_follows_hf_and_rows_are_independent(monkeypatch):
    """Rows with a tie at the k-th value (HF keeps it: more than k tokens) draw over the
    vocabulary, clean rows over the k candidates; the frequencies match the reference and a
    clean row's tokens do not change when a neighbour has ties."""
    monkeypatch.setattr(decoding, "CHUNK", 4)
    vocab, batch, top_k, top_p = 300, 20000, 4, 0.95
    rng = np.random.RandomState(6)
    clean_row = rng.standard_normal(vocab).astype(np.float32)
    tied_row = np.full(vocab, -3.0, np.float32)
    tied_row[[7, 100, 201, 299]] = [2.0, 1.0, 0.0, 0.0]  # k-th value 0.0 shared by two
    tied_row[[50, 150]] = 0.0
    for row in (clean_row, tied_row):
        logits = jnp.tile(jnp.asarray(row), (batch, 1))
        keys = decoding.row_keys(jax.random.PRNGKey(7), batch)
        draws = np.asarray(jax.jit(functools.partial(
                decoding.sample_tokens, top_k=top_k, top_p=top_p))(keys, logits))
        want = top_k_top_p_reference(row, top_k, top_p)
        freq = np.bincount(draws, minlength=vocab) / batch
        np.testing.assert_array_equal(freq > 0, want > 0)
        np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / batch))
    assert (top_k_top_p_reference(tied_row, top_k, top_p) > 0).sum() == 6
    mixed = np.stack([clean_row, tied_row] * 8)
    keys = decoding.row_keys(jax.random.PRNGKey(8), 16)
    fn = jax.jit(functools.partial(decoding.sample_tokens, top_k=top_k, top_p=top_p))
    alone = np.asarray(fn(keys, jnp.asarray(np.stack([clean_row] * 16))))
    np.testing.assert_array_equal(np.asarray(fn(keys, jnp.asarray(mixed)))[::2], alone[::2])
