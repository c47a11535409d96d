"""`ssr-jax default-run --out_dir=DIR` (what `make run` calls): did SSR help? A small
`ssr-jax compare` (gin/compare/quick.gin) on the embedded default corpus and a CPU:

  1. a TEACHER (tiny T5 1.1, 4x the student) pre-trained with span corruption; its fills of
     held-out masked examples are measured (valid non-empty / empty / malformed);
  2. a shared STUDENT INIT (d_model 64) pre-trained with span corruption;
  3. two arms from that init, the same steps, batch and schedule: span corruption, and
     online SSR from the teacher (sharded on the student's mesh); both evaluated on the
     same held-out span-corruption examples;
  4. both fine-tuned on the synthetic grammatical-error-correction task (GLEU, exact match,
     the copy-the-input floor), the checkpoint chosen by the decoded validation GLEU, and
     scored on its test split with bootstrap intervals and a paired test;
  5. the SSR student exported to Hugging Face format with the vocabulary training recorded.
Everything goes under DIR (report.md, results.json, plots); a summary at the end says
where. `make compare` runs the full comparison (a larger teacher, two tasks, three seeds).
"""
import argparse
import json
import os
import time
from typing import List

from ssr_jax.errors import UserError

QUICK_GIN = "compare/quick.gin"


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssr-jax default-run", description=__doc__.split(
            "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="where everything goes")
    parser.add_argument("--teacher_steps", type=int, default=900,
                        help="span-corruption steps of the teacher (default: 900, where its "
                             "held-out fills pass 90%% valid and non-empty)")
    parser.add_argument("--init_steps", type=int, default=200,
                        help="span-corruption steps of the shared student init (default: 200)")
    parser.add_argument("--student_steps", type=int, default=200,
                        help="steps of each arm from the init (default: 200)")
    parser.add_argument("--finetune_steps", type=int, default=1200,
                        help="fine-tuning steps on the downstream task (default: 1200; "
                             "the students start copying GEC sentences after ~600)")
    parser.add_argument("--eval_batches", type=int, default=8,
                        help="held-out batches of 16 examples for each evaluation")
    parser.add_argument("--gin", action="append", default=[], metavar="X=Y",
                        help="extra gin binding of the comparison, e.g. compare.seeds=[0,1] "
                             "(repeatable)")
    args = parser.parse_args(argv)
    for name in ("teacher_steps", "init_steps", "student_steps", "finetune_steps",
                 "eval_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)}: --teacher_steps, --init_steps, "
                            "--student_steps, --finetune_steps and --eval_batches must be >= 1.")
    return args


def _export(model_dir: str, out: str) -> None:
    """`ssr-jax export-hf` with no --vocab: the tokenizer is the vocabulary the training
    recorded next to the checkpoints."""
    from ssr_jax.cli.hf import export_main  # pylint: disable=import-outside-toplevel
    export_main(["--checkpoint", model_dir, "--out", out])


def compare_argv(args: argparse.Namespace, out: str) -> List[str]:
    select = max(1, args.finetune_steps // 2)
    return [f"--gin_file={QUICK_GIN}", f"--gin.MODEL_DIR={out!r}",
            f"--gin.compare.teacher_steps={args.teacher_steps}",
            f"--gin.compare.teacher_max_steps={args.teacher_steps}",
            f"--gin.compare.init_steps={args.init_steps}",
            f"--gin.compare.arm_steps={args.student_steps}",
            f"--gin.compare.finetune_steps={args.finetune_steps}",
            f"--gin.compare.select_every={select}",
            f"--gin.compare.eval_batches={args.eval_batches}"] + [f"--gin.{b}" for b in args.gin]


def _summary(results, out: str, hf_dir: str, seconds: float) -> List[str]:
    arms = results["arms"]
    lines = [f"default run finished in {int(seconds // 60)}m{int(seconds % 60):02d}s; "
             f"everything is under {out}"]
    teacher = results["teacher"]
    lines.append(f"  teacher  {teacher['checkpoint']}: "
                 f"{teacher['valid non-empty fills (held-out)']:.1%} of held-out spans get a "
                 f"valid non-empty fill ({teacher['empty fills']:.1%} empty, "
                 f"{teacher['fallbacks']:.1%} malformed)")
    for arm, entry in arms.items():
        ev = entry["pretrain"]["eval"]
        lines.append(f"  {arm:<16} held-out span corruption: loss {ev['loss']:.3f}, "
                     f"token accuracy {ev['accuracy']:.3f}")
    for task, entry in results["tasks"].items():
        metric, scores = entry["primary_metric"], entry["scores"]
        cells = [f"{arm} {row[metric]['mean']:.2f}" for arm, row in scores["arms"].items()]
        cells += [f"{name} {row[metric]['mean']:.2f}" for name, row in
                  scores.get("extra", {}).items() if metric in row]
        lines.append(f"  {task} test {metric}: " + ", ".join(cells))
    lines += [f"  {s}" for s in results.get("summary", [])]
    lines += [f"  report: {os.path.join(out, 'report.md')}",
              f"  SSR student as Hugging Face T5: {hf_dir}  "
              "(T5ForConditionalGeneration.from_pretrained)",
              f"  metrics: tensorboard --logdir {out}"]
    return lines


def main(argv: List[str]) -> int:
    # pylint: disable=import-outside-toplevel
    from ssr_jax.cli import compare
    args = _parse(argv)
    out = os.path.abspath(os.path.expanduser(args.out_dir))
    start = time.time()
    spec = compare.spec_from_gin(compare_argv(args, out))
    results = compare.run(spec)
    hf_dir = os.path.join(out, "ssr_student_hf")
    ssr_arms = [a for a in spec.arms if a in spec.ssr_arms]
    if ssr_arms:
        print(f"== export the {ssr_arms[0]} student to Hugging Face format -> {hf_dir}",
              flush=True)
        _export(results["arms"][ssr_arms[0]]["pretrain"]["dir"], hf_dir)
    seconds = time.time() - start
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"out_dir": out, "report": os.path.join(out, "report.md"),
                   "student_hf": hf_dir, "seconds": seconds}, f, indent=2)
    print("\n".join(_summary(results, out, hf_dir, seconds)), flush=True)
    return 0
