"""Two processes on localhost (jax.distributed, gloo) train exactly like one."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from jaxalign.metrics import read_jsonl

# Starts processes that meet in collectives: run alone, not beside other tests.
pytestmark = [pytest.mark.slow, pytest.mark.serial]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One record per row: packing fills rows within each process's share of the records, so
# packed batches (not their loss) depend on the process count.
FLAGS = ["--config=configs/sft.py:test", "--config.train.steps=8", "--config.train.log_every=1",
         "--config.checkpoint.save_every=4", "--config.data.eval=", "--config.mesh.data=8",
         "--config.data.pack=false"]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(workdir, processes, flags=FLAGS, log_dir=None):
    """Starts the processes; with ``log_dir`` each writes to its own file there (no pipe
    to fill while another process is being waited on), else to a pipe."""
    port = _free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(8 // processes), PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1")
        if processes > 1:
            env.update(JAXALIGN_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAXALIGN_NUM_PROCESSES=str(processes), JAXALIGN_PROCESS_ID=str(pid))
        out = (open(os.path.join(log_dir, f"process{pid}.log"), "w") if log_dir
               else subprocess.PIPE)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *flags], cwd=ROOT,
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
        if log_dir:
            out.close()
    return procs


def _train(workdir, processes, timeout=300):
    """Runs to the end (see :func:`finish`); returns each process's log."""
    log_dir = tempfile.mkdtemp(prefix="mp-logs-", dir=os.path.dirname(workdir))
    return finish(_start(workdir, processes, log_dir=log_dir), log_dir, timeout)


def finish(procs, log_dir, timeout=600):
    """Waits for every process (each logging to ``log_dir/process<i>.log``); on a timeout
    or a failed process, every process still running dumps its Python stacks
    (faulthandler, SIGABRT) into its log, which the failure shows. Returns the logs."""
    deadline = time.monotonic() + timeout
    # Stop waiting at the first failure too: the others then wait in a barrier for good.
    while (time.monotonic() < deadline and any(p.poll() is None for p in procs)
           and not any(p.poll() for p in procs)):
        time.sleep(0.2)
    hung = [i for i, p in enumerate(procs) if p.poll() is None]
    for i in hung:
        procs[i].send_signal(signal.SIGABRT)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    outs = []
    for i in range(len(procs)):
        with open(os.path.join(log_dir, f"process{i}.log")) as f:
            outs.append(f.read())
    logs = "\n".join(f"--- process {i} ---\n{o[-6000:]}" for i, o in enumerate(outs))
    assert not hung, f"processes {hung} still running (after a failure or {timeout}s):\n{logs}"
    for p in procs:
        assert p.returncode == 0, logs
    return outs


def _losses(workdir):
    return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"]


def test_two_processes_match_one_and_resume(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _train(one, 1)
    outs = _train(two, 2)
    assert "on 8 of 8 cpu devices" in outs[0]  # progress lines come from process 0 only
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
