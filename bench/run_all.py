"""`make bench`: every benchmark in its own process, one table each, bench/results.json and
bench/RESULTS.md (machine description, targets, tables).

    python bench/run_all.py [--quick] [--only=train_step,plan] [--no_write]

Each benchmark is bench/NAME.py (see common.py for the contract). The targets of issue 7 are
checked at the end and listed with the measured values.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=wrong-import-position

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = ("train_step", "teacher_sampling", "input_pipeline", "online_ssr", "plan",
              "gpu_check", "gpu_mfu", "gpu_sampling", "gpu_ssr_step")  # gpu_*: bench/gpu.sh
TIME_LIMIT_S = 25 * 60


def run_one(name: str, quick: bool) -> dict:
    """Runs bench/NAME.py in a fresh process (its own thread pools and memory)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [sys.executable, os.path.join(BENCH_DIR, f"{name}.py"), f"--json={out}"]
        if quick:
            cmd.append("--quick")
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=False)
        seconds = time.time() - t0
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            print(f"### {name}: FAILED (exit {proc.returncode})\n{tail}\n", flush=True)
            return {"name": name, "title": name, "failed": True, "error": tail,
                    "headers": ["error"], "rows": [[tail.splitlines()[-1] if tail else "?"]],
                    "seconds": seconds}
        with open(out) as f:
            result = json.load(f)
    result["seconds"] = seconds
    print(common.render(result) + f"\n\n({name}: {seconds:.0f} s)\n", flush=True)
    return result


def targets(results: dict, total_s: float) -> list:
    """[target, measured, met] rows for the targets of issues 7 and 14."""
    rows = []

    def data(name):
        r = results.get(name)
        return r.get("data", {}) if r and not r.get("failed") else None

    ts = data("train_step")
    if ts:
        for shape in ts.get("shapes", []):
            v = ts[shape]["ours float32"]["vs_hf"]
            rows.append([f"train step {shape}: >= 1.3x HF tokens/s", f"{v:.2f}x (float32)",
                         v >= 1.3])
    tsm = data("teacher_sampling")
    if tsm:
        for shape in tsm.get("shapes", []):  # the teacher's default sampler, top-k 50 + top-p
            r, hf = tsm[f"{shape} default ours"], tsm[f"{shape} default hf generate"]
            at_bound = r["new_tokens_per_call"] / tsm[shape]["compute_bound_s"]
            at_own = r["new_tokens_per_call"] / tsm[shape]["own_matmuls_s"]
            rows.append([f"teacher sampling {shape}: >= 3x HF new tokens/s",
                         f"{r['vs_hf']:.2f}x (the call's matmuls alone at their own shapes "
                         f"take {100 * r['of_own_matmuls']:.0f}% of our call's time: a call "
                         f"of only those would be {at_own / hf['new_tokens_per_s']:.1f}x HF; "
                         f"at 2048^3's rate {at_bound / hf['new_tokens_per_s']:.1f}x)",
                         r["vs_hf"] >= 3.0])
    ip = data("input_pipeline")
    online = data("online_ssr")
    for name in ("span corruption 512/114", "SSR masking 512/114"):
        entry = (ip or {}).get("masking", {}).get(f"{name} batched")
        if entry:  # issue 14: the batched masking against the per-example path
            rows.append([f"{name}: batched masking >= 3x per-example examples/CPU-s",
                         f"{entry['vs_per_example']:.1f}x ({entry['cores']:.2f} cores feed "
                         "an H100 training T5 1.1 base at 45% MFU)",
                         entry["vs_per_example"] >= 3.0])
    if ip:
        for name, entry in ip.items():
            if not (isinstance(entry, dict) and "ratio" in entry):
                continue
            if name.startswith("SSR masking") and online:
                # Masked examples feed only online SSR steps (teacher sampling + student step;
                # offline SSR reads rewritten data): consumption = SSR examples per such step,
                # with the fastest (1x) teacher.
                step_s = online["online SSR teacher 1x"]["step_s"]
                ratio = entry["examples_per_cpu_s"] / (ip["ssr_examples_per_step"] / step_s)
                rows.append([f"{name}: >= 5x consumption (online SSR step, 1x teacher)",
                             f"{ratio:.1f}x (student step alone: {entry['ratio']:.1f}x)",
                             ratio >= 5.0])
                continue
            rows.append([f"{name}: >= 5x consumption ({entry['consumer']})",
                         f"{entry['ratio']:.1f}x", entry["ratio"] >= 5.0])
    pl = data("plan")
    if pl and "accuracy" in pl:
        err = pl["accuracy"]["max_relative_error"]
        rows.append(["plan within 10% of the compiled step's memory (8 fake devices)",
                     f"{100 * err:.1f}% max deviation", err <= 0.10])
    rows.append([f"make bench under {TIME_LIMIT_S // 60} min", f"{total_s / 60:.1f} min",
                 total_s < TIME_LIMIT_S])
    return rows


