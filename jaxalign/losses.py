"""Pure loss math. Functions return sums and counts so callers can normalise
over the global batch (all devices, all micro-batches), never per shard."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logps(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Log-probability of each target token under float32 log-softmax."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt - lse_bt


def masked_token_nll(logits_btv: jax.Array, targets_bt: jax.Array,
                     mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood over masked tokens, and the token count.

    The mean loss is ``nll_sum / count`` where both are summed over the whole
    global batch; dividing per shard or per micro-batch would make the loss
    depend on the mesh shape and on gradient accumulation.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    nll_sum = -jnp.sum(token_logps(logits_btv, targets_bt) * mask_bt)
    return nll_sum, jnp.sum(mask_bt)


def masked_token_accuracy_sum(logits_btv: jax.Array, targets_bt: jax.Array,
                              mask_bt: jax.Array) -> jax.Array:
    """Number of masked positions whose argmax prediction equals the target."""
    hit_bt = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    return jnp.sum(hit_bt * mask_bt.astype(jnp.float32))


def sequence_logps(logits_btv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array, *,
                   average: bool = False) -> jax.Array:
    """Per-sequence log-probability of the masked targets: sum, or mean if ``average``.

    The mean (length-normalised) form is what SimPO and ORPO use.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    sum_b = jnp.sum(token_logps(logits_btv, targets_bt) * mask_bt, axis=-1)
    if not average:
        return sum_b
    return sum_b / jnp.maximum(jnp.sum(mask_bt, axis=-1), 1.0)


DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
                  "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop")


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, *, loss_type: str, beta: float,
             label_smoothing: float = 0.0, discopop_tau: float = 0.05,
             chosen_lengths: jax.Array | None = None, rejected_lengths: jax.Array | None = None,
             reference_free: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pairwise preference losses with TRL's names and formulas.

    Inputs are per-sequence log-probs ``[b]`` (summed over completion tokens).
    ``label_smoothing`` > 0 turns ``sigmoid`` into conservative DPO and sets the
    flip rate of ``robust`` and ``exo_pair``. ``ipo`` divides each log-ratio by its
    completion length when ``chosen_lengths``/``rejected_lengths`` are given (as
    TRL does). ``aot``/``aot_unpaired`` sort over the batch axis, so their
    per-example losses depend on the whole (micro-)batch.

    Returns:
      ``(losses_b, chosen_rewards_b, rejected_rewards_b)`` with rewards
      ``beta * (logps - ref_logps)`` (gradient-free).
    """
    if reference_free:
        ref_chosen_logps = jnp.zeros_like(ref_chosen_logps)
        ref_rejected_logps = jnp.zeros_like(ref_rejected_logps)
    chosen_lr = chosen_logps - ref_chosen_logps
    rejected_lr = rejected_logps - ref_rejected_logps
    delta = chosen_lr - rejected_lr
    ls = label_smoothing
    logsig = jax.nn.log_sigmoid

    def smoothed(x):
        return -logsig(beta * x) * (1 - ls) - logsig(-beta * x) * ls

    if loss_type == "sigmoid":
        losses = smoothed(delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
        c, r = chosen_lr, rejected_lr
        if chosen_lengths is not None and rejected_lengths is not None:
            c = c / jnp.maximum(chosen_lengths, 1.0)
            r = r / jnp.maximum(rejected_lengths, 1.0)
        losses = (c - r - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        eps = ls if ls > 0 else 1e-3  # log(0) is undefined; TRL used 1e-3 for the same reason
        losses = (jax.nn.sigmoid(beta * delta) * (logsig(beta * delta) - jnp.log1p(-eps))
                  + jax.nn.sigmoid(-beta * delta) * (logsig(-beta * delta) - jnp.log(eps)))
    elif loss_type == "nca_pair":
        c, r = beta * chosen_lr, beta * rejected_lr
        losses = -logsig(c) - 0.5 * logsig(-c) - 0.5 * logsig(-r)
    elif loss_type == "robust":
        losses = (-(1 - ls) * logsig(beta * delta) + ls * logsig(-beta * delta)) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        losses = -logsig(beta * chosen_lr) - logsig(-beta * rejected_lr)
    elif loss_type == "sppo_hard":
        losses = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
    elif loss_type == "aot":
        losses = smoothed(jnp.sort(chosen_logps - rejected_logps)
                          - jnp.sort(ref_chosen_logps - ref_rejected_logps))
    elif loss_type == "aot_unpaired":
        losses = smoothed(jnp.sort(chosen_lr) - jnp.sort(rejected_lr))
    elif loss_type == "apo_zero":
        losses = 1 - jax.nn.sigmoid(beta * chosen_lr) + jax.nn.sigmoid(beta * rejected_lr)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * chosen_lr) + 1 - jax.nn.sigmoid(beta * delta)
    elif loss_type == "discopop":
        logits = beta * delta
        mod = jax.nn.sigmoid(logits / discopop_tau)
        # exp(-logits) * mod in log space: the product is tiny where exp(-logits)
        # alone would overflow (large negative logits drive mod to 0 much faster).
        exp_part = jnp.exp(-logits + logsig(logits / discopop_tau))
        losses = -logsig(logits) * (1 - mod) + exp_part
    else:
        raise ValueError(f"dpo loss_type={loss_type!r}; known: {', '.join(DPO_LOSS_TYPES)}")
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_lr)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_lr)
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *, beta: float,
               gamma: float, label_smoothing: float = 0.0
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SimPO: ``-log σ(β (mean logp_w − mean logp_l) − γ)``, reference-free.

    Inputs are length-normalised log-probs (``sequence_logps(..., average=True)``).
    """
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = (-jax.nn.log_sigmoid(logits) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-logits) * label_smoothing)
    rewards = jax.lax.stop_gradient
    return losses, rewards(beta * chosen_avg_logps), rewards(beta * rejected_avg_logps)


