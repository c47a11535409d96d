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
                 "ssr_default_docstring_summary", "ssr_default_gec"):
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
    assert set(docs) == {"train", "validation", "downstream", "comments"}
    assert len(docs["train"]) > 2500 and len(docs["validation"]) > 150
    assert len(docs["downstream"]) > 2500  # held out of pre-training for downstream tasks
    assert sum(len(d["text"]) for d in docs["train"]) > 700_000
    for split, items in docs.items():
        if split != "comments":  # the stdlib's comments: a split of their own, not hashed
            assert all(corpus.split_of(d["text"]) == split for d in items[:500])
    texts = [d["text"] for items in docs.values() for d in items]
    assert len(set(texts)) == len(texts)
    # The TFDS build holds exactly these documents.
    built = [ex["text"].decode() for ex in
             seqio.get_mixture_or_task("ssr_default_span_corruption").source.get_dataset(
                 "validation", shuffle=False).as_numpy_iterator()]
    assert sorted(built) == sorted(d["text"] for d in docs["validation"])


def test_docstring_summary_task(tasks_module):
    examples = all_examples("ssr_default_docstring_summary", "validation")
    assert len(examples) > 20
    assert set(seqio.get_mixture_or_task("ssr_default_docstring_summary").splits) == {
        "train", "validation", "test"}
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


def test_unknown_task_suggests_close_names_and_the_task_module(tasks_module):
    with pytest.raises(UserError) as err:
        pipeline("ssr_default_span_corruptoin")
    msg = str(err.value)
    assert "did you mean 'ssr_default_span_corruption'" in msg
    assert "MIXTURE_OR_TASK_MODULE" in msg and "PYTHONPATH" in msg
    with pytest.raises(UserError, match=r"\d+ registered, e\.g\. .*MIXTURE_OR_TASK_MODULE"):
        pipeline("zzzz_nothing_like_it")
    with pytest.raises(UserError, match="MIXTURE_OR_TASK_MODULE='tasks' was imported but "
                                        "registers no such name"):
        pipeline("zzzz_nothing_like_it", module="tasks")


def read_source(name, split="train"):
    source = seqio.get_mixture_or_task(name).source
    return [{k: v.decode() for k, v in ex.items()}
            for ex in source.get_dataset(split, shuffle=False).as_numpy_iterator()]


def test_tsv_task_by_header_name_and_by_index(tasks_module, tmp_path, cache_dir, caplog):
    from ssr_jax.data import factories
    rows = [f"{i}\t{TEXT} ({i})\tsorting {i}" for i in range(10)]
    rows.insert(2, "# a comment line, dropped by the line filter")
    rows.insert(4, "only\ttwo columns")
    rows.insert(6, "")
    lines = ["id\tdocument\tsummary"] + rows
    path = write(tmp_path / "data.tsv", "\n".join(lines).encode())
    vocab = tasks_module.default_vocabulary()
    with caplog.at_level(logging.WARNING):
        factories.register_tsv_task("user_tsv", {"train": path}, vocab,
                                    inputs_column="document", targets_column="summary",
                                    line_filter=r"^#", cache_dir=cache_dir, overwrite=True)
        got = read_source("user_tsv")
    # Independently: the data lines with three columns that are not comments.
    expect = [l.split("\t") for l in lines[1:] if l and not l.startswith("#")
              and len(l.split("\t")) == 3]
    assert [(ex["inputs"], ex["targets"]) for ex in got] == [(e[1], e[2]) for e in expect]
    assert len(got) == 10
    bad_line = lines.index("only\ttwo columns") + 1
    assert f"{path}:{bad_line}: 2 tab-separated columns, no column 'summary'" in caplog.text
    assert seqio.get_mixture_or_task("user_tsv").source.num_input_examples("train") == 10
    # The same columns by 0-based index, no header: the header line is then a (kept) row.
    factories.register_tsv_task("user_tsv_idx", {"train": path}, vocab, inputs_column=1,
                                targets_column=2, header=False, line_filter=r"^#",
                                cache_dir=cache_dir, overwrite=True)
    assert [(ex["inputs"], ex["targets"]) for ex in read_source("user_tsv_idx")] == \
        [("document", "summary")] + [(e[1], e[2]) for e in expect]
    factories.register_tsv_task("user_tsv_bad", {"train": path}, vocab,
                                inputs_column="article", targets_column="summary",
                                cache_dir=cache_dir, overwrite=True)
    with pytest.raises(UserError, match=r"data\.tsv:1: the TSV header has no column "
                                        r"'article'; it has \['id', 'document', 'summary'\]"):
        read_source("user_tsv_bad")
    with pytest.raises(UserError, match="header=False"):
        factories.register_tsv_task("x", {"train": path}, vocab, inputs_column="document",
                                    targets_column="summary", header=False)
    # A TSV task trains.
    assert next(pipeline("user_tsv"))["decoder_loss_weights"].sum() > 0


