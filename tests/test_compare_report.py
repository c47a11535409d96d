"""The comparison report (ssr_jax/compare/report.py, plots.py): results.json holds the
results, report.md states them (numbers parsed back), one sentence per task and arm, and
the plots are PNGs."""
import json
import os
import random
import re

import pytest

from ssr_jax.compare import plots, report, scores
from ssr_jax.data import metrics
from ssr_jax.errors import UserError

WORDS = "the a cat dog sat ran on under mat house big small red blue bird tree".split()
PNG = b"\x89PNG\r\n\x1a\n"


def _task_data(seed, n=30):
    rng = random.Random(seed)
    clean = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))) for _ in range(n)]

    def noisy(text, rate):
        return " ".join(w if rng.random() > rate else rng.choice(WORDS) for w in text.split())
    sources = [noisy(c, 0.3) for c in clean]
    return clean, sources, noisy


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    clean, sources, noisy = _task_data(0)
    targets = [{"source": s, "references": [c]} for s, c in zip(sources, clean)]
    arms = {"span_corruption": [[noisy(c, 0.3) for c in clean] for _ in range(3)],
            "ssr": [[c if i % 2 else noisy(c, 0.05) for i, c in enumerate(clean)]
                    for _ in range(3)],
            "ssr_mix": [[noisy(c, 0.3) for c in clean] for _ in range(3)]}
    gec = scores.score_task([metrics.gleu, metrics.exact_match, metrics.gleu_copy_source],
                            targets, arms, "span_corruption", num_resamples=300,
                            extra_predictions={"copy the input": sources})
    summ_refs, summ_inputs, _ = _task_data(1, n=20)
    summ = scores.score_task(
            [metrics.rouge], summ_refs,
            {a: [[noisy(r, 0.4) for r in summ_refs] for _ in range(3)] for a in arms},
            "span_corruption", num_resamples=200,
            extra_predictions={"first sentence": summ_inputs})
    entries = {}
    for k, arm in enumerate(arms):
        path = logs / f"{arm}.jsonl"
        with open(path, "w") as f:
            for step in range(0, 101, 10):
                record = {"step": step, "loss": 6.0 - 0.02 * step - 0.1 * k,
                          "accuracy": 0.1 + 0.001 * step}
                if arm != "span_corruption":
                    record.update({"ssr/nonempty_fill_rate": 0.8, "ssr/empty_fill_rate": 0.1,
                                   "ssr/fallback_rate": 0.07, "ssr/truncated_rate": 0.03})
                f.write(json.dumps(record) + "\n")
            f.write('{"step": 110, "lo')  # a line cut short by a kill
        entries[arm] = {"label": arm.replace("_", " "),
                        "pretrain": {"eval": {"loss": 5.1234 + k, "accuracy": 0.25 - 0.01 * k},
                                     "metrics_file": str(path),
                                     "teacher_flops": 0.0 if k == 0 else 1.5e15 * k,
                                     "teacher_seconds": 0.0 if k == 0 else 42.0 * k,
                                     "seconds": 100.0 + k}}
    return {"protocol": {"teacher": "t5-small-import", "student size": 1250000,
                         "init steps": 300, "arm steps": 300, "fine-tuning seeds": [0, 1, 2],
                         "scale": "the largest that fits 45 minutes on 2 cores"},
            "teacher": {"non-embedding params": 5000000, "valid non-empty fills": 0.93},
            "arms": entries,
            "tasks": {"gec_synthetic": {"primary_metric": "gleu", "scores": gec},
                      "docstring:summary": {"primary_metric": "rougeLsum", "scores": summ}},
            "notes": ["a note"]}


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = report.write_report(str(out), results)
    with open(paths["report"]) as f:
        text = f.read()
    with open(paths["results"]) as f:
        saved = json.load(f)
    return out, paths, text, saved


