"""Preference losses against independent float64 NumPy formulas (TRL's definitions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

C = np.array([-12.0, -30.5, -7.25, -40.0, -3.0])  # policy log p(chosen)
R = np.array([-14.0, -28.0, -9.5, -41.0, -8.0])  # policy log p(rejected)
RC = np.array([-13.0, -30.0, -8.0, -39.0, -4.5])  # reference log p(chosen)
RR = np.array([-13.5, -29.0, -9.0, -40.0, -6.0])  # reference log p(rejected)
BETA, LS, TAU = 0.1, 0.2, 0.05


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def reference(loss_type, c, r, rc, rr, beta, ls):
    cl, rl = c - rc, r - rr
    d = cl - rl
    if loss_type == "sigmoid":
        return -logsig(beta * d) * (1 - ls) - logsig(-beta * d) * ls
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        q = sig(beta * d)
        return q * (np.log(q) - np.log(1 - ls)) + (1 - q) * (np.log(1 - q) - np.log(ls))
    if loss_type == "nca_pair":
        return -logsig(beta * cl) - 0.5 * logsig(-beta * cl) - 0.5 * logsig(-beta * rl)
    if loss_type == "robust":
        return ((1 - ls) * -logsig(beta * d) - ls * -logsig(-beta * d)) / (1 - 2 * ls)
    if loss_type == "bco_pair":
        return -logsig(beta * cl) - logsig(-beta * rl)
    if loss_type == "sppo_hard":
        return (cl - 1 / (2 * beta)) ** 2 + (rl + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            x = np.sort(c - r) - np.sort(rc - rr)
        else:
            x = np.sort(cl) - np.sort(rl)
        return -logsig(beta * x) * (1 - ls) - logsig(-beta * x) * ls
    if loss_type == "apo_zero":
        return (1 - sig(beta * cl)) + sig(beta * rl)
    if loss_type == "apo_down":
        return sig(beta * cl) + (1 - sig(beta * d))
    if loss_type == "discopop":
        z = beta * d
        m = sig(z / TAU)
        return -logsig(z) * (1 - m) + np.exp(-z) * m
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_family_golden(loss_type):
    got, cr, rr = losses.dpo_loss(*map(jnp.asarray, (C, R, RC, RR)), loss_type=loss_type,
                                  beta=BETA, label_smoothing=LS, discopop_tau=TAU)
    want = reference(loss_type, C, R, RC, RR, BETA, LS)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cr), BETA * (C - RC), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rr), BETA * (R - RR), rtol=1e-6)


def test_sigmoid_dpo_at_reference_is_log2():
    x = jnp.asarray(C)
    got, _, _ = losses.dpo_loss(x, jnp.asarray(R), x, jnp.asarray(R), loss_type="sigmoid",
                                beta=0.5)
    np.testing.assert_allclose(np.asarray(got), np.log(2.0), rtol=1e-6)


def test_ipo_length_normalised():
    lc, lr = np.array([4.0, 10, 3, 8, 2]), np.array([5.0, 9, 6, 2, 7])
    got, _, _ = losses.dpo_loss(*map(jnp.asarray, (C, R, RC, RR)), loss_type="ipo", beta=BETA,
                                chosen_lengths=jnp.asarray(lc), rejected_lengths=jnp.asarray(lr))
    want = ((C - RC) / lc - (R - RR) / lr - 1 / (2 * BETA)) ** 2
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_dpo_gradients_finite_at_extreme_gaps(loss_type, gap):
    def total(c):
        out, _, _ = losses.dpo_loss(c, jnp.array([-gap, -5.0]), jnp.array([-1.0, -2.0]),
                                    jnp.array([-1.0, -2.0]), loss_type=loss_type, beta=0.1,
                                    label_smoothing=0.1)
        return jnp.sum(out)
    value, grad = jax.value_and_grad(total)(jnp.array([gap, -3.0]))
    assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), (value, grad)


def test_simpo_golden():
    ac, ar = C / 6.0, R / 5.0
    got, crw, _ = losses.simpo_loss(jnp.asarray(ac), jnp.asarray(ar), beta=2.0, gamma=0.5)
    np.testing.assert_allclose(np.asarray(got), -logsig(2.0 * (ac - ar) - 0.5), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(crw), 2.0 * ac, rtol=1e-6)


def test_orpo_golden():
    ac, ar = np.array([-0.3, -1.2, -0.01]), np.array([-0.9, -0.4, -2.0])
    got, log_odds = losses.orpo_odds_ratio_loss(jnp.asarray(ac), jnp.asarray(ar), beta=0.25)
    odds = lambda lp: np.exp(lp) / (1 - np.exp(lp))  # noqa: E731
    want_lo = np.log(odds(ac)) - np.log(odds(ar))
    np.testing.assert_allclose(np.asarray(log_odds), want_lo, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), -0.25 * logsig(want_lo), rtol=1e-5)


def test_kto_golden():
    pol, ref = np.array([-5.0, -9.0, -2.0, -7.0]), np.array([-6.0, -8.0, -2.5, -7.5])
    desirable = np.array([True, False, True, False])
    kl = 0.3
    got, rewards = losses.kto_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(desirable),
                                   jnp.asarray(kl), beta=0.5, desirable_weight=1.5,
                                   undesirable_weight=0.7)
    r = pol - ref
    want = np.where(desirable, 1.5 * (1 - sig(0.5 * (r - kl))), 0.7 * (1 - sig(0.5 * (kl - r))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(rewards), 0.5 * r, rtol=1e-6)
    # A negative KL estimate is clamped to zero.
    clamped, _ = losses.kto_loss(jnp.asarray(pol), jnp.asarray(ref), jnp.asarray(desirable),
                                 jnp.asarray(-1.0), beta=0.5)
    np.testing.assert_allclose(np.asarray(clamped), np.where(
        desirable, 1 - sig(0.5 * r), 1 - sig(-0.5 * r)), rtol=1e-6)


def test_bradley_terry_and_accuracy_on_hand_made_batch():
    rc, rr = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, 1.5, -3.0])
    got = losses.bradley_terry_loss(rc, rr)
    np.testing.assert_allclose(np.asarray(got), np.log1p(np.exp([-1.0, 1.0, -2.0])), rtol=1e-6)
    with_margin = losses.bradley_terry_loss(rc, rr, jnp.array([1.0, 0.0, 0.5]), center_coef=0.1)
    want = np.log1p(np.exp([0.0, 1.0, -1.5])) + 0.1 * np.array([3.0, 2.0, -4.0]) ** 2
    np.testing.assert_allclose(np.asarray(with_margin), want, rtol=1e-6)
    assert float(jnp.mean(rc > rr)) == pytest.approx(2 / 3)


def test_sequence_logps_sum_and_mean():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 7))
    targets = rng.integers(0, 7, size=(2, 4))
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = (picked * mask).sum(-1)
    args = (jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(losses.sequence_logps(*args)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.sequence_logps(*args, average=True)),
                               want / mask.sum(-1), rtol=1e-5)
