"""`ssr-jax default-run` (a quick `ssr-jax compare`), shrunk to a few steps: teacher, shared
init, span-corruption and SSR arms, fine-tuning with decode-based checkpoint choice, scores,
report, HF export; the report checked against the predictions it wrote."""
import json
import os

import numpy as np
import pytest

from ssr_jax.cli import compare_stages, default_run
from ssr_jax.cli.compare_spec import CompareSpec
from ssr_jax.errors import UserError

GEC = "ssr_default_gec"


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="must be >= 1"):
        default_run.main([f"--out_dir={tmp_path}", "--student_steps=0"])


@pytest.mark.parametrize("changes, match", [
    ({"arms": ("ssr",)}, "must include the baseline 'span_corruption'"),
    ({"arms": ("span_corruption", "sr")}, r"unknown arm\(s\) \['sr'\]"),
    ({"select_every": 700}, "no checkpoint to choose from"),
    ({"tasks": ("x",)}, r"task_lengths has no lengths for \['x'\]"),
    ({"seeds": ()}, "compare.seeds is empty"),
    ({"tasks": ()}, "compare.tasks is empty"),
    ({"decode_method": "sample"}, "compare.decode_method='sample': use 'greedy' or 'beam'"),
    ({"num_beams": 0}, r"compare.num_beams=0 must be an integer >= 1"),
])
def test_compare_spec_refuses_bad_settings(changes, match):
    base = dict(out_dir="/tmp/x", task_lengths={GEC: {"inputs": 8, "targets": 8}},
                tasks=(GEC,))
    with pytest.raises(UserError, match=match):
        CompareSpec(**{**base, **changes})


def _recompute(test_file):
    """The task's metrics from a written JSONL file, independently of compare's scoring."""
    from ssr_jax.data import metrics  # pylint: disable=import-outside-toplevel
    rows = [json.loads(line) for line in open(test_file)]
    prefix = "fix: "
    sources = [r["inputs"][len(prefix):] if r["inputs"].startswith(prefix) else r["inputs"]
               for r in rows]
    targets = [r["targets"] for r in rows]
    preds = [r["prediction"] for r in rows]
    out = metrics.gleu(targets, preds, sources=sources)
    out.update(metrics.exact_match(targets, preds))
    out["copy"] = metrics.gleu(targets, sources, sources=sources)["gleu"]
    return rows, out


