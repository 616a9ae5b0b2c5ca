"""TensorBoard, W&B and sample sinks next to metrics.jsonl; PNG plots; a real sweep."""

import glob
import json
import os
import subprocess
import sys
import time
import types

import pytest
from presets import preset
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from jaxalign.jobs import sweep
from jaxalign.metrics import MetricsWriter, TensorBoardWriter, read_jsonl
from jaxalign.plots import metric_group, plot_runs, run_labels
from jaxalign.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"train.steps": 6, "train.log_every": 3, "train.eval_every": 6, "train.eval_batches": 1,
        "checkpoint.save_every": 6}


def _events(workdir):
    acc = EventAccumulator(os.path.join(workdir, "tb"), size_guidance={"scalars": 0,
                                                                       "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc):
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    """The sft test preset's 3-run learning-rate sweep, tiny: shared by the tests below."""
    root = str(tmp_path_factory.mktemp("sweep"))
    runs = sweep.load_sweep(os.path.join(ROOT, "configs/sft.py:test"), "lr")
    results = sweep.run_sweep(preset("sft", "test", **TINY), runs, root)
    return root, results


@pytest.mark.slow
def test_sweep_of_three_runs_writes_a_summary(sweep_root):
    root, results = sweep_root
    assert [r["status"] for r in results] == ["ok"] * 3
    assert [r["name"] for r in results] == ["learning_rate=0.003", "learning_rate=0.01",
                                            "learning_rate=0.03"]
    for r in results:
        assert r["workdir"] == os.path.join(root, r["name"])
        assert r["metrics"]["step"] == 6
        assert {"train/loss", "train/token_accuracy", "eval/loss"} <= set(r["metrics"])
        assert "train/learning_rate" not in r["metrics"]
    losses = [r["metrics"]["train/loss"] for r in results]
    assert len(set(losses)) == 3
    with open(os.path.join(root, "sweep_summary.json")) as f:
        saved = json.load(f)
    assert [s["metrics"]["train/loss"] for s in saved] == losses
    with open(os.path.join(root, "sweep_summary.md")) as f:
        table = f.read().strip().splitlines()
    assert table[0].startswith("| run | status | step | train/loss | eval/loss |")
    assert len(table) == 2 + 3 and all("| ok |" in line for line in table[2:])


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics_jsonl(sweep_root):
    workdir = sweep_root[1][1]["workdir"]
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    expected: dict[str, list] = {}
    for row in rows:
        for k, v in row.items():
            if k not in ("step", "split"):
                expected.setdefault(f"{row['split']}/{k}", []).append((row["step"], float(v)))
    got = _scalars(_events(workdir))
    assert {"train/loss", "eval/loss", "train/learning_rate", "train/tokens_per_s"} <= set(got)
    assert set(got) == set(expected)
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # Event files hold float32.
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [s for s, _ in got["train/loss"]] == [3, 6]
    assert [s for s, _ in got["eval/loss"]] == [6]


@pytest.mark.slow
def test_plots_of_real_runs(sweep_root, tmp_path):
    paths = plot_runs([r["workdir"] for r in sweep_root[1][:2]], str(tmp_path))
    assert {os.path.basename(p) for p in paths} >= {"loss.png", "reward_accuracy.png",
                                                    "learning_rate.png", "throughput.png"}


def test_resume_replaces_points_past_the_checkpoint(tmp_path):
    workdir = str(tmp_path)
    first = MetricsWriter(workdir, resume_step=0)
    for step in range(1, 7):
        first.write(step, "train", {"loss": float(step)})
    first.log_text(5, "samples/eval", "lost with the rows past step 3")
    first.close()
    # Resumed from a step-3 checkpoint: steps 4..6 are recomputed (other values).
    again = MetricsWriter(workdir, resume_step=3)
    for step in range(4, 7):
        again.write(step, "train", {"loss": 10.0 * step})
    again.close()
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert _scalars(_events(workdir))["train/loss"] == want
    assert [(r["step"], r["loss"]) for r in read_jsonl(os.path.join(workdir,
                                                                    "metrics.jsonl"))] == want
    assert read_jsonl(os.path.join(workdir, "samples.jsonl")) == []


def test_event_records_decode_as_tensorboard_protos(tmp_path):
    writer = TensorBoardWriter(str(tmp_path), purge_step=12)
    writer.scalars(12, "train", {"loss": 0.5, "rewards/chosen": -3e38})
    writer.close()
    (path,) = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    events = list(LegacyEventFileLoader(path).Load())  # raw protos; checks the CRCs too
    assert [e.step for e in events] == [0, 12, 12, 12]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == events[1].session_log.START
    assert [(v.tag, v.simple_value) for e in events[2:] for v in e.summary.value] == [
        ("train/loss", 0.5), ("train/rewards/chosen", pytest.approx(-3e38))]
    assert all(abs(e.wall_time - time.time()) < 600 for e in events)


def test_log_text_goes_to_samples_jsonl_and_tensorboard(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.log_text(7, "samples/eval", "User: What is 2 + 2?\nAssistant: 4")
    writer.close()
    assert read_jsonl(str(tmp_path / "samples.jsonl")) == [
        {"step": 7, "name": "samples/eval", "text": "User: What is 2 + 2?\nAssistant: 4"}]
    acc = _events(str(tmp_path))
    (event,) = acc.Tensors("samples/eval/text_summary")
    assert event.step == 7
    assert event.tensor_proto.string_val == [b"User: What is 2 + 2?\nAssistant: 4"]


def test_tensorboard_can_be_turned_off(tmp_path):
    MetricsWriter(str(tmp_path), {"tensorboard": False}).close()
    assert not os.path.exists(tmp_path / "tb")


def _fake_wandb(calls):
    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    return types.SimpleNamespace(init=init, Html=lambda s: ("html", s),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))


def test_wandb_logs_split_prefixed_scalars_and_resumes_its_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    settings = {"wandb_project": "proj", "wandb_entity": "", "wandb_name": "", "wandb_mode":
                "offline"}
    writer = MetricsWriter(str(tmp_path / "my-run"), settings, run_config={"stage": "sft"})
    writer.write(10, "eval", {"loss": 1.25})
    writer.close()
    init = calls[0][1]
    assert (init["project"], init["name"], init["id"], init["mode"], init["config"]) == (
        "proj", "my-run", "abc123", "offline", {"stage": "sft"})
    assert ("log", {"eval/loss": 1.25}, 10) in calls and calls[-1] == ("finish",)
    # The same workdir continues the same W&B run.
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls := []))
    (tmp_path / "my-run" / "wandb_run_id").write_text("first-id\n")
    MetricsWriter(str(tmp_path / "my-run"), settings).close()
    assert calls[0][1]["id"] == "first-id" and calls[0][1]["resume"] == "allow"


