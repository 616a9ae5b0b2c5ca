"""Kill -9 (SFT, DPO, GRPO) and SIGTERM resume, damaged checkpoints, failed saves,
exploding losses, restore onto other meshes."""

import errno
import glob
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.path import async_path
from presets import preset

from jaxalign.checkpoint import (
    MANIFEST,
    Checkpointer,
    CheckpointSaveError,
    abstract_with_shardings,
)
from jaxalign.mesh import make_mesh
from jaxalign.metrics import read_jsonl
from jaxalign.train import Trainer

# Orbax's writers that a failed save abandons are garbage-collected during later tests.
pytestmark = pytest.mark.filterwarnings(
    "ignore:coroutine 'async_serialize_from_host.<locals>.write_fragment' was never awaited")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ASYNC = {"checkpoint.async_save": True, "data.eval": "", "train.log_every": 1}
# Per stage: overrides of its test preset and the steps after which the kills land.
# GRPO scores with a dense reward (groups are rarely flat, so every update moves the
# params) and splits each rollout into 2 updates, so kills also land mid-rollout.
STAGES = {
    "sft": ({**_ASYNC, "train.steps": 16, "checkpoint.save_every": 4}, (3, 7, 11)),
    "dpo": ({**_ASYNC, "train.steps": 16, "checkpoint.save_every": 4}, (3, 7, 11)),
    "grpo": ({**_ASYNC, "train.steps": 12, "checkpoint.save_every": 2, "rl.minibatches": 2,
              "rl.rewards": "answer_similarity,length_penalty:0.5"}, (3, 5, 9)),
}
# Throughput and timing vary from run to run; every other logged number must not.
_TIMING = ("tokens_per_s", "positions_per_s", "mfu", "time/", "time_frac/")


def _flag(key, value):
    return f"--config.{key}={value}"


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """One persistent compilation cache for every run of this module.

    Compiling dominates a tiny run's start; later runs load the reference run's
    executables, which are the same binaries, so the bitwise comparisons still hold.
    """
    return str(tmp_path_factory.mktemp("xla_cache"))


def _launch(workdir, stage, cache):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    flags = [_flag(k, v) for k, v in STAGES[stage][0].items()]
    return subprocess.Popen(
        [sys.executable, "-m", "launch.train", f"--config=configs/{stage}.py:test",
         f"--workdir={workdir}", *flags],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_to_end(workdir, stage, cache):
    proc = _launch(workdir, stage, cache)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _wait_for_step(proc, step, lines):
    """Reads output until the progress line of ``step`` or a later step appears."""
    for line in proc.stdout:
        lines.append(line)
        found = re.match(r"step +(\d+)/", line)
        if found and int(found[1]) >= step:
            return True
    return False


def _final_params(workdir):
    """The step and params of the newest checkpoint in ``workdir``, on one device.

    The restore target comes from the checkpoint's own metadata: no trainer (and no
    compile) is needed to read a run's result.
    """
    directory = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(directory, save_every=1, keep=0)
    meta = ocp.StandardCheckpointer().metadata(
        os.path.join(directory, str(ckpt.latest_step()), "state"))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          meta.item_metadata.tree)
    step, state, _ = ckpt.restore_latest_intact(target)
    ckpt.close()
    return step, jax.tree.map(np.asarray, jax.device_get(state["params"]))


def _losses(workdir):
    """Every deterministic number of every logged training step, by step."""
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(_TIMING)}
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


class _References:
    """Uninterrupted runs per stage, started on demand and shared by the module's tests.

    A reference run is started next to the first killed run of its stage: the two
    compile on the two cores at once.
    """

    def __init__(self, tmp_path_factory, cache):
        self._factory, self._cache = tmp_path_factory, cache
        self._running, self._done = {}, {}

    def start(self, stage):
        if stage not in self._running and stage not in self._done:
            workdir = str(self._factory.mktemp(f"reference_{stage}"))
            self._running[stage] = workdir, _launch(workdir, stage, self._cache)

    def __call__(self, stage):
        """``(workdir, (step, params), metrics by step)`` of the finished reference run."""
        self.start(stage)
        if stage in self._running:
            workdir, proc = self._running.pop(stage)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
            self._done[stage] = workdir, _final_params(workdir), _losses(workdir)
        return self._done[stage]

    def close(self):
        for _, proc in self._running.values():
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def references(tmp_path_factory, xla_cache):
    refs = _References(tmp_path_factory, xla_cache)
    yield refs
    refs.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigkill_at_random_moments_resumes_exactly(tmp_path, references, xla_cache, stage):
    """3 SIGKILLs per stage (mid-step, mid async save, mid-rollout for GRPO), then resume."""
    overrides, targets = STAGES[stage]
    workdir = str(tmp_path / "killed")
    rng = random.Random(stage)
    kills = 0
    for kill_after in targets:  # kill at or shortly after these steps
        proc = _launch(workdir, stage, xla_cache)
        references.start(stage)
        lines = []
        if not _wait_for_step(proc, kill_after, lines):
            proc.wait()
            pytest.fail("".join(lines))
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    _run_to_end(workdir, stage, xla_cache)
    assert kills == 3
    _, (ref_step, ref_params), ref_losses = references(stage)
    step, params = _final_params(workdir)
    assert step == ref_step == overrides["train.steps"]
    _assert_same_params(params, ref_params)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, step + 1))
    assert len({row["loss"] for row in losses.values()}) > step // 2  # not a constant
    assert losses == ref_losses


