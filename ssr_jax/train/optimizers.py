"""Optimizers (optax) and learning-rate schedules with T5X's defaults.

An `Optimizer` pairs the optax transformation with its schedule so that the train step can
report the learning rate it used. Schedules are functions of the (0-based) step count.
"""
import dataclasses
from typing import Callable, Optional, Union

import jax.numpy as jnp
import optax

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation and the learning-rate schedule it applies."""

    tx: optax.GradientTransformation
    learning_rate: Schedule


def _as_schedule(learning_rate: Union[float, Schedule]) -> Schedule:
    if callable(learning_rate):
        return learning_rate
    value = float(learning_rate)
    return lambda step: jnp.full((), value, jnp.float32)


def _with_clipping(tx: optax.GradientTransformation,
                   clip_global_norm: Optional[float]) -> optax.GradientTransformation:
    if clip_global_norm is None or clip_global_norm <= 0:
        return tx
    return optax.chain(optax.clip_by_global_norm(clip_global_norm), tx)


def adafactor(learning_rate: Union[float, Schedule] = 1e-3,
              decay_rate: float = 0.8,
              factored: bool = True,
              min_dim_size_to_factor: int = 128,
              clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True,
              momentum: Optional[float] = None,
              weight_decay_rate: Optional[float] = None,
              epsilon: float = 1e-30,
              clip_global_norm: Optional[float] = None) -> Optimizer:
    """Adafactor with T5's defaults: beta2_t = 1 - t^-0.8, factored second moments for
    matrices whose two largest dims are >= min_dim_size_to_factor, update clipping at RMS
    1.0 and steps scaled by the parameter's RMS (so the schedule is a relative step size)."""
    schedule = _as_schedule(learning_rate)
    tx = optax.adafactor(
            learning_rate=schedule,
            min_dim_size_to_factor=min_dim_size_to_factor,
            decay_rate=decay_rate,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            clipping_threshold=clipping_threshold,
            momentum=momentum,
            weight_decay_rate=weight_decay_rate,
            eps=epsilon,
            factored=factored)
    return Optimizer(_with_clipping(tx, clip_global_norm), schedule)


def adamw(learning_rate: Union[float, Schedule] = 1e-4,
          b1: float = 0.9,
          b2: float = 0.999,
          epsilon: float = 1e-8,
          weight_decay: float = 0.0,
          clip_global_norm: Optional[float] = 1.0) -> Optimizer:
    """AdamW (decoupled weight decay), global-norm clipping at 1.0 by default."""
    schedule = _as_schedule(learning_rate)
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=epsilon, weight_decay=weight_decay)
    return Optimizer(_with_clipping(tx, clip_global_norm), schedule)


def rsqrt_schedule(base_learning_rate: float = 1.0, warmup_steps: int = 10000) -> Schedule:
    """T5's inverse square root decay: base / sqrt(max(step, warmup)); constant during
    warmup (0.01 for 10k steps with base 1.0, then decaying)."""
    if warmup_steps <= 0:
        raise ValueError(f"rsqrt_schedule.warmup_steps must be positive, got {warmup_steps}.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return base_learning_rate / jnp.sqrt(jnp.maximum(step, float(warmup_steps)))

    return schedule


def constant_schedule(base_learning_rate: float = 1e-3, warmup_steps: int = 0) -> Schedule:
    """A constant rate (T5 fine-tuning uses 1e-3 with Adafactor), optional linear warmup."""
    return linear_schedule(base_learning_rate, warmup_steps, decay_steps=0,
                           end_learning_rate=base_learning_rate)


def linear_schedule(base_learning_rate: float = 1e-3, warmup_steps: int = 0,
                    decay_steps: int = 0, end_learning_rate: float = 0.0,
                    start_step: int = 0) -> Schedule:
    """Linear warmup from 0 to base over warmup_steps, then linear decay to
    end_learning_rate over decay_steps (0 = stay at base), both counted from start_step.

    The step travels with the params, so a fine-tuning run from a checkpoint at step S sees
    steps S, S+1, ...; start_step=S makes its warmup and decay count its own steps (a decay
    to 0 over N fine-tuning steps: start_step=S, decay_steps=N, TRAIN_STEPS=S+N)."""
    if start_step < 0 or warmup_steps < 0 or decay_steps < 0:
        raise ValueError(f"linear_schedule: start_step={start_step}, warmup_steps="
                         f"{warmup_steps} and decay_steps={decay_steps} must be >= 0.")

    def schedule(step):
        step = jnp.maximum(jnp.asarray(step, jnp.float32) - start_step, 0.0)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        if decay_steps > 0:
            frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
            value = base_learning_rate + frac * (end_learning_rate - base_learning_rate)
        else:
            value = jnp.asarray(base_learning_rate, jnp.float32)
        return warm * value

    return schedule


def cosine_schedule(base_learning_rate: float = 1e-3, warmup_steps: int = 0,
                    decay_steps: int = 10000, alpha: float = 0.0) -> Schedule:
    """Linear warmup, then cosine decay from base to alpha * base over decay_steps."""
    if decay_steps <= 0:
        raise ValueError(f"cosine_schedule.decay_steps must be positive, got {decay_steps}.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1)) if warmup_steps else 1.0
        frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        cos = 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return warm * base_learning_rate * ((1.0 - alpha) * cos + alpha)

    return schedule