@pytest.mark.slow
def test_shrunken_default_run_report_matches_its_predictions(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [f"--out_dir={out}", "--teacher_steps=4", "--init_steps=4", "--student_steps=4",
            "--finetune_steps=4", "--eval_batches=1",
            "--gin=compare.fill_check_examples=16", "--gin=compare.validation_batches=1",
            "--gin=compare.test_batches=1", "--gin=compare.decode_batch_size=16",
            "--gin=compare.num_resamples=50", "--gin=compare.seeds=[0, 1]"]
    assert default_run.main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()

    # Stages: the arms continued the init's step; fine-tuning continued the arms'.
    init = json.loads((out / "stages" / "init.json").read_text())["result"]
    assert init["step"] == 4
    for arm in ("span_corruption", "ssr"):
        rec = json.loads((out / "stages" / f"arm__{arm}.json").read_text())["result"]
        assert rec["step"] == 8 and os.path.isdir(os.path.join(rec["dir"], "checkpoints", "8"))
        assert results["arms"][arm]["pretrain"]["eval"]["weight_sum"] > 0
    teacher = results["teacher"]
    assert 0.0 <= teacher["valid non-empty fills (held-out)"] <= 1.0
    ssr_cost = results["arms"]["ssr"]["pretrain"]
    assert ssr_cost["teacher_flops"] > 0 and results["arms"]["span_corruption"]["pretrain"][
        "teacher_flops"] is None

    # The report's numbers are the decoded files' numbers.
    scores = results["tasks"][GEC]["scores"]
    files = results["finetuning"][GEC]
    for arm, runs in files.items():
        assert len(runs) == 2
        for seed, run in enumerate(runs):
            # Fine-tuning 8 -> 12, a checkpoint every 2 steps: chosen among 10 and 12.
            assert run["best_step"] in (10, 12)
            assert compare_stages.saved_steps(
                os.path.dirname(os.path.dirname(run["test_file"]))) == [10, 12]
            rows, recomputed = _recompute(run["test_file"])
            assert len(rows) == scores["num_examples"] == 16  # one batch of 16 examples
            preds = [r["prediction"] for r in rows]
            assert results["tasks"][GEC]["distinct_outputs"][arm][seed] == \
                len(set(preds)) / len(preds)
            for key in ("gleu", "exact_match"):
                np.testing.assert_allclose(scores["arms"][arm][key]["seeds"][seed],
                                           recomputed[key], atol=1e-9)
        mean = np.mean([_recompute(r["test_file"])[1]["gleu"] for r in runs])
        np.testing.assert_allclose(scores["arms"][arm]["gleu"]["mean"], mean, atol=1e-9)
    np.testing.assert_allclose(scores["floors"]["gleu_copy_source"], recomputed["copy"],
                               atol=1e-9)
    np.testing.assert_allclose(scores["extra"]["copy_input"]["gleu"]["mean"], recomputed["copy"],
                               atol=1e-9)
    sentence = results["sentences"][GEC]["ssr"]
    assert sentence in report and sentence in printed
    assert f"{scores['arms']['ssr']['gleu']['mean']:.2f}" in sentence
    for plot in results["plots"].values():
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The SSR student exported with the recorded vocabulary.
    hf = out / "ssr_student_hf"
    assert (hf / "config.json").is_file() and str(hf) in printed
    assert "default run finished" in printed

    # A rerun skips every stage (nothing is trained again) and writes the same scores.
    assert default_run.main(argv) == 0
    again = capsys.readouterr().out
    assert "ssr-jax train" not in again and "step 1/" not in again
    assert again.count("done before") >= 1 + 1 + 2 + 4
    assert json.loads((out / "results.json").read_text())["tasks"] == results["tasks"]


def test_a_stage_done_with_other_settings_is_refused(tmp_path):
    spec = CompareSpec(out_dir=str(tmp_path), tasks=(GEC,),
                       task_lengths={GEC: {"inputs": 8, "targets": 8}})
    stages = compare_stages.Stages(spec)
    assert stages._done("init", {"steps": 3}) is None  # pylint: disable=protected-access
    stages._finish("init", {"steps": 3}, {"dir": "x"})  # pylint: disable=protected-access
    assert stages._done("init", {"steps": 3}) == {"dir": "x"}  # pylint: disable=protected-access
    with pytest.raises(UserError, match="was done with other settings"):
        stages._done("init", {"steps": 4})  # pylint: disable=protected-access


def test_the_finetuning_recipe_decays_to_zero_over_the_finetunings_own_steps(tmp_path):
    """The step travels with the params (an arm at step 600 fine-tunes from 600 to 3000);
    gin/compare/finetune.gin with the bindings compare passes decays 5e-2 -> 0 over those
    2400 steps, not over 0..3000."""
    from ssr_jax.cli import flags as flags_lib  # pylint: disable=import-outside-toplevel
    from ssr_jax.cli import gin_registry  # pylint: disable=import-outside-toplevel
    spec = CompareSpec(out_dir=str(tmp_path), tasks=(GEC,), finetune_steps=2400,
                       task_lengths={GEC: {"inputs": 8, "targets": 8}})
    bindings = compare_stages.Stages(spec).finetune_bindings(
            GEC, {"dir": "/ckpt/arm", "step": 600}, 1, str(tmp_path / "ft"))
    gin_registry.setup(flags_lib.parse_flags([f"--gin_file={spec.finetune_gin}"]
                                             + [f"--gin.{b}" for b in bindings]))
    assert gin_registry.query_macro("TRAIN_STEPS") == 3000
    assert gin_registry.query_macro("SEED") == 1
    rate = gin_registry.call("linear_schedule")
    base = 5e-2
    for step, want in ((600, base), (1800, base / 2), (2999, base / 2400), (3000, 0.0)):
        assert float(rate(step)) == pytest.approx(want, rel=1e-3, abs=1e-9), step  # float32


def test_a_recipe_of_ones_own_may_ignore_the_offered_finetuning_macros(tmp_path, capsys):
    """compare passes FINETUNE_START_STEP / FINETUNE_STEPS to every fine-tuning; a recipe at a
    constant rate (gin/runs/finetune.gin) ignores them without a warning, while a typo of a
    macro it does use still warns."""
    from ssr_jax.cli import flags as flags_lib  # pylint: disable=import-outside-toplevel
    from ssr_jax.cli import gin_registry  # pylint: disable=import-outside-toplevel
    spec = CompareSpec(out_dir=str(tmp_path), tasks=(GEC,), finetune_gin="runs/finetune.gin",
                       task_lengths={GEC: {"inputs": 8, "targets": 8}})
    bindings = compare_stages.Stages(spec).finetune_bindings(
            GEC, {"dir": "/ckpt/arm", "step": 600}, 0, str(tmp_path / "ft"))
    capsys.readouterr()
    gin_registry.setup(flags_lib.parse_flags([f"--gin_file={spec.finetune_gin}"]
                                             + [f"--gin.{b}" for b in bindings]
                                             + ["--gin.DROPOUT_RAT=0.0"]))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == ["ssr-jax: warning: --gin.DROPOUT_RAT=0.0 is not used by any binding (did "
                   "you mean DROPOUT_RATE?)"]


def test_a_stage_keys_on_its_gin_files_text_includes_too(tmp_path, monkeypatch):
    """A recipe edited in place (here: a file it includes) is not 'done before'."""
    (tmp_path / "base.gin").write_text("X = 1\n")
    (tmp_path / "recipe.gin").write_text("include 'base.gin'\nY = 2\n")
    monkeypatch.chdir(tmp_path)
    stages = compare_stages.Stages(CompareSpec(out_dir=str(tmp_path / "out"), tasks=(GEC,),
                                               task_lengths={GEC: {"inputs": 8, "targets": 8}}))
    before = compare_stages.gin_digest("recipe.gin")
    assert compare_stages.gin_digest("recipe.gin") == before
    # pylint: disable=protected-access
    stages._finish("init", {**stages.recipe("recipe.gin"), "steps": 3}, {"dir": "x"})
    assert stages._done("init", {**stages.recipe("recipe.gin"), "steps": 3}) == {"dir": "x"}
    (tmp_path / "base.gin").write_text("X = 3\n")
    assert compare_stages.gin_digest("recipe.gin") != before
    with pytest.raises(UserError, match="was done with other settings"):
        stages._done("init", {**stages.recipe("recipe.gin"), "steps": 3})
    assert compare_stages.gin_digest("compare/finetune.gin") != compare_stages.gin_digest(
            "runs/finetune.gin")  # found on the search path; the includer differs


def test_a_task_without_a_test_split_falls_back_to_validation_with_a_warning(capsys):
    assert compare_stages.test_split(GEC, "tasks") == "test"
    assert "WARNING" not in capsys.readouterr().out
    # The pre-training task has train and validation splits only.
    assert compare_stages.test_split("ssr_default_span_corruption", "tasks") == "validation"
    assert "has no test split" in capsys.readouterr().out
