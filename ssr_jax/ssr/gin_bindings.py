"""Gin registrations of the SSR pieces (gin stays at the edge: the library takes plain args).

Registered under the module 'ssr_jax' with plain names:
  TeacherConfig, SsrStageConfig, SpanCurriculum,
  ssr_online_stage   -> a train.input_stage_factory (teacher checked when gin evaluates it,
                        i.e. before `train` builds anything),
  ssr_offline_stage  -> a train.input_stage_factory reading generate-spans output,
  generate_spans     -> the body of `ssr-jax generate-spans`.
See gin/objectives/ssr_online.gin and ssr_offline.gin for the bindings.
"""
import os
from typing import Callable, Dict, Optional

from ssr_jax.ssr import curriculum, offline, online
from ssr_jax.ssr import teacher as teacher_lib

MODULE = "ssr_jax"
SUMMARY_FILE = "ssr_summary.json"
_REGISTERED: Dict[str, Callable] = {}


def ssr_online_stage(teacher: teacher_lib.TeacherConfig,
                     config: online.SsrStageConfig = online.SsrStageConfig(),
                     student_vocab_size: Optional[int] = None,
                     mixture_or_task_name: Optional[str] = None,
                     module: Optional[str] = "tasks", model_dir: Optional[str] = None):
    """Checks the teacher against the task's vocabulary now (no compute) and returns the
    trainer's stage factory (DatasetConfig, Partitioner, num_microbatches) -> SSRStage.
    With model_dir, the run's SSR statistics go to MODEL_DIR/ssr_summary.json at the end."""
    if mixture_or_task_name:
        vocabulary = online.task_vocabulary(mixture_or_task_name, module)
        teacher_lib.check_teacher(teacher, vocabulary, student_vocab_size)

    def factory(cfg, partitioner, num_microbatches: int = 1):
        summary = os.path.join(model_dir, SUMMARY_FILE) if model_dir else None
        return online.online_stage(cfg, partitioner, num_microbatches, teacher, config,
                                   student_vocab_size, summary)
    return factory


def ssr_offline_stage(output_dir: str, config: online.SsrStageConfig = online.SsrStageConfig()):
    """The trainer's stage factory for generate-spans output in `output_dir`."""
    offline.read_manifest(output_dir)  # fail before any compute

    def factory(cfg, partitioner, num_microbatches: int = 1):
        return offline.offline_stage(cfg, partitioner, num_microbatches, output_dir, config)
    return factory


def registrations() -> Dict[str, Callable]:
    return {"TeacherConfig": teacher_lib.TeacherConfig, "SsrStageConfig": online.SsrStageConfig,
            "SpanCurriculum": curriculum.SpanCurriculum,
            "ssr_online_stage": ssr_online_stage, "ssr_offline_stage": ssr_offline_stage,
            "generate_spans": offline.generate_spans}


def register() -> Dict[str, Callable]:
    """Registers the core configurables (ssr_jax.gin_config) and the SSR ones once; returns
    name -> gin-wrapped callable. Names that gin_config already registers are reused."""
    import gin  # pylint: disable=import-outside-toplevel
    from ssr_jax import gin_config  # pylint: disable=import-outside-toplevel
    if not _REGISTERED:
        core = gin_config.register()
        for name, obj in registrations().items():
            _REGISTERED[name] = core[name] if name in core else gin.external_configurable(
                    obj, name=name, module=MODULE)
    return _REGISTERED


def call(name: str, **kwargs):
    """Calls a registered SSR configurable; a missing binding becomes one UserError line."""
    from ssr_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    try:
        return register()[name](**kwargs)
    except TypeError as e:
        if "No values supplied by Gin or caller" in str(e):
            first = str(e).strip().splitlines()[0]
            raise UserError(f"missing gin binding for {name}: {first}") from e
        raise
