"""Sweeps without training: names, failures, launch commands (a real sweep: test_observability)."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags
from presets import preset

from jaxalign.jobs import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_failed_run_is_reported_and_the_rest_still_run(tmp_path):
    def fake_train(config, workdir):
        if config.optim.learning_rate > 0.02:
            raise FloatingPointError("non-finite loss at step 4")
        os.makedirs(workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"step": 6, "split": "train", "loss": 1.5, "accuracy": 0.75,
                                "learning_rate": 0.01}) + "\n")
        return {"preempted": False}

    runs = [{"optim.learning_rate": 0.03}, {"optim.learning_rate": 0.01}]
    results = sweep.run_sweep(preset("sft", "test"), runs, str(tmp_path), train_fn=fake_train)
    assert [r["status"] for r in results] == ["failed", "ok"]
    assert "FloatingPointError: non-finite loss" in results[0]["error"]
    assert results[1]["metrics"] == {"step": 6, "train/loss": 1.5, "train/accuracy": 0.75}
    table = sweep.summary_table(results)
    assert "| learning_rate=0.03 | failed (FloatingPointError: non-finite loss at step 4) |" \
        in table


def test_misspelled_override_fails_before_any_run(tmp_path):
    with pytest.raises(KeyError, match="optim.learning_rat"):
        sweep.run_sweep(preset("sft", "test"), [{"optim.learning_rate": 1e-3},
                                                {"optim.learning_rat": 1e-3}], str(tmp_path),
                        train_fn=lambda c, w: pytest.fail("must not train"))


def test_run_names_are_distinct_and_filesystem_safe():
    names = sweep.run_names([{"dpo.loss_type": "simpo", "dpo.beta": 2.0},
                             {"dpo.loss_type": "a/b c"}, {"dpo.loss_type": "a/b c"},
                             {"kto.beta": 0.1, "dpo.beta": 0.1}, {}])
    assert names == ["loss_type=simpo,dpo.beta=2", "loss_type=a_b_c", "loss_type=a_b_c-2",
                     "kto.beta=0.1,dpo.beta=0.1", "base"]


def _parse_train_command(command):
    """Parses a printed command with the flags launch.train defines."""
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "launch.train"]
    fv = flags.FlagValues()
    argv = ["launch.train", *argv[3:]]
    # The override flags are defined from the argv the parser is given.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config path is relative, as on the cluster
    try:
        fv(argv)
        return fv.config, fv.workdir
    finally:
        os.chdir(cwd)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections
def test_print_emits_one_parseable_command_per_run(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "--config=configs/dpo.py:test",
         "--sweep=loss_type", f"--workdir={tmp_path}/dpo", "--print", "--config.train.steps=7"],
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    commands = out.strip().splitlines()
    assert len(commands) == 4
    runs = sweep.load_sweep(os.path.join(ROOT, "configs/dpo.py:test"), "loss_type")
    for command, run, name in zip(commands, runs, sweep.run_names(runs), strict=True):
        config, workdir = _parse_train_command(command)
        assert workdir == f"{tmp_path}/dpo/{name}"
        expected = sweep.apply_overrides(preset("dpo", "test", **{"train.steps": 7}), run)
        assert config.to_dict() == expected.to_dict()
    assert _parse_train_command(commands[3])[0].dpo.beta == 2.0


@pytest.mark.slow
def test_cli_exits_non_zero_when_a_run_fails(tmp_path):
    cfg = tmp_path / "bad_sweep.py"
    cfg.write_text(
        "from configs.sft import get_config  # noqa: F401\n\n"
        "def get_sweep(arg, preset='demo'):\n"
        "    return [{'train.nonfinite': 'bogus'}, {'train.nonfinite': 'nope'}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sweep", f"--config={cfg}:test", "--sweep=any",
         f"--workdir={tmp_path}/root"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "2 of 2 runs failed" in proc.stderr
    assert proc.stdout.count("| failed (ValueError: train.nonfinite=") == 2
    assert os.path.exists(tmp_path / "root" / "sweep_summary.md")
