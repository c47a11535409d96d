"""The last stage of `ssr-jax compare`: score the decoded test files and write the report.

Everything is recomputed from the files the fine-tuning stages wrote (one JSONL row per test
example: inputs, targets, prediction), so the report's numbers are those files' numbers.
"""
import json
from typing import Any, Dict, List, Mapping

from ssr_jax.cli.compare_spec import BASELINE, CompareSpec
from ssr_jax.errors import UserError

# Distinct test predictions per example under which an arm is flagged as writing (nearly)
# one output for every input: a comparison of such students says which constant scores
# better, not which objective helps.
DEGENERATE_SHARE = 0.1


def read_rows(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def task_rows(task: str, runs: Mapping[str, List[Mapping[str, Any]]]):
    """(the examples' rows, {arm: [predictions of each seed]}); every file must hold the same
    examples in the same order."""
    reference, predictions = None, {}
    for arm, seeds in runs.items():
        predictions[arm] = []
        for run in seeds:
            rows = read_rows(run["test_file"])
            keys = [(r.get("inputs"), r["targets"]) for r in rows]
            if reference is None:
                reference, first = rows, (run["test_file"], keys)
            elif keys != first[1]:
                raise UserError(f"{run['test_file']} and {first[0]} do not hold the same "
                                f"examples of {task}; rerun their fine-tuning stages.")
            predictions[arm].append([r["prediction"] for r in rows])
    return reference or [], predictions


def score(spec: CompareSpec, task_name: str, runs) -> Dict[str, Any]:
    # pylint: disable=import-outside-toplevel
    import tasks as task_registry
    from ssr_jax.compare import scores
    from ssr_jax.data.dataset import get_task
    from ssr_jax.train import infer as infer_lib
    task = get_task(task_name, spec.module)
    rows, predictions = task_rows(task_name, runs)
    targets, _ = infer_lib.postprocessed(task, rows)
    post = {arm: [infer_lib.postprocessed(task, [dict(r, prediction=p) for r, p in
                                                 zip(rows, seed)])[1] for seed in seeds]
            for arm, seeds in predictions.items()}
    extra = task_registry.trivial_predictions(task_name, [r.get("inputs", "") for r in rows])
    extra = {name: infer_lib.postprocessed(task, [dict(r, prediction=p) for r, p in
                                                  zip(rows, preds)])[1]
             for name, preds in extra.items()}
    fns = list(getattr(task, "predict_metric_fns", None) or [])
    if not fns:
        raise UserError(f"task {task_name!r} has no metric_fns: compare scores decoded "
                        "predictions with them (register the task with metric_fns=[...]).")
    first = next(iter(runs.values()))[0]
    distinct = {arm: [len(set(seed)) / max(1, len(seed)) for seed in seeds]
                for arm, seeds in predictions.items()}
    return {"primary_metric": first["primary_metric"], "num_examples": len(rows),
            "distinct_outputs": distinct,
            "split": first["test_split"],
            "scores": scores.score_task(fns, targets, post, BASELINE,
                                        num_resamples=spec.num_resamples, seed=0,
                                        extra_predictions=extra)}


def task_notes(task_name: str, scored: Mapping[str, Any]) -> List[str]:
    """The report's warnings for a task: each arm whose primary metric does not beat the best
    trivial baseline, and each arm with a seed that wrote (nearly) one output for every
    input (`distinct_outputs` < DEGENERATE_SHARE)."""
    primary, tables = scored["primary_metric"], scored["scores"]
    baselines = {name: metrics[primary]["mean"] for name, metrics in
                 (tables.get("extra") or {}).items() if primary in metrics}
    notes = []
    if baselines:
        best = max(baselines, key=baselines.get)
        for arm, metrics in tables["arms"].items():
            mean = metrics[primary]["mean"]
            if not mean > baselines[best]:
                notes.append(f"{task_name}: {arm} ({primary} {mean:.2f}) does not beat the "
                             f"trivial baseline {best} ({baselines[best]:.2f}): the arms "
                             "are compared below what a model that learnt nothing scores.")
    for arm, shares in (scored.get("distinct_outputs") or {}).items():
        worst = min(shares)
        if worst < DEGENERATE_SHARE:
            notes.append(f"{task_name}: {arm} wrote nearly one output for every input (its "
                         f"worst seed: {worst:.1%} distinct predictions); its score is that "
                         "of a constant, not of reading the input.")
    return notes


def _protocol(spec: CompareSpec, teacher, init) -> Dict[str, Any]:
    ratio = teacher["non_embedding_params"] / max(1, init["non_embedding_params"])
    return {
        "teacher": (f"{teacher['dir']} (step {teacher['step']}, "
                    f"{teacher['non_embedding_params']:,} non-embedding params, "
                    f"{ratio:.1f}x the student)"),
        "student": (f"{init['non_embedding_params']:,} non-embedding params "
                    f"(d_model {init['model'].get('d_model')}, "
                    f"{init['model'].get('num_encoder_layers')}+"
                    f"{init['model'].get('num_decoder_layers')} layers)"),
        "shared init": f"{init['dir']} (step {init['step']})",
        "arms": f"{', '.join(spec.arms)}: {spec.arm_steps} steps each from the init",
        "fine-tuning": (f"{spec.finetune_gin}, "
                        + ", ".join(f"{t}: {spec.steps_of(t)} steps" for t in spec.tasks)
                        + ", seeds "
                        f"{list(spec.seeds)}; checkpoint chosen every {spec.select_every} "
                        f"steps by the {spec.decode_method}-decoded validation metric"),
        "decoding": spec.decode_description(),
        "bootstrap": f"{spec.num_resamples} resamples of the test examples",
    }


def build_and_write(spec: CompareSpec, out: str, teacher, init, arms, tasks) -> Dict[str, Any]:
    from ssr_jax.compare import report  # pylint: disable=import-outside-toplevel
    fills = teacher["fills"]
    results: Dict[str, Any] = {
        "protocol": _protocol(spec, teacher, init),
        "teacher": {"checkpoint": teacher["dir"], "step": teacher["step"],
                    "non-embedding params": teacher["non_embedding_params"],
                    "valid non-empty fills (held-out)": fills.get("valid_nonempty_share"),
                    "empty fills": fills.get("empty_share"),
                    "fallbacks": fills.get("fallback_share"),
                    "reached the target": teacher["reached_target"],
                    "fill history": [(h["step"], h.get("valid_nonempty_share"))
                                     for h in teacher["fill_history"]]},
        "init": {"label": "shared init", "metrics_file": f"{init['dir']}/train/metrics.jsonl",
                 "eval": init["eval"], "seconds": init["seconds"]},
        "arms": {arm: {"label": arm, "pretrain": {
                     "dir": info["dir"], "eval": info["eval"],
                     "metrics_file": info["metrics_file"],
                     "teacher_flops": info.get("teacher_flops"),
                     "teacher_seconds": info.get("teacher_seconds"),
                     "seconds": info["seconds"]}} for arm, info in arms.items()},
        "tasks": {name: score(spec, name, entry["runs"]) for name, entry in tasks.items()},
        "finetuning": {name: {arm: [{"best_step": r["best_step"], "seconds": r["seconds"],
                                     "test_file": r["test_file"]} for r in runs]
                              for arm, runs in entry["runs"].items()}
                       for name, entry in tasks.items()},
        "notes": [],
    }
    for name, scored in results["tasks"].items():
        results["notes"] += task_notes(name, scored)
    if not teacher["reached_target"]:
        results["notes"].append(
                f"The teacher reached {fills.get('valid_nonempty_share', 0):.1%} valid "
                f"non-empty fills, below the {spec.min_valid_fills:.0%} target.")
    paths = report.write_report(out, results)
    with open(paths["results"]) as f:
        written = json.load(f)
    written["summary"] = [s for per_task in written.get("sentences", {}).values()
                          for s in per_task.values()]
    return written
