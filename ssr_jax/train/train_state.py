"""The train state: everything a checkpoint must hold to continue bit for bit."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
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


def schedule_counts_at(opt_state: Any, step) -> Any:
    """`opt_state` with every schedule count (optax's ScaleByScheduleState) set to `step`:
    the learning rate the optimizer applies is then schedule(step), the one the train step
    logs. Other counts (Adafactor's decay, Adam's bias correction) belong to the moments and
    stay those of fresh ones."""
    def is_schedule(x):
        return isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(
            lambda x: x._replace(count=jnp.full_like(x.count, step)) if is_schedule(x) else x,
            opt_state, is_leaf=is_schedule)


def state_from_params(params: Any, optimizer: Optimizer, partitioner: Partitioner,
                      shardings: TrainState, seed: int, step: int = 0,
                      opt_state: Any = None) -> TrainState:
    """A state at `step` around given (already sharded) params, e.g. from an initial
    checkpoint: its (sharded) optimizer state when given, else a fresh one whose schedule
    continues at `step`. The dropout rng is init_state's for `seed`, so dropout stays a
    function of (seed, step)."""
    rep = partitioner.sharding(PartitionSpec())

    def make(p, o, seed, step):
        if o is None:
            o = schedule_counts_at(optimizer.tx.init(p), step)
        zero = jnp.zeros((), jnp.int32)
        return TrainState(step=jnp.asarray(step, jnp.int32), params=p, opt_state=o,
                          rng=jax.random.split(jax.random.PRNGKey(seed))[1],
                          nonfinite_consecutive=zero, nonfinite_total=zero)
    opt_shardings = None if opt_state is None else shardings.opt_state
    with partitioner.activation_context():
        return jax.jit(make, in_shardings=(shardings.params, opt_shardings, rep, rep),
                       out_shardings=shardings)(params, opt_state, seed, step)
