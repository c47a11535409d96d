"""The comparison's report: results.json (the whole results dict) and report.md with its
plots, from one results dict that the `compare` command fills stage by stage.

Results dict (what the caller passes; only 'tasks' is required, the rest is rendered when
present; numbers are plain Python or numpy scalars):
  {'protocol': {name: str | number, ...},  # teacher, sizes, steps, batch, fine-tuning
                                           # recipe, seeds, scale and why: rendered in order
   'teacher': {name: str | number, ...},   # e.g. checkpoint, non-embedding params, held-out
                                           # fill quality: rendered in order
   'init': {'label': str, 'metrics_file': path, 'eval': {...}, 'seconds': s},  # the shared
                                           # student init (optional; plotted and tabled)
   'arms': {arm: {'label': str,            # the arm's name in the report (default: arm)
                  'pretrain': {'eval': {'loss': x, 'accuracy': y},  # final held-out eval
                               'metrics_file': path,   # the arm's MODEL_DIR/train/metrics.jsonl
                               'teacher_flops': f, 'teacher_seconds': t, 'seconds': s}}},
   'tasks': {task: {'primary_metric': key,            # e.g. 'rougeLsum', 'gleu'
                    'higher_is_better': True,         # optional
                    'scores': scores.score_task(...)}},
   'notes': [str, ...]}
write_report adds to what it writes to results.json: 'plots' {name: file relative to
out_dir}, 'verdicts' {task: {arm: 'better' | 'worse' | 'within noise'}} and 'sentences'
{task: {arm: the sentence in report.md}}, for every arm but the task's baseline.

report.md: the protocol and teacher lists, a table of pre-training (held-out loss and
accuracy, teacher FLOPs and seconds, wall seconds), per task a table of every arm and metric
(mean over seeds [95% bootstrap interval], seed std, difference vs the baseline [95%
interval], p) with the trivial baselines' rows and floors, and one sentence per task and arm:
"<arm> is better than / worse than / within noise of <baseline> on <task> (<metric> <arm
mean> vs <baseline mean>, p=<p>)." Metrics are printed with 2 decimals, p with 3.
"""
import copy
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from ssr_jax.compare import plots as plots_lib
from ssr_jax.compare.scores import verdict
from ssr_jax.errors import UserError

RESULTS_FILE, REPORT_FILE = "results.json", "report.md"
_PHRASE = {"better": "is better than", "worse": "is worse than",
           "within noise": "is within noise of"}


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become Python; NaN and inf become None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy scalar or array
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _value(x: Any) -> str:
    """A protocol/teacher value as text."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(_value(v) for v in x)
    if isinstance(x, Mapping):
        return ", ".join(f"{k}={_value(v)}" for k, v in x.items())
    return str(x)


def _num(x: Optional[float], spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _interval(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _label(results: Mapping[str, Any], arm: str) -> str:
    return str(results.get("arms", {}).get(arm, {}).get("label", arm))


def _items(title: str, entries: Mapping[str, Any]) -> List[str]:
    return [f"## {title}", ""] + [f"- **{_cell(k)}**: {_value(v)}" for k, v in entries.items()]


def _pretrain_table(results: Mapping[str, Any]) -> List[str]:
    rows = []
    init = results.get("init")
    if init:
        rows.append((str(init.get("label", "shared init")), init))
    rows += [(_label(results, arm), entry.get("pretrain") or {})
             for arm, entry in results.get("arms", {}).items()]
    if not rows:
        return []
    out = ["## Pre-training", "",
           "| arm | held-out loss | held-out accuracy | teacher FLOPs | teacher seconds | "
           "wall seconds |", "|---|---|---|---|---|---|"]
    for label, entry in rows:
        ev = entry.get("eval") or {}
        out.append(f"| {_cell(label)} | {_num(ev.get('loss'), '.4f')} | "
                   f"{_num(ev.get('accuracy'), '.4f')} | "
                   f"{_num(entry.get('teacher_flops'), '.3g')} | "
                   f"{_num(entry.get('teacher_seconds'), '.1f')} | "
                   f"{_num(entry.get('seconds'), '.1f')} |")
    return out


def sentence(arm_label: str, baseline_label: str, task: str, metric: str, arm_mean: float,
             baseline_mean: float, p_value: float, outcome: str) -> str:
    """The report's one sentence for an arm on a task."""
    return (f"{arm_label} {_PHRASE[outcome]} {baseline_label} on {task} ({metric} "
            f"{arm_mean:.2f} vs {baseline_mean:.2f}, p={p_value:.3f}).")


