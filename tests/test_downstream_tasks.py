"""The downstream tasks of the embedded corpus: carved from the held-out pool only, split
apart, deterministic, counted, and scored by their metrics against independent values."""
import collections
import hashlib
import os

import pytest

tf = pytest.importorskip("tensorflow")

import seqio  # noqa: E402

from ssr_jax.data import gleu as gleu_lib  # noqa: E402
from ssr_jax.data import sentences  # noqa: E402

LENGTHS = {"inputs": 128, "targets": 64}
SPLITS = ("train", "validation", "test")
# Sizes on the Python this repository is developed with (the stdlib's text is the data).
DOCUMENTED_SIZES = {"py3_11_7": {
    "corpus": {"train": 3114, "validation": 285, "downstream": 3384, "comments": 428},
    "ssr_default_docstring_summary": {"train": 1032, "validation": 119, "test": 134},
    "ssr_default_gec": {"train": 42177, "validation": 700, "test": 685},
    "gec_sentences": {"train": 5464, "validation": 700, "test": 685}}}


@pytest.fixture(scope="module")
def tasks_module(tmp_path_factory):
    path = os.environ.get("SSR_JAX_DATA_DIR") or str(tmp_path_factory.getbasetemp() / "ssr_data")
    os.environ["SSR_JAX_DATA_DIR"] = path
    import tasks
    return tasks


@pytest.fixture(scope="module")
def corpus(tasks_module):
    from ssr_jax.data import corpus as corpus_lib
    return corpus_lib


@pytest.fixture(scope="module")
def docs(corpus):
    return corpus.corpus_documents()


@pytest.fixture(scope="module")
def pretraining_text(docs):
    return "\n".join(d["text"] for split in ("train", "validation") for d in docs[split])


def residue(text):
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 20


def documented(key):
    from ssr_jax.data import corpus as corpus_lib
    return DOCUMENTED_SIZES.get(corpus_lib.CONFIG_NAME, {}).get(key)


def test_pool_is_held_out_of_pretraining(corpus, docs):
    for split, items in docs.items():
        for d in items:
            if split == "comments":  # every comment document, whatever its hash
                assert d["source"].startswith("comments:") and not d["summary"] + d["body"]
                continue
            r = residue(d["text"])
            assert split == ("validation" if r == 0 else "downstream" if 1 <= r <= 10
                             else "train")
    texts = {split: {d["text"] for d in items} for split, items in docs.items()}
    held_out = texts["downstream"] | texts["comments"]
    assert not (held_out & (texts["train"] | texts["validation"]))
    assert not texts["downstream"] & texts["comments"]
    total = sum(len(texts[split]) for split in ("train", "validation", "downstream"))
    assert 0.45 < len(texts["downstream"]) / total < 0.55
    sizes = {split: len(items) for split, items in docs.items()}
    assert sizes == (documented("corpus") or sizes)
    # The TFDS build holds the same documents; the pre-training tasks read only 'train'
    # and 'validation', and their 'train' has no pool document.
    built = corpus.built_documents()
    assert {s: sorted(d["text"] for d in v) for s, v in built.items()} == \
        {s: sorted(v) for s, v in texts.items()}
    for name in ("ssr_default_span_corruption", "ssr_default_ssr_masked"):
        source = seqio.get_mixture_or_task(name).source
        assert tuple(source.splits) == ("train", "validation")
    source = seqio.get_mixture_or_task("ssr_default_span_corruption").source
    read = {ex["text"].decode() for ex in
            source.get_dataset("train", shuffle=False).as_numpy_iterator()}
    assert read == texts["train"]


def test_comment_paragraphs_are_runs_of_whole_line_comments(corpus):
    source = (
        "# Return the first item of the queue,\n"
        "#   or None when it is empty.\n"
        "#\n"
        "# A second paragraph after an empty comment line.\n"
        "x = 1  # an inline comment after code is left out\n"
        "    # An indented comment: a paragraph of its own.\n"
        "\n"
        "# Not joined across a blank line.\n"
        "s = '# not a comment, a string'\n")
    assert corpus._comment_paragraphs(source) == [
        "Return the first item of the queue, or None when it is empty.",
        "A second paragraph after an empty comment line.",
        "An indented comment: a paragraph of its own.",
        "Not joined across a blank line."]


