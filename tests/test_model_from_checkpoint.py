"""The model and the vocabulary come with the checkpoint: eval, infer, fine-tuning and export-hf
of a `ssr-jax train` run with no model gin file and no --vocab; a gin MODEL that disagrees
with the checkpoint is refused in one line naming both sizes."""
import json
import os

import pytest

pytest.importorskip("tensorflow")

from ssr_jax import cli  # noqa: E402
from ssr_jax import vocab as vocab_lib  # noqa: E402
from ssr_jax.data.dataset import DatasetConfig  # noqa: E402
from ssr_jax.errors import UserError  # noqa: E402
from ssr_jax.models.config import T5Config  # noqa: E402
from ssr_jax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from ssr_jax.partitioning import Partitioner  # noqa: E402
from ssr_jax.train import checkpoints, trainer  # noqa: E402
import helpers  # noqa: E402

TASK = "ssr_default_span_corruption"
LENGTHS = {"inputs": 64, "targets": 16}
SHAPE = {"d_model": 32, "d_ff": 64, "num_heads": 2, "d_kv": 16, "num_encoder_layers": 1,
         "num_decoder_layers": 1}
DATA = [f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}"]


def _train_argv(model_dir, *extra):
    return ["train", "--gin_file=gin/experiments/tiny_default.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
            *[f"--gin.t5_1_1_tiny/T5Config.{k}={v}" for k, v in SHAPE.items()], *DATA,
            "--gin.EVAL_EVERY=0", "--gin.train.log_every=1",
            "--gin.CheckpointConfig.save_every=2", *extra]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny_run")
    assert cli.main(_train_argv(model_dir)) == 0
    return str(model_dir)


def test_training_records_the_tasks_vocabulary(run_dir, vocabulary):
    with open(os.path.join(run_dir, "checkpoints", "vocab.json")) as f:
        record = json.load(f)
    assert record == vocab_lib.vocab_record(vocabulary)
    assert os.path.isfile(record["sentencepiece_model_file"])


