"""What a run does with SSR, as plain data, and the trainer's input stage built from it.

`SsrSpec` is what the edge (gin) hands to the library: `online(...)` trains with the teacher
in the input stage; `offline(...)` trains from generate-spans output (and tells
`generate-spans` where to write it and with which teacher). `input_stage_factory` checks
everything that needs no compute (the teacher against the task's vocabulary, the offline data
against the run) and returns the trainer's `(DatasetConfig, Partitioner, microbatches) ->
InputStage` factory.
"""
import dataclasses
import os
from typing import Optional

from ssr_jax.data.dataset import task_vocabulary
from ssr_jax.errors import UserError
from ssr_jax.ssr import offline as offline_lib
from ssr_jax.ssr import stage as stage_lib
from ssr_jax.ssr import stats as stats_lib
from ssr_jax.ssr import teacher as teacher_lib

ONLINE, OFFLINE = "online", "offline"


@dataclasses.dataclass(frozen=True)
class SsrSpec:
    """mode: 'online' | 'offline'. teacher: the online teacher, or the one generate-spans
    uses (offline training needs none). output_dir: generate-spans output (offline).
    summary_dir: where the run's SSR statistics go (SUMMARY_FILE), e.g. MODEL_DIR.
    num_steps / chunk_steps: what generate-spans writes (None: one pass of the split)."""

    mode: str
    config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig()
    teacher: Optional[teacher_lib.TeacherConfig] = None
    output_dir: Optional[str] = None
    student_vocab_size: Optional[int] = None
    summary_dir: Optional[str] = None
    num_steps: Optional[int] = None
    chunk_steps: int = 50

    def __post_init__(self):
        if self.mode not in (ONLINE, OFFLINE):
            raise UserError(f"SSR mode {self.mode!r}: use {ONLINE!r} or {OFFLINE!r}.")
        if self.mode == ONLINE and self.teacher is None:
            raise UserError("online SSR needs a teacher (TeacherConfig).")
        if self.mode == OFFLINE and not self.output_dir:
            raise UserError("offline SSR needs OUTPUT_DIR (the generate-spans output).")

    @property
    def summary_path(self) -> Optional[str]:
        return os.path.join(self.summary_dir, stats_lib.SUMMARY_FILE) if self.summary_dir \
            else None


def online(teacher: teacher_lib.TeacherConfig,
           config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig(),
           student_vocab_size: Optional[int] = None,
           summary_dir: Optional[str] = None) -> SsrSpec:
    return SsrSpec(ONLINE, config, teacher, student_vocab_size=student_vocab_size,
                   summary_dir=summary_dir)


def offline(output_dir: str, config: stage_lib.SsrStageConfig = stage_lib.SsrStageConfig(),
            teacher: Optional[teacher_lib.TeacherConfig] = None,
            student_vocab_size: Optional[int] = None, num_steps: Optional[int] = None,
            chunk_steps: int = 50) -> SsrSpec:
    return SsrSpec(OFFLINE, config, teacher, output_dir, student_vocab_size,
                   num_steps=num_steps, chunk_steps=chunk_steps)


def input_stage_factory(spec: SsrSpec, dataset, train_steps: Optional[int] = None):
    """The trainer's stage factory for `spec` and the student's DatasetConfig, after the
    checks that need no compute. train_steps (the run's TRAIN_STEPS): offline data holding
    fewer steps is refused here, before anything is built."""
    if spec.mode == ONLINE:
        vocabulary = task_vocabulary(dataset.mixture_or_task_name, dataset.module)
        teacher_lib.check_teacher(spec.teacher, vocabulary, spec.student_vocab_size)

        def online_factory(cfg, partitioner, num_microbatches: int = 1):
            return stage_lib.online_stage(cfg, partitioner, num_microbatches, spec.teacher,
                                          spec.config, spec.student_vocab_size,
                                          spec.summary_path)
        return online_factory
    # Data shards are known only with the mesh: here the bound that one reader gets (no
    # count of readers gets more steps); offline_stage checks the exact count.
    offline_lib.check_offline_data(spec.output_dir, train_steps, readers=1)

    def offline_factory(cfg, partitioner, num_microbatches: int = 1):
        return offline_lib.offline_stage(cfg, partitioner, num_microbatches, spec.output_dir,
                                         spec.config, train_steps)
    return offline_factory


def generate_spans(spec: SsrSpec, dataset, partitioner, **kwargs):
    """`ssr-jax generate-spans` for an offline spec: writes spec.output_dir."""
    if spec.mode != OFFLINE:
        raise UserError("generate-spans writes offline SSR data: include "
                        "gin/objectives/ssr_offline.gin (train.ssr = @ssr_offline()).")
    if spec.teacher is None or not spec.teacher.checkpoint_path:
        raise UserError("generate-spans needs a teacher: set TEACHER_CHECKPOINT.")
    return offline_lib.generate_spans(teacher=spec.teacher, dataset=dataset,
                                  output_dir=spec.output_dir, partitioner=partitioner,
                                  ssr=spec.config, num_steps=spec.num_steps,
                                  chunk_steps=spec.chunk_steps,
                                  student_vocab_size=spec.student_vocab_size, **kwargs)
