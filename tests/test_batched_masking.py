"""The batched masks (ssr_jax.data.batched_masking, numpy) against the per-example TF code:
the Philox twins number for number, both masks row for row, and the preprocessors example
for example (same seed, same examples; documents empty, chunked and grouped)."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from ssr_jax.data import span_corruption as sc  # noqa: E402
from ssr_jax.data import ssr_preprocessors as sp  # noqa: E402
from ssr_jax.errors import UserError  # noqa: E402

VOCAB_SIZE = VS = 4100  # a vocabulary whose top 100 ids are sentinels


def random_seeds(rng, n, dtype):
    info = np.iinfo(dtype)
    seeds = rng.integers(info.min, info.max, size=(n, 2), dtype=dtype, endpoint=True)
    seeds[:3] = [[0, 0], [-1, -1], [info.min, info.max]]
    return seeds


def test_philox_twins_match_tf_stateless_ops():
    from ssr_jax.data import philox
    rng = np.random.default_rng(7)
    for dtype in (np.int32, np.int64):
        seeds = random_seeds(rng, 12, dtype)
        uniform = philox.uniform_float32(seeds, 37)
        tail = philox.uniform_float32(seeds, 9, first=13)
        ints = philox.uniform_int(seeds, 5, -1, 2)
        split = philox.split(seeds, 3)
        pois = philox.poisson(seeds, 60, 3.0)
        pois_odd = philox.poisson(seeds, 20, 2.7123)
        assert split.dtype == dtype
        for i, seed in enumerate(seeds):
            s = tf.constant(seed)
            ref = tf.random.stateless_uniform([37], s).numpy()
            np.testing.assert_array_equal(uniform[i], ref)
            np.testing.assert_array_equal(tail[i], ref[13:22])
            np.testing.assert_array_equal(
                ints[i], tf.random.stateless_uniform([5], s, -1, 2, tf.int32).numpy())
            np.testing.assert_array_equal(
                split[i], tf.random.experimental.stateless_split(s, 3).numpy())
            np.testing.assert_array_equal(
                pois[i], tf.random.stateless_poisson([60], s, 3.0, tf.int32).numpy())
            np.testing.assert_array_equal(
                pois_odd[i], tf.random.stateless_poisson([20], s, 2.7123, tf.int32).numpy())
    with pytest.raises(ValueError, match="rates"):
        philox.poisson(seeds, 3, 12.0)


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.3, 2.0)])
def test_batched_corruption_equals_per_example(density, mean_span):
    from ssr_jax.data import batched_masking as bm
    rng = np.random.default_rng(int(density * 100))
    lengths = rng.integers(1, 600, 24)
    lengths[:4] = [1, 2, 3, 568]
    seeds = np.stack([random_seeds(rng, 24, np.int64), random_seeds(rng, 24, np.int64)], 1)
    tokens = np.zeros((24, lengths.max()), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(3, VOCAB_SIZE - 100, n)
    mask = bm.t5_noise_mask(lengths, seeds, density, mean_span)
    inputs, in_len, targets, tgt_len = bm.corrupt_batch(tokens, lengths, seeds, VOCAB_SIZE,
                                                        density, mean_span)
    in_off, tgt_off = np.cumsum(in_len) - in_len, np.cumsum(tgt_len) - tgt_len
    for i, n in enumerate(lengths):
        s = [tf.constant(seeds[i, 0]), tf.constant(seeds[i, 1])]
        ref = sc.random_spans_noise_mask(int(n), s, density, mean_span).numpy()
        np.testing.assert_array_equal(mask[i, :n], ref)
        assert not mask[i, n:].any()
        ref_in, ref_tgt = sc.corrupt_segment(tf.constant(tokens[i, :n]), s, VOCAB_SIZE,
                                             density, mean_span)
        np.testing.assert_array_equal(inputs[in_off[i]:in_off[i] + in_len[i]], ref_in.numpy())
        np.testing.assert_array_equal(targets[tgt_off[i]:tgt_off[i] + tgt_len[i]],
                                      ref_tgt.numpy())


class _Vocab:
    """What the preprocessors read of a vocabulary."""
    vocab_size, extra_ids = VOCAB_SIZE, 100


def synthetic_documents(n=260, seed=0):
    """Tokenized documents of 0-299 tokens (some empty), as a seqio source would give them
    (dense variable-length 'targets' and another feature)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, VOCAB_SIZE - 100, int(rng.integers(0, 300))).astype(np.int32)
            for _ in range(n)]
    docs[3] = docs[3][:0]
    docs[10] = docs[10][:0]
    ids = tf.data.Dataset.range(n)
    return tf.data.Dataset.zip((ids, tf.data.Dataset.from_generator(
        lambda: iter(docs), output_signature=tf.TensorSpec([None], tf.int32)))).map(
            lambda i, d: {"targets": d, "id": i})


