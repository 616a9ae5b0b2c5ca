"""The GRPO stage end to end on a tiny model, and the reward registry."""

import json

import numpy as np
import pytest
from presets import preset

from jaxalign import rewards
from jaxalign.algos import grpo
from jaxalign.rollout import prompts_per_rollout
from jaxalign.train import Trainer, train


@rewards.register("test_even_ids")
def _even_ids(completions, records, ctx):
    """Fraction of generated ids that are even: learnable from scratch in a few steps."""
    return [np.mean([i % 2 == 0 for i in ids]) if ids else 0.0 for ids in ctx.completion_ids]


def _rows(workdir, split="train"):
    with open(workdir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.mark.slow
def test_grpo_raises_reward_and_sampler_matches_trainer(tmp_path):
    config = preset("grpo", **{"rl.rewards": "test_even_ids", "train.steps": 12,
                               "train.log_every": 1, "train.eval_every": 12,
                               "optim.learning_rate": 3e-2, "rl.kl_coef": 0.05})
    out = train(config, str(tmp_path))
    rows = _rows(tmp_path)
    first = np.mean([r["reward/mean"] for r in rows[:3]])
    last = np.mean([r["reward/mean"] for r in rows[-3:]])
    assert last > first + 0.15, (first, last)
    # The sampler's log-probs and the trainer's recomputed ones agree (f32).
    assert max(r["consistency/logp_gap"] for r in rows) < 1e-5
    assert all(r["kl"] >= 0 for r in rows) and rows[-1]["kl"] > 0
    fracs = [rows[-1][f"time_frac/{k}"] for k in ("rollout", "reward", "logprobs", "update",
                                                   "handoff")]
    assert sum(fracs) == pytest.approx(1.0)
    assert "task_accuracy" in out["eval"] and "reward/mean" in out["eval"]


@pytest.mark.slow
def test_grpo_several_updates_per_rollout(tmp_path):
    """epochs x minibatches updates reuse one rollout: ratios leave 1, checkpoints wait."""
    config = preset("grpo", **{"rl.rewards": "test_even_ids", "rl.epochs": 2,
                               "rl.minibatches": 2, "train.steps": 8, "train.log_every": 1,
                               "train.eval_every": 100, "checkpoint.save_every": 1,
                               "optim.learning_rate": 3e-2, "grpo.importance": "sequence"})
    trainer = Trainer(config, str(tmp_path))
    try:
        trainer.fit()
        saved = trainer.checkpointer.all_steps()
    finally:
        trainer.close()
    rows = _rows(tmp_path)
    # The first update of a rollout is on-policy; later ones are not.
    assert rows[0]["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert any(abs(r["policy/ratio"] - 1.0) > 1e-4 for r in rows[1:4])
    # Each rollout feeds 4 updates; only rollout boundaries are checkpointed.
    assert all(s % 4 == 0 for s in saved), saved


def test_select_groups_prefers_informative_groups():
    config = preset("grpo", **{"rl.num_samples": 2})
    # 6 groups of 2: flat, informative, flat, informative, padding, informative.
    rewards_b = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 0.5, 0], np.float32)
    real_b = np.array([1] * 8 + [0, 0] + [1, 1], bool)
    keep, m = grpo.select_groups(rewards_b, real_b, rows=6, step=3, config=config)
    assert keep.tolist() == [2, 3, 6, 7, 10, 11]  # whole groups, in sampled order
    assert m == {"groups/informative_sampled": 0.6, "groups/informative_kept": 1.0}
    # Too few informative groups: flat real groups fill up before padding does.
    keep, m = grpo.select_groups(rewards_b, real_b, rows=10, step=3, config=config)
    assert sorted(set(keep.tolist()) - {2, 3, 6, 7, 10, 11}) == [0, 1, 4, 5]
    assert m["groups/informative_kept"] == 0.6
    again, _ = grpo.select_groups(rewards_b, real_b, rows=6, step=3, config=config)
    assert again.tolist() == [2, 3, 6, 7, 10, 11]


