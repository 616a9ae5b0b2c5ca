"""The GRPO family: group-relative policy optimisation on sampled completions.

Each rollout samples ``rl.num_samples`` (G) completions per prompt with the
policy being trained, scores them (``rl.rewards``) and gives each completion the
advantage of its reward within its group. Variants are settings of ``config.grpo``
and ``config.rl``:

* GRPO: ``advantage=std``, ``loss_agg=seq-mean-token-mean``, symmetric clip;
* Dr. GRPO: ``advantage=none``, ``loss_agg=seq-mean-token-sum-norm``;
* DAPO: ``clip_high`` > ``clip_low`` (clip-higher), ``loss_agg=token-mean``,
  ``dynamic_sampling`` (zero-variance groups carry no weight) and the
  ``overlong_penalty`` reward; ``oversample`` = k > 1 is DAPO's filtering: each
  rollout samples k × the prompts and trains on the groups whose rewards differ
  (topped up with flat groups when too few differ), so the update -- most of a
  step's time -- is not spent on groups that carry no gradient;
* GSPO: ``importance=sequence`` (one length-normalised ratio per sequence);
* RLOO: ``advantage=rloo`` (leave-one-out baseline).

``rl.kl_coef`` > 0 adds a per-token KL penalty (``rl.kl_estimator`` k1/k2/k3)
against the frozen initial policy; 0 drops the reference model altogether.
``rl.offpolicy`` (tis / mis / seq_mask) weighs each token's policy-gradient term by
the behaviour-weights trainer's over the sampler's probability of the sampled token
(``losses.offpolicy_weights``), correcting a sampler/trainer mismatch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import losses
from jaxalign import rollout as rollout_lib
from jaxalign.algos.base import Loader, RunContext, Stage
from jaxalign.config import section
from jaxalign.evals.generation import make_prompt_evaluator
from jaxalign.rollout import mean_metric
from jaxalign.step import Batch, LossOut

ADVANTAGES = ("std", "none", "rloo")
IMPORTANCE = ("token", "sequence")


def default_config() -> dict[str, Any]:
    """The ``rl`` and ``grpo`` sections with their defaults."""
    return {"rl": rollout_lib.rl_config(), "grpo": section(
        "grpo", "The GRPO family: GRPO, Dr. GRPO, DAPO, GSPO, RLOO (jaxalign.algos.grpo).",
        advantage=("std", "group baseline: std (GRPO) | none (Dr. GRPO) | rloo"),
        loss_agg=("seq-mean-token-mean", "loss aggregation: seq-mean-token-mean | token-mean "
                  "(DAPO) | seq-mean-token-sum-norm (Dr. GRPO)"),
        clip_low=(0.2, "ratio clip below 1 (1 - clip_low)"),
        clip_high=(0.2, "ratio clip above 1 (1 + clip_high); > clip_low is DAPO's "
                   "clip-higher"),
        importance=("token", "importance ratio: token | sequence (GSPO)"),
        dynamic_sampling=(False, "zero-variance groups carry no weight (DAPO)"),
        oversample=(1, "sample k× the prompts, train on the informative groups (DAPO)"),
        entropy_metric=(True, "log the policy's entropy on the completions"))}


def check_config(config: Any) -> None:
    """Stops before any compute on an unknown variant or impossible settings."""
    rollout_lib.check_config(config)
    g = config.grpo
    if g.advantage not in ADVANTAGES:
        raise ValueError(f"grpo.advantage={g.advantage!r}; expected one of {list(ADVANTAGES)}")
    if g.importance not in IMPORTANCE:
        raise ValueError(f"grpo.importance={g.importance!r}; expected one of "
                         f"{list(IMPORTANCE)}")
    if g.loss_agg not in losses.AGGREGATIONS:
        raise ValueError(f"grpo.loss_agg={g.loss_agg!r}; expected one of "
                         f"{list(losses.AGGREGATIONS)}")
    if g.clip_low < 0 or g.clip_high < 0:
        raise ValueError("grpo.clip_low and grpo.clip_high must be >= 0")
    if g.advantage == "rloo" and config.rl.num_samples < 2:
        raise ValueError("grpo.advantage=rloo needs rl.num_samples >= 2")
    if g.oversample < 1:
        raise ValueError(f"grpo.oversample={g.oversample} must be >= 1 (1 = keep every group)")


def group_advantages(rewards_b: np.ndarray, weight_b: np.ndarray, config: Any
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-row advantages (and weights: dynamic sampling zeroes flat groups) + metrics."""
    g = config.rl.num_samples
    adv_b = np.asarray(losses.group_advantages(jnp.asarray(rewards_b), g,
                                               scale=config.grpo.advantage))
    r_pg = rewards_b.reshape(-1, g)
    real_p = weight_b.reshape(-1, g)[:, 0] > 0
    flat_p = np.ptp(r_pg, axis=1) == 0
    weight_b = weight_b.copy()
    if config.grpo.dynamic_sampling:
        weight_b = np.where(np.repeat(flat_p, g), 0.0, weight_b).astype(np.float32)
    metrics = {
        "reward/std_within_group": float(r_pg[real_p].std(axis=1, ddof=0).mean())
        if real_p.any() else 0.0,
        "groups/flat_fraction": float(flat_p[real_p].mean()) if real_p.any() else 0.0,
    }
    return {"advantages_b": adv_b.astype(np.float32), "weight_b": weight_b}, metrics


