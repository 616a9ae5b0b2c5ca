"""RL math against hand-worked values: GAE, group advantages, clipping, aggregation, KL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses


def test_gae_unmasked_hand_computed():
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.6, 0.7]])
    adv, ret = losses.gae(rewards, values, jnp.ones((1, 3)), gamma=1.0, lam=0.95)
    # delta_2 = 1 - 0.7; delta_1 = 0.7 - 0.6; delta_0 = 0.6 - 0.5; A_t = delta_t + 0.95 A_t+1
    np.testing.assert_allclose(adv, [[0.46575, 0.385, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(ret, [[0.96575, 0.985, 1.0]], rtol=1e-6)


def test_gae_masked_tail_is_terminal():
    rewards = jnp.array([[1.0, 0.0, 2.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    values = jnp.array([[0.2, 0.4, 0.1, 9.0], [1.0, 7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0: the padded step's value (9) and reward (5) are never seen.
    np.testing.assert_allclose(adv[0], [1.92176, 1.058, 1.9, 0.0], rtol=1e-6)
    np.testing.assert_allclose(ret[0], [2.12176, 1.458, 2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(adv[1], [2.0, 0, 0, 0], rtol=1e-6)


def test_group_advantages_std_none_rloo():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1.0 / 3.0)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    np.testing.assert_allclose(losses.group_advantages(r, 4, scale="std"),
                               [a, -a, -a, a, 0, 0, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(losses.group_advantages(r, 4, scale="none"),
                               [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-7)
    # Leave-one-out: 1 - mean(0, 0, 1) = 2/3.
    np.testing.assert_allclose(losses.group_advantages(r, 4, scale="rloo"),
                               [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scale"):
        losses.group_advantages(r, 4, scale="median")


@pytest.mark.parametrize("ratio,adv,clip_high,want,clipped", [
    (1.3, 1.0, 0.2, -1.2, 1.0),    # above 1+eps with A > 0: clipped
    (1.3, -1.0, 0.2, 1.3, 0.0),    # above 1+eps with A < 0: unclipped (pessimistic)
    (0.7, 1.0, 0.2, -0.7, 0.0),    # below 1-eps with A > 0: unclipped
    (0.7, -1.0, 0.2, 0.8, 1.0),    # below 1-eps with A < 0: clipped
    (1.3, 1.0, 0.28, -1.28, 1.0),  # DAPO clip-higher widens the upper bound only
    (1.1, 1.0, 0.2, -1.1, 0.0),    # inside the trust region
])
def test_clipped_policy_loss_boundaries(ratio, adv, clip_high, want, clipped):
    old = jnp.zeros((1, 1))
    logps = jnp.full((1, 1), math.log(ratio))
    loss, r, c = losses.clipped_policy_loss(logps, old, jnp.full((1, 1), adv), jnp.ones((1, 1)),
                                            clip_low=0.2, clip_high=clip_high)
    np.testing.assert_allclose(loss, [[want]], rtol=1e-6)
    np.testing.assert_allclose(r, [[ratio]], rtol=1e-6)
    assert float(c[0, 0]) == clipped
    grad = jax.grad(lambda lp: losses.clipped_policy_loss(
        lp, old, jnp.full((1, 1), adv), jnp.ones((1, 1)), clip_low=0.2,
        clip_high=clip_high)[0].sum())(logps)
    # The clipped branch carries no gradient; the unclipped one carries -A * ratio.
    np.testing.assert_allclose(grad, [[0.0 if clipped else -adv * ratio]], rtol=1e-6, atol=1e-7)


def test_gspo_sequence_ratio_is_length_normalised():
    logps = jnp.array([[0.3, -0.1, 0.4, 9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    _, ratio, _ = losses.clipped_policy_loss(logps, jnp.zeros_like(logps), jnp.ones_like(logps),
                                             mask, clip_low=10, clip_high=10,
                                             sequence_level=True)
    np.testing.assert_allclose(ratio[0, :3], [math.exp(0.2)] * 3, rtol=1e-6)


def test_aggregation_modes_hand_worked():
    loss = jnp.array([[1.0, 2.0, 3.0, 7.0], [4.0, 5.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    total, norm = losses.aggregate(loss, mask, "token-mean", max_len=4)
    assert norm == "tokens" and float(total) == 10.0  # / 4 tokens = 2.5
    total, norm = losses.aggregate(loss, mask, "seq-mean-token-mean", max_len=4)
    assert norm == "seqs" and float(total) == 6.0  # (6/3 + 4/1) / 2 seqs = 3
    total, norm = losses.aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=4)
    assert norm == "seqs" and float(total) == 2.5  # 10 / 4 / 2 seqs = 1.25


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
def test_aggregation_is_additive_over_row_splits(mode):
    """Sums over micro-batches equal the whole batch's: accumulation cannot change the loss."""
    rng = np.random.default_rng(0)
    loss = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    mask = jnp.asarray(rng.integers(0, 2, size=(6, 5)), jnp.float32)
    whole, _ = losses.aggregate(loss, mask, mode, max_len=5)
    parts = sum(losses.aggregate(loss[i::3], mask[i::3], mode, max_len=5)[0] for i in range(3))
    np.testing.assert_allclose(parts, whole, rtol=1e-6)


def test_kl_estimators():
    lp, ref = jnp.array([0.5]), jnp.array([0.0])
    assert float(losses.kl_penalty(lp, ref, "k1")[0]) == pytest.approx(0.5)
    assert float(losses.kl_penalty(lp, ref, "k2")[0]) == pytest.approx(0.125)
    assert float(losses.kl_penalty(lp, ref, "k3")[0]) == pytest.approx(math.exp(-0.5) - 0.5)
    # k3 is non-negative and zero at the reference.
    x = jnp.linspace(-5, 5, 11)
    assert bool(jnp.all(losses.kl_penalty(x, jnp.zeros_like(x), "k3") >= 0))
    assert float(losses.kl_penalty(ref, ref, "k3")[0]) == 0.0


def test_clipped_value_loss_and_whiten():
    v, old, ret = jnp.array([1.5]), jnp.array([1.0]), jnp.array([3.0])
    # Clipped to 1.2: max((1.5 - 3)^2, (1.2 - 3)^2) / 2 = 1.62
    np.testing.assert_allclose(losses.clipped_value_loss(v, old, ret, clip=0.2), [1.62],
                               rtol=1e-6)
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    m = jnp.array([1.0, 1.0, 1.0, 0.0])
    w = losses.masked_whiten(x, m)
    np.testing.assert_allclose(w[:3], [-1.0, 0.0, 1.0], rtol=1e-6)  # unbiased std = 1
    np.testing.assert_allclose(losses.masked_whiten(x, m, shift_mean=False)[:3], [1, 2, 3],
                               rtol=1e-6)


def test_entropy_uniform_is_log_vocab():
    np.testing.assert_allclose(losses.entropy(jnp.zeros((1, 2, 8))), math.log(8), rtol=1e-6)
