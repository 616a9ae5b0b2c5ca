"""PPO: per-token rewards and GAE on a hand-made rollout, adaptive KL, a tiny run + resume."""

import json

import numpy as np
import pytest
from presets import preset

from jaxalign.algos import ppo
from jaxalign.train import Trainer


def _hand_batch():
    mask = np.array([[0, 1, 1, 0], [0, 1, 0, 0]], np.float32)
    return {
        "loss_mask_bt": mask,
        "weight_b": np.ones(2, np.float32),
        "stopped_b": np.array([1.0, 0.0], np.float32),
        "sampler_logps_bt": np.array([[0, -1, -2, 0], [0, -3, 0, 0]], np.float32),
        "ref_logps_bt": np.array([[0, -1.5, -1, 0], [0, -3, 0, 0]], np.float32),
        "old_values_bt": np.array([[0, 0.5, 0.2, 0], [0, 0.25, 0, 0]], np.float32),
    }


def test_rewards_kl_penalty_and_gae_hand_computed():
    config = preset("ppo", **{"ppo.gamma": 1.0, "ppo.lam": 1.0,
                              "ppo.whiten_advantages": False, "ppo.missing_eos_penalty": 1.0})
    cols, metrics = ppo.advantages(_hand_batch(), np.array([2.0, 1.0], np.float32), config,
                                   kl_coef=0.1)
    # Row 0: rewards (-0.1 * 0.5, -0.1 * -1 + 2) on its two tokens; gamma = lam = 1 makes
    # the advantage the return-to-go minus the value.
    np.testing.assert_allclose(cols["returns_bt"][0], [0, 2.05, 2.1, 0], rtol=1e-6)
    np.testing.assert_allclose(cols["advantages_bt"][0], [0, 1.55, 1.9, 0], rtol=1e-6)
    # Row 1 was cut off: its score 1 loses the missing-eos penalty of 1.
    np.testing.assert_allclose(cols["returns_bt"][1], [0, 0, 0, 0], atol=1e-7)
    assert metrics["kl/sequence"] == pytest.approx((0.5 - 1.0 + 0.0) / 2)
    assert metrics["score/mean"] == pytest.approx((2.0 + 0.0) / 2)


def test_adaptive_kl_moves_toward_target():
    up = ppo.adaptive_kl(0.1, observed_kl=8.0, target=2.0, horizon=100.0, rows=10)
    down = ppo.adaptive_kl(0.1, observed_kl=0.5, target=2.0, horizon=100.0, rows=10)
    assert up == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at +0.2
    assert down == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert ppo.adaptive_kl(0.1, 2.0, target=2.0, horizon=100.0, rows=10) == pytest.approx(0.1)


@pytest.mark.slow
def test_ppo_runs_learns_values_and_resumes_kl_state(tmp_path):
    overrides = {"ppo.kl_target": 0.01, "ppo.kl_horizon": 50.0, "rl.kl_coef": 0.1,
                 "train.log_every": 1, "train.eval_every": 100, "optim.learning_rate": 3e-3}
    config = preset("ppo", **overrides)
    trainer = Trainer(config, str(tmp_path))
    try:
        trainer.fit(num_steps=4)  # one rollout = epochs 2 x minibatches 2 updates
        coef = trainer.batches.rollout.state()["kl_coef"]
    finally:
        trainer.close()
    assert coef != pytest.approx(0.1)
    resumed = Trainer(config, str(tmp_path))
    try:
        assert resumed.batches.rollout.state()["kl_coef"] == coef
        resumed.fit()
    finally:
        resumed.close()
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # The critic fits the returns of a rollout over its updates.
    assert rows[3]["value/loss"] < rows[0]["value/loss"]
    assert max(r["consistency/logp_gap"] for r in rows) < 1e-5
