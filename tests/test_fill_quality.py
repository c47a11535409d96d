"""The teacher's fill quality on held-out masked examples: exact counts for a teacher whose
outputs the test chooses, and the real sampler's fills recounted by the test's own loop."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssr_jax.data.dataset import DatasetConfig
from ssr_jax.data.pipeline import InputPipeline
from ssr_jax.data.ssr_preprocessors import teacher_decode_lengths
from ssr_jax.errors import UserError
from ssr_jax.models.base import DecodeConfig
from ssr_jax.partitioning import Partitioner
from ssr_jax.ssr import fill_quality
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import teacher as tl
from ssr_jax.train import checkpoints
from ssr_jax import vocab as vocab_lib
from test_teacher import SMALL, VOCAB, random_params

LENGTHS = {"inputs": 64, "targets": 16}  # slots of 32 / 8 with examples_per_row = 2
VS, LO = 4100, 4000  # the default vocabulary's size and its lowest sentinel


def X(k):
    return VS - 1 - k


def dataset(batch_size=4):
    return DatasetConfig("ssr_default_ssr_masked", LENGTHS, split="validation",
                         batch_size=batch_size, shuffle=False, module="tasks")


def held_out(count):
    """The first `count` masked validation examples in the slots, read independently."""
    pipe = InputPipeline("ssr_default_ssr_masked", "validation",
                         {"inputs": 32, "targets": 8}, 8, seed=0, shuffle=False, pack=False,
                         repeat=False)
    return pipe.next_examples(count)


def original_spans(target):
    spans, cur = [], []
    for t in target.tolist():
        if LO <= t < VS:
            spans.append(cur)
            cur = []
        elif t != 1:
            cur.append(t)
    return spans


def kind_of(teacher_input):
    """The test's rule: 0 perfect fills, 1 span 0 empty, 2 output cut before <x_n> (the
    last span has no fill), 3 nothing at all."""
    return int(np.asarray(teacher_input).sum()) % 4


class ChosenTeacher:
    """Test stub: writes, for each teacher input, the output its kind_of asks for."""

    def __init__(self, max_len):
        self.decode = DecodeConfig(method="sample", max_decode_length=max_len)
        self.table = {}

    def learn(self, examples):
        for ex in examples:
            spans = original_spans(ex["targets"])
            kind = kind_of(ex["inputs"])
            out = []
            for k, span in enumerate(spans):
                out += [X(k)] + ([] if kind == 1 and k == 0 else span)
            out += [] if kind == 2 else [X(len(spans))]
            self.table[ex["inputs"].tobytes()] = [] if kind == 3 else out

    def generate(self, inputs, keys, stops, lens):
        x = np.asarray(inputs)
        out = np.zeros((x.shape[0], self.decode.max_decode_length), np.int32)
        for b, row in enumerate(x):
            if row.any():  # padding rows of a last, short step
                got = self.table[stage_lib.strip_pad(row).tobytes()]
                out[b, :len(got)] = got
        return jnp.asarray(out)


def test_counts_equal_the_chosen_outputs(vocabulary):
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    examples = held_out(24)  # 20 asked for: three teacher batches of 8
    assert len(examples) == 24
    teacher = ChosenTeacher(16)
    teacher.learn(examples)
    source = stage_lib.TeacherRewrite(teacher, partitioner, (32, 8), vocabulary, seed=0,
                                      fill_ratio=2.0)
    got = fill_quality.measure_source(source, dataset(), partitioner, 20)
    # The expected counts, from the rule alone.
    want = dict(examples=0, spans=0, nonempty_fills=0, empty_fills=0, fallbacks=0, complete=0)
    for ex in examples:
        n, kind = int(ex["num_spans"]), kind_of(ex["inputs"])
        want["examples"] += 1
        want["spans"] += n
        want["complete"] += kind == 0
        if kind == 0:
            want["nonempty_fills"] += n
        elif kind in (1, 2):
            want["nonempty_fills"] += n - 1
            want["empty_fills" if kind == 1 else "fallbacks"] += 1
        else:
            want["fallbacks"] += n
    assert {0, 1, 2, 3} == {kind_of(ex["inputs"]) for ex in examples}
    complete = want.pop("complete")
    assert {k: got[k] for k in want} == want
    assert got["truncated"] == 0 and got["dropped_examples"] == 0
    assert got["valid_nonempty_share"] == want["nonempty_fills"] / want["spans"]
    assert got["empty_share"] == want["empty_fills"] / want["spans"]
    assert got["fallback_share"] == want["fallbacks"] / want["spans"]
    assert got["complete_example_share"] == complete / want["examples"]
    assert got["exact_copy_share"] == 1.0  # every non-empty fill is the original span
    # The paper's policy drops the incomplete examples and counts them; the shares stay.
    dropping = stage_lib.TeacherRewrite(teacher, partitioner, (32, 8), vocabulary, seed=0,
                                        fill_ratio=2.0, malformed="drop_example")
    dropped = fill_quality.measure_source(dropping, dataset(), partitioner, 20)
    assert dropped["dropped_examples"] == want["examples"] - complete
    assert dropped["valid_nonempty_share"] == got["valid_nonempty_share"]
    with pytest.raises(UserError, match="num_examples"):
        fill_quality.measure_source(source, dataset(), partitioner, 0)


def count_fills(teacher_input, output):
    """The test's own count of one teacher output: (non-empty, empty, missing) spans, a span
    k filled by the first `<x_k> ... <x_k+1>` with no sentinel between, before EOS/pad."""
    n = sum(LO <= t < VS for t in teacher_input.tolist())
    out = []
    for t in output.tolist():
        if t in (0, 1) or t >= VS:
            break
        out.append(t)
    marks = [(i, VS - 1 - t) for i, t in enumerate(out) if LO <= t < VS]
    fills = {}
    for (i, k), (j, k2) in zip(marks, marks[1:]):
        if k2 == k + 1 and k not in fills:
            fills[k] = j - i - 1
    nonempty = sum(1 for k in range(n) if fills.get(k, 0) > 0)
    empty = sum(1 for k in range(n) if fills.get(k) == 0)
    return nonempty, empty, n - nonempty - empty


@pytest.fixture(scope="module")
def chain_teacher_dir(tmp_path_factory, vocabulary):
    """A T5 checkpoint whose decoder is a Markov chain over its previous token (its
    attention and MLP outputs zeroed, logits = weights x that token's unit embedding): after
    `<x_k>` it samples a word (a non-empty fill), `<x_k+1>` (an empty fill) or `<x_k+2>` (a
    skipped sentinel, so span k has no fill); after the word, `<x_k+1>`. Sampling gives
    every kind of span, and different keys give different fills."""
    params = random_params(SMALL, seed=4)
    dec = params["decoder"]
    for block, name in (("self_attention", "out"), ("encoder_decoder_attention", "out"),
                        ("mlp", "wo")):
        dec["layers_0"][block][name]["kernel"][:] = 0.0
    chain = [(0, X(0), 2.0)]  # the decoder starts from token 0
    for k in range(6):
        word = 100 + k
        chain += [(X(k), word, 2.0), (X(k), X(k + 1), 1.9), (X(k), X(k + 2), 1.85),
                  (word, X(k + 1), 2.0)]
    # The chain's tokens get orthogonal embeddings of RMS 1: the RMS-normed decoder state is
    # the previous token's embedding, so logits are exactly weight x sqrt(d_model).
    tokens = sorted({t for prev, nxt, _ in chain for t in (prev, nxt)})
    basis = np.linalg.qr(np.random.RandomState(0).standard_normal((SMALL.d_model,) * 2))[0]
    emb = params["token_embedder"]["embedding"]
    for i, t in enumerate(tokens):
        emb[t] = basis[i] * np.sqrt(SMALL.d_model)
    kernel = np.zeros_like(dec["logits_dense"]["kernel"])
    for prev, nxt, weight in chain:
        kernel[:, nxt] += weight * basis[tokens.index(prev)]
    dec["logits_dense"]["kernel"] = kernel
    root = tmp_path_factory.mktemp("chain_teacher")
    checkpoints.save_params(os.path.join(root, "1"), params, dataclasses.asdict(SMALL))
    vocab_lib.write_vocab_record(str(root), vocabulary)
    return str(root)


def test_real_teacher_fills_recounted(chain_teacher_dir, vocabulary):
    """measure_fills with a checkpoint equals the test's own loop: the same examples, keys,
    stop tokens and decode lengths into the teacher's sampler, counted by count_fills."""
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    cfg = tl.TeacherConfig(chain_teacher_dir, seed=3)
    got = fill_quality.measure_fills(cfg, dataset(), partitioner, 16, student_vocab_size=VOCAB)
    examples = held_out(16)
    max_len = tl.static_decode_length(32, 8, 2.0)
    teacher = tl.Teacher.load(cfg, partitioner, vocabulary, max_len, VOCAB)

    def recount(seed):
        want, complete = np.zeros(3, int), 0
        for batch in (examples[:8], examples[8:]):
            x = stage_lib.pad_rows([ex["inputs"] for ex in batch], 32)
            n = np.array([int(ex["num_spans"]) for ex in batch])
            m = np.array([int(ex["masked_length"]) for ex in batch])
            lens = np.clip(teacher_decode_lengths((x > 0).sum(1), n, m, 32, 2.0), 1, max_len)
            g = partitioner.make_global_batch({"x": x, "keys": tl.example_keys(x, seed),
                                               "stops": tl.stop_tokens(n, VS),
                                               "lens": lens.astype(np.int32)})
            outputs = np.asarray(teacher.generate(g["x"], g["keys"], g["stops"], g["lens"]))
            for ex, out in zip(batch, outputs):
                counts = np.array(count_fills(ex["inputs"], out))
                want += counts
                complete += counts[0] == int(ex["num_spans"])
        return want, complete

    want, complete = recount(3)
    spans = int(sum(int(ex["num_spans"]) for ex in examples))
    assert got["examples"] == 16 and got["spans"] == spans == want.sum()
    assert (want > 0).all(), want  # non-empty, empty and missing fills all occur
    assert (got["nonempty_fills"] + got["truncated"], got["empty_fills"],
            got["fallbacks"]) == tuple(want.tolist())
    assert got["valid_nonempty_share"] == pytest.approx(want[0] / spans)
    assert got["complete_example_share"] == pytest.approx(complete / 16)
    assert got["valid_nonempty_share"] + got["empty_share"] + got["fallback_share"] == \
        pytest.approx(1.0)
    assert tuple(recount(4)[0]) != tuple(want)  # the count would see other keys