@pytest.mark.slow
def test_sigterm_checkpoints_at_step_boundary_and_resumes(tmp_path, references, xla_cache):
    _, (_, ref_params), ref_losses = references("sft")
    workdir = str(tmp_path / "term")
    proc = _launch(workdir, "sft", xla_cache)
    lines = []
    assert _wait_for_step(proc, 6, lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM" in out
    saved = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=0)
    stopped_at = saved.latest_step()
    saved.close()
    assert 6 <= stopped_at < STAGES["sft"][0]["train.steps"]
    _run_to_end(workdir, "sft", xla_cache)
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


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def mesh_source(tmp_path_factory):
    """A checkpoint written on 8 devices as (data, fsdp, tensor) = (2, 2, 2)."""
    # One record per row, so the saved position counts exactly 3 batches of records
    # (packing reads a window of records ahead).
    config = _config(**{"train.steps": 3, "checkpoint.save_every": 3, "data.eval": "",
                        "data.pack": False})
    workdir = str(tmp_path_factory.mktemp("mesh_source"))
    source = Trainer(config, workdir, mesh=make_mesh(dict(data=2, fsdp=2, tensor=2)))
    source.fit()
    source.close()
    return config, workdir, jax.tree.map(np.asarray, jax.device_get(source.state)), \
        source.data_state


@pytest.mark.slow
@pytest.mark.parametrize("target", [(1, 1, 1), (4, 2, 1)])
def test_restore_onto_another_mesh(mesh_source, target):
    config, workdir, want, source_data_state = mesh_source
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
    assert step == 3 and data_state == source_data_state
    assert data_state["counts"]["records"] == 3 * config.train.batch_size
    target_ckpt.close()


# Where Orbax's writer is made to fail: creating the step's directory (a read-only
# directory; chmod would not stop the root user tests may run as) or writing its
# metadata after the arrays (a full disk), in an async and a synchronous save.
SAVE_FAULTS = [("mkdir", errno.EACCES, "Permission denied", False),
               ("write_text", errno.ENOSPC, "No space left on device", True)]


# Orbax's failed async writers leave a closed event loop behind; that is its noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("where,code,text,async_save", SAVE_FAULTS)
def test_failed_save_stops_loudly_and_keeps_older_checkpoints(tmp_path, monkeypatch, where,
                                                              code, text, async_save):
    config = _config(**{"train.steps": 8, "checkpoint.save_every": 2, "data.eval": "",
                        "checkpoint.async_save": async_save})
    workdir = str(tmp_path / "w")
    trainer = Trainer(config, workdir)
    saved, start_save = {}, trainer.checkpointer.save

    async def fail(*args, **kwargs):
        raise OSError(code, text)

    def save(step, state, data_state, **kw):
        if step == 4:  # the disk fills up (or turns read-only) after the first checkpoint
            trainer.checkpointer.wait()
            monkeypatch.setattr(async_path, where, fail)
        saved.setdefault(step, jax.tree.map(np.asarray, jax.device_get(state["params"])))
        return start_save(step, state, data_state, **kw)

    monkeypatch.setattr(trainer.checkpointer, "save", save)
    ckpt = os.path.join(workdir, "checkpoints")
    with pytest.raises(CheckpointSaveError) as err:
        trainer.fit()
    trainer.close()
    message = str(err.value)
    assert message.startswith(f"writing checkpoint step 4 to {ckpt} failed (")
    assert re.search(rf"\[Errno {code}\] {text}\)\. Earlier checkpoints are untouched "
                     r"\(the latest is step 2\)", message), message
    # The run stops at once, or for an async save when the next one waits for it.
    assert int(jax.device_get(trainer.state["step"])) == (6 if async_save else 4)
    monkeypatch.undo()
    check = Checkpointer(ckpt, save_every=1, keep=0)
    assert check.all_steps() == [2]
    abstract = abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    step, state, _ = check.restore_latest_intact(abstract)
    check.close()
    assert step == 2
    _assert_same_params(jax.tree.map(np.asarray, jax.device_get(state["params"])), saved[2])


@pytest.mark.slow
def test_exploding_loss_stops_with_step_metric_and_last_good_checkpoint(tmp_path):
    """A learning rate of 1e6 (a typo for 1e-6) is caught before it is logged or saved."""
    log_every = 5
    config = _config(**{"train.steps": 20, "train.log_every": log_every, "data.eval": "",
                        "optim.learning_rate": 1e6, "checkpoint.save_every": 1})
    workdir = str(tmp_path / "w")
    ckpt = os.path.join(workdir, "checkpoints")
    trainer = Trainer(config, workdir)
    with pytest.raises(FloatingPointError) as err:
        trainer.fit()
    trainer.close()
    found = re.fullmatch(
        r"non-finite loss, gradient or update at step (\d+): the update was not applied and "
        r"the run stops \(train.nonfinite=stop\)\. At step (\d+): ((?:loss|grad_norm|update_norm)"
        r"(?: and (?:loss|grad_norm|update_norm))*) (?:is|are) non-finite \(loss=\S+, "
        r"grad_norm=\S+, update_norm=\S+\)\. Last good checkpoint: step (\d+) in (\S+)\. "
        r"Lower optim.learning_rate.*", str(err.value))
    assert found, err.value
    first, detected, last = (int(found[i]) for i in (1, 2, 4))
    assert found[5] == ckpt and "nan" in str(err.value)
    assert first <= detected < first + log_every  # within one logging interval
    # No checkpoint holds a state after the first non-finite update; the last one restores.
    saved = Checkpointer(ckpt, save_every=1, keep=0)
    assert last == max(saved.all_steps()) == first - 1
    step, state, _ = saved.restore_latest_intact(
        abstract_with_shardings(trainer.abstract_state, trainer.state_shardings))
    saved.close()
    assert step == last
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))
