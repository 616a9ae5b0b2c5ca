"""Pure loss math. Functions return sums and counts so callers can normalise
over the global batch (all devices, all micro-batches), never per shard."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Log-probability of each target token under float32 log-softmax."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt - lse_bt


def masked_token_nll(logits_btv: jax.Array, targets_bt: jax.Array,
                     mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood over masked tokens, and the token count.

    The mean loss is ``nll_sum / count`` where both are summed over the whole
    global batch; dividing per shard or per micro-batch would make the loss
    depend on the mesh shape and on gradient accumulation.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    nll_sum = -jnp.sum(token_logps(logits_btv, targets_bt) * mask_bt)
    return nll_sum, jnp.sum(mask_bt)


def masked_token_accuracy_sum(logits_btv: jax.Array, targets_bt: jax.Array,
                              mask_bt: jax.Array) -> jax.Array:
    """Number of masked positions whose argmax prediction equals the target."""
    hit_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    return jnp.sum(hit_bt * mask_bt.astype(jnp.float32))