def test_parallel_files_task_pairs_lines_and_refuses_unequal_files(tasks_module, tmp_path,
                                                                  cache_dir, caplog):
    from ssr_jax.data import factories
    vocab = tasks_module.default_vocabulary()
    src_lines = [f"she go to school {i}" for i in range(9)]
    tgt_lines = [f"she goes to school {i}" for i in range(9)]
    tgt_bytes = "\n".join(tgt_lines).encode().replace(b"goes to school 3", b"\xff\xfe 3")
    src = write(tmp_path / "train.src", "\n".join(src_lines).encode() + b"\n")
    tgt = write(tmp_path / "train.tgt", tgt_bytes)
    with caplog.at_level(logging.WARNING):
        factories.register_parallel_files_task("user_parallel", {"train": (src, tgt)}, vocab,
                                               prefix="fix: ", cache_dir=cache_dir,
                                               overwrite=True)
        got = read_source("user_parallel")
    keep = [i for i in range(9) if i != 3]
    assert [(ex["inputs"], ex["targets"]) for ex in got] == \
        [(src_lines[i], tgt_lines[i]) for i in keep]
    assert f"{tgt}:4: not UTF-8" in caplog.text
    examples = all_examples("user_parallel")
    assert vocab.decode(examples[0]["inputs"].tolist()) == "fix: " + src_lines[0]
    assert vocab.decode(examples[0]["targets"].tolist()) == tgt_lines[0]
    # One line more on the source side: refused, naming both files and their line counts.
    short = write(tmp_path / "short.tgt", "\n".join(tgt_lines[:7]).encode())
    with open(src) as f, open(short) as g:
        n_src, n_tgt = len(f.read().splitlines()), len(g.read().splitlines())
    factories.register_parallel_files_task("user_parallel_bad", {"train": [(src, short)]},
                                           vocab, cache_dir=cache_dir, overwrite=True)
    with pytest.raises(UserError) as err:
        read_source("user_parallel_bad")
    assert f"{src} has {n_src} lines, {short} has {n_tgt}" in str(err.value)
    assert (n_src, n_tgt) == (9, 7)
    assert not [f for f in os.listdir(cache_dir) if ".tmp" in f]  # no half-written cache
    with pytest.raises(UserError, match="source file, target file"):
        factories.register_parallel_files_task("x", {"train": src}, vocab)