@pytest.mark.slow
def test_grpo_oversample_trains_on_informative_groups(tmp_path):
    config = preset("grpo", **{"rl.rewards": "test_even_ids", "train.steps": 2,
                               "train.log_every": 1, "train.eval_every": 100,
                               "grpo.oversample": 3, "grpo.dynamic_sampling": True})
    assert prompts_per_rollout(config) == 3 * config.train.batch_size // 4
    train(config, str(tmp_path))
    rows = _rows(tmp_path)
    assert all(r["groups/informative_kept"] >= r["groups/informative_sampled"] for r in rows)
    assert all(r["groups/flat_fraction"] == pytest.approx(1 - r["groups/informative_kept"])
               for r in rows)


@pytest.mark.parametrize("key,value,match", [
    ("grpo.oversample", 0, "grpo.oversample"),
    ("grpo.advantage", "median", "grpo.advantage"),
    ("grpo.loss_agg", "sum", "grpo.loss_agg"),
    ("rl.num_samples", 3, "multiple of rl.num_samples"),
    ("rl.rewards", "no_such_reward", "unknown reward"),
    ("rl.kl_estimator", "k9", "rl.kl_estimator"),
])
def test_grpo_config_errors(tmp_path, key, value, match):
    with pytest.raises(ValueError, match=match):
        Trainer(preset("grpo", **{key: value}), str(tmp_path))


def _ctx(lengths, stopped, limit=8, **options):
    return rewards.RewardContext(lengths=np.asarray(lengths), stopped=np.asarray(stopped),
                                 max_new_tokens=limit, options=options)


def test_builtin_reward_functions():
    recs = [{"answer": "42", "kind": "task"}, {"answer": "42", "kind": "task"},
            {"answer": "abc", "kind": "task"}]
    outs = [" 42 ", "it is 41.0 or 42", "ABC!"]
    ctx = _ctx([2, 6, 3], [True, True, False])
    assert rewards.exact_answer(outs, recs, ctx) == [1.0, 0.0, 0.0]
    assert rewards.numeric_answer(outs, recs, ctx) == [1.0, 1.0, 0.0]
    assert rewards.contains_answer(outs, recs, ctx) == [1.0, 1.0, 1.0]
    refusal = rewards.REFUSAL
    kinds = [{"kind": "harmful"}, {"kind": "harmful"}, {"kind": "benign"}, {"kind": "benign"}]
    assert rewards.refusal_correct([refusal, "Sure", refusal, "Sure"], kinds, ctx) == [
        1.0, 0.0, 0.0, 1.0]
    # DAPO's soft overlong penalty: limit 8, buffer 4 -> 0 up to 4 tokens, -1 at 8 / cut off.
    pen = rewards.overlong_penalty([""] * 4, [{}] * 4,
                                   _ctx([3, 6, 8, 8], [True, True, True, False],
                                        overlong_buffer=4))
    np.testing.assert_allclose(pen, [0.0, -0.5, -1.0, -1.0])
    with pytest.raises(KeyError, match="answer"):
        rewards.exact_answer(["x"], [{"kind": "task"}], ctx)


def test_reward_combination_and_registry():
    combo = rewards.Rewards("exact_answer:2,stopped:0.5")
    total, parts = combo(["1", "2"], [{"answer": "1"}, {"answer": "1"}],
                         _ctx([1, 8], [True, False]))
    np.testing.assert_allclose(total, [2.5, 0.0])
    assert set(parts) == {"exact_answer", "stopped"}
    assert rewards.parse_spec("rm:runs/x:0.5, exact_answer") == [("rm:runs/x", 0.5),
                                                                 ("exact_answer", 1.0)]
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("exact_answer", lambda c, r, x: [0.0] * len(c))
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.Rewards("exact_answer,nope")
    bad = rewards.register("test_short_list", lambda c, r, x: [1.0])
    del bad
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        rewards.Rewards("test_short_list")(["a", "b"], [{}, {}], _ctx([1, 1], [True, True]))
