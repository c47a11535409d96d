"""Jitted train and eval steps.

The model returns loss *sums*; the step divides by the global weight sum of the whole batch
(accumulated over microbatches), so gradient accumulation equals the full-batch gradient and
the loss does not depend on how the batch is split or sharded.
"""
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from ssr_jax.models.base import BaseModel
from ssr_jax.partitioning import Partitioner
from ssr_jax.train.optimizers import Optimizer
from ssr_jax.train.train_state import TrainState

Metrics = Dict[str, jax.Array]
AUX_KEYS = ("weight_sum", "z_loss_sum", "cross_ent_sum", "correct_sum")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _split_microbatches(batch: Mapping[str, jax.Array], num_microbatches: int,
                        partitioner: Partitioner) -> Dict[str, jax.Array]:
    """[B, ...] -> [M, B/M, ...] with microbatch i = rows i, i+M, i+2M, ... so that every
    device keeps an equal share of every microbatch (no resharding between them)."""
    spec = PartitionSpec(None, *partitioner.batch_spec())

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // num_microbatches, num_microbatches) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(x, partitioner.sharding(spec))

    return {k: split(v) for k, v in batch.items()}


def _grads_and_sums(model: BaseModel, params: Any, batch: Mapping[str, jax.Array],
                    dropout_rng: jax.Array, num_microbatches: int,
                    partitioner: Partitioner) -> Tuple[Any, jax.Array, Dict[str, jax.Array]]:
    """Gradient of the summed loss and the summed aux metrics over all microbatches."""
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    if num_microbatches <= 1:
        (loss_sum, aux), grads = grad_fn(params, batch, dropout_rng)
        return grads, _f32(loss_sum), {k: _f32(aux[k]) for k in AUX_KEYS}

    micro = _split_microbatches(batch, num_microbatches, partitioner)

    def body(carry, inputs):
        grads_acc, loss_acc, aux_acc = carry
        index, mb = inputs
        (loss_sum, aux), grads = grad_fn(params, mb, jax.random.fold_in(dropout_rng, index))
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        aux_acc = {k: aux_acc[k] + _f32(aux[k]) for k in AUX_KEYS}
        return (grads_acc, loss_acc + _f32(loss_sum), aux_acc), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros((), jnp.float32), {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS})
    (grads, loss_sum, aux), _ = jax.lax.scan(
            body, init, (jnp.arange(num_microbatches), micro))
    return grads, loss_sum, aux


def loss_and_grads(model: BaseModel, params: Any, batch: Mapping[str, jax.Array],
                   dropout_rng: jax.Array, partitioner: Partitioner, num_microbatches: int = 1
                   ) -> Tuple[jax.Array, Any, Dict[str, jax.Array]]:
    """(loss, grads, summed aux) with loss and grads normalised by the batch's total weight."""
    grads, loss_sum, aux = _grads_and_sums(model, params, batch, dropout_rng,
                                           num_microbatches, partitioner)
    denom = jnp.maximum(aux["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    return loss_sum / denom, grads, {"loss_sum": loss_sum, **aux}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: BaseModel,
               optimizer: Optimizer, partitioner: Partitioner,
               num_microbatches: int = 1) -> Tuple[TrainState, Metrics]:
    """One update. A step whose loss, gradient or resulting params are not finite applies no
    update (params and optimizer state are kept) and increments the non-finite counters; the
    step still counts (its batch is consumed)."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    loss, grads, sums = loss_and_grads(model, state.params, batch, dropout_rng, partitioner,
                                       num_microbatches)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Finite gradients can still overflow the params (a huge learning rate): checked per
    # element, as a norm of large finite params could itself overflow.
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p))
                                       for p in jax.tree.leaves(new_params)]))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa
    nonfinite = jnp.where(finite, 0, 1).astype(jnp.int32)
    new_state = state.replace(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_consecutive=jnp.where(finite, 0, state.nonfinite_consecutive + 1),
            nonfinite_total=state.nonfinite_total + nonfinite)
    metrics = {**sums,
               "real_tokens": _real_tokens(batch),
               "grad_norm": grad_norm,
               "learning_rate": optimizer.learning_rate(state.step),
               "nonfinite": nonfinite,
               "nonfinite_consecutive": new_state.nonfinite_consecutive}
    return new_state, metrics


def _real_tokens(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Non-padding input and target positions of the batch (the rest is padding)."""
    return sum(jnp.sum(batch[k] != 0).astype(jnp.float32)
               for k in ("encoder_input_tokens", "decoder_target_tokens") if k in batch)


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, model: BaseModel) -> Metrics:
    """Summed metrics of one batch, no dropout."""
    out = model.eval_fn(params, batch)
    return {k: _f32(out[k]) for k in AUX_KEYS}


def _in_context(partitioner: Partitioner, fn: Callable) -> Callable:
    """Calls fn with the partitioner's mesh and activation rules in scope (jit traces there)."""
    def call(*args):
        with partitioner.activation_context():
            return fn(*args)
    call.jitted = fn  # for lowering / cost analysis
    return call


def make_train_step(model: BaseModel, optimizer: Optimizer, partitioner: Partitioner,
                    state_shardings: TrainState, num_microbatches: int = 1,
                    donate: bool = True) -> Callable[[TrainState, Any], Tuple[TrainState, Metrics]]:
    """`(state, global batch) -> (state, metrics)`, jitted with the state donated. The batch
    keeps the sharding `Partitioner.make_global_batch` gave it."""
    def step(state, batch):
        return train_step(state, batch, model=model, optimizer=optimizer,
                          partitioner=partitioner, num_microbatches=num_microbatches)
    jitted = jax.jit(step, in_shardings=(state_shardings, None),
                     out_shardings=(state_shardings, partitioner.replicated()),
                     donate_argnums=(0,) if donate else ())
    return _in_context(partitioner, jitted)


def make_eval_step(model: BaseModel, partitioner: Partitioner,
                   param_shardings: Any) -> Callable[[Any, Any], Metrics]:
    """`(params, global batch) -> summed metrics`, jitted."""
    def step(params, batch):
        return eval_step(params, batch, model=model)
    jitted = jax.jit(step, in_shardings=(param_shardings, None),
                     out_shardings=partitioner.replicated())
    return _in_context(partitioner, jitted)
