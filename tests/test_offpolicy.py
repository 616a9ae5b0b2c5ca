"""Off-policy correction (``rl.offpolicy``): the weights against hand-worked numbers, the
GRPO/PPO losses weigh only the policy-gradient term, and a tiny GRPO run where sampler and
trainer agree (f32 on CPU) is unchanged by it."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from presets import preset

from jaxalign import losses, rewards
from jaxalign import rollout as rollout_lib
from jaxalign.algos import grpo, ppo
from jaxalign.train import train

# Ratios r = exp(trainer − sampler) of 3 rows × 4 tokens; row 2 is padding (mask 0), and
# the padded tokens' big ratios must count nowhere.
RATIO_BT = np.array([[1.0, 3.0, 4.0, 10.0],
                     [1.5, 0.25, 1.5, 0.8],
                     [9.0, 9.0, 9.0, 9.0]])
MASK_BT = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
SAMPLER_BT = np.array([[-1.0, -0.5, -2.0, -3.0]] * 3, np.float32)
TRAINER_BT = (SAMPLER_BT + np.log(RATIO_BT)).astype(np.float32)
# Masked mean ratio: (1 + 3 + 4 + 1.5 + 0.25 + 1.5 + 0.8) / 7 = 12.05 / 7.
RATIO_SUM, TOKENS = 12.05, 7.0

# cap = 2, so the band is [0.5, 2]. Row 0's geometric mean (1·3·4)^(1/3) = 2.289 leaves
# it; row 1's (1.5·0.25·1.5·0.8)^(1/4) = 0.819 stays inside.
EXPECTED = {
    # weights on the masked tokens, clipped_frac (sum, count)
    "none": ([[1, 1, 1, 0], [1, 1, 1, 1]], (0.0, TOKENS)),
    # min(r, 2): 3 and 4 are capped (2 tokens).
    "tis": ([[1, 2, 2, 0], [1.5, 0.25, 1.5, 0.8]], (2.0, TOKENS)),
    # r outside [0.5, 2] -> 0: 3, 4 and 0.25 (3 tokens).
    "mis": ([[1, 0, 0, 0], [1.5, 0, 1.5, 0.8]], (3.0, TOKENS)),
    # row 0 dropped whole, row 1 kept: 1 of the 2 non-empty sequences.
    "seq_mask": ([[0, 0, 0, 0], [1, 1, 1, 1]], (1.0, 2.0)),
}


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_offpolicy_weights_hand_worked(mode):
    weights_bt, stats = losses.offpolicy_weights(
        jnp.asarray(TRAINER_BT), jnp.asarray(SAMPLER_BT), jnp.asarray(MASK_BT), mode=mode,
        cap=2.0)
    want_bt, (clip_sum, clip_count) = EXPECTED[mode]
    assert weights_bt.dtype == jnp.float32 and weights_bt.shape == (3, 4)
    np.testing.assert_allclose(np.asarray(weights_bt * MASK_BT)[:2], want_bt, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(weights_bt * MASK_BT)[2], 0.0)
    s, c = stats["offpolicy/ratio_mean"]
    np.testing.assert_allclose([float(s), float(c)], [RATIO_SUM, TOKENS], rtol=1e-6)
    s, c = stats["offpolicy/clipped_frac"]
    assert (float(s), float(c)) == (clip_sum, clip_count)


def test_offpolicy_none_is_ones_and_weights_are_gradient_free():
    weights_bt, _ = losses.offpolicy_weights(jnp.asarray(TRAINER_BT), jnp.asarray(SAMPLER_BT),
                                             jnp.asarray(MASK_BT), mode="none", cap=2.0)
    np.testing.assert_array_equal(weights_bt, np.ones((3, 4), np.float32))
    for mode in ("tis", "mis", "seq_mask"):
        grad = jax.grad(lambda t, m=mode: jnp.sum(losses.offpolicy_weights(
            t, jnp.asarray(SAMPLER_BT), jnp.asarray(MASK_BT), mode=m, cap=2.0)[0]))(
            jnp.asarray(TRAINER_BT))
        np.testing.assert_array_equal(grad, 0.0)
    with pytest.raises(ValueError, match="off-policy mode"):
        losses.offpolicy_weights(jnp.asarray(TRAINER_BT), jnp.asarray(SAMPLER_BT),
                                 jnp.asarray(MASK_BT), mode="is", cap=2.0)


@pytest.mark.parametrize("key,value,match", [
    ("rl.offpolicy", "is", r"rl.offpolicy='is'"),
    ("rl.offpolicy_cap", 1.0, r"rl.offpolicy_cap=1.0 must be > 1"),
    ("rl.offpolicy_cap", 0.5, r"rl.offpolicy_cap=0.5"),
])
def test_offpolicy_config_errors(key, value, match):
    for stage in ("grpo", "ppo"):
        with pytest.raises(ValueError, match=match):
            rollout_lib.check_config(preset(stage, **{key: value}))


class _FakePolicy:
    """Stands in for a model: fixed token log-probs (traced), zero entropy and values."""

    def __init__(self, logps_bt):
        self.logps_bt = logps_bt

    def hidden(self, inputs_bt, positions_bt, segment_ids_bt):
        return jnp.zeros(inputs_bt.shape + (1,))

    def token_stats(self, h_btd, targets_bt, *, temperature, with_entropy=False):
        out = {"logps_bt": self.logps_bt}
        if with_entropy:
            out["entropy_bt"] = jnp.zeros_like(self.logps_bt)
        return out

    def values(self, h_btd):
        return jnp.zeros(h_btd.shape[:2])


def _batch(**extra):
    b, t = MASK_BT.shape
    zeros = jnp.zeros((b, t), jnp.int32)
    return {"inputs_bt": zeros, "targets_bt": zeros, "positions_bt": zeros,
            "segment_ids_bt": zeros, "loss_mask_bt": jnp.asarray(MASK_BT),
            "weight_b": jnp.asarray([1.0, 1.0, 0.0]),
            "sampler_logps_bt": jnp.asarray(SAMPLER_BT), **extra}


def _loss_and_grad(make_loss, config, batch):
    loss_fn, _ = make_loss(config)

    def total(logps_bt):
        out = loss_fn(_FakePolicy(logps_bt), batch)
        return sum(out.terms.values()), out.metrics

    (loss, metrics), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(TRAINER_BT))
    return float(loss), metrics, np.asarray(grad)


@pytest.mark.parametrize("mode", ["tis", "mis", "seq_mask"])
def test_grpo_loss_weighs_only_the_policy_term(mode):
    """On-policy GRPO (ratio 1, token-mean): the policy term's sum is −Σ A·w and its
    gradient −A·w per token; the k3 KL term is the same with and without weights."""
    adv_b = jnp.asarray([1.0, -2.0, 0.0])
    ref_bt = jnp.asarray(TRAINER_BT - 0.3)
    batch = _batch(advantages_b=adv_b, ref_logps_bt=ref_bt)
    over = {"grpo.loss_agg": "token-mean", "rl.kl_coef": 0.1, "grpo.entropy_metric": False}
    base, base_m, base_g = _loss_and_grad(grpo.make_loss, preset("grpo", **over), batch)
    got, got_m, got_g = _loss_and_grad(
        grpo.make_loss, preset("grpo", **over, **{"rl.offpolicy": mode}), batch)
    w_bt = np.zeros((3, 4))
    w_bt[:2] = EXPECTED[mode][0]
    a_bt = np.asarray(adv_b)[:, None] * MASK_BT
    # Unweighted policy term: −Σ A over masked tokens; weighted: −Σ A·w.
    np.testing.assert_allclose(got - base, -(a_bt * w_bt).sum() + a_bt.sum(), rtol=1e-5)
    np.testing.assert_allclose(got_g - base_g, -a_bt * (w_bt - 1.0), rtol=1e-5, atol=1e-6)
    assert "offpolicy/ratio_mean" not in base_m
    s, c = got_m["offpolicy/ratio_mean"]
    np.testing.assert_allclose(float(s / c), RATIO_SUM / TOKENS, rtol=1e-6)
    assert float(got_m["kl"][0]) == pytest.approx(float(base_m["kl"][0]))


def test_ppo_loss_weighs_only_the_policy_term_against_old_logps():
    """PPO's behaviour log-probs are the rollout's ``old_logps_bt``; values/entropy keep
    their weight. With logps = old_logps the policy term is −A per token."""
    adv_bt = jnp.asarray(np.array([[1.0, -1.0, 0.5, 7.0], [2.0, 0.5, -1.0, 1.0],
                                   [3.0] * 4], np.float32))
    ret_bt = jnp.asarray(np.full((3, 4), 0.5, np.float32))
    batch = _batch(advantages_bt=adv_bt, old_logps_bt=jnp.asarray(TRAINER_BT),
                   old_values_bt=jnp.zeros((3, 4)), returns_bt=ret_bt)
    base, base_m, _ = _loss_and_grad(ppo.make_loss, preset("ppo"), batch)
    got, got_m, _ = _loss_and_grad(ppo.make_loss, preset("ppo", **{"rl.offpolicy": "tis"}),
                                   batch)
    w_bt = np.zeros((3, 4))
    w_bt[:2] = EXPECTED["tis"][0]
    a_bt = np.asarray(adv_bt) * MASK_BT
    np.testing.assert_allclose(got - base, -(a_bt * (w_bt - 1.0)).sum(), rtol=1e-5)
    assert float(got_m["value/loss"][0]) == float(base_m["value/loss"][0])
    assert tuple(map(float, got_m["offpolicy/clipped_frac"])) == (2.0, TOKENS)


@rewards.register("test_offpolicy_even_ids")
def _even_ids(completions, records, ctx):
    """Fraction of generated ids that are even: rewards differ within groups from step 0."""
    return [np.mean([i % 2 == 0 for i in ids]) if ids else 0.0 for ids in ctx.completion_ids]


def _rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_grpo_run_with_agreeing_sampler_is_unchanged(tmp_path):
    """f32 sampler and trainer on CPU agree: ratios ≈ 1, nothing clipped or masked, and
    the loss and gradient are the uncorrected run's (~25 s on 2 CPU cores)."""
    common = {"train.steps": 2, "train.log_every": 1, "train.eval_every": 100,
              "rl.rewards": "test_offpolicy_even_ids", "rl.kl_coef": 0.05}
    runs = {}
    for mode in ("none", "mis"):  # tis weights are min(r, cap): the same at r = 1
        workdir = tmp_path / mode
        train(preset("grpo", **common, **{"rl.offpolicy": mode}), str(workdir))
        runs[mode] = _rows(workdir)
    assert all("offpolicy/ratio_mean" not in r for r in runs["none"])
    # Not vacuous: rewards differ within groups, so there is a policy gradient.
    assert all(r["grad_norm"] > 0 for r in runs["none"])
    for mode in ("mis",):
        assert len(runs[mode]) == 2
        for row, base in zip(runs[mode], runs["none"], strict=True):
            assert row["offpolicy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
            assert row["offpolicy/clipped_frac"] == 0.0
            assert math.isclose(row["loss"], base["loss"], abs_tol=1e-6), (mode, row["loss"],
                                                                          base["loss"])
            assert row["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
