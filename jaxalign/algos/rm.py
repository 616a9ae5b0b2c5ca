"""Reward modelling: a Bradley–Terry scalar head trained on preference pairs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses, pairs
from jaxalign.algos.base import Stage
from jaxalign.config import section
from jaxalign.models.heads import RewardModel
from jaxalign.pairs import halves, mean_pair, pair_valid, stacked
from jaxalign.step import Batch, LossOut


def default_config() -> dict[str, Any]:
    """The ``rm`` section with its defaults."""
    return {"rm": section(
        "rm", "Bradley–Terry reward model (jaxalign.algos.rm).",
        center_coef=(0.0, "> 0: adds coef · (r_chosen + r_rejected)², keeping rewards "
                     "centred on zero"))}


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The loss is a mean over the real pairs of the global batch."""
    return {"pairs": jnp.sum(pair_valid(batch))}


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.rm``."""
    center_coef = float(config.rm.center_coef)

    def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
        seq = stacked(batch)
        r_chosen, r_rejected = halves(
            model.rewards(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"]))
        valid = pair_valid(batch)
        pair_losses = losses.bradley_terry_loss(r_chosen, r_rejected, center_coef=center_coef)
        return LossOut(
            {"pairs": jnp.sum(pair_losses * valid)},
            {"accuracy": mean_pair((r_chosen > r_rejected).astype(jnp.float32), valid),
             "margin": mean_pair(r_chosen - r_rejected, valid),
             "rewards/chosen": mean_pair(r_chosen, valid),
             "rewards/rejected": mean_pair(r_rejected, valid)})

    return loss_fn, loss_weights


STAGE = Stage(name="rm", make_loss=make_loss, build_data=pairs.build_data,
              tokens_per_batch=pairs.tokens_per_batch, make_model=RewardModel,
              default_config=default_config)