def test_summary_splits_are_disjoint_and_held_out(corpus, docs, pretraining_text):
    got = corpus.summary_examples(docs)
    # The same examples in the same order from the stdlib parse and from the TFDS build.
    assert got == corpus.downstream_examples("summary") == corpus.summary_examples(docs)
    pool = {d["text"] for d in docs["downstream"]}
    for items in got.values():
        for ex in items:
            assert ex["targets"] + "\n" + ex["inputs"] in pool  # summary + body of a pool doc
            assert ex["inputs"].strip() and ex["targets"] not in pretraining_text
    targets = {s: {ex["targets"] for ex in got[s]} for s in SPLITS}
    assert not (targets["train"] & targets["validation"] or targets["train"] & targets["test"]
                or targets["validation"] & targets["test"])
    # Every pool document with a body is used, unless its summary is pre-training text.
    expect = sum(1 for d in docs["downstream"] if d["body"].strip()
                 and d["summary"] not in pretraining_text)
    sizes = {s: len(got[s]) for s in SPLITS}
    assert sum(sizes.values()) == expect
    assert sizes == (documented("ssr_default_docstring_summary") or sizes)
    assert 0.7 < sizes["train"] / expect < 0.9 and sizes["test"] > 40


def test_gec_sentences_are_disjoint_and_held_out(corpus, docs, pretraining_text):
    got = corpus.gec_sentences(docs)
    assert got == corpus.gec_sentences(corpus.built_documents())
    pool_text = "\n".join(d["text"] for d in docs["downstream"])
    comment_text = "\n".join(d["text"] for d in docs["comments"])
    seen = collections.Counter(s for items in got.values() for s in items)
    assert max(seen.values()) == 1  # each sentence once: in one split only
    from_comments = 0
    for s in seen:
        words = s.split()
        assert 6 <= len(words) <= 40 and s[0].isupper() and s[-1] in ".!?"
        assert s not in pretraining_text
        if s not in pool_text:
            assert s in comment_text
            from_comments += 1
    assert 0.2 < from_comments / len(seen) < 0.6  # the comments add sentences, not most
    sizes = {split: len(items) for split, items in got.items()}
    assert sizes == (documented("gec_sentences") or sizes)
    assert sizes["test"] > 100 and sizes["validation"] > 100


def test_gec_examples_pair_corruptions_with_their_sentence(corpus, docs):
    from ssr_jax.data import synthetic_errors as se
    clean = corpus.gec_sentences(docs)
    got = corpus.gec_examples(docs)
    assert got == corpus.downstream_examples("gec")
    for split in SPLITS:
        items = got[split]
        assert {ex["targets"] for ex in items} == set(clean[split])
        assert all(ex["inputs"] != ex["targets"] for ex in items)
        per = collections.Counter(ex["targets"] for ex in items)
        assert max(per.values()) == (corpus.GEC_TRAIN_VERSIONS if split == "train" else 1)
        for ex in items[:50]:
            versions = [se.corrupt(ex["targets"], corpus.GEC_SEED, v).source
                        for v in range(corpus.GEC_TRAIN_VERSIONS)]
            assert ex["inputs"] in versions
    sizes = {s: len(got[s]) for s in SPLITS}
    assert sizes == (documented("ssr_default_gec") or sizes)


