"""The run spec: what gin's `train.*` bindings build, as one frozen dataclass.

`ssr-jax train`, `generate-spans` and `plan` all read a run through it (gin registers it
as `train`, so T5X-style bindings `train.model = %MODEL`, `train.train_steps = ...` fill it),
and hand its plain values to the library: `train()` for training, the SSR spec for
generate-spans, the model/optimizer/partitioner/dataset for the plan.
"""
import dataclasses
from typing import Any, Dict, Optional

from ssr_jax.data.dataset import DatasetConfig
from ssr_jax.errors import UserError
from ssr_jax.models.base import BaseModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.ssr.spec import SsrSpec
from ssr_jax.train.checkpoints import CheckpointConfig
from ssr_jax.train.optimizers import Optimizer


_INT_FIELDS = ("train_steps", "eval_every", "eval_steps", "log_every", "num_microbatches",
               "seed", "max_consecutive_nonfinite")
_BOOL_FIELDS = ("initial_checkpoint_params_only", "replay_initial_data")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A training run (see `ssr_jax.train.trainer.train` for each field) and its SSR."""

    model: BaseModel
    model_dir: str
    train_dataset: DatasetConfig
    train_steps: int
    optimizer: Optimizer
    partitioner: Partitioner
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval_dataset: Optional[DatasetConfig] = None
    eval_every: int = 0
    eval_steps: int = 20
    log_every: int = 50
    num_microbatches: int = 1
    seed: int = 0
    initial_checkpoint_path: Optional[str] = None
    initial_checkpoint_params_only: bool = False  # True: step 0, fresh optimizer state
    replay_initial_data: bool = False  # True: the initial checkpoint's run's data order
    max_consecutive_nonfinite: int = 20
    peak_flops_per_device: Optional[float] = None
    ssr: Optional[SsrSpec] = None  # train.ssr = @ssr_online() / @ssr_offline()

    def __post_init__(self):
        # A wrong type (`--gin.TRAIN_STEPS="'ten'"`) would otherwise surface as a TypeError
        # deep in the trainer; the ranges are the trainer's to check. The messages name the
        # binding, `train.<field>=`; gin_registry.call names the macro instead when the
        # binding is one (TRAIN_STEPS='ten').
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"train.{name}={value!r} must be an integer.")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise UserError(f"train.{name}={value!r} must be True or False.")
        value = self.peak_flops_per_device
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"train.peak_flops_per_device={value!r} must be a "
                            "number (FLOP/s) or None.")
        for name in ("model_dir", "initial_checkpoint_path"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise UserError(f"train.{name}={value!r} must be a path (a quoted "
                                "string, e.g. --gin.MODEL_DIR=\"'/tmp/run'\").")

    def train_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of `train()` (everything but the SSR spec)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "ssr"}
