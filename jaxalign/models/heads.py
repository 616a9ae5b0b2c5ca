"""Scalar heads on the decoder trunk: reward models (and, later, value heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.models.transformer import Transformer, TransformerConfig, resolve_dtype


def last_real_index(segment_ids_bt: jax.Array) -> jax.Array:
    """Index of each row's last non-padding position (right-padded rows)."""
    t = segment_ids_bt.shape[1]
    pos_bt = jnp.arange(t)[None, :]
    return jnp.max(jnp.where(segment_ids_bt != 0, pos_bt, 0), axis=1)


class RewardModel(Transformer):
    """The decoder trunk with a scalar head read at the last real token.

    Its parameters are the trunk's (without the unembedding, which a reward
    model never uses) plus ``reward_head`` and ``reward_bias``, so a supervised
    checkpoint initialises the trunk key for key.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        if hasattr(self, "unembed"):
            del self.unembed
        pd = resolve_dtype(cfg.param_dtype)
        init = jax.nn.initializers.normal(stddev=1.0 / (cfg.d_model + 1) ** 0.5)
        self.reward_head = nnx.Param(init(rngs.params(), (cfg.d_model,), pd),
                                     logical_axes=("embed",))
        self.reward_bias = nnx.Param(jnp.zeros((), pd), logical_axes=())

    def rewards(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                segment_ids_bt: jax.Array) -> jax.Array:
        """One float32 reward per row, from the hidden state at its last real token."""
        h_btd = self.hidden(tokens_bt, positions_bt, segment_ids_bt)
        last_b = last_real_index(segment_ids_bt)
        h_bd = jnp.take_along_axis(h_btd, last_b[:, None, None], axis=1)[:, 0]
        w_d = self.reward_head[...].astype(jnp.float32)
        return h_bd.astype(jnp.float32) @ w_d + self.reward_bias[...].astype(jnp.float32)

    def segment_rewards(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                        segment_ids_bt: jax.Array, num_segments: int) -> jax.Array:
        """``[b, p]`` float32 rewards at the last position of each segment of packed rows
        (slot ``k`` = segment ``k + 1``; 0-position slots read position 0, mask them).
        With one segment per row, ``rewards(...)[:, None]``."""
        if num_segments == 1:
            return self.rewards(tokens_bt, positions_bt, segment_ids_bt)[:, None]
        h_btd = self.hidden(tokens_bt, positions_bt, segment_ids_bt)
        w_d = self.reward_head[...].astype(jnp.float32)
        # The head is linear: score every position, then read the segments' last ones.
        r_bt = h_btd.astype(jnp.float32) @ w_d + self.reward_bias[...].astype(jnp.float32)
        last_bp = losses.segment_last_index(segment_ids_bt, num_segments)
        return jnp.take_along_axis(r_bt, last_bp, axis=1)


class PolicyWithValue(Transformer):
    """The decoder with a scalar value head on the shared trunk (PPO's critic).

    ``model(tokens_bt, ...)`` is the policy's logits as usual; ``hidden`` then
    ``token_stats`` and ``values`` give log-probs and values from one trunk pass. The head's
    params (``value_head``, ``value_bias``) are the only ones a policy checkpoint
    lacks, so an SFT run initialises everything else; exports and later stages
    ignore them.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        pd = resolve_dtype(cfg.param_dtype)
        # Zero init: the critic starts by predicting 0 everywhere, not noise.
        self.value_head = nnx.Param(jnp.zeros((cfg.d_model,), pd), logical_axes=("embed",))
        self.value_bias = nnx.Param(jnp.zeros((), pd), logical_axes=())

    def values(self, h_btd: jax.Array) -> jax.Array:
        """Float32 value of each position's state ``[b, t]`` from final hidden states."""
        w_d = self.value_head[...].astype(jnp.float32)
        return h_btd.astype(jnp.float32) @ w_d + self.value_bias[...].astype(jnp.float32)
