"""`ssr-jax default-run --out_dir=DIR` (what `make run` calls): the whole SSR recipe, shrunk to
the embedded default corpus and a CPU.

  1. pre-train a small TEACHER (tiny T5 1.1) with span corruption
     (gin/experiments/default_teacher.gin);
  2. pre-train a smaller STUDENT with online SSR from that teacher: each step the teacher,
     sharded on the student's mesh, fills masked spans of fresh examples, and the student
     learns to rewrite them into the original (gin/experiments/default_student_ssr.gin);
  3. evaluate both on held-out span corruption (the same examples for both), with
     `ssr-jax eval` and no model gin file: the model comes with the checkpoint;
  4. export the student to Hugging Face format (transformers' T5ForConditionalGeneration)
     with no --vocab: the tokenizer is the vocabulary training recorded.
Everything goes under DIR; a summary at the end says where. The real recipe is the same
commands with a real teacher (`ssr-jax import-hf` of t5-v1_1-large) and C4 (README).
"""
import argparse
import json
import os
import time
from typing import Dict, List, Optional

from ssr_jax.errors import UserError

TEACHER_GIN = "gin/experiments/default_teacher.gin"
STUDENT_GIN = "gin/experiments/default_student_ssr.gin"
EVAL_GIN = "gin/runs/eval.gin"
EVAL_TASK = "ssr_default_span_corruption"
EVAL_LENGTHS = {"inputs": 128, "targets": 32}


def _parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ssr-jax default-run", description=__doc__.split(
            "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="where everything goes")
    parser.add_argument("--teacher_steps", type=int, default=300,
                        help="span-corruption steps of the teacher (default: 300)")
    parser.add_argument("--student_steps", type=int, default=300,
                        help="online SSR steps of the student (default: 300)")
    parser.add_argument("--eval_batches", type=int, default=8,
                        help="held-out batches of 16 examples for each evaluation")
    parser.add_argument("--gin", action="append", default=[], metavar="X=Y",
                        help="extra gin binding for both trainings (repeatable)")
    args = parser.parse_args(argv)
    if args.teacher_steps < 1 or args.student_steps < 1 or args.eval_batches < 1:
        raise UserError("--teacher_steps, --student_steps and --eval_batches must be >= 1.")
    return args


def _train(gin_file: str, model_dir: str, steps: int, extra: List[str]) -> None:
    from ssr_jax.cli.train import main as train_main  # pylint: disable=C0415
    argv = [f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.TRAIN_STEPS={steps}", "--gin.train.log_every=" + str(max(1, steps // 6))]
    if train_main(argv + extra) != 0:
        raise UserError(f"training {model_dir} failed; see the log above.")


def _evaluate(model_dir: str, batches: int) -> Dict[str, float]:
    """Held-out span-corruption loss/accuracy of a run's newest checkpoint: `ssr-jax eval`
    with no model gin file (the model comes with the checkpoint), so teacher and student are
    evaluated the same way, as a user would."""
    from ssr_jax.cli import gin_registry  # pylint: disable=import-outside-toplevel
    argv = [f"--gin_file={EVAL_GIN}", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.MIXTURE_OR_TASK_NAME='{EVAL_TASK}'",
            f"--gin.TASK_FEATURE_LENGTHS={EVAL_LENGTHS}", "--gin.BATCH_SIZE=16",
            f"--gin.evaluate.num_batches={batches}"]
    results = []
    gin_registry.run_command("eval", argv,
                             lambda: results.append(gin_registry.call("evaluate")) or 0)
    return results[0]


def _export(model_dir: str, out: str) -> None:
    """`ssr-jax export-hf` with no --vocab: the tokenizer is the vocabulary the training
    recorded next to the checkpoints."""
    from ssr_jax.cli.hf import export_main  # pylint: disable=import-outside-toplevel
    export_main(["--checkpoint", model_dir, "--out", out])


def _describe(model_dir: str) -> str:
    from ssr_jax.train import checkpoints  # pylint: disable=import-outside-toplevel
    c = checkpoints.load_model_config(model_dir) or {}
    return (f"d_model {c.get('d_model')}, {c.get('num_encoder_layers')}+"
            f"{c.get('num_decoder_layers')} layers")


def _ssr_line(model_dir: str) -> Optional[str]:
    from ssr_jax.ssr import stats  # pylint: disable=import-outside-toplevel
    path = os.path.join(model_dir, stats.SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f"SSR (the teacher's fills): {stats.describe(json.load(f))}"


def main(argv: List[str]) -> int:
    args = _parse(argv)
    out = os.path.abspath(os.path.expanduser(args.out_dir))
    teacher_dir, student_dir = os.path.join(out, "teacher"), os.path.join(out, "student")
    hf_dir = os.path.join(out, "student_hf")
    extra = [f"--gin.{b}" for b in args.gin]
    os.makedirs(out, exist_ok=True)
    times = {}
    start = time.time()

    print(f"== 1/4 teacher: span corruption, {args.teacher_steps} steps -> {teacher_dir}",
          flush=True)
    # Training records the vocabulary next to the checkpoints: a student with another
    # vocabulary is refused this teacher before any compute.
    _train(TEACHER_GIN, teacher_dir, args.teacher_steps, extra)
    times["teacher"] = time.time() - start

    print(f"== 2/4 student: online SSR from the teacher, {args.student_steps} steps -> "
          f"{student_dir}", flush=True)
    t = time.time()
    _train(STUDENT_GIN, student_dir, args.student_steps,
           [f"--gin.TEACHER_CHECKPOINT='{teacher_dir}'"] + extra)
    times["student"] = time.time() - t

    print(f"== 3/4 evaluation on held-out span corruption ({args.eval_batches} batches)",
          flush=True)
    t = time.time()
    evals = {name: _evaluate(d, args.eval_batches)
             for name, d in (("teacher", teacher_dir), ("student", student_dir))}
    times["eval"] = time.time() - t

    print(f"== 4/4 export the student to Hugging Face format -> {hf_dir}", flush=True)
    t = time.time()
    _export(student_dir, hf_dir)
    times["export"] = time.time() - t
    total = time.time() - start

    summary = {"out_dir": out, "teacher": teacher_dir, "student": student_dir,
               "student_hf": hf_dir, "eval": evals, "seconds": {**times, "total": total}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    lines = [f"default run finished in {int(total // 60)}m{int(total % 60):02d}s; "
             f"everything is under {out}",
             f"  teacher  {teacher_dir}  (span corruption, {_describe(teacher_dir)})",
             f"           held-out span corruption: loss {evals['teacher']['loss']:.3f}, "
             f"token accuracy {evals['teacher']['accuracy']:.3f}",
             f"  student  {student_dir}  (online SSR from the teacher, "
             f"{_describe(student_dir)})",
             f"           held-out span corruption: loss {evals['student']['loss']:.3f}, "
             f"token accuracy {evals['student']['accuracy']:.3f}"]
    ssr = _ssr_line(student_dir)
    if ssr:
        lines.append(f"           {ssr}")
    lines += [f"  student as Hugging Face T5: {hf_dir}  (T5ForConditionalGeneration."
              "from_pretrained)",
              f"  metrics: tensorboard --logdir {out}   summary: "
              f"{os.path.join(out, 'summary.json')}"]
    print("\n".join(lines), flush=True)
    return 0