def test_line_filter_drops_headings_in_text_and_jsonl(tasks_module, tmp_path, cache_dir,
                                                      caplog):
    from ssr_jax.data import factories
    vocab = tasks_module.default_vocabulary()
    lines = ["= Sorting =", "", TEXT, "== History ==", "The sort is stable.", "",
             "Keys are compared once."]
    path = write(tmp_path / "wiki.txt", "\n".join(lines).encode())
    heading = r"^=+ .* =+$"
    factories.register_text_task("user_wiki", {"train": path}, vocab, line_filter=heading,
                                 cache_dir=cache_dir, overwrite=True)
    import re
    expect = [l for l in lines if l and not re.search(heading, l)]
    assert [ex["text"] for ex in read_source("user_wiki")] == expect
    report = [f for f in os.listdir(cache_dir) if f.startswith("wiki.txt")
              and f.endswith(".report.json")]
    with open(os.path.join(cache_dir, report[0])) as f:
        summary = json.load(f)
    assert summary["filtered"] == sum(bool(re.search(heading, l)) for l in lines) == 2
    assert summary["skipped"] == 0
    # Paragraphs: a dropped heading neither joins nor splits documents.
    factories.register_text_task("user_wiki_par", {"train": path}, vocab, paragraphs=True,
                                 line_filter=heading, cache_dir=cache_dir, overwrite=True)
    assert [ex["text"] for ex in read_source("user_wiki_par")] == \
        [f"{TEXT}\nThe sort is stable.", "Keys are compared once."]
    # Without the filter the same headings are documents (the old behaviour).
    factories.register_text_task("user_wiki_all", {"train": path}, vocab,
                                 cache_dir=cache_dir, overwrite=True)
    assert len(read_source("user_wiki_all")) == len([l for l in lines if l])
    # JSONL: comment lines would be reported as invalid JSON; filtered, they are not.
    rows = ["# exported 2024", json.dumps({"text": TEXT}), "# part 2", json.dumps({"text": "b"})]
    jpath = write(tmp_path / "c.jsonl", "\n".join(rows).encode())
    with caplog.at_level(logging.WARNING):
        factories.register_jsonl_task("user_jsonl_filtered", {"train": jpath}, vocab,
                                      text_field="text", line_filter=r"^#",
                                      cache_dir=cache_dir, overwrite=True)
        assert [ex["text"] for ex in read_source("user_jsonl_filtered")] == [TEXT, "b"]
    assert "invalid JSON" not in caplog.text
    with pytest.raises(UserError, match="not a regular expression"):
        factories.register_text_task("x", {"train": path}, vocab, line_filter="(unclosed")


def test_truncated_inputs_are_counted_and_warned_once(tasks_module, tmp_path, cache_dir,
                                                      caplog):
    from ssr_jax.data import factories, pipeline as pipeline_lib
    vocab = tasks_module.default_vocabulary()
    rows = [{"document": " ".join([TEXT] * (i % 3)) + f" item {i}",
             "summary": "short" if i % 4 else f"{TEXT} {i}"} for i in range(23)]
    path = write(tmp_path / "trunc.jsonl", "\n".join(map(json.dumps, rows)).encode())
    factories.register_jsonl_task("user_trunc", {"validation": path}, vocab,
                                  inputs_field="document", targets_field="summary",
                                  prefix="summarize: ", cache_dir=cache_dir, overwrite=True)
    lengths = {"inputs": 32, "targets": 8}
    # Independently: tokens of the prefixed input plus its EOS, against the feature length.
    long_in = sum(len(vocab.encode("summarize: " + r["document"])) + 1 > 32 for r in rows)
    long_tgt = sum(len(vocab.encode(r["summary"])) + 1 > 8 for r in rows)
    assert 0 < long_in < len(rows) and 0 < long_tgt < len(rows)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # a second pass (e.g. the next eval) does not warn again
            pipe = pipeline("user_trunc", "validation", task_feature_lengths=lengths,
                            pack=False, shuffle=False, repeat=False)
            batches = list(pipe)
            assert sum(int((b["decoder_loss_weights"].sum(1) > 0).sum()) for b in batches) == 23
            assert all("inputs_untrimmed_length" not in b for b in batches)
    warnings = [r.getMessage() for r in caplog.records if "were truncated" in r.getMessage()]
    assert warnings == [
        f"task user_trunc split validation: {long_in} of the first 23 examples had inputs "
        "longer than 32 tokens and were truncated",
        f"task user_trunc split validation: {long_tgt} of the first 23 examples had targets "
        "longer than 8 tokens and were truncated"]
    # A long stream warns after the first TRUNCATION_SAMPLE examples, not at its end.
    factories.register_jsonl_task("user_trunc_train", {"train": path}, vocab,
                                  inputs_field="document", targets_field="summary",
                                  prefix="summarize: ", cache_dir=cache_dir, overwrite=True)
    caplog.clear()
    sample, pipeline_lib.TRUNCATION_SAMPLE = pipeline_lib.TRUNCATION_SAMPLE, 46
    try:
        with caplog.at_level(logging.WARNING):
            pipe = pipeline("user_trunc_train", task_feature_lengths=lengths, pack=False,
                            shuffle=False)
            pipe.next_examples(45)
            assert "were truncated" not in caplog.text
            pipe.next_examples(10)
    finally:
        pipeline_lib.TRUNCATION_SAMPLE = sample
    assert f"{2 * long_in} of the first 46 examples had inputs longer" in caplog.text