@pytest.mark.parametrize("name", ["ssr_default_docstring_summary", "ssr_default_gec"])
def test_tasks_count_and_read_their_splits(corpus, tasks_module, name):
    task = seqio.get_mixture_or_task(name)
    kind = "summary" if "summary" in name else "gec"
    prefix = tasks_module.default.PREFIXES[name]
    assert tasks_module.input_prefix(name) == prefix
    assert set(task.splits) == set(SPLITS)
    for split in SPLITS:
        raw = [{k: v.decode() for k, v in ex.items()} for ex in
               task.source.get_dataset(split, shuffle=False).as_numpy_iterator()]
        assert raw == corpus.downstream_examples(kind)[split]
        assert task.source.num_input_examples(split) == len(raw)
    # Shuffled reads are the same set, in a seeded order; shards split it.
    shuffled = [ex["inputs"] for ex in
                task.source.get_dataset("validation", seed=3).as_numpy_iterator()]
    again = [ex["inputs"] for ex in
             task.source.get_dataset("validation", seed=3).as_numpy_iterator()]
    assert shuffled == again and sorted(shuffled) == sorted(
        ex["inputs"].encode() for ex in corpus.downstream_examples(kind)["validation"])
    halves = [[(ex["inputs_pretokenized"], ex["targets_pretokenized"]) for ex in
               task.get_dataset(LENGTHS, "test", shuffle=False,
                                shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator()]
              for i in range(2)]
    assert halves[0] and halves[1] and not set(halves[0]) & set(halves[1])
    assert len(halves[0]) + len(halves[1]) == task.source.num_input_examples("test")
    vocab = tasks_module.default_vocabulary()
    examples = list(task.get_dataset(LENGTHS, "test", shuffle=False).as_numpy_iterator())
    assert len(examples) == task.source.num_input_examples("test")
    for ex, want in zip(examples[:20], corpus.downstream_examples(kind)["test"]):
        assert ex["inputs_pretokenized"].decode() == prefix + want["inputs"]
        assert vocab.decode(ex["inputs"].tolist()).startswith(prefix.strip())
        assert ex["targets"][-1] == 1


def gec_targets(task, split="test"):
    """The task's post-processed targets and raw inputs, as infer/eval give them."""
    rows = list(task.get_dataset(LENGTHS, split, shuffle=False).as_numpy_iterator())
    targets = [task.postprocess_fn(r["targets_pretokenized"].decode(), example=r,
                                   is_target=True) for r in rows]
    return targets, [r["inputs_pretokenized"].decode() for r in rows]


def test_gec_metrics_floor_and_baselines(corpus, tasks_module):
    task = seqio.get_mixture_or_task("ssr_default_gec")
    targets, inputs = gec_targets(task)
    test = corpus.downstream_examples("gec")["test"]
    assert [t["source"] for t in targets] == [ex["inputs"] for ex in test]
    assert [t["references"] for t in targets] == [[ex["targets"]] for ex in test]

    def score(predictions):
        out = {}
        for fn in task.predict_metric_fns:
            out.update(fn(targets, predictions))
        return out

    base = tasks_module.trivial_predictions("ssr_default_gec", inputs)
    assert base["copy_input"] == [ex["inputs"] for ex in test]
    copy = score(base["copy_input"])
    assert set(copy) == {"gleu", "gleu_std", "gleu_ci95_low", "gleu_ci95_high",
                         "gleu_copy_source", "exact_match"}
    # Independently: JFLEG's corpus GLEU of copying, one reference per sentence.
    srcs, refs = [ex["inputs"] for ex in test], [ex["targets"] for ex in test]
    stats = [sum(col) for col in zip(*(gleu_lib.sentence_stats(s, s, r)
                                       for s, r in zip(srcs, refs)))]
    floor = 100 * gleu_lib.corpus_score(stats)
    assert copy["gleu"] == pytest.approx(floor) == pytest.approx(copy["gleu_copy_source"])
    assert 0 < floor < 100 and copy["exact_match"] == 0.0 and copy["gleu_std"] == 0.0
    perfect = score(refs)
    assert perfect["gleu"] == pytest.approx(100.0) and perfect["exact_match"] == 100.0
    assert perfect["gleu_copy_source"] == pytest.approx(floor)
    # Fixing only the doubled words beats copying: the task rewards what is learnable.
    dedup = [" ".join(w for i, w in enumerate(s.split()) if i == 0 or w != s.split()[i - 1])
             for s in srcs]
    assert score(dedup)["gleu"] > floor


def test_summary_baselines_score_below_the_reference(corpus, tasks_module):
    pytest.importorskip("rouge_score")
    task = seqio.get_mixture_or_task("ssr_default_docstring_summary")
    rows = list(task.get_dataset(LENGTHS, "test", shuffle=False).as_numpy_iterator())
    inputs = [r["inputs_pretokenized"].decode() for r in rows]
    targets = [r["targets_pretokenized"].decode() for r in rows]
    base = tasks_module.trivial_predictions("ssr_default_docstring_summary", inputs)
    test = corpus.downstream_examples("summary")["test"]
    assert base["copy_input"] == [ex["inputs"].strip() for ex in test]
    assert base["first_sentence"] == [sentences.split(ex["inputs"])[0] for ex in test]
    (rouge,) = task.predict_metric_fns
    first = rouge(targets, base["first_sentence"])
    assert set(first) == {"rouge1", "rouge2", "rougeLsum"}
    assert 0 < first["rouge1"] < 50
    assert rouge(targets, targets)["rouge1"] == pytest.approx(100.0)