def preprocessed(prep, seed, take=-1, **kwargs):
    import seqio
    feats = {"targets": seqio.Feature(_Vocab()), "inputs": seqio.Feature(_Vocab())}
    with seqio.map_seed_manager(seed):
        ds = prep(synthetic_documents(), output_features=feats, **kwargs)
    return [{k: v.tolist() for k, v in ex.items()} for ex in ds.take(take).as_numpy_iterator()]


@pytest.mark.parametrize("max_chunk_tokens", [sc.MAX_CHUNK_TOKENS, 50])
def test_batched_span_corruption_gives_the_per_example_examples(max_chunk_tokens):
    """Same seed, same examples: empty documents, chunks of long documents (50 tokens: most
    documents have several), groups of 128 and the short last ones of a finite stream."""
    lengths = {"inputs": 128, "targets": 29}
    kw = dict(sequence_length=lengths, max_chunk_tokens=max_chunk_tokens)
    batched = preprocessed(sc.span_corruption, 5, mask_batch_size=16, **kw)
    reference = preprocessed(sc.span_corruption, 5, mask_batch_size=0, **kw)
    assert len(batched) > 50 and batched == reference
    assert preprocessed(sc.span_corruption, 6, mask_batch_size=16, **kw) != batched


def test_mask_batch_size_is_checked():
    for bad in (-1, True, 2.5, "128"):
        with pytest.raises(UserError, match="mask_batch_size"):
            sc.check_mask_batch_size(bad)


@pytest.mark.parametrize("scheme,slot,span_rate,dtype", [
        ("paper", (128, 32), 0.075, np.int32), ("paper", (512, 114), 0.075, np.int64),
        ("paper", None, 0.2, np.int64), ("t5", (512, 114), 0.075, np.int64)])
