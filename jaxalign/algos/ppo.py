"""PPO with a value head on the policy's trunk, GAE and KL control (TRL's conventions).

Each rollout samples completions, scores them (``rl.rewards``: typically a trained
reward model, ``rm:<RM workdir>``) and turns the score into per-token rewards:
``−β·(logp − ref_logp)`` on every generated token plus the score on the last one.
GAE(γ, λ) over the critic's values gives advantages (whitened over the rollout)
and returns; ``rl.epochs`` passes over ``rl.minibatches`` minibatches then
optimise the clipped policy loss, the clipped value loss and an entropy bonus.
β is fixed, or adaptive (``ppo.kl_target`` > 0): it moves to keep the per-sequence
KL near the target, and its value is checkpointed with the run. ``rl.offpolicy``
weighs the policy term per token against sampler/trainer mismatch (as in GRPO).
"""

from __future__ import annotations

from collections.abc import Mapping
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
from jaxalign.models.heads import PolicyWithValue
from jaxalign.rollout import mean_metric
from jaxalign.step import Batch, LossOut


def default_config() -> dict[str, Any]:
    """The ``rl`` section with PPO's defaults (one sample, reused) and the ``ppo`` section."""
    rl = rollout_lib.rl_config(num_samples=1, epochs=2, minibatches=2, kl_coef=0.05)
    return {"rl": rl, "ppo": section(
        "ppo", "PPO with a value head, GAE and KL control (jaxalign.algos.ppo).",
        gamma=(1.0, "GAE discount γ"),
        lam=(0.95, "GAE λ"),
        clip=(0.2, "policy ratio clip"),
        value_clip=(0.2, "value prediction clip around the rollout's values"),
        vf_coef=(0.1, "weight of the value loss"),
        entropy_coef=(0.0, "weight of the entropy bonus"),
        whiten_advantages=(True, "whiten advantages over the rollout"),
        missing_eos_penalty=(1.0, "subtracted from the score of a cut-off completion"),
        kl_target=(0.0, "> 0: adaptive β (rl.kl_coef) toward this per-sequence KL"),
        kl_horizon=(10_000.0, "adaptive KL horizon, in samples: how fast β moves"))}


def check_config(config: Any) -> None:
    """Stops before any compute on impossible PPO settings."""
    rollout_lib.check_config(config)
    p = config.ppo
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ValueError(f"ppo.gamma={p.gamma} and ppo.lam={p.lam} must lie in [0, 1]")
    for name in ("clip", "value_clip", "vf_coef", "entropy_coef", "kl_target"):
        if p[name] < 0:
            raise ValueError(f"ppo.{name}={p[name]} must be >= 0")
    if p.kl_target > 0 and config.rl.kl_coef <= 0:
        raise ValueError("ppo.kl_target > 0 (adaptive KL) needs an initial rl.kl_coef > 0")


def adaptive_kl(coef: float, observed_kl: float, *, target: float, horizon: float,
                rows: int) -> float:
    """The adaptive KL controller (Ziegler et al.): nudges β toward the KL target."""
    error = float(np.clip(observed_kl / target - 1.0, -0.2, 0.2))
    return coef * (1.0 + error * rows / horizon)


