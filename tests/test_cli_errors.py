"""Entry points end a user's mistake with one ``error:`` line on stderr and exit status 2."""

import json
import os
import subprocess
import sys

import pytest
from presets import preset

from jaxalign.config import to_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["launch.train", "--config=configs/sft.py:test"]


def _launch(module, *args, traceback=False):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("JAXALIGN_TRACEBACK", None)
    if traceback:
        env["JAXALIGN_TRACEBACK"] = "1"
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def _one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _run_without_checkpoints(path):
    """A run directory whose config.json was written but whose first save never came."""
    path.mkdir()
    (path / "config.json").write_text(to_json(preset("sft", "test", tokenizer="builtin:world")))
    return path


@pytest.mark.slow
def test_bad_config_key_and_the_traceback_on_request(tmp_path):
    args = [*TRAIN, f"--workdir={tmp_path / 'run'}", "--config.train.stpes=3"]
    line = _one_error_line(_launch(*args), "--config.train.stpes=3", "'stpes'", "steps")
    loud = _launch(*args, traceback=True)
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.splitlines()[-1] == line


@pytest.mark.slow
def test_overlong_record_from_a_data_worker(tmp_path):
    data = tmp_path / "chats.jsonl"
    short = {"prompt": "What is 2 + 3?", "response": "5"}
    long = {"messages": [{"role": "user", "content": "word " * 200},
                         {"role": "assistant", "content": "ok"}]}
    data.write_text("".join(json.dumps(r) + "\n" for r in [short] * 40 + [long]))
    proc = _launch(*TRAIN, f"--workdir={tmp_path / 'run'}", f"--config.data.train=jsonl:{data}",
                   "--config.data.eval=", "--config.data.overlong=error",
                   "--config.data.num_workers=1", "--config.train.steps=2")
    line = _one_error_line(proc, f"jsonl:{data}, line 41, field 'messages'", "data.max_len")
    assert "Grain" not in line


@pytest.mark.slow
@pytest.mark.parametrize("module", ["launch.export_hf", "launch.eval"])
def test_missing_checkpoint(module, tmp_path):
    run = _run_without_checkpoints(tmp_path / "run")
    _one_error_line(_launch(module, f"--workdir={run}", f"--out={tmp_path / 'out'}"),
                    f"no checkpoints in {run}")


@pytest.mark.slow
def test_init_from_a_directory_that_is_no_hf_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    proc = _launch(*TRAIN, f"--workdir={tmp_path / 'run'}",
                   f"--config.model.init_from=hf:{tmp_path}")
    _one_error_line(proc, f"{tmp_path}", "config.json")
