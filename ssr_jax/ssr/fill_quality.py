"""How good a teacher's fills are: the online SSR stage run over held-out masked examples.

`measure_fills` masks the examples of an SSR-masked task's split (e.g. 'validation' of
'ssr_default_ssr_masked', in order, one pass) in the student's slots, has the teacher fill
them exactly as online training does (the same `SSRStage` with the teacher as its source:
the same per-example keys, decode lengths, sampler and rewrite), and returns the rewrite
counts as shares. A teacher is good enough to teach when nearly every span gets a
well-formed, non-empty fill ('valid_nonempty_share', e.g. >= 90%): for an empty fill or a
fallback (missing or malformed fill) the student sees `<x_k> <x_k+1>`, i.e. plain span
corruption, not a rewrite.
"""
import dataclasses
import math
from typing import Dict, Optional

from ssr_jax import distributed
from ssr_jax.data.ssr_rewrite import RewriteStats
from ssr_jax.errors import UserError
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import teacher as teacher_lib


def fill_report(stats: RewriteStats) -> Dict[str, float]:
    """Every RewriteStats count plus its shares:
      valid_nonempty_share  well-formed non-empty fills / spans (those dropped for the
                            student's length count: the teacher's fill was good; the stage's
                            decode budget leaves room for any well-formed output, so none is);
      empty_share, fallback_share, truncated_share  the other kinds / spans (empty +
                            fallback + valid_nonempty = 1);
      complete_example_share  examples whose every span has a non-empty fill / examples;
      exact_copy_share      non-empty fills equal to the original span / non-empty fills;
      mean_fill_length, mean_original_length  tokens per non-empty fill / original span."""
    out: Dict[str, float] = dict(stats.to_json())
    spans = max(stats.spans, 1)
    valid = stats.nonempty_fills + stats.truncated
    out.update(valid_nonempty_share=valid / spans, empty_share=stats.empty_fills / spans,
               fallback_share=stats.fallbacks / spans, truncated_share=stats.truncated / spans,
               complete_example_share=((stats.examples - stats.incomplete_examples)
                                       / max(stats.examples, 1)),
               exact_copy_share=stats.exact_copies / max(stats.nonempty_fills, 1),
               mean_fill_length=stats.fill_tokens / max(stats.nonempty_fills, 1),
               mean_original_length=stats.original_tokens / max(stats.original_spans, 1))
    return out


def measure_source(source, dataset, partitioner, num_examples: int,
                   config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig()
                   ) -> Dict[str, float]:
    """`measure_fills` with a built source (a `stage.TeacherRewrite`, which holds the
    malformed policy; tests pass one whose teacher they control). Reads whole teacher
    batches of examples_per_row x batch_size examples until num_examples are measured or
    the split ends."""
    if num_examples < 1:
        raise UserError(f"measure_fills: num_examples={num_examples} must be >= 1.")
    config = dataclasses.replace(config, span_corruption_examples=0, curriculum=None,
                                 probe_every=0)
    plan = stage_lib.plan_slots(dataset.task_feature_lengths, dataset.batch_size, config,
                                partitioner)
    pipelines = stage_lib.make_pipelines(dataset, plan, config, dataset.mixture_or_task_name,
                                         shuffle=False, repeat=False)
    stage = stage_lib.SSRStage(plan, partitioner, pipelines, source, config,
                               allow_partial=True, label="teacher fills")
    prev = None
    for _ in range(math.ceil(num_examples / plan.ssr_examples)):
        step = stage.start_step()  # the teacher fills step s + 1 while step s is rewritten
        if prev is not None:
            stage.finish(prev)
        prev = step
        if step.ended:
            break
    stage.finish(prev)
    mine = stage.pop_stats()
    stage.close()
    # Hosts that read the same data shard saw the same examples: count each shard once.
    per_shard = {}
    for shard, counts in distributed.gather_json([plan.ssr_shard[0], mine.to_json()]):
        per_shard.setdefault(shard, counts)
    total = RewriteStats()
    for counts in per_shard.values():
        total = total.merge(RewriteStats.from_json(counts))
    return fill_report(total)


def measure_fills(teacher: teacher_lib.TeacherConfig, dataset, partitioner, num_examples: int,
                  config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig(),
                  student_vocab_size: Optional[int] = None) -> Dict[str, float]:
    """The teacher's fills on at least num_examples held-out masked examples (fewer if the
    split ends), as `fill_report`'s dict.

    dataset: a DatasetConfig of the SSR-masked task and split to measure on, with the
      student's task_feature_lengths and batch_size (they set the slots: lengths /
      examples_per_row, and the teacher batch: examples_per_row x batch_size); read in
      order, one pass, whatever its shuffle.
    config: the stage settings online training uses (examples_per_row; malformed, which
      only changes 'dropped_examples'); span-corruption examples and the curriculum are left
      out of the measurement (it describes the teacher on the task's own mask).
    The teacher is checked, loaded on the partitioner's mesh and sampled as online SSR does.
    """
    config = dataclasses.replace(config, span_corruption_examples=0, curriculum=None)
    plan = stage_lib.plan_slots(dataset.task_feature_lengths, dataset.batch_size, config,
                                partitioner)
    source = stage_lib.teacher_source(dataset, plan, partitioner, teacher, student_vocab_size,
                                      config.malformed)
    return measure_source(source, dataset, partitioner, num_examples, config)
