"""Offline SSR: generate-spans gives the online stage's batches, resumes after an interruption
with every example exactly once, and its output is a SeqIO task; the CLI goes through gin."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from ssr_jax.errors import UserError
from ssr_jax.partitioning import Partitioner
from ssr_jax.data.dataset import DatasetConfig
from ssr_jax.ssr import offline
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import teacher as tl
from ssr_jax.ssr.curriculum import SpanCurriculum
from helpers import host
from test_teacher import VOCAB

LENGTHS = {"inputs": 64, "targets": 16}
SC_TASK = "ssr_default_span_corruption"


def dataset():
    return DatasetConfig("ssr_default_ssr_masked", LENGTHS, batch_size=4, seed=1, shuffle=False,
                         module="tasks")


def config(k=2, curriculum=None, malformed="empty_fill"):
    return stage_lib.SsrStageConfig(examples_per_row=2, span_corruption_examples=k,
                                    span_corruption_task=SC_TASK, curriculum=curriculum,
                                    malformed=malformed)


def read_all(output_dir):
    """Every stored example, in file (= generation) order."""
    import tensorflow as tf
    out = []
    for path in offline.list_chunks(output_dir):
        for record in tf.data.TFRecordDataset(path):
            ex = tf.train.Example.FromString(record.numpy())
            out.append(tuple(tuple(ex.features.feature[k].int64_list.value)
                             for k in ("inputs", "targets")))
    return out


def test_online_and_offline_give_identical_batches(tmp_path, teacher_dir):
    partitioner = Partitioner({"data": 2, "model": 4})
    teacher = tl.TeacherConfig(teacher_dir, seed=5)
    # With a span-length curriculum on the first two steps (the same masks) and the paper's
    # malformed policy (the same examples dropped, the random teacher drops most).
    ssr = config(curriculum=SpanCurriculum(steps=2, start_mean_span=1.5),
                 malformed="drop_example")
    stage = stage_lib.online_stage(dataset(), partitioner, 1, teacher, ssr, VOCAB)
    online_batches = [host(stage.start_next().result()) for _ in range(3)]
    stage.close()
    out = str(tmp_path / "spans")
    record = offline.generate_spans(teacher=teacher, dataset=dataset(), output_dir=out,
                                    partitioner=partitioner, ssr=ssr, num_steps=3,
                                    chunk_steps=2, student_vocab_size=VOCAB)
    assert record["complete"] and record["examples"] == 3 * 6
    assert [os.path.basename(p) for p in offline.list_chunks(out)] == [
            offline.chunk_name(0, 0, 1), offline.chunk_name(1, 0, 1)]
    stage = offline.offline_stage(dataset(), partitioner, 1, out, ssr)
    for expected in online_batches:
        got = host(stage.start_next().result())
        assert got.keys() == expected.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    with pytest.raises(StopIteration):
        stage.start_next()
    stage.close()


def test_interrupted_generation_yields_every_example_once(tmp_path, teacher_dir):
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    kwargs = dict(teacher=tl.TeacherConfig(teacher_dir), dataset=dataset(),
                  partitioner=partitioner, ssr=config(k=0), num_steps=5, chunk_steps=2,
                  student_vocab_size=VOCAB)
    whole = str(tmp_path / "whole")
    offline.generate_spans(output_dir=whole, **kwargs)
    expected = read_all(whole)
    assert len(expected) == 5 * 8 and len(set(expected)) > 30

    parts = str(tmp_path / "parts")
    first = offline.generate_spans(output_dir=parts, stop_after_chunks=1, **kwargs)
    assert first["chunks_done"] == 1 and not first["complete"]
    progress_file = os.path.join(parts, offline.progress_name(0, 1))
    shutil.copy(progress_file, str(tmp_path / "progress_after_1"))
    offline.generate_spans(output_dir=parts, stop_after_chunks=1, **kwargs)
    # A crash after chunk 1 was renamed into place but before its progress was recorded,
    # with a half-written temporary file left behind.
    shutil.copy(str(tmp_path / "progress_after_1"), progress_file)
    with open(os.path.join(parts, offline.chunk_name(2, 0, 1)) + ".tmp-0", "wb") as f:
        f.write(b"partial")
    assert len(read_all(parts)) == 4 * 8
    with pytest.raises(UserError, match="has not finished"):
        offline.offline_stage(dataset(), partitioner, 1, parts, config(k=0))
    done = offline.generate_spans(output_dir=parts, **kwargs)
    assert done["complete"] and done["examples"] == 5 * 8
    assert read_all(parts) == expected
    assert not [n for n in os.listdir(parts) if ".tmp" in n]
    # Rerunning a complete directory does nothing; other settings are refused.
    assert offline.generate_spans(output_dir=parts, **kwargs)["examples"] == 5 * 8
    with pytest.raises(UserError, match="other settings"):
        offline.generate_spans(output_dir=parts, **{**kwargs, "num_steps": 6})


def test_offline_task_and_vocabulary_check(tmp_path, teacher_dir, vocabulary):
    import seqio
    out = str(tmp_path / "spans")
    offline.generate_spans(teacher=tl.TeacherConfig(teacher_dir), dataset=dataset(),
                           output_dir=out,
                           partitioner=Partitioner({"data": 1}, devices=jax.devices()[:1]),
                           ssr=config(k=0), num_steps=1, student_vocab_size=VOCAB)
    task = offline.register_offline_ssr_task("test_offline_ssr_task", out, vocabulary)
    examples = list(task.get_dataset({"inputs": 32, "targets": 8}, split="train",
                                     shuffle=False).as_numpy_iterator())
    assert [(tuple(e["inputs"]), tuple(e["targets"])) for e in examples] == read_all(out)
    assert all(e["inputs"][-1] == 1 and e["targets"][-1] == 1 for e in examples)
    assert "test_offline_ssr_task" in seqio.TaskRegistry.names()
    manifest = json.load(open(os.path.join(out, offline.MANIFEST)))
    manifest["vocabulary"]["sentencepiece_sha256"] = "0" * 64
    json.dump(manifest, open(os.path.join(out, offline.MANIFEST), "w"))
    with pytest.raises(UserError, match="written with vocabulary"):
        offline.register_offline_ssr_task("test_offline_ssr_task", out, vocabulary)


def test_generate_spans_command(tmp_path, capsys, teacher_dir):
    from ssr_jax import cli
    out = str(tmp_path / "spans")
    argv = ["generate-spans", "--gin_file=gin/experiments/default_student_ssr.gin",
            "--gin_file=gin/objectives/ssr_offline.gin", f"--gin.OUTPUT_DIR='{out}'",
            f"--gin.TEACHER_CHECKPOINT='{teacher_dir}'", "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=2", "--gin.SSR_SPAN_CORRUPTION_EXAMPLES=0",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
            "--gin.Partitioner.mesh_shape={'data': 2, 'model': 4}",
            "--gin.ssr_offline.chunk_steps=1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert len(read_all(out)) == 2 * 4
    assert os.path.isfile(os.path.join(out, "generate_config.gin"))
    printed = capsys.readouterr().out
    assert "generate-spans: done" in printed
    # The progress file counts every span as exactly one kind; the line shows each share.
    stats = json.load(open(os.path.join(out, offline.progress_name(0, 1))))["stats"]
    kinds = ("nonempty_fills", "empty_fills", "fallbacks", "truncated")
    assert "valid_fills" not in stats and stats["spans"] > 0
    assert sum(stats[k] for k in kinds) == stats["spans"]
    done = next(line for line in printed.splitlines() if "generate-spans: done" in line)
    spans = stats["spans"]
    words = ("filled", "empty fills", "fallbacks", "fills dropped for length")
    for k, word in zip(kinds, words):
        assert f"{stats[k] / spans:.1%} {word}" in done, (k, done)
    assert cli.main(argv[:-1] + ["--gin.ssr_offline.chunk_steps=2"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_one_pass_generation_writes_every_example_of_the_split_once(tmp_path, teacher_dir,
                                                                    vocabulary):
    """num_steps=None: one pass; the last, short step is padded for the teacher and only its
    real examples are written (a count against the split's own size)."""
    import seqio
    from ssr_jax.data import factories
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(f"The quick brown fox number {i} jumps over the lazy dog and "
                              f"runs away into the forest {i} times." for i in range(9)))
    factories.register_text_task("ssr_one_pass", {"train": str(text)}, vocabulary, "ssr_masked",
                                 cache_dir=str(tmp_path / "cache"), overwrite=True)
    cfg = DatasetConfig("ssr_one_pass", LENGTHS, batch_size=4, seed=1, shuffle=False)
    out = str(tmp_path / "spans")
    record = offline.generate_spans(
            teacher=tl.TeacherConfig(teacher_dir), dataset=cfg, output_dir=out,
            partitioner=Partitioner({"data": 1}, devices=jax.devices()[:1]), ssr=config(k=0),
            num_steps=None, chunk_steps=2, student_vocab_size=VOCAB)
    split = list(seqio.get_mixture_or_task("ssr_one_pass").get_dataset(
            {"inputs": 32, "targets": 8}, split="train", shuffle=False, seed=1,
            num_epochs=1).as_numpy_iterator())
    stored = read_all(out)
    assert record["complete"] and record["examples"] == len(stored) == len(split) > 8
    assert [t for _, t in stored] == [tuple(ex["targets"]) for ex in split]