def advantages(batch: Mapping[str, np.ndarray], scores_b: np.ndarray, config: Any,
               kl_coef: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-token rewards, GAE advantages (whitened) and returns of a rollout.

    Scores land on each row's last generated token; a completion cut off without
    a stop token first loses ``ppo.missing_eos_penalty``.
    """
    p = config.ppo
    mask_bt = batch["loss_mask_bt"] * batch["weight_b"][:, None]
    stopped_b = batch["stopped_b"] > 0
    scores_b = np.where(stopped_b, scores_b, scores_b - p.missing_eos_penalty)
    if "ref_logps_bt" in batch:
        # Sampled tokens' log-ratio: the k1 estimate of the per-token KL.
        kl_bt = (batch["sampler_logps_bt"] - batch["ref_logps_bt"]) * mask_bt
    else:
        kl_bt = np.zeros_like(mask_bt)
    t = mask_bt.shape[1]
    last_b = t - 1 - np.argmax(mask_bt[:, ::-1] > 0, axis=1)
    has_b = mask_bt.sum(1) > 0
    rewards_bt = -kl_coef * kl_bt
    rewards_bt[np.arange(len(last_b))[has_b], last_b[has_b]] += scores_b[has_b]
    values_bt = batch["old_values_bt"]
    adv_bt, ret_bt = losses.gae(jnp.asarray(rewards_bt), jnp.asarray(values_bt),
                                jnp.asarray(mask_bt), gamma=p.gamma, lam=p.lam)
    if p.whiten_advantages:
        adv_bt = losses.masked_whiten(adv_bt, jnp.asarray(mask_bt)) * mask_bt
    real = max(float(batch["weight_b"].sum()), 1.0)
    seq_kl = float(kl_bt.sum() / real)
    metrics = {"kl/sequence": seq_kl, "kl/coef": kl_coef,
               "score/mean": float((scores_b * batch["weight_b"]).sum() / real),
               "values/mean": float((values_bt * mask_bt).sum() / max(mask_bt.sum(), 1))}
    return ({"advantages_bt": np.asarray(adv_bt, np.float32),
             "returns_bt": np.asarray(ret_bt, np.float32)}, metrics)


def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """Every generated token of the global batch weighs the same (TRL's masked mean)."""
    return {"tokens": jnp.sum(batch["loss_mask_bt"] * batch["weight_b"][:, None])}


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.ppo`` / ``config.rl``."""
    check_config(config)
    p, rl, temperature = config.ppo, config.rl, float(config.rl.temperature)

    def loss_fn(model: nnx.Module, batch: Batch) -> LossOut:
        h_btd = model.hidden(batch["inputs_bt"], batch["positions_bt"],
                             batch["segment_ids_bt"])
        values_bt = model.values(h_btd)
        stats = model.token_stats(h_btd, batch["targets_bt"], temperature=temperature,
                                  with_entropy=True)
        logps_bt = stats["logps_bt"]
        mask_bt = batch["loss_mask_bt"] * batch["weight_b"][:, None]
        old_bt = batch.get("old_logps_bt", jax.lax.stop_gradient(logps_bt))
        pg_bt, ratio_bt, clipped_bt = losses.clipped_policy_loss(
            logps_bt, old_bt, batch["advantages_bt"], mask_bt, clip_low=p.clip,
            clip_high=p.clip)
        off_metrics: dict[str, tuple[jax.Array, jax.Array]] = {}
        if rl.offpolicy != "none":
            # Sampler/trainer mismatch: weigh the policy-gradient term only.
            w_bt, off_metrics = losses.offpolicy_weights(
                old_bt, batch["sampler_logps_bt"], mask_bt, mode=rl.offpolicy,
                cap=float(rl.offpolicy_cap))
            pg_bt = pg_bt * w_bt
        vf_bt = losses.clipped_value_loss(values_bt, batch["old_values_bt"], batch["returns_bt"],
                                          clip=p.value_clip)
        ent_bt = stats["entropy_bt"]
        per_token_bt = pg_bt + p.vf_coef * vf_bt - p.entropy_coef * ent_bt
        return LossOut({"tokens": jnp.sum(per_token_bt * mask_bt)}, {
            "policy/loss": mean_metric(pg_bt, mask_bt),
            "policy/ratio": mean_metric(ratio_bt, mask_bt),
            "policy/clip_fraction": mean_metric(clipped_bt, mask_bt),
            "policy/entropy": mean_metric(jax.lax.stop_gradient(ent_bt), mask_bt),
            "value/loss": mean_metric(vf_bt, mask_bt),
            "value/error": mean_metric(jnp.abs(values_bt - batch["returns_bt"]), mask_bt),
            **rollout_lib.consistency_metric(logps_bt, batch, mask_bt),
            **off_metrics,
        })

    return loss_fn, loss_weights


def _values(model: PolicyWithValue, seq: Mapping[str, jax.Array]) -> jax.Array:
    h_btd = model.hidden(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"])
    return model.values(h_btd) * seq["loss_mask_bt"]


def make_batches(ctx: RunContext, prompts: Loader) -> rollout_lib.RolloutBatches:
    """The run's rollouts: sample, score, per-token rewards with the KL penalty, GAE."""
    config = ctx.config
    p = config.ppo

    def hook(batch, scores_b):
        coef = float(rollout.host_state.get("kl_coef", config.rl.kl_coef))
        cols, metrics = advantages(batch, scores_b, config, coef)
        if p.kl_target > 0 and "ref_logps_bt" in batch:
            rollout.host_state["kl_coef"] = adaptive_kl(
                coef, metrics["kl/sequence"], target=p.kl_target, horizon=p.kl_horizon,
                rows=int(batch["weight_b"].sum()))
        return cols, metrics

    rollout = rollout_lib.Rollout(ctx, hook, value_fn=_values)
    rollout.host_state = {"kl_coef": float(config.rl.kl_coef)}
    return rollout_lib.RolloutBatches(rollout, prompts)


def make_evaluator(ctx: RunContext):
    """Greedy answers on the eval prompts: rewards (the RM's included), accuracy, refusals."""
    return make_prompt_evaluator(ctx)


STAGE = Stage(name="ppo", make_loss=make_loss, build_data=rollout_lib.build_data,
              check_config=check_config,
              make_model=PolicyWithValue, make_batches=make_batches,
              make_evaluator=make_evaluator, default_config=default_config)
