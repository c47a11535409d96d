"""T5 span corruption against a from-definition reference (no t5 import)."""
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ssr_jax.data import span_corruption as sc  # noqa: E402
from ssr_jax.errors import UserError  # noqa: E402

VOCAB_SIZE = 4100  # a vocabulary whose top 100 ids are sentinels


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One embedded-corpus build shared by every test file of the session."""
    path = os.environ.get("SSR_JAX_DATA_DIR") or str(tmp_path_factory.getbasetemp() / "ssr_data")
    os.environ["SSR_JAX_DATA_DIR"] = path
    return path


# ---- reference, from the definition ---------------------------------------------------

def ref_counts(length, density=0.15, mean_span=3.0):
    length = max(length, 2)
    noise = int(np.clip(np.round(length * density), 1, length - 1))  # half to even
    return noise, max(int(np.round(noise / mean_span)), 1)


def ref_runs(mask):
    """[(is_noise, run_length)] of consecutive equal values."""
    runs = []
    for m in mask:
        if runs and runs[-1][0] == m:
            runs[-1][1] += 1
        else:
            runs.append([m, 1])
    return [(bool(a), b) for a, b in runs]


def ref_sentinelize(tokens, span_mask):
    """Each maximal run of True -> one sentinel, the i-th being VOCAB_SIZE - 1 - i."""
    out, i, prev = [], 0, False
    for tok, m in zip(tokens, span_mask):
        if m and not prev:
            out.append(VOCAB_SIZE - 1 - i)
            i += 1
        elif not m:
            out.append(tok)
        prev = m
    return out


def seeds(a, b=0):
    return [tf.constant([a, b], tf.int32), tf.constant([a + 7, b + 3], tf.int32)]


# ---- tests ---------------------------------------------------------------------------

def test_raw_length_arithmetic():
    assert sc.span_corruption_lengths(512) == (568, 114)
    for inputs_length in (16, 64, 128, 256, 512, 1024):
        raw, targets = sc.span_corruption_lengths(inputs_length)
        noise, spans = ref_counts(raw)
        assert raw - noise + spans + 1 == inputs_length or (
            raw - noise + spans + 1 < inputs_length
            and (raw + 1) - ref_counts(raw + 1)[0] + ref_counts(raw + 1)[1] + 1 > inputs_length)
        assert targets == noise + spans + 1
        assert sc.noise_counts(raw) == (noise, spans)


def test_noise_mask_matches_definition_on_random_lengths():
    rng = np.random.default_rng(0)
    mask_fn = tf.function(lambda n, s0, s1: sc.random_spans_noise_mask(n, [s0, s1]),
                          input_signature=[tf.TensorSpec([], tf.int32),
                                           tf.TensorSpec([2], tf.int32),
                                           tf.TensorSpec([2], tf.int32)])
    for trial in range(60):
        length = int(rng.integers(2, 600))
        s = seeds(trial, length)
        mask = mask_fn(tf.constant(length), s[0], s[1]).numpy()
        noise, spans = ref_counts(length)
        assert mask.shape == (length,)
        assert mask.sum() == noise
        runs = ref_runs(mask)
        assert not runs[0][0], "interleaving starts with non-noise"
        assert sum(1 for is_noise, _ in runs if is_noise) == spans
        assert sum(1 for is_noise, _ in runs if not is_noise) == spans
        assert all(n > 0 for _, n in runs)


def test_sentinel_layout_and_reconstruction():
    rng = np.random.default_rng(1)
    spec = [tf.TensorSpec([None], tf.int32), tf.TensorSpec([2], tf.int32),
            tf.TensorSpec([2], tf.int32)]
    mask_fn = tf.function(lambda n, s0, s1: sc.random_spans_noise_mask(n, [s0, s1]),
                          input_signature=[tf.TensorSpec([], tf.int32)] + spec[1:])
    fn = tf.function(lambda t, s0, s1: sc.corrupt_segment(t, [s0, s1], VOCAB_SIZE),
                     input_signature=spec)
    for trial in range(30):
        length = int(rng.integers(2, 300))
        tokens = rng.integers(3, VOCAB_SIZE - 100, size=length).astype(np.int32)
        s = seeds(100 + trial)
        inputs, targets = (x.numpy().tolist() for x in fn(tokens, s[0], s[1]))
        mask = mask_fn(tf.constant(length), s[0], s[1]).numpy()
        assert inputs == ref_sentinelize(tokens.tolist(), mask)
        assert targets == ref_sentinelize(tokens.tolist(), ~mask)
        # Sentinels count down from the top: <extra_id_0> = VOCAB_SIZE - 1.
        sent_in = [t for t in inputs if t >= VOCAB_SIZE - 100]
        assert sent_in == [VOCAB_SIZE - 1 - i for i in range(len(sent_in))]
        # Merging inputs and targets by sentinel gives the original back.
        pieces_t, cur = {}, None
        for t in targets:
            if t >= VOCAB_SIZE - 100:
                cur = t
                pieces_t[cur] = []
            else:
                pieces_t[cur].append(t)
        merged = []
        for t in inputs:
            merged.extend(pieces_t[t] if t >= VOCAB_SIZE - 100 else [t])
        assert merged == tokens.tolist()


def test_same_seed_same_mask_different_seed_differs():
    a = sc.random_spans_noise_mask(200, seeds(5)).numpy()
    b = sc.random_spans_noise_mask(200, seeds(5)).numpy()
    np.testing.assert_array_equal(a, b)
    others = [sc.random_spans_noise_mask(200, seeds(6 + i)).numpy() for i in range(5)]
    assert all((a != o).any() for o in others)


def test_span_lengths_average_mean_noise_span_length():
    lengths = []
    for i in range(100):
        runs = ref_runs(sc.random_spans_noise_mask(500, seeds(200 + i)).numpy())
        lengths += [n for is_noise, n in runs if is_noise]
    assert abs(np.mean(lengths) - 75 / 25) < 1e-9  # 75 noise tokens in 25 spans, always
    assert len(set(lengths)) > 3  # random composition, not fixed-length spans


def test_sentinel_budget_is_checked():
    class Vocab:
        extra_ids = 100
    with pytest.raises(UserError, match="extra ids"):
        sc.check_sentinel_budget(Vocab(), 150, "span corruption")


def test_task_reconstructs_validation_stream(data_dir):
    import seqio
    import tasks

    vocab = tasks.default_vocabulary()
    task = seqio.get_mixture_or_task("ssr_default_span_corruption")
    lengths = {"inputs": 128, "targets": 29}
    ds = task.get_dataset(lengths, split="validation", shuffle=False, seed=3)
    examples = list(ds.as_numpy_iterator())
    assert len(examples) > 50
    stream = []
    for i, ex in enumerate(examples):
        inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
        assert inputs[-1] == 1 and targets[-1] == 1  # EOS
        assert len(inputs) <= 128 and len(targets) <= 29
        pieces, cur = {}, None
        for t in targets[:-1]:
            if t >= vocab.vocab_size - 100:
                cur, pieces[t] = t, []
            else:
                pieces[cur].append(t)
        for t in inputs[:-1]:
            stream.extend(pieces.get(t, []) if t >= vocab.vocab_size - 100 else [t])
    full = sum(len(ex["inputs"]) == 128 for ex in examples)
    assert full >= len(examples) - 3  # only the last segment of each 128-doc group is short
    docs = task.source.get_dataset("validation", shuffle=False)
    expected = []
    for doc in docs.as_numpy_iterator():
        expected.extend(vocab.encode(doc["text"].decode("utf-8")))
    assert stream == expected


def test_task_seeded_determinism(data_dir):
    import seqio
    import tasks  # noqa: F401

    task = seqio.get_mixture_or_task("ssr_default_span_corruption")

    def first(seed, n=8):
        # Unshuffled, so the seed acts through the preprocessing (chunking, noise) alone.
        ds = task.get_dataset({"inputs": 64, "targets": 16}, split="validation", shuffle=False,
                              seed=seed)
        return [ex["inputs"].tolist() for ex in ds.take(n).as_numpy_iterator()]

    assert first(1) == first(1)
    assert first(1) != first(2)