def write_markdown(path: str, results: dict, machine: dict, total_s: float, quick: bool):
    lines = ["# Benchmarks", "",
             "Written by `make bench` (`bench/run_all.py`); numbers from the run below. The "
             "machine may be shared with other jobs: every comparison interleaves the "
             "contenders repetition by repetition and reports medians (and process CPU "
             "seconds, which a busy machine inflates less than wall time).", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [f"- total benchmark time: {total_s / 60:.1f} min" + (" (--quick)" if quick else ""),
              "", "## Targets (issues 7, 14)", ""]
    lines.append(common.table(["target", "measured", "met"],
                              [[t, m, "yes" if ok else "NO"]
                               for t, m, ok in targets(results, total_s)]))
    for name in BENCHMARKS:
        if name in results:
            lines += ["", "## " + name.replace("_", " "), "", common.render(results[name])]
    notes_path = os.path.join(BENCH_DIR, "NOTES.md")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            lines += ["", f.read().strip()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _merged(results, total, machine):
    """The previous results.json with `results` replacing its runs of the same benchmarks;
    the total time counts each benchmark's latest run."""
    with open(os.path.join(BENCH_DIR, "results.json")) as f:
        old = json.load(f)
    if old.get("quick"):
        raise SystemExit("--update: the existing results.json is a --quick run")
    replaced = sum(old["benchmarks"].get(n, {}).get("seconds", 0.0) for n in results)
    merged = dict(old["benchmarks"], **results)
    total = old["total_seconds"] - replaced + total
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    machine = dict(old["machine"], rerun=f"{', '.join(results)} at {stamp} UTC "
                   f"(load {machine.get('load_average', '?')}; the rest as above)")
    return merged, total, machine


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--no_write", action="store_true", help="print only")
    parser.add_argument("--update", action="store_true",
                        help="with --only: replace just these benchmarks in the existing "
                             "results.json / RESULTS.md (the others keep their run)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    common.setup_env(__name__)
    machine = common.machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()) + "\n", flush=True)
    t0 = time.time()
    results = {name: run_one(name, args.quick) for name in names}
    total = time.time() - t0
    rows = targets(results, total)
    print("### Targets\n\n" + common.table(["target", "measured", "met"],
                                           [[t, m, "yes" if ok else "NO"] for t, m, ok in rows]))
    if args.update and not args.no_write:
        results, total, machine = _merged(results, total, machine)
    if not args.no_write:
        with open(os.path.join(BENCH_DIR, "results.json"), "w") as f:
            json.dump({"machine": machine, "total_seconds": total, "quick": args.quick,
                       "benchmarks": results}, f, indent=1, default=str)
        write_markdown(os.path.join(BENCH_DIR, "RESULTS.md"), results, machine, total,
                       args.quick)
        print(f"\nwrote bench/results.json and bench/RESULTS.md ({total / 60:.1f} min)")
    return 0 if not any(r.get("failed") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
