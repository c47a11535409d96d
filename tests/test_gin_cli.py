"""The gin edge: flags, layering, one-line errors, and a tiny end-to-end train / eval / infer
on the embedded default corpus through `ssr-jax`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssr_jax import cli
from ssr_jax.cli import flags as flags_lib
from ssr_jax.cli import gin_registry
from ssr_jax.errors import UserError
import helpers
from test_trainer import compilation_cache  # noqa: F401  (module fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--gin_file=gin/experiments/tiny_default.gin"


_error_line = helpers.cli_error_line


def test_flags_layering_and_search_paths(tmp_path):
    extra = tmp_path / "mine.gin"
    extra.write_text("include 'experiments/tiny_default.gin'\nTRAIN_STEPS = 7\n")
    flags = flags_lib.parse_flags([f"--gin_file={extra.name}", "--gin.BATCH_SIZE=4",
                                    "--gin_bindings", "SEED = 3",
                                    f"--gin_search_paths={tmp_path}", "--gin.MODEL_DIR='/m'"])
    gin_registry.setup(flags)
    # experiment (300) < later file (7); run mode default (128) < experiment (16) < flag (4).
    assert gin_registry.query_macro("TRAIN_STEPS") == 7
    assert gin_registry.query_macro("BATCH_SIZE") == 4
    assert gin_registry.query_macro("SEED") == 3
    assert gin_registry.query_macro("MODEL_DIR") == "/m"
    assert gin_registry.query_macro("VOCAB_SIZE") == 4224  # experiment overrides the size file
    with pytest.raises(UserError, match="unknown flag --gin_fil"):
        flags_lib.parse_flags(["--gin_fil=x.gin"])
    with pytest.raises(UserError, match=r"gin file 'nope.gin' not found"):
        gin_registry.setup(flags_lib.parse_flags(["--gin_file=nope.gin"]))


def test_includes_resolve_beside_a_directory_named_like_a_gin_folder(tmp_path, monkeypatch):
    # `make run` writes runs/ in the working directory; Python then sees a namespace package
    # `runs` and gin's package reader used to crash on `include 'runs/pretrain.gin'`.
    import importlib
    (tmp_path / "runs").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    importlib.invalidate_caches()
    gin_registry.setup(flags_lib.parse_flags(["--gin_file=experiments/tiny_default.gin",
                                             "--gin.MODEL_DIR='/m'"]))
    assert gin_registry.query_macro("TRAIN_STEPS") == 300


def test_default_vocab_size_matches_the_shipped_vocabulary():
    import tasks  # pylint: disable=import-outside-toplevel
    gin_registry.setup(flags_lib.parse_flags([TINY, "--gin.MODEL_DIR='/m'"]))
    assert gin_registry.query_macro("VOCAB_SIZE") == tasks.default_model_vocab_size()


@pytest.mark.parametrize("flag,expected", [
        ("--gin.T5Config.d_modle=3",
         "gin binding: Configurable 'T5Config' doesn't have a parameter named 'd_modle'"),
        ("--gin.Trainer.steps=3", "No configurable matching 'Trainer'"),
        ("--gin.MODEL_DIR=/tmp/unquoted", "string values need quotes"),
        # A bare word inside a literal: gin's multi-line message, with no ast object repr.
        ("--gin.TASK_FEATURE_LENGTHS={inputs: 48}",
         "Failed to parse token 'inputs' in 'TASK_FEATURE_LENGTHS = {inputs: 48}' (string "
         "values need quotes"),
])
def test_bad_gin_bindings_are_one_line(capsys, flag, expected):
    line = _error_line(capsys, ["train", TINY, "--gin.MODEL_DIR='/tmp/m'", flag])
    assert expected in line


def test_missing_required_macro_is_one_line(capsys):
    line = _error_line(capsys, ["train", TINY])
    assert "required gin value(s) not set: MODEL_DIR" in line
    line = _error_line(capsys, ["eval", "--gin_file=gin/models/t5_1_1/tiny.gin",
                                "--gin_file=gin/runs/eval.gin", "--gin.MODEL_DIR='/m'"])
    assert "MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS" in line


def test_mesh_and_batch_errors_are_one_line(capsys, tmp_path):
    model_dir = f"--gin.MODEL_DIR='{tmp_path}'"
    line = _error_line(capsys, ["train", TINY, model_dir,
                                "--gin.Partitioner.mesh_shape={'data': 3, 'model': -1}"])
    assert "do not divide the 8 devices" in line
    line = _error_line(capsys, ["train", TINY, model_dir, "--gin.BATCH_SIZE=6"])
    assert "BATCH_SIZE=6 is not divisible by the batch mesh axes ('data',) of size 8" in line
    # Not "choose a multiple of 1": a negative size is not a divisibility problem.
    line = _error_line(capsys, ["train", TINY, model_dir, "--gin.BATCH_SIZE=-4"])
    assert line.endswith("BATCH_SIZE=-4 must be a positive integer (a multiple of 8 on this "
                         "mesh).")


def test_unclosed_bracket_in_an_included_gin_file_is_one_line_naming_it(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("TRAIN_STEPS = 3\nBATCH_SIZE = (4,\n\nSEED = 1\n")
    top = tmp_path / "top.gin"
    top.write_text(f"include 'experiments/tiny_default.gin'\ninclude '{bad}'\n")
    line = _error_line(capsys, ["train", f"--gin_file={top}", "--gin.MODEL_DIR='/tmp/m'"])
    assert line == (f"ssr-jax train: error: gin file {bad}:2: unclosed '(' (the file ends "
                    "inside it)")
    line = _error_line(capsys, ["train", TINY, "--gin.MODEL_DIR='/tmp/m'",
                                "--gin.SEED=(1"])
    assert line == "ssr-jax train: error: gin binding 'SEED = (1': unclosed bracket."


def test_syntax_error_in_a_file_names_it_without_the_quoting_hint(capsys, tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'experiments/tiny_default.gin'\nTRAIN_STEPS = 3 +\n")
    line = _error_line(capsys, ["train", f"--gin_file={bad}", "--gin.MODEL_DIR='/tmp/m'"])
    assert line.startswith(f"ssr-jax train: error: gin file {bad}:2: ")
    assert "quotes" not in line  # the hint is for command-line bindings only


@pytest.mark.parametrize("flag,expected", [
        ("--gin.TRAIN_STEPS='ten'", "TRAIN_STEPS='ten' must be an integer."),
        ("--gin.SEED=1.5", "SEED=1.5 must be an integer."),
        ("--gin.train.log_every='x'", "train.log_every='x' must be an integer."),
        ("--gin.MODEL_DIR=3", "MODEL_DIR=3 must be a path"),
])
def test_wrongly_typed_run_values_are_one_line_naming_the_macro(capsys, tmp_path, flag,
                                                                 expected):
    model_dir = f"--gin.MODEL_DIR='{tmp_path}'"
    line = _error_line(capsys, ["train", TINY, model_dir, flag])
    assert line.startswith("ssr-jax train: error: " + expected), line


def test_unused_command_line_macro_warns_with_a_close_match(capsys):
    gin_registry.setup(flags_lib.parse_flags([TINY, "--gin.MODEL_DIR='/m'",
                                              "--gin.TRAIN_STEP=10", "--gin.BATCH_SIZE=4",
                                              "--gin_bindings=ZZZ_UNRELATED = 1"]))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["ssr-jax: warning: --gin.TRAIN_STEP=10 is not used by any binding (did you "
                   "mean TRAIN_STEPS?)",
                   "ssr-jax: warning: --gin.ZZZ_UNRELATED=1 is not used by any binding"]
    assert gin_registry.query_macro("TRAIN_STEPS") == 300  # what the typo leaves in place


def test_installed_command_prints_one_line_without_traceback():
    # The CLI's own log settings, not the test session's (tests/conftest.py sets the same).
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    proc = subprocess.run([sys.executable, "-m", "ssr_jax.cli", "train", TINY], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": REPO})
    assert proc.returncode == 2
    # Nothing but the framework's line: no TF/CUDA start-up noise ("cudart_stub.cc ... Could
    # not find cuda drivers", "failed call to cuInit", "absl::InitializeLog()").
    assert proc.stderr.splitlines() == [
            "ssr-jax train: error: required gin value(s) not set: MODEL_DIR; set them in a gin "
            "file or with e.g. --gin.MODEL_DIR=..."]


@pytest.mark.slow
def test_tiny_default_run_loss_falls_then_eval_and_infer(tmp_path, capsys):
    """`ssr-jax train` with the tiny default experiment (smaller and shorter), then eval and
    infer on its checkpoint."""
    model_dir = f"--gin.MODEL_DIR='{tmp_path}'"
    shape = ["--gin.t5_1_1_tiny/T5Config.d_model=64", "--gin.t5_1_1_tiny/T5Config.d_ff=128",
             "--gin.t5_1_1_tiny/T5Config.num_encoder_layers=1",
             "--gin.t5_1_1_tiny/T5Config.num_decoder_layers=1",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}"]
    assert cli.main(["train", TINY, model_dir, *shape, "--gin.TRAIN_STEPS=80",
                     "--gin.BATCH_SIZE=16", "--gin.train.log_every=8", "--gin.EVAL_EVERY=0",
                     "--gin.CheckpointConfig.save_every=40"]) == 0
    with open(tmp_path / "train" / "metrics.jsonl") as f:
        losses = [json.loads(line)["loss"] for line in f]  # means over 8 steps each
    assert len(losses) == 10
    # From about ln(4224) = 8.3 at initialisation; unigram statistics alone reach ~5.5.
    assert losses[0] > 7.0 and losses[-1] < losses[0] - 1.5, losses
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40", "80", "model_config.json",
                                                            "vocab.json"]
    assert os.path.exists(tmp_path / "config.gin")

    assert cli.main(["eval", "--gin_file=gin/models/t5_1_1/tiny.gin",
                     "--gin_file=gin/runs/eval.gin", model_dir, *shape,
                     "--gin.VOCAB_SIZE=4224",
                     "--gin.MIXTURE_OR_TASK_NAME='ssr_default_span_corruption'",
                     "--gin.eval_data/DatasetConfig.batch_size=16",
                     "--gin.evaluate.num_batches=2"]) == 0
    assert "eval_validation step 80 | loss" in capsys.readouterr().out

    assert cli.main(["infer", "--gin_file=gin/models/t5_1_1/tiny.gin",
                     "--gin_file=gin/runs/infer.gin", model_dir, *shape,
                     "--gin.VOCAB_SIZE=4224",
                     "--gin.MIXTURE_OR_TASK_NAME='ssr_default_span_corruption'",
                     "--gin.BATCH_SIZE=8", "--gin.INFER_BATCHES=1",
                     "--gin.DecodeConfig.method='greedy'", "--gin.MAX_DECODE_LENGTH=16"]) == 0
    out_file = tmp_path / "inference" / "ssr_default_span_corruption-validation-80-greedy.jsonl"
    printed = capsys.readouterr().out
    assert f"wrote 8 predictions to {out_file}" in printed and "did not line up" not in printed
    with open(out_file) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 8
    assert set(rows[0]) == {"inputs", "targets", "prediction", "score"}
    assert all(r["targets"] for r in rows) and "<extra_id_0>" in rows[0]["inputs"]


def test_infer_decodes_rows_and_computes_the_tasks_metrics():
    """Inference's host side: token rows -> text (cut at EOS, no padding) -> task metrics."""
    from ssr_jax.train import infer  # pylint: disable=import-outside-toplevel

    class Vocab:
        def decode(self, ids):
            return " ".join(f"w{i}" for i in ids)

    class Feature:
        vocabulary = Vocab()

    class Task:
        output_features = {"inputs": Feature(), "targets": Feature()}
        postprocess_fn = staticmethod(lambda text, example=None, is_target=False: text.upper())
        predict_metric_fns = [lambda targets, predictions: {
                "exact": 100.0 * np.mean([t == p for t, p in zip(targets, predictions)])}]

    inputs = {"encoder_input_tokens": np.array([[5, 6, 1, 0], [7, 1, 0, 0]]),
              "decoder_target_tokens": np.array([[8, 9, 1, 0], [3, 1, 0, 0]])}
    preds = {"prediction": np.array([[8, 9, 1, 4], [4, 0, 0, 0]]), "score": np.array([-1., -2.])}
    rows = infer._decode_rows(Task(), inputs, preds)  # pylint: disable=protected-access
    assert rows[0] == {"inputs": "w5 w6", "targets": "w8 w9", "prediction": "w8 w9",
                       "score": -1.0}
    assert rows[1]["prediction"] == "w4"
    assert infer._task_metrics(Task(), rows) == {"exact": 50.0}  # pylint: disable=W0212