def select_groups(rewards_b: np.ndarray, real_b: np.ndarray, rows: int, step: int,
                  config: Any) -> tuple[np.ndarray, dict[str, float]]:
    """Rows of the ``rows // G`` groups to train on: informative groups first.

    Groups whose rewards differ carry the gradient; they are taken in a seeded random
    order (a function of the step, so a resumed run picks the same), then flat groups
    fill what is left (with ``dynamic_sampling`` they carry no weight). Padding prompts
    come last. Kept groups stay in their sampled order.
    """
    g = config.rl.num_samples
    r_pg = rewards_b.reshape(-1, g)
    real_p = real_b.reshape(-1, g)[:, 0]
    informative_p = real_p & (np.ptp(r_pg, axis=1) > 0)
    order = np.random.default_rng([config.seed, step, 7]).permutation(len(r_pg))
    rank = np.where(informative_p, 0, np.where(real_p, 1, 2))[order]
    keep_p = np.sort(order[np.argsort(rank, kind="stable")][: rows // g])
    keep = (keep_p[:, None] * g + np.arange(g)[None]).reshape(-1)
    n_real = max(int(real_p.sum()), 1)
    return keep, {"groups/informative_sampled": float(informative_p.sum() / n_real),
                  "groups/informative_kept": float(informative_p[keep_p].mean())}


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """Normalisers over the global batch: weighted completion tokens and sequences."""
    w_b = batch["weight_b"]
    return {"tokens": jnp.sum(batch["loss_mask_bt"] * w_b[:, None]), "seqs": jnp.sum(w_b)}


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.grpo`` / ``config.rl``."""
    check_config(config)
    g, rl = config.grpo, config.rl
    kl_coef, temperature = float(rl.kl_coef), float(rl.temperature)

    def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
        h_btd = model.hidden(batch["inputs_bt"], batch["positions_bt"],
                             batch["segment_ids_bt"])
        stats = model.token_stats(h_btd, batch["targets_bt"], temperature=temperature,
                                  with_entropy=g.entropy_metric)
        logps_bt = stats["logps_bt"]
        mask_bt = batch["loss_mask_bt"] * batch["weight_b"][:, None]
        # One update per rollout: the rollout policy is the current one (ratio 1, but
        # the gradient of the ratio is the policy gradient).
        old_bt = batch.get("old_logps_bt", jax.lax.stop_gradient(logps_bt))
        adv_bt = jnp.broadcast_to(batch["advantages_b"][:, None], logps_bt.shape)
        pg_bt, ratio_bt, clipped_bt = losses.clipped_policy_loss(
            logps_bt, old_bt, adv_bt, mask_bt, clip_low=g.clip_low, clip_high=g.clip_high,
            sequence_level=g.importance == "sequence")
        metrics: dict[str, tuple[jax.Array, jax.Array]] = {
            "policy/ratio": mean_metric(ratio_bt, mask_bt),
            "policy/clip_fraction": mean_metric(clipped_bt, mask_bt),
            "policy/logp": mean_metric(logps_bt, mask_bt),
        }
        if rl.offpolicy != "none":
            # Sampler/trainer mismatch: weigh the policy-gradient term only.
            w_bt, off_metrics = losses.offpolicy_weights(
                old_bt, batch["sampler_logps_bt"], mask_bt, mode=rl.offpolicy,
                cap=float(rl.offpolicy_cap))
            pg_bt = pg_bt * w_bt
            metrics.update(off_metrics)
        per_token_bt = pg_bt
        metrics.update(rollout_lib.consistency_metric(logps_bt, batch, mask_bt))
        if kl_coef > 0:
            kl_bt = losses.kl_penalty(logps_bt, batch["ref_logps_bt"], rl.kl_estimator)
            per_token_bt = per_token_bt + kl_coef * kl_bt
            metrics["kl"] = mean_metric(jax.lax.stop_gradient(kl_bt), mask_bt)
        if g.entropy_metric:
            metrics["policy/entropy"] = mean_metric(
                jax.lax.stop_gradient(stats["entropy_bt"]), mask_bt)
        total, norm = losses.aggregate(per_token_bt, mask_bt, g.loss_agg,
                                       max_len=rl.max_new_tokens)
        return LossOut({norm: total}, metrics)

    return loss_fn, loss_weights


def make_batches(ctx: RunContext, prompts: Loader) -> rollout_lib.RolloutBatches:
    """The run's rollouts: sample, score, group-relative advantages."""
    config = ctx.config

    def advantages(batch, rewards_b):
        return group_advantages(rewards_b, batch["weight_b"], config)

    def select(rewards_b, real_b, rows, step):
        return select_groups(rewards_b, real_b, rows, step, config)

    return rollout_lib.RolloutBatches(
        rollout_lib.Rollout(ctx, advantages, select=select), prompts)


def make_evaluator(ctx: RunContext):
    """Greedy answers on the eval prompts: task accuracy, rewards, refusal rates."""
    return make_prompt_evaluator(ctx)


STAGE = Stage(name="grpo", make_loss=make_loss, build_data=rollout_lib.build_data,
              check_config=check_config,
              make_batches=make_batches, make_evaluator=make_evaluator,
              default_config=default_config)