def test_eval_and_infer_without_a_model_gin_file(run_dir, tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    assert cli.main(["eval", "--gin_file=gin/runs/eval.gin", f"--gin.MODEL_DIR='{out_dir}'",
                     f"--gin.CHECKPOINT_PATH='{run_dir}'", *DATA, "--gin.BATCH_SIZE=8",
                     "--gin.evaluate.num_batches=2"]) == 0
    printed = capsys.readouterr().out
    # The same numbers as an evaluation with the model spelled out.
    model = EncoderDecoderModel(T5Config(vocab_size=4224, **SHAPE))
    expected = trainer.evaluate(
            model=model, checkpoint_path=run_dir, partitioner=Partitioner({"data": -1}),
            dataset=DatasetConfig(TASK, LENGTHS, split="validation", batch_size=8,
                                  shuffle=False, pack=False, module="tasks"), num_batches=2)
    capsys.readouterr()
    assert f"loss {expected['loss']:.4f}" in printed, printed

    assert cli.main(["infer", "--gin_file=gin/runs/infer.gin", f"--gin.MODEL_DIR='{out_dir}'",
                     f"--gin.CHECKPOINT_PATH='{run_dir}'", *DATA, "--gin.BATCH_SIZE=8",
                     "--gin.INFER_BATCHES=1", "--gin.DecodeConfig.method='greedy'",
                     "--gin.MAX_DECODE_LENGTH=4"]) == 0
    files = os.listdir(os.path.join(out_dir, "inference"))
    assert any(f.endswith(".jsonl") for f in files), files


def test_a_model_that_disagrees_with_the_checkpoint_is_refused_in_one_line(run_dir, tmp_path,
                                                                          capsys):
    line = helpers.cli_error_line(capsys, [
            "eval", "--gin_file=gin/models/t5_1_1/tiny.gin", "--gin_file=gin/runs/eval.gin",
            f"--gin.MODEL_DIR='{tmp_path}'", f"--gin.CHECKPOINT_PATH='{run_dir}'", *DATA,
            "--gin.t5_1_1_tiny/T5Config.d_model=48", "--gin.VOCAB_SIZE=4224"])
    config = os.path.join(run_dir, "checkpoints", "2", "model_config.json")
    assert f"d_model 48 in the gin MODEL, 32 in {config}" in line, line
    assert not os.path.exists(tmp_path / "eval_validation")  # refused before any compute


def test_finetune_takes_the_model_from_the_initial_checkpoint(run_dir, tmp_path):
    ft = tmp_path / "ft"
    assert cli.main(["train", "--gin_file=gin/runs/finetune.gin", f"--gin.MODEL_DIR='{ft}'",
                     f"--gin.INITIAL_CHECKPOINT_PATH='{run_dir}'", *DATA,
                     "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.EVAL_EVERY=0",
                     "--gin.CheckpointConfig.save_every=1"]) == 0
    stored = checkpoints.load_model_config(run_dir)
    tuned = checkpoints.load_model_config(str(ft))
    assert tuned == {**stored, "dropout_rate": 0.1}  # fine-tuning's DROPOUT_RATE


def test_export_hf_takes_the_recorded_vocabulary(run_dir, tmp_path, capsys, vocabulary):
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    assert cli.main(["export-hf", "--checkpoint", run_dir, "--out", out]) == 0
    capsys.readouterr()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Return a new sorted list."
    assert tok(text)["input_ids"] == list(vocabulary.encode(text)) + [1]
    assert tok.convert_tokens_to_ids("<extra_id_0>") == vocabulary.vocab_size - 1

    # A vocabulary file changed since training is refused, as is no known vocabulary.
    record_path = os.path.join(run_dir, "checkpoints", "vocab.json")
    with open(record_path) as f:
        record = json.load(f)
    fake = tmp_path / "fake_run" / "checkpoints"
    os.makedirs(fake)
    os.symlink(os.path.join(run_dir, "checkpoints", "2"), fake / "2")
    with open(fake / "vocab.json", "w") as f:
        json.dump({**record, "sentencepiece_sha256": "0" * 64}, f)
    line = helpers.cli_error_line(capsys, ["export-hf", "--checkpoint", str(fake.parent),
                                           "--out", str(tmp_path / "x")])
    assert "changed since training" in line and record["sentencepiece_model_file"] in line
    os.remove(fake / "vocab.json")
    line = helpers.cli_error_line(capsys, ["export-hf", "--checkpoint", str(fake.parent),
                                           "--out", str(tmp_path / "x")])
    assert "records no vocabulary" in line and "--vocab" in line
    assert not os.path.exists(tmp_path / "x" / "config.json")


def test_a_teacher_trained_on_another_sentencepiece_model_is_refused(tmp_path, capsys,
                                                                     monkeypatch):
    """`ssr-jax train` records the vocabulary; a same-sized other one is refused before the
    student builds anything."""
    from pydoc_data import topics
    text = tmp_path / "text.txt"
    text.write_text("\n".join(topics.topics.values()))
    # 4020 pieces + 100 extra ids = 4120, padded to 4224 like the default vocabulary.
    spm = vocab_lib.train_sentencepiece([str(text)], str(tmp_path / "other"), 4020)
    assert vocab_lib.padded_vocab_size(vocab_lib.get_vocabulary(spm)) == 4224
    (tmp_path / "other_vocab_tasks.py").write_text(
            "from ssr_jax import vocab\nfrom ssr_jax.data import factories\n"
            "factories.register_text_task('other_vocab_text', {'train': %r, 'validation': %r},"
            " vocab.get_vocabulary(%r), overwrite=True)\n" % (str(text), str(text), spm))
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = tmp_path / "teacher"
    assert cli.main([*_train_argv(teacher), "--gin.MIXTURE_OR_TASK_MODULE='other_vocab_tasks'",
                     "--gin.MIXTURE_OR_TASK_NAME='other_vocab_text'"]) == 0
    with open(teacher / "checkpoints" / "vocab.json") as f:
        assert json.load(f)["sentencepiece_model_file"] == spm
    capsys.readouterr()
    student = tmp_path / "student"
    line = helpers.cli_error_line(capsys, [
            "train", "--gin_file=gin/experiments/default_student_ssr.gin",
            f"--gin.MODEL_DIR='{student}'", f"--gin.TEACHER_CHECKPOINT='{teacher}'"])
    assert "SSR teacher" in line and spm in line and "default_spm.model" in line, line
    assert not os.path.exists(student / "checkpoints")


def test_a_model_dir_of_another_vocabulary_is_refused(tmp_path, vocabulary):
    import types
    from ssr_jax.cli.train import record_vocabulary
    spec = types.SimpleNamespace(model_dir=str(tmp_path), train_dataset=DatasetConfig(
            TASK, LENGTHS, module="tasks"))
    path = record_vocabulary(spec)
    with open(path) as f:
        record = json.load(f)
    assert record == vocab_lib.vocab_record(vocabulary)
    assert record_vocabulary(spec) == path  # the same vocabulary: a resume is fine
    with open(path, "w") as f:
        json.dump({**record, "sentencepiece_sha256": "0" * 64,
                   "sentencepiece_model_file": "/other/spm.model"}, f)
    with pytest.raises(UserError, match=r"another vocabulary .*/other/spm\.model.*fresh MODEL_DIR"):
        record_vocabulary(spec)
