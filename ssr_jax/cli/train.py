"""`ssr-jax train --gin_file=... --gin.X=Y`: the gin edge of the trainer.

Parses gin flags, optionally joins a multi-process JAX cluster, writes the parsed config to
MODEL_DIR/config.gin, builds the run spec and trains it. Bad input surfaces as `UserError`
(one line).

Multi-process flags (ssr_jax.distributed): --coordinator_address=host:port --num_processes=N
--process_id=i, or the SSR_JAX_* environment, or a detected SLURM/TPU cluster
(--multiprocess=true forces JAX's cluster detection); --heartbeat_timeout_s, --step_timeout_s
and --local_device_ids tune it. In a multi-process run an error ends the process at once
(distributed.fail_fast) so the others stop too instead of hanging.
"""
from typing import List

from ssr_jax.cli import gin_registry
from ssr_jax.cli.spec import RunSpec


def run_spec() -> RunSpec:
    """The configured run (gin already parsed)."""
    return gin_registry.call("train")


def train(spec: RunSpec):
    """Trains a run spec: its SSR (if any) is checked before anything is built."""
    from ssr_jax.ssr import spec as ssr_spec  # pylint: disable=import-outside-toplevel
    from ssr_jax.train import trainer  # pylint: disable=import-outside-toplevel
    factory = (ssr_spec.input_stage_factory(spec.ssr, spec.train_dataset)
               if spec.ssr is not None else None)
    return trainer.train(**spec.train_kwargs(), input_stage_factory=factory)


def main(argv: List[str]) -> int:
    return gin_registry.run_command(
            "train", argv, lambda: 0 if train(run_spec()) is not None else 1)