def test_results_json_holds_the_whole_dict(results, written):
    _, _, _, saved = written
    for key in ("protocol", "teacher", "arms", "tasks", "notes"):
        assert saved[key] == json.loads(json.dumps(results[key]))
    assert set(saved["verdicts"]) == set(saved["sentences"]) == set(results["tasks"])


SENTENCE = re.compile(r"^- (.+?) (is better than|is worse than|is within noise of) (.+?) on "
                      r"(\S+) \((\S+) (-?[\d.]+) vs (-?[\d.]+), p=([\d.]+)\)\.$", re.M)


def test_one_sentence_per_task_and_arm_with_the_numbers_of_results_json(written):
    _, _, text, saved = written
    found = SENTENCE.findall(text)
    assert len(found) == 2 * 2  # two tasks, two arms besides the baseline
    labels = {a["label"]: arm for arm, a in saved["arms"].items()}
    seen = set()
    for arm_label, phrase, base_label, task, metric, value, base_value, p in found:
        entry = saved["tasks"][task]
        assert metric == entry["primary_metric"] and base_label == "span corruption"
        arm = labels[arm_label]
        row = entry["scores"]["arms"][arm][metric]
        assert float(value) == pytest.approx(row["mean"], abs=0.005)
        assert float(base_value) == pytest.approx(
                entry["scores"]["arms"]["span_corruption"][metric]["mean"], abs=0.005)
        assert float(p) == pytest.approx(row["diff"]["p_value"], abs=0.0005)
        want = scores.verdict(*row["diff"]["ci95"], row["diff"]["p_value"])
        assert phrase == {"better": "is better than", "worse": "is worse than",
                          "within noise": "is within noise of"}[want]
        assert saved["verdicts"][task][arm] == want
        seen.add((task, arm))
    assert len(seen) == 4
    # ssr is the reference on every other example: clearly better on the GEC-style task.
    assert saved["verdicts"]["gec_synthetic"]["ssr"] == "better"


ROW = re.compile(r"^\| ([^|]+) \| (\S+) \| (-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\] \| (\S+) \| "
                 r"(?:([+-][\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]|–) \| (\S+) \|$", re.M)


def test_task_tables_state_every_arm_metric_and_trivial_row(written):
    _, _, text, saved = written
    labels = {a["label"]: arm for arm, a in saved["arms"].items()}
    rows = ROW.findall(text)
    by_task, task_of = {}, None
    for line in text.splitlines():  # which task's section each table row is in
        if line.startswith("## ") and line[3:] in saved["tasks"]:
            task_of = line[3:]
        m = ROW.match(line)
        if m and task_of:
            by_task.setdefault(task_of, []).append(m.groups())
    assert sum(map(len, by_task.values())) == len(rows)
    for task, task_rows in by_task.items():
        sc = saved["tasks"][task]["scores"]
        want = sum(len(r) for r in sc["arms"].values()) + sum(len(r) for r in sc["extra"].values())
        assert len(task_rows) == want
        for name, key, mean, lo, hi, std, dm, dlo, dhi, p in task_rows:
            row = (sc["arms"][labels[name]][key] if name in labels
                   else sc["extra"][name][key])
            for got, exp in ((mean, row["mean"]), (lo, row["ci95"][0]), (hi, row["ci95"][1])):
                assert float(got) == pytest.approx(exp, abs=0.005)
            if "diff" in row:
                d = row["diff"]
                assert float(std) == pytest.approx(row["seed_std"], abs=0.005)
                for got, exp in ((dm, d["mean"]), (dlo, d["ci95"][0]), (dhi, d["ci95"][1])):
                    assert float(got) == pytest.approx(exp, abs=0.005)
                assert float(p) == pytest.approx(d["p_value"], abs=0.0005)
            else:
                assert dm is None and p == "–"
    floor = saved["tasks"]["gec_synthetic"]["scores"]["floors"]["gleu_copy_source"]
    assert f"Floor: gleu_copy_source = {floor:.2f}" in text


