"""Two processes on localhost (jax.distributed, gloo) train exactly like one."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from jaxalign.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=configs/sft.py:test", "--config.train.steps=8", "--config.train.log_every=1",
         "--config.checkpoint.save_every=4", "--config.data.eval=", "--config.mesh.data=8"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(workdir, processes):
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(8 // processes), PYTHONUNBUFFERED="1")
        if processes > 1:
            env.update(JAXALIGN_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAXALIGN_NUM_PROCESSES=str(processes), JAXALIGN_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *FLAGS], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


def _losses(workdir):
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"]


def test_two_processes_match_one_and_resume(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train(one, 1)
    outs = _train(two, 2)
    assert "on 8 cpu devices" in outs[0]  # progress lines come from process 0 only
    np.testing.assert_allclose(_losses(two), _losses(one), atol=1e-6, rtol=0)
    assert len(_losses(two)) == 8  # only process 0 writes metrics

    # Lose the last checkpoint, as if both processes died after step 4; resume on 2.
    shutil.rmtree(os.path.join(two, "checkpoints", "8"))
    outs = _train(two, 2)
    assert "starting at step 4" in outs[0]
    np.testing.assert_allclose(_losses(two), _losses(one), atol=1e-6, rtol=0)
