"""KTO on unpaired completions labelled desirable or undesirable (TRL's formulation).

The KL term is estimated from mismatched pairs, as in TRL: the prompt of row
``i`` followed by the completion of row ``i + 1``; its log-ratio under the
policy and the frozen reference (run in the step), averaged over the
micro-batch, clamped at 0 and detached.

With ``data.pack`` rows hold several examples (segments) and ``label_bt`` carries each
segment's label at its positions. Per-example log-probs are per-segment sums
(``[b, p]``, see ``jaxalign.pairs``), and the mismatched pairs are the same as
unpacked: each real example, in row-major order, takes the completion of the next real
one (cyclic over the micro-batch). Those sequences are laid out in rows of ``2t``
positions, row ``r`` holding the mismatched sequences of row ``r``'s examples, which
always fit (see :func:`mismatched_packed`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign import losses, pairs
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


def loss_weights(batch: Batch, is_packed: bool = False) -> dict[str, jax.Array]:
    """The loss is a mean over the real examples of the global batch."""
    p = pairs.num_slots(batch["segment_ids_bt"].shape[1], is_packed)
    return {"examples": jnp.sum(_valid(batch, p))}


def _valid(batch: Batch, num_segments: int = 1) -> jax.Array:
    """``[b, p]`` examples with loss-bearing tokens."""
    return pairs.slot_valid(batch["loss_mask_bt"], batch["segment_ids_bt"], num_segments)


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


def _example_ids(batch: Batch, slot: jax.Array, index: jax.Array, start: jax.Array,
                 p: int) -> jax.Array:
    """Id ``index`` of the example in flat slot ``slot`` (whose first position is
    ``start``): ``inputs`` at its first position, then its ``targets``."""
    t = batch["inputs_bt"].shape[1]
    row = slot // p
    first = batch["inputs_bt"].reshape(-1)[row * t + jnp.clip(start, 0, t - 1)]
    later = batch["targets_bt"].reshape(-1)[row * t + jnp.clip(start + index - 1, 0, t - 1)]
    return jnp.where(index == 0, first, later)


def mismatched_packed(batch: Batch, p: int) -> tuple[dict[str, jax.Array], jax.Array]:
    """Packed rows of ``prompt_j + completion_next(j)``, ``[b, 2t]``, and their ``[b, p]``
    validity; ``next(j)`` is the next real example in row-major order (cyclic).

    Slot ``k`` of row ``r`` keeps its slot (segment ``k + 1``). Row ``r``'s mismatched
    sequences hold its own prompts and the completions of its examples but its first,
    plus one completion from the next row: at most ``2t - 1`` positions. A mismatched
    sequence is cut at ``t`` positions, as unpacked.
    """
    inputs_bt, mask_bt, seg_bt = batch["inputs_bt"], batch["loss_mask_bt"], batch["segment_ids_bt"]
    b, t = inputs_bt.shape
    pos_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
    start = losses.segment_min(pos_bt, seg_bt, p, t).reshape(-1)
    count = losses.segment_sums((seg_bt != 0).astype(jnp.int32), seg_bt, p).reshape(-1)
    first_loss = losses.segment_min(jnp.where(mask_bt > 0, pos_bt, t), seg_bt, p, t)
    valid_bp = _valid(batch, p)
    real = valid_bp.reshape(-1) > 0
    a = first_loss.reshape(-1) - start + 1  # prompt ids: the completion starts at id a
    completion = count + 1 - a
    rank = jnp.cumsum(real) - 1
    n = b * p
    slot_of_rank = jnp.zeros(n, jnp.int32).at[jnp.where(real, rank, n)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    nxt = slot_of_rank[(rank + 1) % jnp.maximum(jnp.sum(real), 1)]
    m_len = jnp.where(real, jnp.minimum(a + completion[nxt], t + 1) - 1, 0).reshape(b, p)
    ends_bp = jnp.cumsum(m_len, axis=1)
    u = jnp.arange(2 * t)
    k_bu = jax.vmap(lambda e: jnp.searchsorted(e, u, side="right"))(ends_bp)
    kc_bu = jnp.minimum(k_bu, p - 1)
    q_bu = u[None, :] - jnp.take_along_axis(ends_bp - m_len, kc_bu, axis=1)
    real_bu = (k_bu < p) & (q_bu < jnp.take_along_axis(m_len, kc_bu, axis=1))
    j_bu = jnp.arange(b)[:, None] * p + kc_bu  # flat slot of each output position
    a_j = a[j_bu]

    def m_id(q):  # id q of slot j's mismatched sequence
        own = q < a_j
        src = jnp.where(own, j_bu, nxt[j_bu])
        index = jnp.where(own, q, a[nxt[j_bu]] + q - a_j)
        return _example_ids(batch, src, index, start[src], p)

    seq = {"inputs_bt": jnp.where(real_bu, m_id(q_bu), 0),
           "targets_bt": jnp.where(real_bu, m_id(q_bu + 1), 0),
           "loss_mask_bt": (real_bu & (q_bu + 1 >= a_j)).astype(jnp.float32),
           "segment_ids_bt": jnp.where(real_bu, kc_bu + 1, 0).astype(jnp.int32),
           "positions_bt": jnp.where(real_bu, q_bu, 0).astype(jnp.int32)}
    return seq, valid_bp


def _logps(model: nnx.Module, seq: Mapping[str, jax.Array], p: int = 1) -> jax.Array:
    return pairs.segment_logps(model, seq, p)[0].reshape(-1)


def _kl_estimate(model: nnx.Module, ref: nnx.Module, batch: Batch, p: int,
                 is_packed: bool) -> jax.Array:
    """The mismatched-pair KL estimate of the (micro-)batch (before clamping)."""
    if is_packed:
        kl_seq, kl_valid_bp = mismatched_packed(batch, p)
        kl_valid = kl_valid_bp.reshape(-1)
    else:
        kl_seq, valid = mismatched(batch), _valid(batch)[:, 0]
        kl_valid = valid * valid[(jnp.arange(valid.shape[0]) + 1) % valid.shape[0]]
    kl_b = jax.lax.stop_gradient(_logps(model, kl_seq, p) - _logps(ref, kl_seq, p))
    return jnp.sum(kl_b * kl_valid) / jnp.maximum(jnp.sum(kl_valid), 1.0)


def _labels(batch: Batch, p: int, is_packed: bool) -> jax.Array:
    """Flat ``[b*p]`` desirable flags: ``label_bt`` per segment packed, ``label_b`` else."""
    if is_packed:
        return losses.segment_sums(batch["label_bt"], batch["segment_ids_bt"], p
                                   ).reshape(-1) > 0
    return batch["label_b"] > 0.5


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.kto`` (and ``config.data.pack``)."""
    kto = config.kto
    beta = float(kto.beta)
    is_packed = pairs.packed(config)

    def loss_fn(model: nnx.Module, batch: Batch, frozen: Mapping[str, Any]) -> LossOut:
        ref = frozen["reference"]
        p = pairs.num_slots(batch["segment_ids_bt"].shape[1], is_packed)
        seq = {k: batch[k] for k in FIELDS}
        policy_b = _logps(model, seq, p)
        ref_b = jax.lax.stop_gradient(_logps(ref, seq, p))
        valid = _valid(batch, p).reshape(-1)
        kl = _kl_estimate(model, ref, batch, p, is_packed)
        desirable = _labels(batch, p, is_packed)
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

    return loss_fn, functools.partial(loss_weights, is_packed=is_packed)


def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Unpaired (prompt + completion, label) rows for this process."""
    return build_loader(config, tokenizer, split, RECORD_FORMAT, process_index=process_index,
                        process_count=process_count)


STAGE = Stage(name="kto", make_loss=make_loss, build_data=build_data,
              frozen_models=frozen_models,
              default_config=default_config)
