"""Helpers shared by the pairwise stages (reward model, DPO family)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.data.loader import build_loader
from jaxalign.step import Batch

FIELDS = ("inputs_bt", "targets_bt", "loss_mask_bt", "segment_ids_bt", "positions_bt")


def pair_valid(batch: Batch) -> jax.Array:
    """1.0 for real pairs, 0.0 for padding rows (no chosen completion tokens)."""
    return (jnp.sum(batch["chosen_loss_mask_bt"], axis=-1) > 0).astype(jnp.float32)


def stacked(batch: Batch) -> dict[str, jax.Array]:
    """Chosen rows then rejected rows, ``[2b, t]``, so both sides run in one forward."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in FIELDS}


def halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Splits a stacked ``[2b, ...]`` result back into (chosen, rejected)."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def mean_pair(x_b: jax.Array, valid_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A (sum, count) metric over real pairs."""
    return jnp.sum(x_b * valid_b), jnp.sum(valid_b)


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Preference pairs (prompt + chosen, prompt + rejected) for this process."""
    return build_loader(config, tokenizer, split, "preference", process_index=process_index,
                        process_count=process_count)


def tokens_per_batch(batch: Mapping[str, Any]) -> int:
    """Positions of both sides (padding included: it costs FLOPs too)."""
    return int(batch["chosen_inputs_bt"].size + batch["rejected_inputs_bt"].size)
