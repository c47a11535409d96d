"""`infer`: one row per real example (no padding rows), the task's raw input and full target
text, the decode method in the file name, metrics over the written rows only."""
import dataclasses
import json

import jax
import pytest

pytest.importorskip("tensorflow")

import seqio  # noqa: E402

from ssr_jax.data import factories, metrics, user_files  # noqa: E402
from ssr_jax.data.dataset import DatasetConfig  # noqa: E402
from ssr_jax.models.base import DecodeConfig  # noqa: E402
from ssr_jax.models.config import T5Config  # noqa: E402
from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from ssr_jax.partitioning import Partitioner  # noqa: E402
from ssr_jax.train import checkpoints  # noqa: E402
from ssr_jax.train import infer as infer_lib  # noqa: E402
import helpers  # noqa: E402

CONFIG = T5Config(vocab_size=4224, d_model=32, num_heads=2, d_kv=8, d_ff=32,
                  num_encoder_layers=1, num_decoder_layers=1)
LENGTHS = {"inputs": 12, "targets": 6}
# The second input and target are longer than LENGTHS: the file must hold them in full.
PAIRS = [("the cat sat on the mat", "a cat sat"),
         ("return a new sorted list from the items in iterable with a custom key function "
          "and the reverse flag", "sort the items of an iterable into a new list in order"),
         ("print the value", "print it")]


@pytest.fixture(scope="module")
def vocabulary():
    import tasks
    return tasks.default_vocabulary()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    checkpoints.save_params(str(root / "7"), helpers.random_params(CONFIG, embedding_std=1.0),
                            dataclasses.asdict(CONFIG))
    return str(root)


def write_jsonl(path, pairs, src="src", tgt="tgt"):
    with open(path, "w") as f:
        for s, t in pairs:
            f.write(json.dumps({src: s, tgt: t}) + "\n")
    return str(path)


def run_infer(name, checkpoint, model_dir, batch_size=8, partitioner=None, **decode):
    return infer_lib.infer(
        model=EncoderDecoderModel(CONFIG), checkpoint_path=checkpoint,
        dataset=DatasetConfig(name, LENGTHS, split="validation", batch_size=batch_size),
        partitioner=partitioner or Partitioner({"data": -1}), model_dir=str(model_dir),
        decode=DecodeConfig(max_decode_length=6, **{"method": "greedy", **decode}))


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_three_examples_give_three_rows_with_raw_text_and_their_metrics(
        tmp_path, vocabulary, checkpoint, capsys):
    data = write_jsonl(tmp_path / "valid.jsonl", PAIRS)
    factories.register_jsonl_task(
        "infer_three", {"validation": data}, vocabulary, inputs_field="src",
        targets_field="tgt", metric_fns=[metrics.exact_match, metrics.bleu, metrics.rouge],
        cache_dir=str(tmp_path / "cache"), overwrite=True)
    # One batch of 8 rows on 8 devices: 3 examples, 5 padding rows.
    written = run_infer("infer_three", checkpoint, tmp_path)
    out = tmp_path / "inference" / "infer_three-validation-7-greedy.jsonl"
    rows = read_rows(out)
    assert len(rows) == 3
    assert [(r["inputs"], r["targets"]) for r in rows] == PAIRS
    # The long pair really was cut by the lengths (so "in full" is a real check).
    assert len(vocabulary.encode(PAIRS[1][0])) > LENGTHS["inputs"]
    assert len(vocabulary.encode(PAIRS[1][1])) > LENGTHS["targets"]
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote")]
    assert printed and printed[-1].startswith(f"wrote 3 predictions to {out}")
    with open(str(out)[:-len(".jsonl")] + "-metrics.json") as f:
        stored = json.load(f)
    targets, preds = [r["targets"] for r in rows], [r["prediction"] for r in rows]
    expected = {**metrics.exact_match(targets, preds), **metrics.bleu(targets, preds),
                **metrics.rouge(targets, preds)}
    assert stored == pytest.approx(expected) and written == pytest.approx(expected)
    assert set(stored) == {"exact_match", "bleu", "rouge1", "rouge2", "rougeLsum"}

    # Several batches with a short last one (one device, batch 2: 2 + 1 rows), beam search:
    # its own file, the greedy one kept.
    one = Partitioner({"data": 1}, devices=jax.devices()[:1])
    run_infer("infer_three", checkpoint, tmp_path, batch_size=2, partitioner=one,
              method="beam", num_beams=2)
    beam_rows = read_rows(tmp_path / "inference" / "infer_three-validation-7-beam2.jsonl")
    assert [(r["inputs"], r["targets"]) for r in beam_rows] == PAIRS
    assert read_rows(out) == rows