def orpo_odds_ratio_loss(chosen_avg_logps: jax.Array, rejected_avg_logps: jax.Array, *,
                         beta: float) -> tuple[jax.Array, jax.Array]:
    """ORPO's odds-ratio term ``-β log σ(log odds_w − log odds_l)``; add the chosen NLL.

    ``odds(p) = p / (1 − p)`` on length-normalised log-probs. Returns
    ``(losses_b, log_odds_b)``.
    """
    def log_odds(logp):
        # log(1 - exp(logp)) for logp < 0, stable near 0 via log(-expm1).
        return logp - jnp.log(-jnp.expm1(jnp.minimum(logp, -1e-7)))

    log_odds_b = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    return -beta * jax.nn.log_sigmoid(log_odds_b), log_odds_b


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, desirable: jax.Array,
             kl: jax.Array, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """KTO on unpaired completions (TRL's form).

    ``kl`` is the batch estimate of KL(policy‖ref) from mismatched prompt/completion
    pairs; it is clamped at 0 and carries no gradient. Desirable examples lose
    ``1 − σ(β(r − kl))``, undesirable ``1 − σ(β(kl − r))``, with
    ``r = logp − ref_logp``. Returns ``(losses_b, rewards_b)``.
    """
    kl = jax.lax.stop_gradient(jnp.maximum(kl, 0.0))
    r = policy_logps - ref_logps
    desirable = desirable.astype(bool)
    losses = jnp.where(desirable,
                       desirable_weight * (1 - jax.nn.sigmoid(beta * (r - kl))),
                       undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - r))))
    return losses, jax.lax.stop_gradient(beta * r)


def bradley_terry_loss(chosen_rewards_b: jax.Array, rejected_rewards_b: jax.Array,
                       margin_b: jax.Array | None = None, *,
                       center_coef: float = 0.0) -> jax.Array:
    """Per-pair reward-model loss ``-log σ(r_w − r_l − margin)``.

    ``center_coef`` > 0 adds ``coef · (r_w + r_l)²``, which keeps rewards centred
    on zero (their offset is otherwise unconstrained).
    """
    diff = chosen_rewards_b - rejected_rewards_b
    if margin_b is not None:
        diff = diff - margin_b
    losses = -jax.nn.log_sigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards_b + rejected_rewards_b) ** 2
    return losses
