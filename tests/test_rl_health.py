"""RL health signals: log-prob mismatch, entropy collapse, reward hacking; the pipeline
stops an RL stage that shows one, naming it."""

import json

import pytest

from jaxalign.evals import rl_health
from jaxalign.jobs import pipeline as pipeline_lib


def _rows(**series):
    """Train rows, one per step, from per-key value lists (plus an eval row to ignore)."""
    n = len(next(iter(series.values())))
    rows = [{"step": i + 1, "split": "train", **{k: v[i] for k, v in series.items()}}
            for i in range(n)]
    rows.append({"step": n, "split": "eval", **{k: 1e9 for k in series}})
    return rows


HEALTHY = dict(**{"consistency/logp_gap": [1e-7] * 8,
                  "policy/entropy": [2.0, 1.9, 1.8, 1.8, 1.7, 1.6, 1.6, 1.5],
                  "reward/mean": [0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5]})


def _by_signal(rows):
    return {r["signal"]: r for r in rows}


def test_ends_are_window_means():
    assert rl_health.ends([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], 0.25) == (1.5, 7.5)
    assert rl_health.ends([1.0, 3.0, 5.0], 0.1) == (1.0, 5.0)  # at least one value
    assert rl_health.ends([1.0], 0.25) is None


def test_healthy_run_passes_every_signal():
    out = _by_signal(rl_health.check(_rows(**HEALTHY), {"task/pass@1": 0.41},
                                     {"task/pass@1": 0.40}, rl_health.Limits()))
    assert [out[s]["status"] for s in rl_health.SIGNALS] == ["pass"] * 3
    # entropy: last quarter (1.6 + 1.5) / 2 over first quarter (2.0 + 1.9) / 2
    assert out["entropy_collapse"]["value"] == pytest.approx(1.55 / 1.95)
    assert out["reward_hacking"]["value"] == pytest.approx(
        {"reward_delta": 0.45 - 0.15, "task_delta": 0.01})


def test_logp_mismatch_uses_the_last_window():
    gap = [0.01] * 6 + [0.2, 0.3]  # drift at the end: late mean 0.25
    out = _by_signal(rl_health.check(_rows(**{**HEALTHY, "consistency/logp_gap": gap}),
                                     None, None, rl_health.Limits(max_logp_gap=0.1)))
    assert out["logp_mismatch"]["status"] == "fail"
    assert out["logp_mismatch"]["value"] == pytest.approx(0.25)
    assert "0.25" in out["logp_mismatch"]["reason"]
    # an early spike alone, later gone, passes
    gap = [0.5, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    out = _by_signal(rl_health.check(_rows(**{**HEALTHY, "consistency/logp_gap": gap}),
                                     None, None, rl_health.Limits(max_logp_gap=0.1)))
    assert out["logp_mismatch"]["status"] == "pass"


def test_entropy_collapse_is_a_ratio_to_the_start():
    ent = [2.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.2]  # 0.2 / 2.0 = 0.1 < 0.2
    out = _by_signal(rl_health.check(_rows(**{**HEALTHY, "policy/entropy": ent}),
                                     None, None, rl_health.Limits()))
    assert out["entropy_collapse"]["status"] == "fail"
    assert out["entropy_collapse"]["value"] == pytest.approx(0.1)
    out = _by_signal(rl_health.check(_rows(**{**HEALTHY, "policy/entropy": ent}),
                                     None, None, rl_health.Limits(min_entropy_ratio=0.05)))
    assert out["entropy_collapse"]["status"] == "pass"


def test_reward_hacking_needs_reward_up_and_task_down_past_tolerance():
    rows = _rows(**HEALTHY)
    limits = rl_health.Limits(task_tolerance=0.02)
    fell = _by_signal(rl_health.check(rows, {"task/pass@1": 0.35}, {"task/pass@1": 0.40},
                                      limits))["reward_hacking"]
    assert fell["status"] == "fail" and "fell by 0.05" in fell["reason"]
    within = _by_signal(rl_health.check(rows, {"task/pass@1": 0.39}, {"task/pass@1": 0.40},
                                        limits))["reward_hacking"]
    assert within["status"] == "pass"
    # reward fell too: not hacking (the run just got worse; the gates judge that)
    down = _rows(**{**HEALTHY, "reward/mean": HEALTHY["reward/mean"][::-1]})
    both = _by_signal(rl_health.check(down, {"task/pass@1": 0.30}, {"task/pass@1": 0.40},
                                      limits))["reward_hacking"]
    assert both["status"] == "pass"


def test_missing_metrics_are_unchecked_not_passed():
    rows = _rows(**{"reward/mean": [0.1, 0.2, 0.3]})
    out = _by_signal(rl_health.check(rows, None, None, rl_health.Limits()))
    assert [out[s]["status"] for s in rl_health.SIGNALS] == ["unchecked"] * 3
    assert "policy/entropy was not logged" in out["entropy_collapse"]["reason"]
    assert "task/pass@1" in out["reward_hacking"]["reason"]


def test_limits_from_config():
    assert rl_health.limits_from(False) is None
    assert rl_health.limits_from(None) == rl_health.Limits()
    assert rl_health.limits_from({"max_logp_gap": None}).max_logp_gap is None
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_gap'\]"):
        rl_health.limits_from({"max_gap": 0.1})
    with pytest.raises(ValueError, match="window"):
        rl_health.limits_from({"window": 0.9})
    with pytest.raises(ValueError, match="min_entropy_ratio"):
        rl_health.limits_from({"min_entropy_ratio": -1.0})


def _finished_stage(workdir, stage, task, metrics_rows=()):
    workdir.mkdir(parents=True)
    (workdir / pipeline_lib.DONE).write_text(json.dumps(
        {"stage": stage, "seconds": 1.0, "train": {}, "eval": {}}))
    (workdir / pipeline_lib.EVALS).write_text(json.dumps(
        {"metrics": {"task/pass@1": task}, "skipped": {}}))
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows))


