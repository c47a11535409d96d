"""`ssr-jax train --gin_file=... --gin.X=Y`: the gin edge of the trainer.

Parses gin flags, optionally joins a multi-process JAX cluster, writes the parsed config to
MODEL_DIR/config.gin, builds the run spec, records the task's vocabulary next to the
checkpoints (MODEL_DIR/checkpoints/vocab.json) and trains it. Bad input surfaces as `UserError`
(one line).

Multi-process flags (ssr_jax.distributed): --coordinator_address=host:port --num_processes=N
--process_id=i, or the SSR_JAX_* environment, or a detected SLURM/TPU cluster
(--multiprocess=true forces JAX's cluster detection); --heartbeat_timeout_s, --step_timeout_s
and --local_device_ids tune it. In a multi-process run an error ends the process at once
(distributed.fail_fast) so the others stop too instead of hanging.
"""
import json
import os
from typing import List

from ssr_jax import distributed
from ssr_jax.cli import gin_registry
from ssr_jax.cli.spec import RunSpec
from ssr_jax.errors import UserError


def run_spec() -> RunSpec:
    """The configured run (gin already parsed)."""
    return gin_registry.call("train")


def record_vocabulary(spec: RunSpec) -> str:
    """Writes MODEL_DIR/checkpoints/vocab.json (process 0): the task's vocabulary travels with
    the checkpoints, so an SSR teacher or an export knows which ids the model means. A
    directory whose record names another vocabulary is refused."""
    # pylint: disable=import-outside-toplevel
    from ssr_jax import vocab as vocab_lib
    from ssr_jax.data.dataset import task_vocabulary
    from ssr_jax.train import checkpoints
    directory = os.path.join(spec.model_dir, checkpoints.CHECKPOINTS_SUBDIR)
    path = os.path.join(directory, vocab_lib.VOCAB_RECORD_FILE)
    data = spec.train_dataset
    vocabulary = task_vocabulary(data.mixture_or_task_name, data.module)
    mine = vocab_lib.vocab_record(vocabulary)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except ValueError:
            old = None  # unreadable: rewritten below
        keys = ("vocab_size", "extra_ids", "sentencepiece_sha256")
        if old is not None and any(old.get(k) != mine.get(k) for k in keys):
            raise UserError(f"{spec.model_dir} holds checkpoints of another vocabulary "
                            f"({path}: {old.get('sentencepiece_model_file')}) than task "
                            f"{data.mixture_or_task_name!r} "
                            f"({mine.get('sentencepiece_model_file')}); use a fresh MODEL_DIR.")
    if distributed.is_primary():
        vocab_lib.write_vocab_record(directory, vocabulary)
    return path


def train(spec: RunSpec):
    """Trains a run spec: its SSR (if any) is checked before anything is built."""
    from ssr_jax.ssr import spec as ssr_spec  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import trainer  # pylint: disable=import-outside-toplevel
    factory = None
    if spec.ssr is not None:
        # The stage's data starts where the run started (an initial checkpoint's step S):
        # offline data must hold TRAIN_STEPS - S steps.
        start = trainer.run_start_step(spec.model_dir, spec.initial_checkpoint_path,
                                       spec.initial_checkpoint_params_only)
        factory = ssr_spec.input_stage_factory(spec.ssr, spec.train_dataset,
                                               spec.train_steps - start)
    record_vocabulary(spec)
    return trainer.train(**spec.train_kwargs(), input_stage_factory=factory)


def main(argv: List[str]) -> int:
    """0: trained to TRAIN_STEPS; distributed.EXIT_PREEMPTED: stopped early by a preemption
    (SIGTERM) after saving, rerun to resume."""
    def run() -> int:
        result = train(run_spec())
        return distributed.EXIT_PREEMPTED if result.preempted else 0
    return gin_registry.run_command("train", argv, run)
