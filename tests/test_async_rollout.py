"""Rollouts on their own devices (rl.rollout_devices) and ahead of the trainer
(rl.async_steps): the version tags, exact resume, and that moving the sampler changes
nothing else."""

import json

import jax
import numpy as np
import pytest
from presets import preset
from test_grpo import _even_ids  # noqa: F401 - registers the test_even_ids reward
from test_reliability import _final_params

from jaxalign import rollout_mesh
from jaxalign.mesh import make_mesh
from jaxalign.models import lora as lora_lib
from jaxalign.train import Trainer, train

# Metrics that time the run, and so differ between runs.
TIMING = ("time", "tokens_per_s", "positions_per_s", "mfu", "rollout/overlap", "wall")


def _config(**overrides):
    base = {"rl.rewards": "test_even_ids", "train.steps": 8, "train.log_every": 1,
            "train.eval_every": 100, "optim.learning_rate": 3e-2, "rl.kl_coef": 0.05,
            "checkpoint.save_every": 2}
    return preset("grpo", **{**base, **overrides})


def _rows(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def _numbers(row):
    return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def test_split_devices_and_config_errors():
    devices = jax.devices()
    train_d, roll_d = rollout_mesh.split_devices(4, devices)
    assert train_d == devices[:4] and roll_d == devices[4:]
    with pytest.raises(ValueError, match="leaves process 0 none"):
        rollout_mesh.split_devices(8, devices)
    with pytest.raises(ValueError, match="needs rl.rollout_devices > 0"):
        rollout_mesh.check_config(_config(**{"rl.async_steps": 1}))
    with pytest.raises(ValueError, match="must be >= 0"):
        rollout_mesh.check_config(_config(**{"rl.async_steps": -1, "rl.rollout_devices": 4}))
    dpo = preset("dpo")
    assert rollout_mesh.rollout_device_count(dpo) == 0
    distill = preset("distill", **{"rl.rollout_devices": 4})
    with pytest.raises(ValueError, match="only the grpo/ppo stages"):
        rollout_mesh.check_config(distill)


def test_inflight_rollout_encoding_is_exact():
    rng = np.random.default_rng(0)
    host = {"inputs_bt": rng.integers(0, 512, (4, 7)).astype(np.int32),
            "old_logps_bt": rng.normal(size=(4, 7)).astype(np.float32),
            "weight_b": np.array([1, 0, 1, 1], np.float32)}
    parts = [(host, {"reward/mean": 0.25, "rl/policy_version": 3.0})]
    back = rollout_mesh.decode_rollout(json.loads(json.dumps(
        rollout_mesh.encode_rollout(parts))))
    assert back[0][1] == parts[0][1]
    for k, v in host.items():
        assert back[0][0][k].dtype == v.dtype and np.array_equal(back[0][0][k], v)


def _stopped_and_resumed(config, workdir, stop, rows):
    """Runs ``config`` to step ``stop`` (checkpointing there), resumes it to the end and
    checks that every logged number but timing equals the uninterrupted run's ``rows``."""
    trainer = Trainer(config, str(workdir))
    try:
        trainer.fit(num_steps=stop)
    finally:
        trainer.close()
    train(config, str(workdir))
    resumed = _rows(workdir)
    assert [r["step"] for r in resumed] == [r["step"] for r in rows]
    for ra, rb in zip(rows, resumed, strict=True):
        assert _numbers(ra) == _numbers(rb), ra["step"]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_sampler_on_its_own_devices_changes_nothing_else(tmp_path, lora):
    """Synchronous, the sampler on 4 devices of its own (weights handed off each rollout)
    logs the numbers of the sampler sharing the 4 training devices. With LoRA only the
    adapters are handed off after the first rollout."""
    steps = {"train.steps": 4, "model.lora.rank": 4 if lora else 0}
    own = _config(**steps, **{"rl.rollout_devices": 4})
    train(own, str(tmp_path / "own"))
    shared = _config(**steps)
    train(shared, str(tmp_path / "shared"), mesh=make_mesh(shared.mesh, jax.devices()[:4]))
    a, b = _rows(tmp_path / "own"), _rows(tmp_path / "shared")
    _, params = _final_params(tmp_path / "own")
    leaves = jax.tree.leaves_with_path(params)
    nbytes = sum(x.nbytes for _, x in leaves)
    adapters = sum(x.nbytes for path, x in leaves
                   if lora_lib.is_adapter_path([getattr(k, "key", k) for k in path]))
    assert (adapters > 0) == lora
    assert [r["handoff/bytes"] for r in a] == [nbytes] + [adapters if lora else nbytes] * 3
    assert all(r["rl/policy_lag"] == 0 for r in a)
    for ra, rb in zip(a, b, strict=True):
        na, nb = _numbers(ra), _numbers(rb)
        na.pop("handoff/bytes")
        assert na.keys() == nb.keys()
        for k in na:
            same = (na[k] == nb[k] if isinstance(na[k], str)
                    else na[k] == pytest.approx(nb[k], abs=1e-5, rel=1e-5))
            assert same, (k, na[k], nb[k])


@pytest.mark.slow
def test_async_one_step_ahead_tags_learns_and_resumes_exactly(tmp_path):
    config = _config(**{"rl.rollout_devices": 4, "rl.async_steps": 1,
                        "train.eval_at_start": True})
    train(config, str(tmp_path / "full"))
    rows = _rows(tmp_path / "full")
    # The batch trained at step n was sampled from the weights after n - 1 updates
    # (the first from the initial weights): one update of lag.
    assert [r["rl/policy_version"] for r in rows] == [0, 0, 1, 2, 3, 4, 5, 6]
    assert [r["rl/policy_lag"] for r in rows] == [0, 1, 1, 1, 1, 1, 1, 1]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # Stale batches are off-policy: the clipped ratio leaves 1 from the second step on.
    assert rows[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert all(abs(r["policy/ratio"] - 1.0) > 1e-4 for r in rows[1:])
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        evals = [r["reward/mean"] for r in map(json.loads, f) if r["split"] == "eval"]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.2, evals  # greedy reward, held out

    # Stopped at step 3 (its checkpoint holds the rollout in flight), then resumed.
    part = _stopped_and_resumed(config, tmp_path / "part", 3, rows)
    (_, full), (_, again) = _final_params(tmp_path / "full"), _final_params(part)
    for x, y in zip(jax.tree.leaves(full), jax.tree.leaves(again), strict=True):
        assert np.array_equal(x, y)


@pytest.mark.slow
def test_async_ppo_rollouts_of_several_updates_resume_exactly(tmp_path):
    """A PPO rollout feeds epochs x minibatches = 4 updates; one rollout ahead, the second
    rollout comes from the initial weights and the third from step 4's."""
    config = preset("ppo", **{"rl.rewards": "test_even_ids", "train.steps": 12,
                              "train.log_every": 1, "train.eval_every": 100,
                              "checkpoint.save_every": 4, "rl.rollout_devices": 4,
                              "rl.async_steps": 1})
    train(config, str(tmp_path / "full"))
    rows = _rows(tmp_path / "full")
    assert [r["rl/policy_version"] for r in rows] == [0] * 8 + [4] * 4
    assert [r["rl/policy_lag"] for r in rows] == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    assert all(np.isfinite(r["loss"]) for r in rows)
    _stopped_and_resumed(config, tmp_path / "part", 4, rows)
