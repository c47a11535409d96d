"""The train state: everything a checkpoint must hold to continue bit for bit."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ssr_jax.models.base import BaseModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.train.optimizers import Optimizer


@flax.struct.dataclass
class TrainState:
    """step: updates taken (int32); rng: raw uint32[2] key, folded with the step for dropout;
    nonfinite_consecutive / nonfinite_total: steps whose loss or gradient was not finite (the
    update was skipped)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    nonfinite_consecutive: jax.Array
    nonfinite_total: jax.Array

    @classmethod
    def create(cls, params: Any, optimizer: Optimizer, rng: jax.Array) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=optimizer.tx.init(params), rng=rng,
                   nonfinite_consecutive=zero, nonfinite_total=zero)

    def meta(self) -> dict:
        """The small replicated leaves, saved as one checkpoint item."""
        return {"step": self.step, "rng": self.rng,
                "nonfinite_consecutive": self.nonfinite_consecutive,
                "nonfinite_total": self.nonfinite_total}

    def replace_meta(self, meta: dict) -> "TrainState":
        return self.replace(**{k: meta[k] for k in self.meta()})


def abstract_state(model: BaseModel, optimizer: Optimizer) -> TrainState:
    """Shapes and dtypes of the train state, without allocating it."""
    def make(rng):
        return TrainState.create(model.init(rng), optimizer, rng)
    return jax.eval_shape(lambda: make(jax.random.PRNGKey(0)))


def state_shardings(partitioner: Partitioner, model: BaseModel,
                    abstract: TrainState) -> TrainState:
    """Param shardings from the model's logical axes, optimizer state matched to params,
    scalars and the rng replicated."""
    params = partitioner.param_shardings(abstract.params, model.param_logical_axes())
    opt = partitioner.opt_state_shardings(abstract.opt_state, abstract.params, params)
    rep = partitioner.sharding(PartitionSpec())
    return TrainState(step=rep, params=params, opt_state=opt, rng=rep,
                      nonfinite_consecutive=rep, nonfinite_total=rep)


def init_state(model: BaseModel, optimizer: Optimizer, partitioner: Partitioner,
               shardings: TrainState, seed: int) -> TrainState:
    """Fresh state created directly in its shardings (never materialised on one device).
    Params come from PRNGKey(seed); the dropout rng is an independent fold of it."""
    def make(seed):
        params_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
        return TrainState.create(model.init(params_key), optimizer, dropout_key)
    with partitioner.activation_context():
        return jax.jit(make, out_shardings=shardings)(seed)


def state_from_params(params: Any, optimizer: Optimizer, partitioner: Partitioner,
                      shardings: TrainState, seed: int) -> TrainState:
    """A step-0 state around given (already sharded) params, e.g. from a pretrained model."""
    def make(p, seed):
        return TrainState.create(p, optimizer, jax.random.split(jax.random.PRNGKey(seed))[1])
    rep = partitioner.sharding(PartitionSpec())
    with partitioner.activation_context():
        return jax.jit(make, in_shardings=(shardings.params, rep),
                       out_shardings=shardings)(params, seed)
