"""`ssr-jax compare --gin_file=gin/compare/default.gin --gin.MODEL_DIR="'runs/compare'"`:
does SSR help? One command, every stage through the normal trainer, resumable stage by stage
(a rerun skips what is done; a killed stage resumes from its checkpoints):

  1. teacher: COMPARE's `teacher_checkpoint` (e.g. a T5 written by `ssr-jax import-hf`), or
     trained with span corruption in chunks until its fills are good (at least
     `min_valid_fills` of the spans of held-out masked examples get a valid non-empty fill)
     or `teacher_max_steps`; every check is kept (the fill history);
  2. shared student init: span corruption for `init_steps` (the paper continues from a
     pretrained T5), or `init_checkpoint`;
  3. arms: each continues from the init for `arm_steps` with the same batch and schedule (the
     step travels with the params, so the schedule continues): span corruption (the
     baseline), online SSR, optionally SSR mixed with span corruption and SSR with the
     curriculum; each is evaluated on the same held-out span-corruption examples, and the SSR
     arms' teacher cost (FLOPs and seconds) is recorded;
  4. downstream: every arm fine-tuned on every task with one recipe (`finetune_gin`; its
     schedule can count the fine-tuning's own steps from FINETUNE_START_STEP over
     FINETUNE_STEPS, as compare/finetune.gin's decay does) and each seed; the
     checkpoint kept is the one with the best decoded validation metric (T5X's infer-eval:
     the validation split decoded at every saved step, greedily or by beam search as
     `decode_method` says), then the test split (validation, with a warning, when the task
     has none) is decoded the same way with it;
  5. scores and report: per task and arm, the metrics' mean over seeds with a 95% bootstrap
     interval over examples, the spread over seeds, a paired bootstrap against span
     corruption with its p-value, trivial baselines (copy the input, its first sentence);
     MODEL_DIR/report.md, results.json and PNG plots.
"""
import os
from typing import List

from ssr_jax.cli import gin_registry
from ssr_jax.cli.compare_spec import CompareSpec


def spec_from_gin(argv: List[str]) -> CompareSpec:
    """Parses the compare gin files and bindings into a CompareSpec (gin is cleared after:
    every stage parses its own files)."""
    from ssr_jax.cli.flags import parse_flags  # pylint: disable=import-outside-toplevel
    flags = parse_flags(argv)
    gin_registry.quiet_logs()
    gin_registry.setup(flags)
    spec = gin_registry.call("compare")
    return spec


def run(spec: CompareSpec) -> dict:
    """All stages (each skipped when already done); returns the results."""
    from ssr_jax.cli import compare_stages  # pylint: disable=import-outside-toplevel
    stages = compare_stages.Stages(spec)
    teacher = stages.teacher()
    init = stages.init()
    arms = {arm: stages.arm(arm, init, teacher) for arm in spec.arms}
    tasks = {task: stages.downstream(task, arms) for task in spec.tasks}
    return stages.report(teacher, init, arms, tasks)


def main(argv: List[str]) -> int:
    spec = spec_from_gin(argv)
    results = run(spec)
    print(f"compare finished: {os.path.join(spec.out_dir, 'report.md')}", flush=True)
    for line in results.get("summary", []):
        print(f"  {line}", flush=True)
    return 0
