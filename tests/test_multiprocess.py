"""Two processes on localhost (jax.distributed, gloo) train exactly like one."""

import os
import shutil
import signal
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


def _start(workdir, processes, flags=FLAGS):
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(8 // processes), PYTHONUNBUFFERED="1")
        if processes > 1:
            env.update(JAXALIGN_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAXALIGN_NUM_PROCESSES=str(processes), JAXALIGN_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *flags], cwd=ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _train(workdir, processes):
    procs = _start(workdir, processes)
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


def test_sigterm_on_one_process_stops_all_at_the_same_step(tmp_path):
    """Only process 1 is told to stop; both checkpoint the same step and exit cleanly."""
    steps = 40
    flags = [*(f for f in FLAGS if "train.steps" not in f and "save_every" not in f),
             f"--config.train.steps={steps}", "--config.checkpoint.save_every=1000"]
    workdir = str(tmp_path / "w")
    procs = _start(workdir, 2, flags)
    lines = []
    try:
        for line in procs[0].stdout:  # progress lines come from process 0 only
            lines.append(line)
            if line.startswith("step  3/"):
                procs[1].send_signal(signal.SIGTERM)
                break
        # Processes that disagree on the stop step hang in their next collective.
        outs = ["".join(lines) + procs[0].communicate(timeout=120)[0],
                procs[1].communicate(timeout=120)[0]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert "stopped by SIGTERM" in out, out
    stopped = int(next(ln for ln in outs[0].splitlines() if ln.startswith("preempted at step"))
                  .split()[3].rstrip(":"))
    # The only checkpoint is the one both processes wrote at the agreed step.
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    assert 3 <= stopped < steps
