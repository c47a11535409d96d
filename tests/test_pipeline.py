"""Packing correctness, pipeline state save/restore, per-host sharding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssr_jax.data import packing

LENGTHS = {"inputs": 64, "targets": 16}


def ex(n_in, n_tgt, base=10, **extra):
    out = {"inputs": np.arange(base, base + n_in, dtype=np.int32),
           "targets": np.arange(base + 100, base + 100 + n_tgt, dtype=np.int32)}
    out.update({k: np.int32(v) for k, v in extra.items()})
    return out


# ---- packing (pure numpy) -----------------------------------------------------------

def test_packing_layout():
    examples = [ex(5, 3, 10), ex(4, 2, 20), ex(6, 4, 30), ex(9, 1, 40)]
    # Row length 10/6: ex0+ex1 fit in row 0 (9/5); ex2 starts row 1; ex3 (9 inputs) row 2.
    batch, left = packing.pack_examples(examples, 3, 10, 6)
    assert left == []
    seg = batch["encoder_segment_ids"]
    np.testing.assert_array_equal(seg[0], [1] * 5 + [2] * 4 + [0])
    np.testing.assert_array_equal(seg[1], [1] * 6 + [0] * 4)
    np.testing.assert_array_equal(batch["encoder_positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(batch["encoder_input_tokens"][0][:9],
                                  list(range(10, 15)) + list(range(20, 24)))
    np.testing.assert_array_equal(batch["decoder_target_tokens"][0], [110, 111, 112, 120, 121, 0])
    # Shifted right per segment, each segment starting with 0.
    np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 110, 111, 0, 120, 0])
    np.testing.assert_array_equal(batch["decoder_segment_ids"][0], [1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(batch["decoder_positions"][0], [0, 1, 2, 0, 1, 0])
    np.testing.assert_array_equal(batch["decoder_loss_weights"][0], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["decoder_loss_weights"][2], [1, 0, 0, 0, 0, 0])
    for key in packing.BASE_KEYS + packing.PACKED_KEYS:
        assert batch[key].dtype == np.int32
    # Loss weights are zero exactly where the targets are padding.
    np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                  (batch["decoder_target_tokens"] != 0).astype(np.int32))


def test_pack_leftover_and_streaming_state():
    examples = [ex(6, 3, 10 * i) for i in range(1, 8)]
    batch, left = packing.pack_examples(examples, 2, 12, 6)  # 2 per row, 4 fit
    assert len(left) == 3 and left[0] is examples[4]
    packer = packing.StreamingPacker(2, 12, 6)
    it = iter(examples)
    first = packer.next_batch(it)
    for k in first:
        np.testing.assert_array_equal(first[k], batch[k])
    state = json.loads(json.dumps(packer.get_state()))
    assert state["pending"]["inputs"] == examples[4]["inputs"].tolist()
    rest = list(it)
    fresh = packing.StreamingPacker(2, 12, 6)
    fresh.set_state(state)
    a, b = packer.next_batch(iter(rest)), fresh.next_batch(iter(rest))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # The end of the stream gives a partial batch (3 examples in 2 rows), then stops.
    assert a["encoder_segment_ids"].max(axis=1).tolist() == [2, 1]
    with pytest.raises(StopIteration):
        packer.next_batch(iter([]))


def test_unpacked_rows_and_passthrough():
    examples = [ex(3, 2, 10, num_spans=4), ex(2, 2, 20, num_spans=7)]
    batch, left = packing.pack_examples(examples, 3, 8, 4, pack=False, passthrough=["num_spans"])
    assert not left and set(batch) == set(packing.BASE_KEYS) | {"num_spans"}
    np.testing.assert_array_equal(batch["num_spans"], [4, 7, 0])
    np.testing.assert_array_equal(batch["encoder_input_tokens"][1], [20, 21, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["decoder_input_tokens"][0], [0, 110, 0, 0])
    assert batch["decoder_loss_weights"][2].sum() == 0


def test_prefetcher_returns_unconsumed_items_in_order_and_raises_the_end():
    from ssr_jax.data.prefetch import Prefetcher
    source = iter(range(10))
    fetch = Prefetcher(lambda: source, depth=2, end_message="no more numbers")
    assert [fetch.get(), fetch.get()] == [0, 1]
    kept = fetch.halt()  # whatever was read ahead comes back, nothing is lost
    assert kept == list(range(2, 2 + len(kept))) and len(kept) >= 1
    rest = [fetch.get() for _ in range(10 - 2 - len(kept))]
    assert kept + rest == list(range(2, 10))
    with pytest.raises(StopIteration, match="no more numbers"):
        fetch.get()

    def failing():
        yield 1
        raise ValueError("broken source")
    fetch = Prefetcher(failing)
    assert fetch.get() == 1
    with pytest.raises(ValueError, match="broken source"):
        fetch.get()
    assert fetch.halt() == []


def test_too_long_example_is_an_error():
    with pytest.raises(packing.ExampleTooLongError):
        packing.pack_examples([ex(9, 2)], 2, 8, 4)


# ---- InputPipeline on the embedded corpus ---------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = os.environ.get("SSR_JAX_DATA_DIR") or str(tmp_path_factory.getbasetemp() / "ssr_data")
    os.environ["SSR_JAX_DATA_DIR"] = path
    import tasks  # noqa: F401
    return path


def make(task="ssr_default_span_corruption", **kw):
    from ssr_jax.data.pipeline import InputPipeline
    args = dict(split="train", task_feature_lengths=LENGTHS, batch_size=4, seed=5)
    args.update(kw)
    return InputPipeline(task, **args)


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pipeline_batches_and_state_roundtrip(data_dir):
    pipe = make()
    first = [next(pipe) for _ in range(3)]
    assert first[0]["encoder_input_tokens"].shape == (4, 64)
    assert set(first[0]) == set(packing.BASE_KEYS) | set(packing.PACKED_KEYS)
    state = json.loads(json.dumps(pipe.get_state()))
    light = pipe.get_state(include_iterator=False)
    expected = [next(pipe) for _ in range(3)]
    for restore in (state, light):
        other = make()
        other.set_state(restore)
        got = [next(other) for _ in range(3)]
        assert all(same(x, y) for x, y in zip(expected, got))
    # Same seed: same stream; another seed: another one, which refuses this state.
    again = make()
    assert all(same(x, next(again)) for x in first)
    other_seed = make(seed=6)
    assert not same(first[0], next(other_seed))
    with pytest.raises(Exception, match="other settings"):
        other_seed.set_state(state)


def test_pipeline_restore_in_a_new_process(data_dir, tmp_path):
    pipe = make(task="ssr_default_ssr_masked")
    next(pipe)
    with open(tmp_path / "state.json", "w") as f:
        json.dump(pipe.get_state(), f)
    expected = next(pipe)
    script = (
        "import json, sys, numpy as np\n"
        "import tasks\n"
        "from ssr_jax.data.pipeline import InputPipeline\n"
        f"p = InputPipeline('ssr_default_ssr_masked', 'train', {LENGTHS!r}, 4, seed=5)\n"
        f"p.set_state(json.load(open({str(tmp_path / 'state.json')!r})))\n"
        f"np.savez({str(tmp_path / 'next.npz')!r}, **next(p))\n")
    env = dict(os.environ, SSR_JAX_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    got = dict(np.load(tmp_path / "next.npz"))
    assert same(expected, got)


def test_shards_are_disjoint(data_dir):
    rows = []
    for index in range(2):
        pipe = make(split="validation", shard_info=(index, 2), shuffle=False, repeat=False,
                    pack=False, batch_size=16)
        rows.append({tuple(r[r > 0].tolist()) for b in pipe for r in b["encoder_input_tokens"]
                     if r.any()})
    assert len(rows[0]) > 20 and len(rows[1]) > 20
    assert not rows[0] & rows[1]


def test_unpacked_ssr_batches_carry_num_spans(data_dir):
    pipe = make(task="ssr_default_ssr_masked", pack=False, batch_size=8)
    batch = next(pipe)
    assert batch["num_spans"].shape == (8,) and (batch["num_spans"] > 0).all()
    # The student target ends with <extra_id_n>, n = num_spans, then EOS.
    import tasks
    vs = tasks.default_vocabulary().vocab_size
    for row, n in zip(batch["decoder_target_tokens"], batch["num_spans"]):
        row = row[row > 0]
        assert row[-1] == 1 and row[-2] == vs - 1 - n
    examples = pipe.next_examples(5)
    assert len(examples) == 5 and "num_spans" in examples[0]
