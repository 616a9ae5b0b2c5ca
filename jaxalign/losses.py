"""Pure loss math. Functions return sums and counts so callers can normalise
over the global batch (all devices, all micro-batches), never per shard."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_logps(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """Log-probability of each target token under float32 log-softmax."""
    logits_btv = logits_btv.astype(jnp.float32)
    lse_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return target_logit_bt - lse_bt


def token_stats(logits_btv: jax.Array, targets_bt: jax.Array, *, with_hits: bool = False,
                with_entropy: bool = False) -> dict[str, jax.Array]:
    """``logps_bt`` of the targets and, if asked, argmax ``hits_bt`` and ``entropy_bt``."""
    out = {"logps_bt": token_logps(logits_btv, targets_bt)}
    if with_hits:
        out["hits_bt"] = (jnp.argmax(logits_btv, axis=-1) == targets_bt).astype(jnp.float32)
    if with_entropy:
        out["entropy_bt"] = entropy(logits_btv)
    return out


def map_position_chunks(fn: Callable[..., dict[str, jax.Array]], chunk: int,
                        *xs_bt: jax.Array) -> dict[str, jax.Array]:
    """``fn`` over ``chunk`` positions at a time; its per-position outputs, joined.

    Each ``x`` is ``[b, t, ...]``; ``fn`` maps ``[b, c, ...]`` slices to a dict of
    ``[b, c]`` arrays. Each chunk's intermediates (its logits) are dropped after use and
    made again in the backward pass (``jax.checkpoint``), so only one chunk's are ever
    live. The sequence is zero-padded to a multiple of ``chunk``.
    """
    b, t = xs_bt[0].shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(x):
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    one_chunk = jax.checkpoint(fn)
    _, out_nbc = jax.lax.scan(lambda c, xs: (c, one_chunk(*xs)), None,
                              tuple(split(x) for x in xs_bt))
    return {k: v.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for k, v in out_nbc.items()}


def chunked_token_stats(h_btd: jax.Array, logits_fn: Callable[[jax.Array], jax.Array],
                        targets_bt: jax.Array, *, chunk: int, with_hits: bool = False,
                        with_entropy: bool = False) -> dict[str, jax.Array]:
    """:func:`token_stats` from hidden states, ``chunk`` positions at a time.

    ``logits_fn`` maps ``[b, c, d]`` hidden states to ``[b, c, v]`` logits; no
    ``[b, t, v]`` array is ever live, only ``[b, chunk, v]`` (:func:`map_position_chunks`).
    """
    def one_chunk(h_bcd, tgt_bc):
        return token_stats(logits_fn(h_bcd), tgt_bc, with_hits=with_hits,
                           with_entropy=with_entropy)

    return map_position_chunks(one_chunk, chunk, h_btd, targets_bt)


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


# --- packed rows: per-segment reductions (axis letter ``p``: a row's segment slots) ----
# Slot ``k`` of row ``b`` is segment ``k + 1`` of that row; segment 0 is padding.

def _per_segment(op: Callable, x_bt: jax.Array, segment_ids_bt: jax.Array,
                 num_segments: int) -> jax.Array:
    def row(x_t, s_t):
        return op(x_t, s_t, num_segments=num_segments + 1)[1:]
    return jax.vmap(row)(x_bt, segment_ids_bt)


def take_positions(index_bk: jax.Array | None, *xs_bt: jax.Array) -> tuple[jax.Array, ...]:
    """Each ``x`` (``[b, t, ...]``) at the positions ``index_bk`` (``[b, k]``) of its own
    row, ``[b, k, ...]``; all of them unchanged when ``index_bk`` is None.

    A loss taken only at some positions (SFT's completion tokens) can then run the
    vocabulary projection on ``k`` rows of hidden states instead of ``t``.
    """
    if index_bk is None:
        return xs_bt
    return tuple(jnp.take_along_axis(x, index_bk.reshape(index_bk.shape + (1,) * (x.ndim - 2)),
                                     axis=1) for x in xs_bt)


def segment_sums(x_bt: jax.Array, segment_ids_bt: jax.Array, num_segments: int) -> jax.Array:
    """``[b, p]`` sums of ``x_bt`` over each segment of each row (0 for absent segments).

    With ``num_segments == 1`` (one example per row) this is the plain row sum over the
    non-padding positions, the same reduction as an unpacked ``jnp.sum(x, -1)``.
    """
    if num_segments == 1:
        return jnp.sum(jnp.where(segment_ids_bt == 1, x_bt, 0), axis=-1, keepdims=True)
    return _per_segment(jax.ops.segment_sum, x_bt, segment_ids_bt, num_segments)


def segment_min(x_bt: jax.Array, segment_ids_bt: jax.Array, num_segments: int,
                empty: int) -> jax.Array:
    """``[b, p]`` minimum of integer ``x_bt`` over each segment; ``empty`` where absent."""
    out = _per_segment(jax.ops.segment_min, x_bt, segment_ids_bt, num_segments)
    return jnp.minimum(out, empty)


def segment_last_index(segment_ids_bt: jax.Array, num_segments: int) -> jax.Array:
    """``[b, p]`` position of each segment's last position (0 for absent segments)."""
    pos_bt = jnp.broadcast_to(jnp.arange(segment_ids_bt.shape[1]), segment_ids_bt.shape)
    last = _per_segment(jax.ops.segment_max, pos_bt, segment_ids_bt, num_segments)
    return jnp.maximum(last, 0)


def masked_dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array,
                    ref_chosen_logps: jax.Array, ref_rejected_logps: jax.Array,
                    valid: jax.Array, *, loss_type: str, **kwargs
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`dpo_loss` over pair slots of which only ``valid`` ones hold pairs.

    Elementwise loss types are :func:`dpo_loss` itself (the caller masks). ``aot`` and
    ``aot_unpaired`` sort over the batch axis: here padding slots are pushed past every
    real pair in both sorts, so the real pairs are matched among themselves, and each
    slot gets the loss of its rank — the real slots' losses sum to the real pairs' sorted
    losses whatever the padding.
    """
    if loss_type not in ("aot", "aot_unpaired"):
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                        loss_type=loss_type, **kwargs)
    _, c_rew, r_rew = dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                               ref_rejected_logps, loss_type=loss_type, **kwargs)
    real = valid > 0
    big = 1e9  # above any real log-prob difference; big - big = 0 keeps the padding finite

    def pad(x, fill):
        return jnp.where(real, x, fill)

    if loss_type == "aot":  # sorts chosen - rejected and ref_chosen - ref_rejected
        c, r = pad(chosen_logps, big), pad(rejected_logps, 0.0)
        rc, rr = pad(ref_chosen_logps, big), pad(ref_rejected_logps, 0.0)
        key = c - r
    else:  # sorts chosen - ref_chosen and rejected - ref_rejected
        c, r = pad(chosen_logps, big), pad(rejected_logps, big)
        rc, rr = pad(ref_chosen_logps, 0.0), pad(ref_rejected_logps, 0.0)
        key = c - rc
    sorted_losses, _, _ = dpo_loss(c, r, rc, rr, loss_type=loss_type, **kwargs)
    rank = jnp.argsort(jnp.argsort(key, stable=True), stable=True)
    return sorted_losses[rank], c_rew, r_rew


# --- online RL: advantages, policy/value objectives, KL estimators -------------------

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """``(x − mean) / std`` over the masked entries (unbiased variance, as TRL's PPO).

    With ``shift_mean=False`` the mean is added back (PPO whitens rewards that way).
    """
    mask = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(x * mask) / n
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    return out if shift_mean else out + mean


def gae(rewards_bt: jax.Array, values_bt: jax.Array, mask_bt: jax.Array, *, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over right-padded token sequences.

    TRL's PPO convention: the value after the last real token is 0 (the episode
    ends there) and padded positions get zero advantage. ``returns = advantages +
    values`` (also zero on padding).

    Returns:
      ``(advantages_bt, returns_bt)``.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    rewards_bt = rewards_bt.astype(jnp.float32) * mask_bt
    values_bt = values_bt.astype(jnp.float32) * mask_bt
    next_values_bt = jnp.concatenate([values_bt[:, 1:], jnp.zeros_like(values_bt[:, :1])], 1)
    next_mask_bt = jnp.concatenate([mask_bt[:, 1:], jnp.zeros_like(mask_bt[:, :1])], 1)
    deltas_bt = rewards_bt + gamma * next_values_bt * next_mask_bt - values_bt

    def back(carry_b, xs):
        delta_b, next_mask_b, mask_b = xs
        adv_b = (delta_b + gamma * lam * next_mask_b * carry_b) * mask_b
        return adv_b, adv_b

    _, adv_tb = jax.lax.scan(back, jnp.zeros(rewards_bt.shape[0], jnp.float32),
                             (deltas_bt.T, next_mask_bt.T, mask_bt.T), reverse=True)
    advantages_bt = adv_tb.T
    return advantages_bt, (advantages_bt + values_bt) * mask_bt


def group_advantages(rewards_b: jax.Array, group_size: int, *, scale: str = "std",
                     eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages of rows ordered prompt-major (row = prompt·G + sample).

    ``scale``: ``std`` — GRPO, ``(r − mean_g) / (std_g + eps)`` with the unbiased
    group std (as TRL); ``none`` — Dr. GRPO, ``r − mean_g``; ``rloo`` — leave-one-out
    baseline, ``r − mean of the other G − 1`` samples.
    """
    r_pg = rewards_b.astype(jnp.float32).reshape(-1, group_size)
    mean_p1 = jnp.mean(r_pg, axis=1, keepdims=True)
    if scale == "std":
        std_p1 = jnp.std(r_pg, axis=1, keepdims=True, ddof=1) if group_size > 1 else 0.0
        adv_pg = (r_pg - mean_p1) / (std_p1 + eps)
    elif scale == "none":
        adv_pg = r_pg - mean_p1
    elif scale == "rloo":
        if group_size < 2:
            raise ValueError("RLOO advantages need at least 2 samples per prompt")
        adv_pg = (r_pg - mean_p1) * (group_size / (group_size - 1))
    else:
        raise ValueError(f"advantage scale {scale!r}; expected std, none or rloo")
    return adv_pg.reshape(-1)


def kl_penalty(logps: jax.Array, ref_logps: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(policy‖ref) from log-probs of tokens sampled by the policy.

    ``k1 = log r``, ``k2 = ½ (log r)²``, ``k3 = r⁻¹ − 1 + log r`` with
    ``r = π/π_ref`` (Schulman's estimators; k3 is GRPO's, unbiased and ≥ 0).
    """
    log_ratio = logps - ref_logps
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.exp(-log_ratio) - 1.0 + log_ratio
    raise ValueError(f"KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def clipped_policy_loss(logps_bt: jax.Array, old_logps_bt: jax.Array,
                        advantages_bt: jax.Array, mask_bt: jax.Array, *, clip_low: float,
                        clip_high: float, sequence_level: bool = False
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's clipped surrogate per token: ``−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)``.

    ``clip_high > clip_low`` is DAPO's clip-higher. ``sequence_level`` (GSPO) uses
    one ratio per sequence, ``exp(mean_t(logp − old_logp))``, for all its tokens.

    Returns:
      ``(loss_bt, ratio_bt, clipped_bt)`` — clipped is 1 where the clipped branch won.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    log_ratio_bt = (logps_bt - old_logps_bt) * mask_bt
    if sequence_level:
        seq_b = jnp.sum(log_ratio_bt, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)
        log_ratio_bt = jnp.broadcast_to(seq_b[:, None], logps_bt.shape)
    ratio_bt = jnp.exp(log_ratio_bt)
    unclipped_bt = ratio_bt * advantages_bt
    clipped_bt = jnp.clip(ratio_bt, 1.0 - clip_low, 1.0 + clip_high) * advantages_bt
    loss_bt = -jnp.minimum(unclipped_bt, clipped_bt)
    return loss_bt, ratio_bt, (clipped_bt < unclipped_bt).astype(jnp.float32)


def aggregate(loss_bt: jax.Array, mask_bt: jax.Array, mode: str, *,
              max_len: int) -> tuple[jax.Array, str]:
    """A per-token loss as a (sum, normaliser name) pair for a global-batch mean.

    * ``token-mean``: every completion token of the batch weighs the same
      (normaliser ``tokens``, DAPO);
    * ``seq-mean-token-mean``: the mean over sequences of each sequence's token
      mean (normaliser ``seqs``, the original GRPO);
    * ``seq-mean-token-sum-norm``: token sums divided by a constant ``max_len``,
      averaged over sequences (normaliser ``seqs``, Dr. GRPO) — no length bias.
    """
    mask_bt = mask_bt.astype(jnp.float32)
    per_token = loss_bt * mask_bt
    if mode == "token-mean":
        return jnp.sum(per_token), "tokens"
    if mode == "seq-mean-token-mean":
        return jnp.sum(jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(mask_bt, -1), 1.0)), "seqs"
    if mode == "seq-mean-token-sum-norm":
        return jnp.sum(per_token) / max_len, "seqs"
    raise ValueError(f"loss aggregation {mode!r}; expected one of {AGGREGATIONS}")


def clipped_value_loss(values_bt: jax.Array, old_values_bt: jax.Array,
                       returns_bt: jax.Array, *, clip: float) -> jax.Array:
    """PPO's clipped value loss per token: ``½ max((v − R)², (v_clip − R)²)``."""
    clipped_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(values_bt - returns_bt),
                             jnp.square(clipped_bt - returns_bt))


def entropy(logits_btv: jax.Array) -> jax.Array:
    """Entropy of each position's next-token distribution ``[b, t]`` (float32)."""
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)


# -- distillation ---------------------------------------------------------------------

DISTILL_LOSSES = ("forward_kl", "reverse_kl", "jsd")


def distill_beta(loss: str, beta: float) -> float:
    """The generalised JSD's β of a named divergence: forward KL is β = 0, reverse KL
    β = 1, ``jsd`` the given β."""
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"distill loss {loss!r}; known: {', '.join(DISTILL_LOSSES)}")
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(loss, beta)


