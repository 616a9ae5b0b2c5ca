"""The multi-stage pipeline: wiring, gates, and resuming without redoing finished stages."""

import json
import os
import shutil

import pytest

from configs.pipeline import get_config
from jaxalign import train as train_lib
from jaxalign.checkpoint import Checkpointer
from jaxalign.jobs import pipeline as pipeline_lib

pytestmark = pytest.mark.slow  # trains every stage in turn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _latest_step(workdir):
    ckpt = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt):
        return None
    saved = Checkpointer(ckpt, save_every=1, keep=0)
    try:
        return saved.latest_step()
    finally:
        saved.close()


@pytest.fixture(scope="module")
def first_two_stages(tmp_path_factory):
    """SFT and RM finished (shared: later tests copy it)."""
    root = str(tmp_path_factory.mktemp("pipe") / "root")
    pipeline_lib.Pipeline(get_config("test").to_dict(), root, repo_dir=ROOT).run(
        stop_after="rm")
    return root


def _recording(monkeypatch):
    calls = []
    real_train = train_lib.train

    def recording_train(cfg, workdir, mesh=None):
        calls.append((os.path.basename(workdir), _latest_step(workdir)))
        return real_train(cfg, workdir, mesh)

    monkeypatch.setattr(train_lib, "train", recording_train)
    return calls


def test_pipeline_resumes_mid_stage_and_skips_finished(tmp_path, monkeypatch,
                                                       first_two_stages):
    config = get_config("test").to_dict()
    root = str(tmp_path / "pipe")
    shutil.copytree(first_two_stages, root)
    pipe = pipeline_lib.Pipeline(config, root, repo_dir=ROOT)
    calls = _recording(monkeypatch)
    pipe.run(stop_after="rm")
    assert calls == []
    # The SFT stage was evaluated once (the RM is not a policy) and wired into the RM.
    assert os.path.isfile(os.path.join(pipe.dirs["sft"], pipeline_lib.EVALS))
    assert not os.path.isfile(os.path.join(pipe.dirs["rm"], pipeline_lib.EVALS))
    with open(os.path.join(pipe.dirs["rm"], "config.json")) as f:
        rm_cfg = json.load(f)
    assert rm_cfg["model"]["init_from"] == f"workdir:{os.path.join(first_two_stages, '1-sft')}"

    # Interrupt the DPO stage after 2 of its 4 steps (a checkpoint at step 2).
    trainer = train_lib.Trainer(pipe.stage_config(pipe.stages[3]), pipe.dirs["dpo"])
    try:
        trainer.fit(num_steps=2)
    finally:
        trainer.close()
    calls.clear()
    report = pipe.run()
    # Finished stages are not redone; DPO resumes from its step-2 checkpoint.
    assert calls == [("3-dpo", 2), ("4-grpo", None), ("5-distill", None)]
    assert report["columns"] == ["base", "sft", "dpo", "grpo", "distill"]
    with open(os.path.join(pipe.dirs["distill"], "config.json")) as f:
        assert json.load(f)["distill"]["teacher"] == f"workdir:{pipe.dirs['grpo']}"
    assert set(report["metrics"]) == set(config["report_metrics"])
    assert all(v is not None for v in report["metrics"]["task/pass@1"].values())
    assert os.path.isfile(os.path.join(root, "report.md"))
    # The untrained base was evaluated before its reference (SFT) existed; the evals that
    # are measured against the reference waited for it instead of running without one.
    base = pipe.evaluate(pipe.stages[0])
    assert not {"preference", "kl"} & set(base["skipped"])
    sft_ref = pipe.evaluate(pipe.stages[1])
    assert sft_ref["metrics"]["kl/mean"] == 0.0 and base["metrics"]["kl/mean"] > 0.0
    calls.clear()
    pipe.run()
    assert calls == []


def test_pipeline_gate_failure_stops(tmp_path, first_two_stages):
    config = get_config("test").to_dict()
    # An impossible gate on the DPO stage: a held-out loss below -1.
    config["stages"][3]["gates"] = [dict(metric="heldout/loss", direction="lower",
                                         tolerance=0.0, threshold=-1.0)]
    root = str(tmp_path / "pipe")
    shutil.copytree(first_two_stages, root)
    pipe = pipeline_lib.Pipeline(config, root, repo_dir=ROOT)
    with pytest.raises(pipeline_lib.GateFailed, match="heldout/loss"):
        pipe.run()
    assert pipe.done("dpo") is not None and pipe.done("grpo") is None


def test_pipeline_config_errors(tmp_path):
    config = get_config("test").to_dict()
    config["stages"][2]["init_from"] = "grpo"
    with pytest.raises(ValueError, match="not an earlier stage"):
        pipeline_lib.Pipeline(config, str(tmp_path), repo_dir=ROOT)
    config = get_config("test").to_dict()
    config["stages"][0]["overrides"] = ["train.stepz=3"]
    pipe = pipeline_lib.Pipeline(config, str(tmp_path), repo_dir=ROOT)
    with pytest.raises(ValueError, match="names no config key"):
        pipe.stage_config(pipe.stages[0])


def test_ceiling_closed_measures_rl_against_its_starts_pass_at_k():
    from jaxalign.jobs.pipeline import ceiling_closed, render_table

    start = {"task/pass@1": 0.5, "task/pass@4": 0.6, "task/pass@8": 0.7,
             "task/pass@1/addition": 0.2, "task/maj@8": 0.55}
    row = ceiling_closed(start, {"task/pass@1": 0.62})
    assert row["k"] == 8 and row["gap"] == pytest.approx(0.2)
    assert row["closed"] == pytest.approx(0.6)
    assert ceiling_closed({"task/pass@1": 0.5}, {"task/pass@1": 0.6}) is None
    text = render_table({"columns": ["dpo", "grpo"], "metrics": {
        "task/pass@1": {"dpo": 0.5, "grpo": 0.62}}, "ceiling": [
        {"stage": "grpo", "start": "dpo", **row}]})
    assert "grpo: greedy pass@1 0.500 -> 0.620, 60% of dpo's gap to its pass@8 (0.700)" in text
