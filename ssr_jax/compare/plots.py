"""The PNG plots of a comparison report, drawn with matplotlib's Agg canvas (no pyplot, no
display, no global backend switch); matplotlib is imported only here, when a plot is drawn.

Inputs are the results dict of `ssr_jax.compare.report` and each arm's training log:
MODEL_DIR/train/metrics.jsonl (`ssr_jax/train/metrics.py`: one JSON object per log step with
"step", "loss", ... and, for online SSR arms, the stage's "ssr/*" scalars from
`ssr_jax/ssr/stats.py`: the shares of spans with a non-empty fill, an empty fill, a fallback
and a fill dropped for length, which add up to 1).
"""
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional

from ssr_jax.errors import UserError

# The four kinds of span of RewriteStats.summary(), in the order they are stacked.
FILL_KEYS = (("ssr/nonempty_fill_rate", "non-empty fill"), ("ssr/empty_fill_rate", "empty fill"),
             ("ssr/fallback_rate", "fallback (no well-formed fill)"),
             ("ssr/truncated_rate", "dropped for length"))
LOSS_KEY, STEP_KEY = "loss", "step"


def _figure(width: float = 7.0, height: float = 4.0):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
        from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise UserError("the comparison's plots need matplotlib: pip install matplotlib "
                        "(or `make install`)") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The records of a metrics.jsonl, in file order; lines cut short by a kill are skipped."""
    if not os.path.exists(path):
        raise UserError(f"no training log {path}: the arm's pre-training did not write one "
                        "(rerun the stage, or leave 'metrics_file' out of its results).")
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and STEP_KEY in record:
                records.append(record)
    return records


def _series(records: List[Mapping[str, float]], key: str):
    points = [(r[STEP_KEY], r[key]) for r in records
              if key in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _label(results: Mapping[str, Any], arm: str) -> str:
    return str(results.get("arms", {}).get(arm, {}).get("label", arm))


def _logs(results: Mapping[str, Any]) -> Dict[str, str]:
    """{label: metrics file} of the shared init (if given) and every arm that has one."""
    logs = {}
    init = results.get("init") or {}
    if init.get("metrics_file"):
        logs[str(init.get("label", "shared init"))] = init["metrics_file"]
    for arm, entry in results.get("arms", {}).items():
        path = (entry.get("pretrain") or {}).get("metrics_file")
        if path:
            logs[_label(results, arm)] = path
    return logs


def plot_pretrain_loss(path: str, results: Mapping[str, Any]) -> Optional[str]:
    """Training loss vs step of the init and every arm; None when no arm has a log."""
    logs = _logs(results)
    if not logs:
        return None
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, log in logs.items():
        steps, loss = _series(read_metrics(log), LOSS_KEY)
        ax.plot(steps, loss, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_teacher_fills(path: str, results: Mapping[str, Any]) -> Optional[str]:
    """Per online SSR arm, the shares of span kinds vs step; None when no arm logged them."""
    arms = {}
    for label, log in _logs(results).items():
        records = read_metrics(log)
        if any(FILL_KEYS[0][0] in r for r in records):
            arms[label] = records
    if not arms:
        return None
    fig = _figure(7.0, 2.6 * len(arms) + 0.6)
    for i, (label, records) in enumerate(arms.items()):
        ax = fig.add_subplot(len(arms), 1, i + 1)
        for key, name in FILL_KEYS:
            steps, share = _series(records, key)
            if steps:
                ax.plot(steps, share, label=name, linewidth=1.2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("share of spans")
        ax.set_title(f"Teacher fills: {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    ax.set_xlabel("step")
    return _save(fig, path)


def plot_task(path: str, task: str, entry: Mapping[str, Any],
              results: Mapping[str, Any]) -> str:
    """The task's primary metric per arm: mean over seeds with its 95% bootstrap interval,
    the seeds as dots, and the trivial baselines and floors as horizontal lines."""
    metric, scores = entry["primary_metric"], entry["scores"]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    arms = list(scores["arms"])
    for x, arm in enumerate(arms):
        row = scores["arms"][arm][metric]
        low, high = row["ci95"]
        ax.errorbar([x], [row["mean"]], yerr=[[row["mean"] - low], [high - row["mean"]]],
                    fmt="o", capsize=6, color="C0")
        ax.plot([x] * len(row["seeds"]), row["seeds"], ".", color="C0", alpha=0.4)
    lines = [(name, rows[metric]["mean"]) for name, rows in scores.get("extra", {}).items()
             if metric in rows]
    lines += [(key, value) for key, value in scores.get("floors", {}).items()
              if key.startswith(metric)]
    for i, (name, value) in enumerate(lines):
        ax.axhline(value, linestyle="--", color=f"C{i + 1}", label=f"{name}: {value:.2f}")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([_label(results, a) for a in arms])
    ax.set_xlim(-0.5, len(arms) - 0.5)
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} (mean over seeds, 95% bootstrap interval)")
    ax.grid(alpha=0.3, axis="y")
    if lines:
        ax.legend(fontsize="small")
    return _save(fig, path)


def file_stem(name: str) -> str:
    """A file name part for a task name (task names may hold ':' or '/')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_plots(out_dir: str, results: Mapping[str, Any]) -> Dict[str, str]:
    """Draws every plot under out_dir; {name: file name relative to out_dir}."""
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, draw in (("pretrain_loss", plot_pretrain_loss),
                       ("teacher_fills", plot_teacher_fills)):
        if draw(os.path.join(out_dir, f"{name}.png"), results):
            written[name] = f"{name}.png"
    for task, entry in results.get("tasks", {}).items():
        file = f"task_{file_stem(task)}.png"
        plot_task(os.path.join(out_dir, file), task, entry, results)
        written[f"task:{task}"] = file
    return written