def _task_section(results: Mapping[str, Any], task: str, entry: Mapping[str, Any],
                  plot: Optional[str]):
    """(markdown lines, {arm: verdict}, {arm: sentence}) of one task."""
    metric, scores = entry.get("primary_metric"), entry.get("scores") or {}
    baseline = scores.get("baseline")
    keys = sorted((scores.get("arms") or {}).get(baseline) or {})
    if metric not in keys:
        raise UserError(f"task {task!r}: primary_metric {metric!r} is not among the "
                        f"baseline's scores {keys}; pass one of them.")
    higher = bool(entry.get("higher_is_better", True))
    out = [f"## {task}", "",
           f"{scores['num_examples']:,} test examples; 95% percentile bootstrap intervals over "
           "examples; differences are paired (the same resamples for both arms). Primary "
           f"metric: {metric}.", "",
           f"| arm | metric | mean over seeds [95% CI] | seed std | diff vs {_cell(_label(results, baseline))} "
           "[95% CI] | p |", "|---|---|---|---|---|---|"]
    for arm, rows in scores["arms"].items():
        for key, row in rows.items():
            diff = row.get("diff")
            out.append(f"| {_cell(_label(results, arm))} | {key} | {row['mean']:.2f} "
                       f"{_interval(row['ci95'])} | {_num(row.get('seed_std'), '.2f')} | "
                       + (f"{diff['mean']:+.2f} {_interval(diff['ci95'])} | "
                          f"{diff['p_value']:.3f} |" if diff else "– | – |"))
    for name, rows in scores.get("extra", {}).items():
        for key, row in rows.items():
            out.append(f"| {_cell(name)} | {key} | {row['mean']:.2f} {_interval(row['ci95'])}"
                       " | – | – | – |")
    for key, value in scores.get("floors", {}).items():
        out += ["", f"Floor: {key} = {value:.2f} (does not depend on the predictions)."]
    verdicts, sentences = {}, {}
    base_mean = scores["arms"][baseline][metric]["mean"]
    for arm, rows in scores["arms"].items():
        if arm == baseline:
            continue
        row = rows[metric]
        diff = row["diff"]
        verdicts[arm] = verdict(diff["ci95"][0], diff["ci95"][1], diff["p_value"], higher)
        sentences[arm] = sentence(_label(results, arm), _label(results, baseline), task,
                                  metric, row["mean"], base_mean, diff["p_value"],
                                  verdicts[arm])
    out += [""] + [f"- {s}" for s in sentences.values()]
    if plot:
        out += ["", f"![{task}: {metric} per arm]({plot})"]
    return out, verdicts, sentences


def render(results: Mapping[str, Any], plots: Optional[Mapping[str, str]] = None):
    """(report.md text, {task: {arm: verdict}}, {task: {arm: sentence}})."""
    plots = plots or {}
    lines = ["# Does SSR help? Objective comparison", ""]
    for key, title in (("protocol", "Protocol"), ("teacher", "Teacher")):
        if results.get(key):
            lines += _items(title, results[key]) + [""]
    table = _pretrain_table(results)
    if table:
        lines += table + [""]
    for name, title in (("pretrain_loss", "Pre-training loss"),
                        ("teacher_fills", "Teacher fills over training")):
        if name in plots:
            lines += [f"![{title}]({plots[name]})", ""]
    verdicts, sentences = {}, {}
    for task, entry in results.get("tasks", {}).items():
        section, verdicts[task], sentences[task] = _task_section(
                results, task, entry, plots.get(f"task:{task}"))
        lines += section + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines), verdicts, sentences


def write_report(out_dir: str, results: Mapping[str, Any], make_plots: bool = True
                 ) -> Dict[str, str]:
    """Writes results.json, report.md and (make_plots) the PNGs under out_dir; returns
    {'results': path, 'report': path, <plot name>: path}."""
    if not results.get("tasks"):
        raise UserError("write_report: the results have no 'tasks' (score at least one "
                        "downstream task first).")
    os.makedirs(out_dir, exist_ok=True)
    results = _jsonable(copy.deepcopy(dict(results)))
    plots = plots_lib.write_plots(out_dir, results) if make_plots else {}
    text, verdicts, sentences = render(results, plots)
    results.update(plots=plots, verdicts=verdicts, sentences=sentences)
    paths = {"results": os.path.join(out_dir, RESULTS_FILE),
             "report": os.path.join(out_dir, REPORT_FILE)}
    for path, body in ((paths["results"], json.dumps(results, indent=1, allow_nan=False)),
                       (paths["report"], text)):
        with open(path + ".tmp", "w") as f:
            f.write(body + "\n")
        os.replace(path + ".tmp", path)
    return {**paths, **{k: os.path.join(out_dir, v) for k, v in plots.items()}}