def test_header_and_pretraining_table(written):
    _, _, text, saved = written
    assert "- **student size**: 1,250,000" in text and "- **fine-tuning seeds**: 0, 1, 2" in text
    assert "- **valid non-empty fills**: 0.93" in text and "- a note" in text
    for arm in saved["arms"].values():
        pre = arm["pretrain"]
        line = next(l for l in text.splitlines() if l.startswith(f"| {arm['label']} | ")
                    and l.count("|") == 7)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(pre["eval"]["loss"], abs=5e-5)
        assert float(cells[2]) == pytest.approx(pre["eval"]["accuracy"], abs=5e-5)
        assert float(cells[3]) == pytest.approx(pre["teacher_flops"], rel=5e-3)
        assert float(cells[5]) == pytest.approx(pre["seconds"], abs=0.05)


def test_plots_are_pngs_embedded_with_relative_links(written):
    out, paths, text, saved = written
    assert set(saved["plots"]) == {"pretrain_loss", "teacher_fills", "task:gec_synthetic",
                                   "task:docstring:summary"}
    for name, rel in saved["plots"].items():
        assert not os.path.isabs(rel) and f"]({rel})" in text
        with open(out / rel, "rb") as f:
            data = f.read()
        assert data[:8] == PNG and len(data) > 5000, name
        assert paths[name] == str(out / rel)
    assert saved["plots"]["task:docstring:summary"] == "task_docstring_summary.png"


def test_read_metrics_skips_cut_lines_and_plots_only_what_exists(results, tmp_path):
    records = plots.read_metrics(results["arms"]["ssr"]["pretrain"]["metrics_file"])
    assert [r["step"] for r in records] == list(range(0, 101, 10))
    bare = {"tasks": results["tasks"],
            "arms": {"span_corruption": {"pretrain": {"eval": {"loss": 1.0}}}}}
    written = plots.write_plots(str(tmp_path), bare)
    assert set(written) == {"task:gec_synthetic", "task:docstring:summary"}
    with pytest.raises(UserError, match="no training log"):
        plots.read_metrics(str(tmp_path / "missing.jsonl"))


def test_bad_results_name_the_problem(results, tmp_path):
    with pytest.raises(UserError, match="no 'tasks'"):
        report.write_report(str(tmp_path), {"protocol": {}})
    bad = {"tasks": {"gec": {"primary_metric": "bleu",
                             "scores": results["tasks"]["gec_synthetic"]["scores"]}}}
    with pytest.raises(UserError, match="primary_metric 'bleu'.*'exact_match', 'gleu'"):
        report.write_report(str(tmp_path), bad, make_plots=False)


def test_notes_flag_arms_under_the_trivial_baseline_and_constant_outputs():
    from ssr_jax.cli.compare_report import task_notes  # pylint: disable=import-outside-toplevel
    clean, sources, _ = _task_data(1)
    targets = [{"source": s, "references": [c]} for s, c in zip(sources, clean)]
    arms = {"span_corruption": [[clean[0]] * len(clean)],  # one output for every input
            "ssr": [list(clean)]}  # every rewrite right
    tables = scores.score_task([metrics.gleu], targets, arms, "span_corruption",
                               num_resamples=50, extra_predictions={"copy_input": sources})
    scored = {"primary_metric": "gleu", "scores": tables, "distinct_outputs": {
        arm: [len(set(p)) / len(p) for p in seeds] for arm, seeds in arms.items()}}
    notes = task_notes("gec", scored)
    constant = tables["arms"]["span_corruption"]["gleu"]["mean"]
    copy = tables["extra"]["copy_input"]["gleu"]["mean"]
    assert constant < copy < tables["arms"]["ssr"]["gleu"]["mean"]
    assert len(notes) == 2, notes
    assert notes[0].startswith(f"gec: span_corruption (gleu {constant:.2f}) does not beat the "
                               f"trivial baseline copy_input ({copy:.2f})")
    assert notes[1].startswith("gec: span_corruption wrote nearly one output for every input "
                               "(its worst seed: 3.3% distinct predictions)")
