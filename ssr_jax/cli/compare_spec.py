"""What `ssr-jax compare` runs: one frozen dataclass, filled by gin's `compare.*` bindings
(gin/compare/default.gin), validated before any compute."""
import dataclasses
from typing import Mapping, Optional, Tuple

from ssr_jax.errors import UserError

# Arm -> the gin file its continued pre-training adds to the shared settings (gin/compare/).
ARM_FILES = {
    "span_corruption": "compare/arm_span_corruption.gin",
    "ssr": "compare/arm_ssr.gin",
    "ssr_mixed": "compare/arm_ssr_mixed.gin",
    "ssr_curriculum": "compare/arm_ssr_curriculum.gin",
    "ssr_offline": "compare/arm_ssr_offline.gin",
}
BASELINE = "span_corruption"
_SSR_ARMS = {"ssr", "ssr_mixed", "ssr_curriculum", "ssr_offline"}
OFFLINE_ARMS = {"ssr_offline"}


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """An objective comparison (ssr_jax/cli/compare.py's docstring has the protocol).

    Pre-training files are gin files (found on the gin search path, e.g. 'compare/...').
    `bindings` apply to every pre-training and fine-tuning run (e.g. "T5Config.dtype='bfloat16'").
    """

    out_dir: str
    # The teacher: given, or trained with span corruption until its fills are good.
    teacher_checkpoint: Optional[str] = None
    teacher_gin: str = "compare/teacher.gin"
    teacher_steps: int = 600
    teacher_extra_steps: int = 300
    teacher_max_steps: int = 1500
    min_valid_fills: float = 0.9
    fill_check_examples: int = 256
    # The shared student init: span corruption for init_steps, or a given checkpoint.
    init_checkpoint: Optional[str] = None
    init_gin: str = "compare/student_init.gin"
    init_steps: int = 300
    # Continued pre-training arms, all from the init with the same steps/batch/schedule.
    arms: Tuple[str, ...] = ("span_corruption", "ssr")
    arm_steps: int = 300
    # Bound for every pre-training run (teacher, init, arms): one source of these values.
    pretrain_lengths: Mapping[str, int] = dataclasses.field(
            default_factory=lambda: {"inputs": 128, "targets": 32})
    pretrain_batch_size: int = 16
    ssr_examples_per_row: int = 2  # SSR examples per student row (slot = lengths / this)
    pretrain_task: str = "ssr_default_span_corruption"  # held-out evaluation of every arm
    ssr_task: str = "ssr_default_ssr_masked"  # the teacher's fill check
    eval_batches: int = 8
    # Downstream: every arm fine-tuned on every task with one recipe and several seeds.
    tasks: Tuple[str, ...] = ("ssr_default_gec", "ssr_default_docstring_summary")
    task_lengths: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)
    primary_metrics: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The recipe gets MODEL_DIR, INITIAL_CHECKPOINT_PATH, TRAIN_STEPS (the arm's step + the
    # task's steps), FINETUNE_START_STEP, FINETUNE_STEPS, the task, lengths and SEED.
    finetune_gin: str = "compare/finetune.gin"
    finetune_steps: int = 600
    task_steps: Mapping[str, int] = dataclasses.field(default_factory=dict)  # per-task override
    select_every: int = 200
    seeds: Tuple[int, ...] = (0, 1, 2)
    decode_batch_size: int = 64
    validation_batches: Optional[int] = 2  # per checkpoint, for the choice; None: all
    test_batches: Optional[int] = None  # None: the whole test split
    # How the checkpoint choice and the test split are decoded: 'greedy' or 'beam'
    # (num_beams, with T5X's length penalty brevity_alpha).
    decode_method: str = "greedy"
    num_beams: int = 4
    brevity_alpha: float = 0.6
    no_repeat_ngram_size: int = 0
    num_resamples: int = 1000
    module: str = "tasks"
    bindings: Tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "bindings", tuple(self.bindings))
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise UserError("compare needs MODEL_DIR (where every stage and the report go), "
                            "e.g. --gin.MODEL_DIR=\"'runs/compare'\".")
        unknown = [a for a in self.arms if a not in ARM_FILES]
        if unknown:
            raise UserError(f"compare.arms: unknown arm(s) {unknown}; choose from "
                            f"{sorted(ARM_FILES)}.")
        if BASELINE not in self.arms:
            raise UserError(f"compare.arms={list(self.arms)} must include the baseline "
                            f"{BASELINE!r}: every arm is compared with it.")
        if len(set(self.arms)) != len(self.arms) or len(set(self.seeds)) != len(self.seeds):
            raise UserError("compare.arms and compare.seeds must not repeat an entry.")
        for name in ("teacher_steps", "teacher_extra_steps", "teacher_max_steps",
                     "fill_check_examples", "arm_steps", "pretrain_batch_size",
                     "ssr_examples_per_row", "eval_batches", "finetune_steps",
                     "select_every", "decode_batch_size", "num_beams", "num_resamples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"compare.{name}={value!r} must be an integer >= 1.")
        if self.init_checkpoint is None and (not isinstance(self.init_steps, int)
                                             or self.init_steps < 1):
            raise UserError(f"compare.init_steps={self.init_steps!r}: the shared init needs "
                            ">= 1 span-corruption steps, or give compare.init_checkpoint.")
        if self.teacher_max_steps < self.teacher_steps:
            raise UserError("compare.teacher_max_steps must be >= compare.teacher_steps.")
        if self.decode_method not in ("greedy", "beam"):
            raise UserError(f"compare.decode_method={self.decode_method!r}: use 'greedy' or "
                            "'beam' (the checkpoint choice and the test scores must not "
                            "depend on a sampling seed).")
        if not 0.0 <= self.min_valid_fills <= 1.0:
            raise UserError(f"compare.min_valid_fills={self.min_valid_fills}: a share in [0, 1].")
        if not self.seeds:
            raise UserError("compare.seeds is empty: give at least one fine-tuning seed "
                            "(3 or more for a spread).")
        for task in self.tasks:
            steps = self.steps_of(task)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise UserError(f"compare.task_steps[{task!r}]={steps!r} must be an integer "
                                ">= 1.")
            if self.select_every > steps:
                raise UserError(f"compare.select_every={self.select_every} > the {steps} "
                                f"fine-tuning steps of {task}: no checkpoint to choose from.")
        if not self.tasks:
            raise UserError("compare.tasks is empty: give at least one downstream task (any "
                            "registered seq2seq task), e.g. compare.tasks=['ssr_default_gec'].")
        missing = [t for t in self.tasks if t not in self.task_lengths]
        if missing:
            raise UserError(f"compare.task_lengths has no lengths for {missing}; e.g. "
                            f"compare.task_lengths={{'{missing[0]}': {{'inputs': 128, "
                            "'targets': 64}}}.")

    def decode_description(self) -> str:
        """How validation and test are decoded, in words (the report's 'decoding' line)."""
        text = (f"beam search, {self.num_beams} beams, length penalty alpha "
                f"{self.brevity_alpha}" if self.decode_method == "beam" else "greedy")
        if self.no_repeat_ngram_size:
            text += f", no repeated {self.no_repeat_ngram_size}-grams"
        return text

    def steps_of(self, task: str) -> int:
        """Fine-tuning steps of a task (compare.task_steps, else finetune_steps)."""
        return self.task_steps.get(task, self.finetune_steps)

    @property
    def ssr_arms(self) -> Tuple[str, ...]:
        return tuple(a for a in self.arms if a in _SSR_ARMS)