def test_training_past_the_generated_steps_is_refused_before_step_1(tmp_path, teacher_dir):
    """TRAIN_STEPS beyond the steps generate-spans wrote: a UserError naming both numbers
    and the fix from input_stage_factory (before anything is built) and offline_stage,
    not a StopIteration once training has started."""
    from ssr_jax.ssr import spec as ssr_spec
    partitioner = Partitioner({"data": 1}, devices=jax.devices()[:1])
    out = str(tmp_path / "spans")
    offline.generate_spans(teacher=tl.TeacherConfig(teacher_dir), dataset=dataset(),
                           output_dir=out, partitioner=partitioner, ssr=config(k=0),
                           num_steps=2, student_vocab_size=VOCAB)
    spec = ssr_spec.offline(out, config(k=0))
    with pytest.raises(UserError, match=r"holds 2 steps, fewer than TRAIN_STEPS=3; .*"
                                        r"generate-spans.* or lower TRAIN_STEPS to 2\.$"):
        ssr_spec.input_stage_factory(spec, dataset(), train_steps=3)
    with pytest.raises(UserError, match="holds 2 steps, fewer than TRAIN_STEPS=3"):
        offline.offline_stage(dataset(), partitioner, 1, out, config(k=0), train_steps=3)
    # Exactly the steps written: accepted, and every one of them is there.
    stage = ssr_spec.input_stage_factory(spec, dataset(), train_steps=2)(dataset(), partitioner)
    for _ in range(2):
        stage.start_next().result()
    with pytest.raises(StopIteration):
        stage.start_next()
    stage.close()

    # One pass of a split (num_steps None): the steps are the examples written (per the
    # progress files) over the examples a step takes, counted against the files themselves.
    manifest_path = os.path.join(out, offline.MANIFEST)
    manifest = json.load(open(manifest_path))
    manifest["num_steps"] = None
    json.dump(manifest, open(manifest_path, "w"))
    per_step = manifest["ssr_examples_per_step"]
    assert len(read_all(out)) == 2 * per_step == 16
    ssr_spec.input_stage_factory(spec, dataset(), train_steps=2)
    progress_path = os.path.join(out, offline.progress_name(0, 1))
    record = json.load(open(progress_path))
    record["examples"] = 2 * per_step - 1  # a short last step is no step
    json.dump(record, open(progress_path, "w"))
    with pytest.raises(UserError, match="holds 1 steps, fewer than TRAIN_STEPS=2"):
        ssr_spec.input_stage_factory(spec, dataset(), train_steps=2)
    # Two writers of 15 and 32 examples (4 a step each): read as written, writer 0's 15
    # give 3 steps; read by 4 readers, reader j takes examples j, j+4, ... of all 47.
    two = {**manifest, "num_shards": 2}
    records = [{"examples": 15}, {"examples": 32}]
    assert offline.available_steps(two, records) == 15 // 4 == 3
    assert offline.available_steps(two, records, readers=1) == 47 // 8
    assert offline.available_steps(two, records, readers=4) == min(
            len(range(j, 47, 4)) // 2 for j in range(4)) == 5
