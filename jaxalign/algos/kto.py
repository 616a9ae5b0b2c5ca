"""KTO on unpaired completions labelled desirable or undesirable (TRL's formulation).

The KL term is estimated from mismatched pairs, as in TRL: the prompt of row
``i`` followed by the completion of row ``i + 1``; its log-ratio under the
policy and the frozen reference (run in the step), averaged over the
micro-batch, clamped at 0 and detached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses
from jaxalign.algos.base import Stage
from jaxalign.config import section
from jaxalign.data.loader import build_loader
from jaxalign.pairs import FIELDS, mean_pair
from jaxalign.step import Batch, LossOut

RECORD_FORMAT = "unpaired"


def default_config() -> dict[str, Any]:
    """The ``kto`` section with its defaults."""
    return {"kto": section(
        "kto", "KTO on unpaired completions (jaxalign.algos.kto).",
        beta=(0.1, "β: strength of the implicit KL toward the reference"),
        desirable_weight=(1.0, "loss weight of desirable examples"),
        undesirable_weight=(1.0, "loss weight of undesirable examples"))}


def frozen_models(config: Any) -> tuple[str, ...]:
    return ("reference",)


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """The loss is a mean over the real examples of the global batch."""
    return {"examples": jnp.sum(_valid(batch))}


def _valid(batch: Batch) -> jax.Array:
    return (jnp.sum(batch["loss_mask_bt"], axis=-1) > 0).astype(jnp.float32)


def mismatched(batch: Batch) -> dict[str, jax.Array]:
    """Rows ``prompt_i + completion_{i+1}`` in the batch's layout (right-padded, shifted).

    A row's ids are ``inputs`` plus its last target; its completion starts one
    past the first loss-bearing position. Completions that no longer fit are cut.
    """
    inputs_bt, targets_bt, mask_bt = (batch[k] for k in FIELDS[:3])
    b, t = inputs_bt.shape
    n_b = jnp.sum(batch["segment_ids_bt"] != 0, axis=-1)  # real positions = ids - 1
    ids_bs = jnp.concatenate([inputs_bt, jnp.zeros((b, 1), inputs_bt.dtype)], axis=1)
    ids_bs = ids_bs.at[jnp.arange(b), n_b].set(targets_bt[jnp.arange(b), jnp.maximum(n_b - 1, 0)])
    start_b = jnp.argmax(mask_bt > 0, axis=-1) + 1  # first completion id
    j = (jnp.arange(b) + 1) % b
    s = jnp.arange(t + 1)[None, :]
    src_bs = s - start_b[:, None] + start_b[j][:, None]  # index into row j's ids
    new_len_b = jnp.minimum(start_b + (n_b[j] + 1 - start_b[j]), t + 1)
    take_bs = jnp.take_along_axis(ids_bs[j], jnp.clip(src_bs, 0, t), axis=1)
    new_bs = jnp.where(s < start_b[:, None], ids_bs, take_bs)
    new_bs = jnp.where(s < new_len_b[:, None], new_bs, 0)
    pos_t = jnp.arange(t)[None, :]
    real_bt = pos_t < (new_len_b - 1)[:, None]
    return {"inputs_bt": jnp.where(real_bt, new_bs[:, :-1], 0), "targets_bt": new_bs[:, 1:],
            "loss_mask_bt": ((pos_t + 1 >= start_b[:, None]) & real_bt).astype(jnp.float32),
            "segment_ids_bt": real_bt.astype(jnp.int32),
            "positions_bt": jnp.where(real_bt, pos_t, 0).astype(jnp.int32)}


def _logps(model: nnx.Module, seq: Mapping[str, jax.Array]) -> jax.Array:
    h_btd = model.hidden(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"])
    logps_bt = model.token_stats(h_btd, seq["targets_bt"])["logps_bt"]
    return jnp.sum(logps_bt * seq["loss_mask_bt"].astype(jnp.float32), axis=-1)


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.kto``."""
    kto = config.kto
    beta = float(kto.beta)

    def loss_fn(model: nnx.Module, batch: Batch, frozen: Mapping[str, Any]) -> LossOut:
        ref = frozen["reference"]
        seq = {k: batch[k] for k in FIELDS}
        policy_b = _logps(model, seq)
        ref_b = jax.lax.stop_gradient(_logps(ref, seq))
        valid = _valid(batch)
        kl_seq = mismatched(batch)
        kl_valid = valid * valid[(jnp.arange(valid.shape[0]) + 1) % valid.shape[0]]
        kl_b = jax.lax.stop_gradient(_logps(model, kl_seq) - _logps(ref, kl_seq))
        kl = jnp.sum(kl_b * kl_valid) / jnp.maximum(jnp.sum(kl_valid), 1.0)
        desirable = batch["label_b"] > 0.5
        per_example, rewards = losses.kto_loss(
            policy_b, ref_b, desirable, kl, beta=beta,
            desirable_weight=float(kto.desirable_weight),
            undesirable_weight=float(kto.undesirable_weight))
        good, bad = valid * desirable, valid * ~desirable
        return LossOut({"examples": jnp.sum(per_example * valid)}, {
            "kl/estimate": (kl, jnp.ones(())),  # before clamping at 0
            "rewards/desirable": mean_pair(rewards, good),
            "rewards/undesirable": mean_pair(rewards, bad),
            "rewards/accuracy": ((jnp.sum((rewards > 0) * good) + jnp.sum((rewards < 0) * bad)),
                                 jnp.sum(valid)),
        })

    return loss_fn, loss_weights


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Unpaired (prompt + completion, label) rows for this process."""
    return build_loader(config, tokenizer, split, RECORD_FORMAT, process_index=process_index,
                        process_count=process_count)


def tokens_per_batch(batch: Mapping[str, Any]) -> int:
    """Positions of the trained rows; tokens/s and MFU count the policy's training pass only."""
    return int(batch["inputs_bt"].size)


STAGE = Stage(name="kto", make_loss=make_loss, build_data=build_data,
              tokens_per_batch=tokens_per_batch, frozen_models=frozen_models,
              default_config=default_config)