def test_batched_mask_equals_per_example(scheme, slot, span_rate, dtype):
    """numpy span ids and layout of a batch of segments == the TF mask of each segment, for
    the same seeds; slot None: 40 crowded tokens (20% span rate) where the retries bind."""
    from ssr_jax.data import batched_masking as bm
    config = sp.SsrMaskConfig(scheme=scheme, span_rate=span_rate)
    lengths = (sp.ssr_lengths(*slot, config) if slot else sp.SsrLengths(40, 1000, 1000, 99))
    rng = np.random.default_rng(len(scheme) + lengths.raw_length)
    rows, n = 32, lengths.raw_length
    seg = np.where(np.arange(rows) < rows // 2, n, rng.integers(1, n + 1, rows))
    seg[-1] = 1  # a one-token segment gets no span: the batch drops it, as the filter does
    tokens = np.zeros((rows, n), np.int32)
    for i, m in enumerate(seg):
        tokens[i, :m] = rng.integers(3, 4000, m)
    info = np.iinfo(dtype)
    seeds = rng.integers(info.min, info.max, (rows, 2, 2), dtype=dtype, endpoint=True)
    ids = (bm.paper_span_ids(seg, seeds[:, 0], config, lengths) if scheme == "paper"
           else bm.t5_span_ids(seg, seeds, config))
    out = bm.ssr_mask_batch(tokens, seg, seeds, VS, config, lengths)
    seed_spec = tf.TensorSpec([2], tf.as_dtype(dtype))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), seed_spec, seed_spec])
    def reference(t, s0, s1):
        got = dict(sp.mask_segment(t, [s0, s1], VS, config, lengths))
        if scheme == "paper":
            got["ids"] = sp.paper_span_ids(tf.size(t), s0, config, lengths)
        return got

    kept = 0
    for i, m in enumerate(seg):
        ref = reference(tokens[i, :m], seeds[i, 0], seeds[i, 1])
        if scheme == "paper":
            np.testing.assert_array_equal(ids[i, :m], ref["ids"].numpy())
        if int(ref["num_spans"]) == 0:
            continue
        for k in ("inputs", "targets"):
            start = out[k + "_len"][:kept].sum()
            np.testing.assert_array_equal(out[k][start:start + out[k + "_len"][kept]],
                                          ref[k].numpy())
        assert out["num_spans"][kept] == ref["num_spans"]
        assert out["masked_length"][kept] == ref["masked_length"]
        kept += 1
    assert kept == len(out["num_spans"]) >= rows // 2


@pytest.mark.parametrize("config", [sp.SsrMaskConfig(), sp.SsrMaskConfig(scheme="t5")])
def test_batched_ssr_mask_gives_the_per_example_examples(config):
    """Same seed, same SSR examples from documents (empty ones, chunked long ones) on both
    paths."""
    kw = dict(sequence_length={"inputs": 128, "targets": 32}, config=config,
              max_chunk_tokens=200)
    batched = preprocessed(sp.ssr_mask, 3, mask_batch_size=16, **kw)
    reference = preprocessed(sp.ssr_mask, 3, mask_batch_size=0, **kw)
    assert len(batched) > 50 and batched == reference
    assert all(ex["num_spans"] > 0 for ex in batched)


def test_long_poisson_means_keep_the_per_example_mask():
    """The numpy Poisson twin stops at mean 10 (TF leaves Knuth's method there): such a
    paper mask runs the per-example path, whatever mask_batch_size says."""
    kw = dict(sequence_length={"inputs": 128, "targets": 64},
              config=sp.SsrMaskConfig(mean_span_length=12.0))
    got = preprocessed(sp.ssr_mask, 3, take=20, **kw)
    assert got == preprocessed(sp.ssr_mask, 3, take=20, mask_batch_size=0, **kw)
    assert np.mean([ex["masked_length"] / ex["num_spans"] for ex in got]) > 6


def test_bench_masking_rows_against_a_hand_count():
    """bench/input_pipeline.py's consumer (T5 1.1 base on one H100 at 45% MFU) and its
    ratio and cores columns, against the matmul count written out for that model."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import input_pipeline as ip  # pylint: disable=import-outside-toplevel
    d, inner, ff, vocab, layers, s, t = 768, 12 * 64, 2048, 32128, 12, 512, 114
    encoder = s * (4 * d * inner + 3 * d * ff) + 2 * s * s * inner
    decoder = t * (8 * d * inner + 3 * d * ff) + 2 * t * t * inner + 2 * t * s * inner
    train = 3 * 2 * (layers * (encoder + decoder) + t * d * vocab)
    need = 0.45 * 989e12 / train
    assert ip.consumer_examples_per_s({"inputs": 512, "targets": 114}) == pytest.approx(need)
    rates = {"span corruption 512/114": {"per-example": [90.0, 110.0, 100.0],
                                         "batched": [400.0, 420.0, 380.0]}}
    rows, data, _ = ip.masking_rows(rates, 1e5, 60.0)
    assert rows[1][3] == "4.0x" and rows[1][6] == f"{need / 400:.2f}"
    assert data["span corruption 512/114 batched"]["cores"] == pytest.approx(need / 400)