def _kl(p_logps: jax.Array, q_logps: jax.Array) -> jax.Array:
    """``KL(p || q)`` over the last axis from log-probs; tokens where p is 0 add nothing."""
    p = jnp.exp(p_logps)
    # where() inside the product: the unpicked branch (0 * inf) must not reach the gradient
    return jnp.sum(p * jnp.where(p > 0, p_logps - q_logps, 0.0), axis=-1)


def generalized_jsd(student_logps: jax.Array, teacher_logps: jax.Array,
                    beta: float) -> jax.Array:
    """GKD's generalised Jensen–Shannon divergence per position (last axis: vocabulary).

    With ``M = β·teacher + (1−β)·student``: ``β·KL(teacher‖M) + (1−β)·KL(student‖M)``;
    the ends are the two KLs themselves, as in GKD and TRL: β = 0 is the forward
    ``KL(teacher‖student)``, β = 1 the reverse ``KL(student‖teacher)``.
    """
    s, t = student_logps.astype(jnp.float32), teacher_logps.astype(jnp.float32)
    if beta == 0.0:
        return _kl(t, s)
    if beta == 1.0:
        return _kl(s, t)
    # A token both give probability 0 (-inf, e.g. masked padding) stays at 0 in M, with
    # no NaN from logaddexp(-inf, -inf)'s gradient.
    none = jnp.isneginf(t) & jnp.isneginf(s)
    m = jnp.where(none, -jnp.inf, jnp.logaddexp(jnp.where(none, 0.0, t) + jnp.log(beta),
                                                jnp.where(none, 0.0, s) + jnp.log1p(-beta)))
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def _log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def distill_divergence(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, *,
                       beta: float, temperature: float = 1.0, top_k: int = 0) -> jax.Array:
    """Per-position :func:`generalized_jsd` between ``softmax(logits / temperature)``.

    ``top_k`` > 0 compares the two distributions on the teacher's ``top_k`` most likely
    tokens only, each renormalised over them (``top_k`` ≥ V is the full divergence).
    """
    if 0 < top_k < teacher_logits_btv.shape[-1]:
        top_btk, ids_btk = jax.lax.top_k(teacher_logits_btv.astype(jnp.float32), top_k)
        return topk_distill_divergence(student_logits_btv, ids_btk, top_btk, beta=beta,
                                       temperature=temperature)
    return generalized_jsd(_log_softmax(student_logits_btv, temperature),
                           _log_softmax(teacher_logits_btv, temperature), beta)


