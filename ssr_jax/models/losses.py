"""Token losses: cross-entropy with z-loss and label smoothing, summed over weighted tokens.

Everything is computed in fp32 whatever the activation dtype. The gradient is written by
hand (softmax * (1 + 2 z lse) - soft_targets) so that no one-hot [.., vocab] tensor is
built in either pass.
"""
import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp


def _smoothing(vocab_size: int, label_smoothing: float) -> Tuple[float, float, float]:
    """(confidence, low_confidence, normalizing_constant) for T5X-style smoothing.

    Soft targets put `confidence` on the label and `low_confidence` on each other token;
    the constant is the entropy of that distribution, subtracted so the minimum loss is 0.
    """
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab_size - 1) if vocab_size > 1 else 0.0
    const = 0.0
    if confidence > 0:
        const -= confidence * math.log(confidence)
    if low > 0:
        const -= (vocab_size - 1) * low * math.log(low)
    return confidence, low, const


def _xent_fwd(logits, targets, z_loss, label_smoothing):
    confidence, low, const = _smoothing(logits.shape[-1], label_smoothing)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # -sum_v soft_v * (logit_v - lse) = lse - sum_v soft_v * logit_v, as soft sums to 1.
    soft_dot = (confidence - low) * target_logit
    if low > 0:
        soft_dot = soft_dot + low * jnp.sum(logits, axis=-1)
    cross_ent = lse - soft_dot - const
    z = z_loss * jnp.square(lse)
    return (cross_ent, z), (logits, targets, lse, z_loss)


def _xent_bwd(label_smoothing, res, g):
    logits, targets, lse, z_loss = res
    g_ce, g_z = g
    confidence, low, _ = _smoothing(logits.shape[-1], label_smoothing)
    probs = jnp.exp(logits - lse[..., None])
    # d lse = probs; d (z lse^2) = 2 z lse probs; d (soft . logits) = soft targets
    # = low everywhere plus (confidence - low) on the label.
    grad = probs * (g_ce + 2.0 * z_loss * lse * g_z)[..., None] - low * g_ce[..., None]
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    on_label = ((confidence - low) * g_ce)[..., None]
    grad = grad - jnp.where(vocab_ids == targets[..., None], on_label, 0.0)
    # Targets are ids and z_loss a fixed coefficient: neither gets a gradient.
    return grad, None, None


def _xent_primal(logits, targets, z_loss, label_smoothing):
    return _xent_fwd(logits, targets, z_loss, label_smoothing)[0]


# label_smoothing (argument 3) is a static Python float.
cross_entropy_with_logits = jax.custom_vjp(_xent_primal, nondiff_argnums=(3,))
cross_entropy_with_logits.defvjp(_xent_fwd, _xent_bwd)
cross_entropy_with_logits.__doc__ = """Per-token (cross_entropy, z_loss) in fp32.

Args:
  logits: [..., vocab] fp32.
  targets: int [...] label ids.
  z_loss: coefficient of the auxiliary z-loss z_loss * logsumexp(logits)**2.
  label_smoothing: Python float; 0 gives the plain cross-entropy.
"""


def token_losses(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0,
                 label_smoothing: float = 0.0) -> Tuple[jax.Array, jax.Array]:
    """(cross_entropy, z_loss) per token, fp32 [...]."""
    return cross_entropy_with_logits(logits.astype(jnp.float32), targets,
                                     jnp.asarray(z_loss, jnp.float32), float(label_smoothing))


def summed_metrics(logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array],
                   z_loss: float = 0.0, label_smoothing: float = 0.0
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Weighted sums over tokens: (loss_sum, aux) as the BaseModel contract describes.

    weights=None weights every non-pad (target != 0) token by 1. loss_sum is
    cross_ent_sum + z_loss_sum; correct_sum counts weighted tokens whose target is the
    argmax of the logits (the first id of a tie for the top, as jnp.argmax).
    """
    if weights is None:
        weights = (targets > 0)
    weights = weights.astype(jnp.float32)
    cross_ent, z = token_losses(logits, targets, z_loss, label_smoothing)
    cross_ent_sum = jnp.sum(cross_ent * weights)
    z_loss_sum = jnp.sum(z * weights)
    # Not argmax: XLA:CPU runs its (value, index) reduce unvectorised, slower than max
    # reduces (the max is shared with the logsumexp). Same answer as argmax == target: the
    # target holds the max and every lower id is below it (argmax takes the first of a tie,
    # so a collapsed model with equal logits scores 0, not 1).
    logits32 = logits.astype(jnp.float32)
    top = jnp.max(logits32, axis=-1)
    target_logit = jnp.take_along_axis(logits32, targets[..., None], axis=-1)[..., 0]
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits32.shape, logits32.ndim - 1)
    below = jnp.max(jnp.where(vocab_ids < targets[..., None], logits32, -jnp.inf), axis=-1)
    correct = ((target_logit == top) & ((targets == 0) | (below < target_logit))
               ).astype(jnp.float32)
    loss_sum = cross_ent_sum + z_loss_sum
    aux = {
            "loss_sum": loss_sum,
            "cross_ent_sum": cross_ent_sum,
            "z_loss_sum": z_loss_sum,
            "weight_sum": jnp.sum(weights),
            "correct_sum": jnp.sum(correct * weights),
    }
    return loss_sum, aux
