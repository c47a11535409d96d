"""Task registrations, the embedded corpus, user-file factories and bad input."""
import json
import logging
import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import seqio  # noqa: E402

from ssr_jax.errors import UserError  # noqa: E402

LENGTHS = {"inputs": 64, "targets": 16}
TEXT = ("Return a new sorted list from the items in iterable. A custom key function can be "
        "supplied to customize the sort order, and the reverse flag can be set to request the "
        "result in descending order.")


@pytest.fixture(scope="module")
def tasks_module(tmp_path_factory):
    path = os.environ.get("SSR_JAX_DATA_DIR") or str(tmp_path_factory.getbasetemp() / "ssr_data")
    os.environ["SSR_JAX_DATA_DIR"] = path
    import tasks
    return tasks


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def pipeline(name, split="train", **kw):
    from ssr_jax.data.pipeline import InputPipeline
    args = dict(task_feature_lengths=LENGTHS, batch_size=4, seed=0)
    args.update(kw)
    return InputPipeline(name, split, **args)


def all_examples(name, split="train", lengths=LENGTHS):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(lengths, split=split, shuffle=False, seed=0)
    return list(ds.as_numpy_iterator())


def test_registered_names_and_vocabulary(tasks_module):
    names = set(seqio.TaskRegistry.names())
    for name in ("ssr_default_span_corruption", "ssr_default_ssr_masked", "c4_span_corruption",
                 "c4_ssr_masked", "cnn_dailymail_v3", "xsum", "squad_question_generation",
                 "ssr_default_docstring_summary"):
        assert name in names
    vocab = tasks_module.default_vocabulary()
    assert vocab.vocab_size == 4100 and vocab.extra_ids == 100
    assert tasks_module.default_model_vocab_size() == 4224
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.decode(vocab.encode(TEXT)) == TEXT
    for name in ("ssr_default_span_corruption", "ssr_default_ssr_masked", "c4_ssr_masked"):
        assert set(seqio.get_mixture_or_task(name).splits) >= {"train", "validation"}


def test_corpus_is_deterministic_and_split_by_hash(tasks_module):
    from ssr_jax.data import corpus
    docs = corpus.corpus_documents()
    assert len(docs["train"]) > 5000 and len(docs["validation"]) > 150
    assert sum(len(d["text"]) for d in docs["train"]) > 1_000_000
    for split, items in docs.items():
        assert all(corpus.split_of(d["text"]) == split for d in items[:500])
    texts = [d["text"] for d in docs["train"] + docs["validation"]]
    assert len(set(texts)) == len(texts)
    # The TFDS build holds exactly these documents.
    built = [ex["text"].decode() for ex in
             seqio.get_mixture_or_task("ssr_default_span_corruption").source.get_dataset(
                 "validation", shuffle=False).as_numpy_iterator()]
    assert sorted(built) == sorted(d["text"] for d in docs["validation"])


def test_docstring_summary_task(tasks_module):
    examples = all_examples("ssr_default_docstring_summary", "validation")
    assert len(examples) > 20
    vocab = tasks_module.default_vocabulary()
    for ex in examples[:10]:
        assert vocab.decode(ex["inputs"].tolist()).startswith("summarize: ")
        assert ex["targets"][-1] == 1 and len(ex["targets"]) > 1


