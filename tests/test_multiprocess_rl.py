"""The online stages on 2 processes x 4 devices (jax.distributed on localhost, gloo) give
the numbers of 1 process x 8 devices, and a GRPO run killed mid-rollout resumes exactly.

GRPO (dynamic sampling over 2x the prompts, KL reference, 2 updates per rollout), PPO
(whitened advantages, 2 epochs x 2 minibatches, adaptive KL, a reward model trained
one step beforehand), one rejection-sampling round and sampled distillation batches all
score with a user's Python reward imported by its path, as does a GRPO run with its
sampler on devices of its own (2 per process) one rollout ahead of the trainer
(``tests/mp_rl_driver.py``, which runs every case in one process). Every logged
number must agree within 1e-5 and every sampler call must draw the same token ids.

The runs compile with XLA's backend optimisation off: compiling dominates these tiny
runs on a 2-core machine, and both layouts compile alike, so the comparison holds.
"""

import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_multiprocess import finish
from test_reliability import _final_params

from jaxalign.metrics import read_jsonl

# Starts processes that meet in collectives: run alone, not beside other tests.
pytestmark = [pytest.mark.slow, pytest.mark.serial]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "mp_rl_driver.py")
CASES = ("grpo", "async", "rm", "ppo", "rejection", "distill")
SAMPLED = ("grpo", "async", "ppo", "rejection", "distill")  # the cases that sample
# Throughput and timing vary from run to run; every other logged number must not.
_TIMING = ("tokens_per_s", "positions_per_s", "mfu", "time/", "time_frac/", "rollout/overlap")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(root, processes, cases, pipe_first=False, models=""):
    """Starts the driver as ``processes`` processes; each writes ``root/process<i>.log``
    (process 0 to a pipe instead with ``pipe_first``)."""
    os.makedirs(root, exist_ok=True)
    port, procs = _free_port(), []
    for pid in range(processes):
        env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(8 // processes), PYTHONUNBUFFERED="1",
                   PYTHONFAULTHANDLER="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                             "--xla_backend_optimization_level=0".strip())
        if processes > 1:
            env.update(JAXALIGN_COORDINATOR_ADDRESS=f"localhost:{port}",
                       JAXALIGN_NUM_PROCESSES=str(processes), JAXALIGN_PROCESS_ID=str(pid))
        out = (subprocess.PIPE if pipe_first and pid == 0
               else open(os.path.join(root, f"process{pid}.log"), "a"))
        procs.append(subprocess.Popen([sys.executable, DRIVER, root, ",".join(cases), models],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      text=True))
        if out is not subprocess.PIPE:
            out.close()
    return procs


def _finish(root, procs, timeout=600):
    """Waits for the processes logging under ``root`` (see ``test_multiprocess.finish``)."""
    return finish(procs, root, timeout)


def _rows(path):
    """Every logged row, without timing and throughput."""
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case on 1 process x 8 devices, then on 2 processes x 4 devices (with the
    first run's reward model and distillation teacher)."""
    base = tmp_path_factory.mktemp("mp_rl")
    one, two = str(base / "one"), str(base / "two")
    _finish(one, _start(one, 1, CASES))
    logs = _finish(two, _start(two, 2, CASES, models=one))
    assert "on 8 of 8 cpu devices" in logs[0]
    return one, two


def test_two_processes_match_one(runs):
    one, two = runs
    for case in (*CASES, "rejection/round_0"):
        a = _rows(os.path.join(one, case, "metrics.jsonl"))
        b = _rows(os.path.join(two, case, "metrics.jsonl"))
        assert [(r["step"], r["split"], sorted(r)) for r in a] == [
            (r["step"], r["split"], sorted(r)) for r in b], case
        for ra, rb in zip(a, b, strict=True):
            for key, value in ra.items():
                if isinstance(value, (int, float)):
                    assert abs(value - rb[key]) <= 1e-5, (case, ra["step"], key, value, rb[key])
    for case in SAMPLED:
        a = np.load(os.path.join(one, case, "samples.npz"))
        b = np.load(os.path.join(two, case, "samples.npz"))
        assert len(a.files) >= 2 and a.files == b.files, case
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{case} {name}")
    # The Python reward ran, and GRPO trained on informative groups.
    grpo = read_jsonl(os.path.join(one, "grpo", "metrics.jsonl"))
    assert all("reward/mp_rl_driver.overlap_reward" in r for r in grpo)
    assert any(r["groups/informative_kept"] > 0 for r in grpo)
    assert all("reward/rm" in r for r in read_jsonl(os.path.join(one, "ppo", "metrics.jsonl")))


def test_kill_mid_rollout_resumes_exactly(runs, tmp_path):
    """Both processes killed (-9) mid-rollout; rerun, they resume from the last rollout
    boundary and end bitwise equal to the uninterrupted 2-process run."""
    _, two = runs
    root = str(tmp_path)
    procs = _start(root, 2, ["grpo"], pipe_first=True)
    try:
        for line in procs[0].stdout:
            found = re.match(r"step +(\d+)/", line)
            if found and int(found[1]) >= 3:  # step 4 finishes that rollout
                break
        else:
            pytest.fail("the run ended before step 3")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = _finish(root, _start(root, 2, ["grpo"]))
    assert "starting at step 2" in logs[0]
    want_step, want = _final_params(os.path.join(two, "grpo"))
    got_step, got = _final_params(os.path.join(root, "grpo"))
    assert got_step == want_step == 6
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (_rows(os.path.join(root, "grpo", "metrics.jsonl"))
            == _rows(os.path.join(two, "grpo", "metrics.jsonl")))
