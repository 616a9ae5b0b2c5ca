"""Kill -9 and SIGTERM resume, damaged checkpoints, restore onto other meshes."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from presets import preset

from configs import sft as sft_config
from jaxalign.checkpoint import MANIFEST, Checkpointer, abstract_with_shardings
from jaxalign.mesh import make_mesh
from jaxalign.metrics import read_jsonl
from jaxalign.train import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
FLAGS = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
         "--config.checkpoint.save_every=4", "--config.checkpoint.async_save=True",
         "--config.data.eval="]


def _launch(workdir):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", "--config=configs/sft.py:test",
         f"--workdir={workdir}", *FLAGS],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_to_end(workdir):
    proc = _launch(workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _wait_for_step(proc, step, lines):
    """Reads output until the progress line for ``step`` appears."""
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {step:>2}/"):
            return True
    return False


def _final_params(workdir):
    config = sft_config.get_config("test")
    trainer = Trainer(config, str(workdir), mesh=make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                           devices=jax.devices()[:1]))
    step = int(jax.device_get(trainer.state["step"]))
    params = jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))
    trainer.close()
    return step, params


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reference"))
    _run_to_end(workdir)
    return workdir, _final_params(workdir), _losses(workdir)


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, reference):
    ref_dir, (ref_step, ref_params), ref_losses = reference
    workdir = str(tmp_path / "killed")
    rng = random.Random(0)
    kills = 0
    for target in (3, 9, 15):  # kill at or after these steps, incl. mid async save
        proc = _launch(workdir)
        lines = []
        if not _wait_for_step(proc, target, lines):
            proc.wait()
            pytest.fail("".join(lines))
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    _run_to_end(workdir)
    assert kills == 3
    step, params = _final_params(workdir)
    assert step == ref_step == STEPS
    _assert_same_params(params, ref_params)
    assert _losses(workdir) == ref_losses


def test_sigterm_checkpoints_at_step_boundary_and_resumes(tmp_path, reference):
    _, (_, ref_params), ref_losses = reference
    workdir = str(tmp_path / "term")
    proc = _launch(workdir)
    lines = []
    assert _wait_for_step(proc, 6, lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    saved = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=0)
    stopped_at = saved.latest_step()
    saved.close()
    assert 6 <= stopped_at < STEPS
    _run_to_end(workdir)
    _assert_same_params(_final_params(workdir)[1], ref_params)
    assert _losses(workdir) == ref_losses


def _config(**overrides):
    return preset("sft", **overrides)


def _flip_a_byte(step_dir):
    biggest = max((p for p in glob.glob(os.path.join(step_dir, "state", "**"), recursive=True)
                   if os.path.isfile(p)), key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2] ^= 0x5A
    with open(biggest, "wb") as f:
        f.write(data)
    return os.path.relpath(biggest, step_dir)


def test_damaged_checkpoint_falls_back_to_older_one(tmp_path, caplog):
    config = _config(**{"train.steps": 8, "checkpoint.save_every": 4, "data.eval": "",
                        "checkpoint.async_save": True})
    workdir = str(tmp_path / "w")
    trainer = Trainer(config, workdir)
    trainer.fit()
    trainer.close()
    ckpt = os.path.join(workdir, "checkpoints")
    assert all(os.path.exists(os.path.join(ckpt, s, MANIFEST)) for s in ("4", "8"))
    rel = _flip_a_byte(os.path.join(ckpt, "8"))
    with caplog.at_level("WARNING"):
        resumed = Trainer(config, workdir)
    assert int(jax.device_get(resumed.state["step"])) == 4
    assert f"checkpoint step 8 in {ckpt} is damaged (checksum mismatch in {rel})" in caplog.text
    resumed.close()
    # Truncate the older one too: nothing intact is left, and that is an error, not a restart.
    data_file = max(glob.glob(os.path.join(ckpt, "4", "state", "**"), recursive=True),
                    key=lambda p: os.path.getsize(p) if os.path.isfile(p) else -1)
    with open(data_file, "r+b") as f:
        f.truncate(1)
    with pytest.raises(RuntimeError, match=r"no intact checkpoint in .*step 8: checksum mismatch"
                                           r".*step 4: checksum mismatch"):
        Trainer(config, workdir)


@pytest.mark.parametrize("target", [(1, 1, 1), (4, 2, 1)])
def test_restore_onto_another_mesh(tmp_path, target):
    config = _config(**{"train.steps": 3, "checkpoint.save_every": 3, "data.eval": ""})
    workdir = str(tmp_path / "w")
    source = Trainer(config, workdir, mesh=make_mesh(dict(data=2, fsdp=2, tensor=2)))
    source.fit()
    source.close()
    want = jax.tree.map(np.asarray, jax.device_get(source.state))
    devices = jax.devices()[:1] if target == (1, 1, 1) else None
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), target, strict=True)), devices=devices)
    other = Trainer(config, workdir, mesh=mesh)
    got = jax.tree.map(np.asarray, jax.device_get(other.state))
    _assert_same_params(got, want)
    leaf = other.state["params"]["layers"][0]["mlp"]["gate_proj"]
    assert len(leaf.sharding.device_set) == (1 if target == (1, 1, 1) else 8)
    other.close()
    target_ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=0)
    abstract = abstract_with_shardings(other.abstract_state, other.state_shardings)
    step, _, data_state = target_ckpt.restore_latest_intact(abstract)
    # The data position is the loader's iterator state as the trainer saved it at step 3.
    assert step == 3 and data_state == source.data_state
    assert data_state["counts"]["records"] == 3 * config.train.batch_size
    target_ckpt.close()
