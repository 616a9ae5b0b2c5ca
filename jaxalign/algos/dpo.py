"""The DPO family on preference pairs: one stage, ``config.dpo.loss_type`` picks the objective.

Reference-based losses (TRL's ``sigmoid``, ``ipo``, ``hinge``, ... see
``losses.DPO_LOSS_TYPES``) read the frozen reference's log-probs either from
the batch (``ref_chosen_logps_b``/``ref_rejected_logps_b``, precomputed) or
from a frozen, non-donated reference model run in the step
(``dpo.reference = "in_step"``). ``simpo`` and ``orpo`` are reference-free.
``dpo.rpo_alpha`` > 0 adds RPO's NLL on chosen tokens to any of them.

With ``data.pack`` the batch holds several pairs per row (layout: ``jaxalign.pairs``);
the losses see per-pair ``[b, p]`` log-probs from per-segment sums, flattened, and give
the same loss and gradients as the pairs one per row. The precomputed reference is then
stored per pair slot (``ref_*_logps_bp``, cut to the most pairs any row of the run holds).
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
from jaxalign.pairs import halves, mean_pair, pair_slots_valid, stacked
from jaxalign.step import Batch, LossOut

REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = (*losses.DPO_LOSS_TYPES, *REFERENCE_FREE)


def default_config() -> dict[str, Any]:
    """The ``dpo`` section with its defaults (read by this stage and rejection's DPO rounds)."""
    return {"dpo": section(
        "dpo", "The DPO family on preference pairs (jaxalign.algos.dpo).",
        loss_type=("sigmoid", "objective: sigmoid (DPO; cDPO with label_smoothing) | hinge | "
                   "ipo | exo_pair | nca_pair | robust | bco_pair | sppo_hard | aot | "
                   "aot_unpaired | apo_zero | apo_down | discopop, or reference-free simpo | "
                   "orpo"),
        beta=(0.1, "β: strength of the implicit KL toward the reference (SimPO: the reward "
              "scale)"),
        label_smoothing=(0.0, "assumed label-flip rate (conservative DPO, robust, exo_pair)"),
        discopop_tau=(0.05, "discopop's temperature"),
        simpo_gamma=(0.5, "SimPO's target reward margin"),
        rpo_alpha=(0.0, "> 0: adds RPO's NLL on the chosen completions with this weight"),
        reference=("in_step", "reference log-probs: in_step (a frozen model run in the step) "
                   "| precomputed (once, before training, as batch columns)"))}


def loss_weights(batch: Batch, is_packed: bool = False) -> dict[str, jax.Array]:
    """Pair losses average over real pairs; NLL terms over chosen completion tokens."""
    p = pairs.num_slots(batch["chosen_segment_ids_bt"].shape[1], is_packed)
    return {"pairs": jnp.sum(pair_slots_valid(batch, p)),
            "chosen_tokens": jnp.sum(batch["chosen_loss_mask_bt"].astype(jnp.float32))}


def uses_reference(config: Any) -> bool:
    return config.dpo.loss_type not in REFERENCE_FREE


def frozen_models(config: Any) -> tuple[str, ...]:
    """Frozen models the step needs: the reference policy when computed in-step."""
    if uses_reference(config) and config.dpo.reference == "in_step":
        return ("reference",)
    return ()


def precomputed_columns(config: Any):
    """``("reference", fn)`` when the reference log-probs are precomputed, else None."""
    if not (uses_reference(config) and config.dpo.reference == "precomputed"):
        return None

    is_packed = pairs.packed(config)

    def columns(ref_model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        if not is_packed:
            chosen, rejected = reference_logps(ref_model, batch)
            return {"ref_chosen_logps_b": chosen, "ref_rejected_logps_b": rejected}
        p = pairs.num_slots(batch["chosen_segment_ids_bt"].shape[1], True)
        chosen, rejected = reference_logps(ref_model, batch, p)
        return {"ref_chosen_logps_bp": chosen, "ref_rejected_logps_bp": rejected}

    return "reference", columns


def sequence_logps(model: nnx.Module, seq: Mapping[str, jax.Array]
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-row summed completion log-probs and completion lengths of stacked (unpacked)
    sequences."""
    logps_bp, lengths_bp = pairs.segment_logps(model, seq, 1)
    return logps_bp[:, 0], lengths_bp[:, 0]


def reference_logps(ref_model: nnx.Module, batch: Batch, num_segments: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """The frozen reference's (chosen, rejected) summed log-probs for a batch: per row
    ``[b]`` by default, per segment slot ``[b, p]`` with ``num_segments``."""
    logps_bp, _ = pairs.segment_logps(ref_model, stacked(batch), num_segments or 1)
    chosen, rejected = halves(jax.lax.stop_gradient(logps_bp))
    if num_segments is None:
        return chosen[:, 0], rejected[:, 0]
    return chosen, rejected


def check_config(config: Any) -> None:
    """Stops before any compute on an unknown loss or an impossible combination."""
    dpo = config.dpo
    if dpo.loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo.loss_type={dpo.loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if dpo.reference not in ("in_step", "precomputed"):
        raise ValueError(f"dpo.reference={dpo.reference!r}; expected in_step or precomputed")
    if dpo.beta <= 0:
        raise ValueError(f"dpo.beta={dpo.beta} must be positive")
    if dpo.loss_type == "robust" and not 0 <= dpo.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={dpo.label_smoothing} must be in [0, 0.5) for "
                         "robust DPO")


def _per_pair(model: nnx.Module, batch: Batch, num_segments: int
              ) -> tuple[jax.Array, ...]:
    """Flat per-pair ``[b*p]`` (chosen, rejected) log-probs and lengths, and pair validity."""
    logps_bp, lengths_bp = pairs.segment_logps(model, stacked(batch), num_segments)
    chosen, rejected = halves(logps_bp)
    chosen_len, rejected_len = halves(lengths_bp)
    valid = pair_slots_valid(batch, num_segments)
    return tuple(x.reshape(-1) for x in (chosen, rejected, chosen_len, rejected_len, valid))


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.dpo`` (and ``config.data.pack``)."""
    check_config(config)
    dpo = config.dpo
    loss_type, beta = dpo.loss_type, float(dpo.beta)
    is_packed = pairs.packed(config)

    def loss_fn(model: nnx.Module, batch: Batch, frozen: Mapping[str, Any] | None = None
                ) -> LossOut:
        p = pairs.num_slots(batch["chosen_segment_ids_bt"].shape[1], is_packed)
        chosen, rejected, chosen_len, rejected_len, valid = _per_pair(model, batch, p)
        metrics: dict[str, tuple[jax.Array, jax.Array]] = {}
        terms: dict[str, jax.Array] = {}
        if loss_type == "simpo":
            pair_losses, c_rew, r_rew = losses.simpo_loss(
                chosen / jnp.maximum(chosen_len, 1), rejected / jnp.maximum(rejected_len, 1),
                beta=beta, gamma=float(dpo.simpo_gamma), label_smoothing=dpo.label_smoothing)
        elif loss_type == "orpo":
            c_avg = chosen / jnp.maximum(chosen_len, 1)
            r_avg = rejected / jnp.maximum(rejected_len, 1)
            pair_losses, log_odds = losses.orpo_odds_ratio_loss(c_avg, r_avg, beta=beta)
            c_rew, r_rew = jax.lax.stop_gradient(beta * c_avg), jax.lax.stop_gradient(beta * r_avg)
            terms["chosen_tokens"] = -jnp.sum(chosen)  # ORPO's SFT term
            metrics["log_odds_ratio"] = mean_pair(log_odds, valid)
        else:
            if "ref_chosen_logps_b" in batch:
                ref_c, ref_r = batch["ref_chosen_logps_b"], batch["ref_rejected_logps_b"]
            elif "ref_chosen_logps_bp" in batch:
                ref_c, ref_r = (pairs.fit_slots(batch[f"ref_{side}_logps_bp"], p).reshape(-1)
                                for side in ("chosen", "rejected"))
            else:
                ref_c, ref_r = (x.reshape(-1) for x in
                                reference_logps(frozen["reference"], batch, p))
            pair_losses, c_rew, r_rew = losses.masked_dpo_loss(
                chosen, rejected, ref_c, ref_r, valid, loss_type=loss_type, beta=beta,
                label_smoothing=dpo.label_smoothing, discopop_tau=dpo.discopop_tau,
                chosen_lengths=chosen_len, rejected_lengths=rejected_len)
        terms["pairs"] = jnp.sum(pair_losses * valid)
        if dpo.rpo_alpha > 0:
            nll = -jnp.sum(chosen * valid)
            terms["chosen_tokens"] = terms.get("chosen_tokens", 0.0) + dpo.rpo_alpha * nll
        metrics.update({
            "rewards/chosen": mean_pair(c_rew, valid),
            "rewards/rejected": mean_pair(r_rew, valid),
            "rewards/accuracy": mean_pair((c_rew > r_rew).astype(jnp.float32), valid),
            "rewards/margin": mean_pair(c_rew - r_rew, valid),
            "logps/chosen": mean_pair(chosen, valid),
            "logps/rejected": mean_pair(rejected, valid),
            "nll/chosen": (-jnp.sum(chosen * valid), jnp.sum(chosen_len * valid)),
        })
        return LossOut(terms, metrics)

    return loss_fn, functools.partial(loss_weights, is_packed=is_packed)


STAGE = Stage(name="dpo", make_loss=make_loss,
              build_data=functools.partial(pairs.build_data, loss_index=True),
              check_config=check_config,
              frozen_models=frozen_models, precomputed_columns=precomputed_columns,
              default_config=default_config)
