"""Supervised fine-tuning: next-token cross-entropy on response tokens only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from jaxalign import losses
from jaxalign.step import Batch, LossOut

BATCH_KEYS = ("inputs_bt", "targets_bt", "loss_mask_bt", "segment_ids_bt", "positions_bt")


def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
    """Summed response-token NLL; the trainer divides by the global token count."""
    logits_btv = model(batch["inputs_bt"], batch["positions_bt"], batch["segment_ids_bt"])
    mask_bt = batch["loss_mask_bt"]
    nll_sum, count = losses.masked_token_nll(logits_btv, batch["targets_bt"], mask_bt)
    hits = losses.masked_token_accuracy_sum(logits_btv, batch["targets_bt"], mask_bt)
    return LossOut(nll_sum, count, {"token_accuracy": (hits, count)})


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Train or eval batches of prompt/response records for this process."""
    from jaxalign.data.pipeline import SFTBatches
    from jaxalign.data.sources import load_records

    data = config.data
    source = data.train if split == "train" else data.eval
    records = load_records(source, split)
    return SFTBatches(
        records, tokenizer, max_len=data.max_len,
        global_batch_size=config.train.batch_size if split == "train" else data.eval_batch_size,
        seed=data.seed, shuffle=split == "train", source=source, overlong=data.overlong,
        process_index=process_index, process_count=process_count)


def tokens_per_batch(batch: Mapping[str, Any]) -> int:
    """Positions the model processes (padding included: it costs FLOPs too)."""
    return int(batch["inputs_bt"].size)