def topk_distill_divergence(student_logits_btv: jax.Array, teacher_ids_btk: jax.Array,
                            teacher_logits_btk: jax.Array, *, beta: float,
                            temperature: float = 1.0) -> jax.Array:
    """:func:`distill_divergence` on given teacher tokens: the teacher's logits at
    ``teacher_ids_btk`` (e.g. its top k, precomputed once) against the student's at the
    same ids, both renormalised over them."""
    student_btk = jnp.take_along_axis(student_logits_btv, teacher_ids_btk, axis=-1)
    return generalized_jsd(_log_softmax(student_btk, temperature),
                           _log_softmax(teacher_logits_btk, temperature), beta)


# --- off-policy correction: trainer (behaviour weights) vs sampler log-probs ----------

OFFPOLICY_MODES = ("none", "tis", "mis", "seq_mask")


def offpolicy_weights(trainer_logps_bt: jax.Array, sampler_logps_bt: jax.Array,
                      mask_bt: jax.Array, *, mode: str, cap: float
                      ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
    """Gradient-free per-token weights that correct a sampler/trainer mismatch.

    ``r_t = exp(trainer_logp − sampler_logp)`` of each sampled token, in float32 (1 on
    unmasked positions):

    * ``none``: weights 1;
    * ``tis`` (truncated importance sampling): ``min(r_t, cap)``;
    * ``mis`` (masked importance sampling): ``r_t`` inside ``[1/cap, cap]``, else 0;
    * ``seq_mask`` (GSPO-style): a sequence whose geometric-mean ratio
      ``exp(mean_t log r_t)`` over its masked tokens leaves ``[1/cap, cap]`` gets
      weight 0 on every token, any other sequence 1.

    Returns:
      ``(weights_bt, stats)``; stats are (sum, count) pairs: ``offpolicy/ratio_mean``
      (mean ``r_t`` over masked tokens) and ``offpolicy/clipped_frac`` — for ``tis``
      the fraction of masked tokens with ``r_t > cap``, for ``mis`` the fraction of
      masked tokens zeroed, for ``seq_mask`` the fraction of sequences (those with any
      masked token) zeroed; 0 for ``none``.
    """
    if mode not in OFFPOLICY_MODES:
        raise ValueError(f"off-policy mode {mode!r}; expected one of {OFFPOLICY_MODES}")
    mask_bt = jax.lax.stop_gradient(mask_bt).astype(jnp.float32)
    log_ratio_bt = (jax.lax.stop_gradient(trainer_logps_bt).astype(jnp.float32)
                    - jax.lax.stop_gradient(sampler_logps_bt).astype(jnp.float32))
    log_ratio_bt = jnp.where(mask_bt > 0, log_ratio_bt, 0.0)
    ratio_bt = jnp.exp(log_ratio_bt)
    n_tokens = jnp.sum(mask_bt)
    clipped: tuple[jax.Array, jax.Array]
    if mode == "none":
        weights_bt = jnp.ones_like(ratio_bt)
        clipped = (jnp.zeros((), jnp.float32), n_tokens)
    elif mode == "tis":
        weights_bt = jnp.minimum(ratio_bt, cap)
        clipped = (jnp.sum((ratio_bt > cap) * mask_bt), n_tokens)
    elif mode == "mis":
        keep_bt = (ratio_bt >= 1.0 / cap) & (ratio_bt <= cap)
        weights_bt = jnp.where(keep_bt, ratio_bt, 0.0)
        clipped = (jnp.sum(~keep_bt * mask_bt), n_tokens)
    else:
        seq_tokens_b = jnp.sum(mask_bt, -1)
        seq_ratio_b = jnp.exp(jnp.sum(log_ratio_bt * mask_bt, -1)
                              / jnp.maximum(seq_tokens_b, 1.0))
        keep_b = (seq_ratio_b >= 1.0 / cap) & (seq_ratio_b <= cap)
        weights_bt = jnp.broadcast_to(keep_b[:, None], ratio_bt.shape).astype(jnp.float32)
        has_b = (seq_tokens_b > 0).astype(jnp.float32)
        clipped = (jnp.sum(~keep_b * has_b), jnp.sum(has_b))
    return weights_bt, {"offpolicy/ratio_mean": (jnp.sum(ratio_bt * mask_bt), n_tokens),
                        "offpolicy/clipped_frac": clipped}