def test_wandb_requested_but_missing_is_a_clear_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ImportError, match="pip install wandb"):
        train(preset("sft", "test", **{"metrics.wandb_project": "proj"}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
    # Off by default: nothing imports wandb.
    MetricsWriter(str(tmp_path / "off")).close()


def _fake_run(path, scale):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step in range(10, 60, 10):
            f.write(json.dumps({"step": step, "split": "train", "loss": scale / step,
                                "kl": 0.01 * step, "reward": step * scale,
                                "learning_rate": 1e-3, "tokens_per_s": 1000.0,
                                "grad_norm": "nan"}) + "\n")
            if step % 20 == 0:
                f.write(json.dumps({"step": step, "split": "eval", "loss": 2 * scale / step,
                                    "accuracy": 0.5}) + "\n")


@pytest.mark.slow
def test_plots_overlay_two_runs(tmp_path):
    runs = [str(tmp_path / "runs" / "lr-small"), str(tmp_path / "runs" / "lr-big")]
    _fake_run(runs[0], 1.0)
    _fake_run(runs[1], 2.0)
    paths = plot_runs(runs, str(tmp_path / "plots"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["kl.png", "learning_rate.png", "loss.png", "optimization.png",
                     "reward_accuracy.png", "throughput.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
    # The command line, with the default output directory (the runs' common parent).
    subprocess.run([sys.executable, "-m", "launch.plot", f"--workdir={runs[0]}",
                    f"--workdir={runs[1]}"], cwd=ROOT, check=True, capture_output=True)
    assert os.path.getsize(tmp_path / "runs" / "plots" / "loss.png") > 5000


def test_metric_groups_and_labels():
    assert [metric_group(k) for k in ("loss", "nll_loss", "rewards/chosen", "token_accuracy",
                                      "kl", "policy/kl_mean", "learning_rate", "mfu",
                                      "time/rollout_s", "grad_norm", "data_records",
                                      "logps/chosen", "entropy")] == [
        "loss", "loss", "reward_accuracy", "reward_accuracy", "kl", "kl", "learning_rate",
        "throughput", "throughput", "optimization", "data", "logprobs", "other"]
    assert run_labels(["a/x", "b/y/"]) == ["x", "y"]
    assert run_labels(["a/x", "b/x"]) == ["a/x", "b/x"]
