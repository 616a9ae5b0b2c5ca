"""Supervised fine-tuning: next-token cross-entropy on assistant tokens only."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.algos.base import Stage
from jaxalign.data.loader import build_loader
from jaxalign.step import Batch, LossOut

BATCH_KEYS = ("inputs_bt", "targets_bt", "loss_mask_bt", "segment_ids_bt", "positions_bt")


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The loss is a mean over every loss-bearing token of the global batch."""
    return {"tokens": jnp.sum(batch["loss_mask_bt"].astype(jnp.float32))}


def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
    """Summed response-token NLL (normalised by ``loss_weights``' token count).

    With ``loss_index_bk`` in the batch the vocabulary projection runs only at those
    (loss-bearing) positions.
    """
    h_btd = model.hidden(batch["inputs_bt"], batch["positions_bt"], batch["segment_ids_bt"])
    h, targets, mask = losses.take_positions(batch.get("loss_index_bk"), h_btd,
                                             batch["targets_bt"], batch["loss_mask_bt"])
    stats = model.token_stats(h, targets, with_hits=True)
    mask = mask.astype(jnp.float32)
    nll_sum = -jnp.sum(stats["logps_bt"] * mask)
    hits = jnp.sum(stats["hits_bt"] * mask)
    return LossOut({"tokens": nll_sum}, {"token_accuracy": (hits, jnp.sum(mask))})


def make_loss(config: Any):
    """``(loss_fn, loss_weights)``; SFT has no options that change the loss."""
    del config
    return loss_fn, loss_weights


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Train or eval batches of SFT records (padded or packed) for this process."""
    return build_loader(config, tokenizer, split, "sft", loss_index=True,
                        process_index=process_index,
                        process_count=process_count)


STAGE = Stage(name="sft", make_loss=make_loss, build_data=build_data)