def write(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_text_file_task_gives_training_batches(tasks_module, tmp_path, cache_dir):
    from ssr_jax.data import factories
    lines = [f"{TEXT} Document number {i}." for i in range(40)]
    train = write(tmp_path / "train.txt", "\n".join(lines).encode())
    valid = write(tmp_path / "valid.txt", "\n\n".join(lines[:5]).encode())
    for objective in ("span_corruption", "ssr_masked"):
        factories.register_text_task(f"user_{objective}", {"train": train, "validation": valid},
                                     tasks_module.default_vocabulary(), objective,
                                     cache_dir=cache_dir, overwrite=True)
        pipe = pipeline(f"user_{objective}")
        batch = next(pipe)
        assert batch["encoder_input_tokens"].shape == (4, 64)
        assert batch["decoder_target_tokens"].shape == (4, 16)
        assert batch["decoder_loss_weights"].sum() > 0
        for key, value in batch.items():
            assert value.dtype == np.int32, key
        vocab = tasks_module.default_vocabulary()
        text = vocab.decode(batch["encoder_input_tokens"][0].tolist())
        assert "<extra_id_0>" in text and ("sorted" in text or "iterable" in text
                                           or "Document" in text)
    # Paragraph mode: blank-line separated documents.
    factories.register_text_task("user_paragraphs", {"train": valid},
                                 tasks_module.default_vocabulary(),
                                 paragraphs=True,
                                 cache_dir=cache_dir, overwrite=True)
    source = seqio.get_mixture_or_task("user_paragraphs").source
    docs = [d["text"].decode() for d in source.get_dataset("train", shuffle=False)
            .as_numpy_iterator()]
    assert docs == lines[:5]


def test_empty_and_undecodable_files(tasks_module, tmp_path, cache_dir, caplog):
    from ssr_jax.data import factories
    empty = write(tmp_path / "empty.txt", b"")
    good = write(tmp_path / "good.txt", f"{TEXT}\nsecond line is fine\n".encode())
    bad = write(tmp_path / "bad.txt", b"first line ok\n\xff\xfe broken bytes\nthird ok\n")
    factories.register_text_task("bad_text", {"train": [empty, good, bad]},
                                 tasks_module.default_vocabulary(),
                                 cache_dir=cache_dir, overwrite=True)
    with caplog.at_level(logging.WARNING):
        source = seqio.get_mixture_or_task("bad_text").source
        docs = [d["text"].decode() for d in
                source.get_dataset("train", shuffle=False).as_numpy_iterator()]
    # Files are read in sorted path order: bad.txt, (empty.txt skipped), good.txt.
    assert docs == ["first line ok", "third ok", TEXT, "second line is fine"]
    log = caplog.text
    assert f"empty file {empty}" in log
    assert f"{bad}:2: not UTF-8" in log
    report = [f for f in os.listdir(cache_dir) if f.startswith("bad.txt") and
              f.endswith(".report.json")]
    with open(os.path.join(cache_dir, report[0])) as f:
        assert json.load(f)["bad"] == [f"{bad}:2: not UTF-8 (invalid start byte at byte 0)"]
    # strict: the first bad line is an error naming file and line.
    factories.register_text_task("bad_text_strict", {"train": bad},
                                 tasks_module.default_vocabulary(),
                                 strict=True,
                                 cache_dir=str(tmp_path / "strict"), overwrite=True)
    with pytest.raises(UserError, match=r"bad\.txt:2"):
        seqio.get_mixture_or_task("bad_text_strict").source.num_input_examples("train")
    # Nothing usable at all: an error, not an empty stream.
    factories.register_text_task("only_empty", {"train": empty}, tasks_module.default_vocabulary(),
                                 cache_dir=cache_dir,
                                 overwrite=True)
    with pytest.raises(UserError, match="no usable example"):
        seqio.get_mixture_or_task("only_empty").source.get_dataset("train")
    with pytest.raises(UserError, match="no file matches"):
        factories.register_text_task("missing", {"train": str(tmp_path / "nope*.txt")},
                                     tasks_module.default_vocabulary(),
                                     cache_dir=cache_dir, overwrite=True)
        seqio.get_mixture_or_task("missing").source.get_dataset("train")


def test_document_longer_than_any_length_is_split_not_cut(tasks_module, tmp_path, cache_dir):
    from ssr_jax.data import factories
    vocab = tasks_module.default_vocabulary()
    long_doc = " ".join(f"{TEXT} Item {i}." for i in range(30))
    tokens = vocab.encode(long_doc)
    assert len(tokens) > 10 * LENGTHS["inputs"]
    path = write(tmp_path / "long.txt", long_doc.encode())
    factories.register_text_task("long_doc", {"train": path}, tasks_module.default_vocabulary(),
                                 cache_dir=cache_dir,
                                 overwrite=True)
    examples = all_examples("long_doc")
    assert len(examples) > 10
    stream = []
    vs = vocab.vocab_size
    for ex in examples:
        assert len(ex["inputs"]) <= 64 and len(ex["targets"]) <= 16
        pieces, cur = {}, None
        for t in ex["targets"][:-1].tolist():
            if t >= vs - 100:
                cur, pieces[t] = t, []
            else:
                pieces[cur].append(t)
        for t in ex["inputs"][:-1].tolist():
            stream.extend(pieces.get(t, []) if t >= vs - 100 else [t])
    assert stream == tokens


def test_jsonl_task_reports_bad_lines_and_trains(tasks_module, tmp_path, cache_dir, caplog):
    from ssr_jax.data import factories, metrics
    rows = [json.dumps({"document": f"{TEXT} ({i})", "summary": f"sorting {i}"})
            for i in range(12)]
    rows.insert(3, json.dumps({"document": "no summary here"}))
    rows.insert(5, "{not json")
    rows.insert(7, json.dumps({"document": "x", "summary": 5}))
    path = write(tmp_path / "data.jsonl", "\n".join(rows).encode())
    factories.register_jsonl_task("user_summaries", {"train": path, "validation": path},
                                  tasks_module.default_vocabulary(),
                                  inputs_field="document", targets_field="summary",
                                  prefix="summarize: ", metric_fns=[metrics.rouge],
                                  cache_dir=cache_dir, overwrite=True)
    with caplog.at_level(logging.WARNING):
        examples = all_examples("user_summaries", "validation", {"inputs": 32, "targets": 8})
    assert len(examples) == 12
    assert f"{path}:4: missing field 'summary'" in caplog.text
    assert f"{path}:6: invalid JSON" in caplog.text
    assert f"{path}:8: field 'summary' is int" in caplog.text
    vocab = tasks_module.default_vocabulary()
    assert vocab.decode(examples[0]["targets"].tolist()) == "sorting 0"
    # Inputs longer than the inputs length are truncated keeping EOS (T5's convention).
    assert len(examples[0]["inputs"]) == 32 and examples[0]["inputs"][-1] == 1
    assert vocab.decode(examples[0]["inputs"].tolist()).startswith("summarize: Return")
    batch = next(pipeline("user_summaries", pack=True))
    assert batch["decoder_loss_weights"].sum() > 0
    task = seqio.get_mixture_or_task("user_summaries")
    scores = {}
    for fn in task.metric_fns:
        scores.update(fn(["sorting 0", "sorting 1"], ["sorting 0", "a list"]))
    assert scores["rouge1"] == pytest.approx(50.0)
    with pytest.raises(UserError, match="not both"):
        factories.register_jsonl_task("x", {"train": path}, tasks_module.default_vocabulary(),
                                      text_field="document",
                                      inputs_field="document", targets_field="summary")


def test_tfrecord_task_skips_records_without_the_feature(tasks_module, tmp_path, caplog):
    from ssr_jax.data import factories
    path = str(tmp_path / "data.tfrecord")

    def example(**feats):
        return tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode()]))
            for k, v in feats.items()})).SerializeToString()

    with tf.io.TFRecordWriter(path) as w:
        w.write(example(text=TEXT))
        w.write(example(other="no text"))
        w.write(example(text="a second document"))
    factories.register_tfrecord_task("user_tfrecord", {"train": path},
                                     tasks_module.default_vocabulary(),
                                     text_field="text",
                                     overwrite=True)
    with caplog.at_level(logging.WARNING):
        source = seqio.get_mixture_or_task("user_tfrecord").source
        docs = [d["text"].decode() for d in
                source.get_dataset("train", shuffle=False).as_numpy_iterator()]
    assert docs == [TEXT, "a second document"]
    assert f"{path}:1: feature 'text' missing" in caplog.text
    assert len(all_examples("user_tfrecord")) >= 1


def test_metrics():
    from ssr_jax.data import metrics
    assert metrics.rouge(["the cat sat"], ["the cat sat"])["rougeLsum"] == pytest.approx(100.0)
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat"])["bleu"] == \
        pytest.approx(100.0)
    assert metrics.bleu(["the cat sat on the mat"], ["a dog ran"])["bleu"] < 10
    assert metrics.exact_match([" a", "b"], ["a", "c"])["exact_match"] == 50.0