def _pipeline(tmp_path, grpo_task, **grpo_series):
    config = {"stages": [dict(name="sft", config="configs/sft.py:test"),
                         dict(name="grpo", config="configs/grpo.py:test", init_from="sft")],
              "rl_health": dict(max_logp_gap=0.05, min_entropy_ratio=0.2, task_tolerance=0.02)}
    pipe = pipeline_lib.Pipeline(config, str(tmp_path))
    _finished_stage(tmp_path / "0-sft", "sft", 0.40)
    _finished_stage(tmp_path / "1-grpo", "grpo", grpo_task, _rows(**{**HEALTHY, **grpo_series}))
    return pipe


def test_pipeline_stops_an_rl_stage_naming_the_signal(tmp_path):
    pipe = _pipeline(tmp_path, 0.30, **{"policy/entropy": [2.0] * 6 + [0.1, 0.1]})
    with pytest.raises(pipeline_lib.GateFailed) as err:
        pipe.run()
    msg = str(err.value)
    assert "stage 'grpo' failed its RL health check" in msg
    assert "entropy_collapse" in msg and "reward_hacking" in msg
    assert "logp_mismatch" not in msg
    saved = json.loads((tmp_path / "1-grpo" / "rl_health.json").read_text())
    assert [r["status"] for r in saved] == ["pass", "fail", "fail"]


def test_pipeline_passes_a_healthy_rl_stage_and_a_stage_can_turn_it_off(tmp_path):
    pipe = _pipeline(tmp_path, 0.41)
    report = pipe.run()
    assert report["columns"] == ["sft", "grpo"]
    assert all(r["status"] == "pass" for r in json.loads(
        (tmp_path / "1-grpo" / "rl_health.json").read_text()))
    sick = _pipeline(tmp_path / "off", 0.10)
    sick.stages[1]["rl_health"] = False
    sick.run()  # no GateFailed
    with pytest.raises(pipeline_lib.GateFailed, match="reward_hacking"):
        _pipeline(tmp_path / "on", 0.10).run()
