"""Helpers shared by the pairwise stages (reward model, DPO family) and KTO.

Packed preference batches (``data.pack``) keep the unpacked keys and shapes: chosen rows
``chosen_*_bt`` and rejected rows ``rejected_*_bt``, ``[b, t]`` each, with *matching
segment layouts* — segment ``k`` of row ``r`` holds pair ``k`` of that row on both
sides (its prompt + chosen completion on the chosen side, its prompt + rejected
completion on the rejected side, positions restarting at 0 per segment). The packer
fits each pair's two lengths into the same row of both sides (two-dimensional
best-fit decreasing). So

* every pair that fits unpacked fits packed (each side only needs ``max_len``), and the
  overlong rules and batch shapes stay those of unpadded rows;
* no pair-index arrays are needed: a pair is ``(row, segment)`` on both sides, and the
  micro-batch split (by rows) keeps every pair whole;
* both sides still run as one ``[2b, t]`` forward (:func:`stacked`).

Per-pair quantities are computed inside the loss as ``[b, p]`` arrays (letter ``p``: a
row's segment slots, slot ``k`` = segment ``k + 1``) by per-segment sums
(:func:`jaxalign.losses.segment_sums`). The number of slots is static: ``p = t``
packed (every segment holds at least one position, so a row never has more than
``t``), ``p = 1`` unpacked. Empty slots are masked by :func:`slot_valid`, and the
loss normaliser counts the real pairs of the whole global batch, as unpacked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.data.loader import build_loader
from jaxalign.step import Batch

FIELDS = ("inputs_bt", "targets_bt", "loss_mask_bt", "segment_ids_bt", "positions_bt")


def packed(config: Any) -> bool:
    """Whether ``config.data.pack`` asks for packed batches (False without a data section)."""
    data = config.get("data") if hasattr(config, "get") else None
    return bool(data is not None and data.get("pack", False))


def num_slots(seq_len: int, is_packed: bool) -> int:
    """Segment slots per row ``p``: ``seq_len`` packed (a segment has >= 1 position), else 1."""
    return seq_len if is_packed else 1


def fit_slots(x_bs: jax.Array, num_segments: int) -> jax.Array:
    """Per-slot values ``[b, s, ...]`` cut or zero-padded to ``num_segments`` slots (a row
    never holds more pairs than the slots kept, so a cut drops only empty slots)."""
    s = x_bs.shape[1]
    if s >= num_segments:
        return x_bs[:, :num_segments]
    return jnp.pad(x_bs, ((0, 0), (0, num_segments - s)) + ((0, 0),) * (x_bs.ndim - 2))


def pair_valid(batch: Batch) -> jax.Array:
    """1.0 for real pairs, 0.0 for padding rows (no chosen completion tokens); unpacked."""
    return (jnp.sum(batch["chosen_loss_mask_bt"], axis=-1) > 0).astype(jnp.float32)


def slot_valid(loss_mask_bt: jax.Array, segment_ids_bt: jax.Array,
               num_segments: int) -> jax.Array:
    """``[b, p]`` 1.0 for the slots whose segment has loss-bearing tokens, else 0.0."""
    counts_bp = losses.segment_sums(loss_mask_bt.astype(jnp.float32), segment_ids_bt,
                                    num_segments)
    return (counts_bp > 0).astype(jnp.float32)


def pair_slots_valid(batch: Batch, num_segments: int) -> jax.Array:
    """``[b, p]`` real pairs of a preference batch (chosen completion tokens in the slot)."""
    return slot_valid(batch["chosen_loss_mask_bt"], batch["chosen_segment_ids_bt"],
                      num_segments)


def stacked(batch: Batch) -> dict[str, jax.Array]:
    """Chosen rows then rejected rows, ``[2b, t]``, so both sides run in one forward."""
    keys = FIELDS + (("loss_index_bk",) if "chosen_loss_index_bk" in batch else ())
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in keys}


def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a stacked ``[2b, ...]`` result back into (chosen, rejected)."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def segment_logps(model: nnx.Module, seq: Mapping[str, jax.Array], num_segments: int
                  ) -> tuple[jax.Array, jax.Array]:
    """``[b, p]`` summed loss-bearing log-probs and loss-bearing lengths of each segment.

    With ``loss_index_bk`` in ``seq`` the vocabulary projection runs only at those
    positions (``k`` per row instead of ``t``).
    """
    h_btd = model.hidden(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"])
    h, targets, mask, seg = losses.take_positions(
        seq.get("loss_index_bk"), h_btd, seq["targets_bt"], seq["loss_mask_bt"],
        seq["segment_ids_bt"])
    mask = mask.astype(jnp.float32)
    logps = model.token_stats(h, targets)["logps_bt"] * mask
    return losses.segment_sums(logps, seg, num_segments), losses.segment_sums(mask, seg,
                                                                                num_segments)


def mean_pair(x_b: jax.Array, valid_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A (sum, count) metric over real pairs."""
    return jnp.sum(x_b * valid_b), jnp.sum(valid_b)


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int, loss_index: bool = False):
    """Preference pairs (prompt + chosen, prompt + rejected) for this process; with
    ``loss_index`` their loss-bearing positions too (for log-prob losses)."""
    return build_loader(config, tokenizer, split, "preference", process_index=process_index,
                        process_count=process_count, loss_index=loss_index)
