"""Reward modelling: a Bradley–Terry scalar head trained on preference pairs.

With ``data.pack`` a row holds several pairs (layout: ``jaxalign.pairs``); each
segment's reward is read at its own last position, so the loss equals the unpacked one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses, pairs
from jaxalign.algos.base import Stage
from jaxalign.config import section
from jaxalign.models.heads import RewardModel
from jaxalign.pairs import halves, mean_pair, pair_slots_valid, stacked
from jaxalign.step import Batch, LossOut


def default_config() -> dict[str, Any]:
    """The ``rm`` section with its defaults."""
    return {"rm": section(
        "rm", "Bradley–Terry reward model (jaxalign.algos.rm).",
        center_coef=(0.0, "> 0: adds coef · (r_chosen + r_rejected)², keeping rewards "
                     "centred on zero"))}


def loss_weights(batch: Batch, is_packed: bool = False) -> dict[str, jax.Array]:
    """The loss is a mean over the real pairs of the global batch."""
    p = pairs.num_slots(batch["chosen_segment_ids_bt"].shape[1], is_packed)
    return {"pairs": jnp.sum(pair_slots_valid(batch, p))}


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.rm`` (and ``config.data.pack``)."""
    center_coef = float(config.rm.center_coef)
    is_packed = pairs.packed(config)

    def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
        p = pairs.num_slots(batch["chosen_segment_ids_bt"].shape[1], is_packed)
        seq = stacked(batch)
        rewards_bp = model.segment_rewards(seq["inputs_bt"], seq["positions_bt"],
                                           seq["segment_ids_bt"], p)
        r_chosen, r_rejected = (x.reshape(-1) for x in halves(rewards_bp))
        valid = pair_slots_valid(batch, p).reshape(-1)
        pair_losses = losses.bradley_terry_loss(r_chosen, r_rejected, center_coef=center_coef)
        return LossOut(
            {"pairs": jnp.sum(pair_losses * valid)},
            {"accuracy": mean_pair((r_chosen > r_rejected).astype(jnp.float32), valid),
             "margin": mean_pair(r_chosen - r_rejected, valid),
             "rewards/chosen": mean_pair(r_chosen, valid),
             "rewards/rejected": mean_pair(r_rejected, valid)})

    return loss_fn, functools.partial(loss_weights, is_packed=is_packed)


STAGE = Stage(name="rm", make_loss=make_loss, build_data=pairs.build_data,
              make_model=RewardModel,
              default_config=default_config)