@pytest.mark.slow
def test_gleu_task_gets_its_sources_through_the_postprocessor(tmp_path, vocabulary,
                                                               checkpoint):
    """A GEC task as metrics' docstring describes it: references joined by ' ||| ' in the
    eval target, the source read from the example's inputs_pretokenized."""
    pairs = [("she go to school every day with her friends",
              "she goes to school every day with her friends ||| she went to school every "
              "day with her friends"),
             ("he have a dog and a cat at home", "he has a dog and a cat at home")]
    data = write_jsonl(tmp_path / "gec.jsonl", pairs)
    source = user_files.UserFileSource({"validation": data}, "jsonl",
                                       {"inputs": "src", "targets": "tgt"},
                                       str(tmp_path / "cache"))
    if "infer_gec" in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove("infer_gec")
    seqio.TaskRegistry.add(
        "infer_gec", source=source, output_features=factories.output_features(vocabulary,
                                                                              "seq2seq"),
        preprocessors=factories.objective_preprocessors("seq2seq", prefix="gec: "),
        postprocess_fn=metrics.source_and_references(prefix="gec: ", separator=" ||| "),
        metric_fns=[metrics.gleu, metrics.gleu_copy_source])
    written = run_infer("infer_gec", checkpoint, tmp_path)
    rows = read_rows(tmp_path / "inference" / "infer_gec-validation-7-greedy.jsonl")
    assert [r["inputs"] for r in rows] == ["gec: " + s for s, _ in pairs]
    refs = [t.split(" ||| ") for _, t in pairs]
    sources = [s for s, _ in pairs]
    expected = {**metrics.gleu(refs, [r["prediction"] for r in rows], sources=sources),
                **metrics.gleu_copy_source(refs, None, sources=sources)}
    assert written == pytest.approx(expected)
    assert written["gleu_copy_source"] > 0


def test_file_name_says_how_it_decoded():
    name = infer_lib.output_name
    assert name("t", "validation", "7", DecodeConfig(method="greedy")) == "t-validation-7-greedy"
    assert name("t", "test", "7", DecodeConfig(method="beam", num_beams=4)) == \
        "t-test-7-beam4"
    assert name("t", "test", "7", DecodeConfig(method="beam", num_beams=4,
                                               brevity_alpha=0.8)) == "t-test-7-beam4-alpha0.8"
    assert name("t", "v", "7", DecodeConfig(method="sample")) == "t-v-7-sample-seed0"
    assert name("t", "v", "7", DecodeConfig(method="sample", temperature=0.7, top_k=40,
                                            top_p=0.9), seed=3) == \
        "t-v-7-sample-t0.7-k40-p0.9-seed3"


def test_file_name_says_it_banned_repeated_ngrams():
    name = infer_lib.output_name
    assert name("t", "v", "7", DecodeConfig(method="greedy", no_repeat_ngram_size=3)) == \
        "t-v-7-greedy-norep3"
    assert name("t", "v", "7", DecodeConfig(method="beam", num_beams=4, brevity_alpha=0.8,
                                            no_repeat_ngram_size=2)) == \
        "t-v-7-beam4-alpha0.8-norep2"
    assert name("t", "v", "7", DecodeConfig(method="sample", top_k=40,
                                            no_repeat_ngram_size=2), seed=1) == \
        "t-v-7-sample-k40-norep2-seed1"
