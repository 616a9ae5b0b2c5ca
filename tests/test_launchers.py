"""Multi-host settings from the environment (explicit, JAX's, SLURM), launch scripts, configs."""

import ast
import glob
import os
import subprocess

import pytest

from jaxalign.mesh import distributed_settings, slurm_first_host, slurm_tasks_on_node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _srun(**extra):
    """What srun sets for task 5 of 16 (2 nodes x 8 tasks), on the second node."""
    env = dict(SLURM_JOB_ID="4242", SLURM_PROCID="13", SLURM_LOCALID="5", SLURM_NODEID="1",
               SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16",
               SLURM_STEP_NODELIST="gpu[017-018]", SLURM_JOB_NODELIST="gpu[017-018]",
               SLURM_STEP_TASKS_PER_NODE="8(x2)", SLURM_TASKS_PER_NODE="8(x2)",
               CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    env.update(extra)
    return env


def test_nothing_set_is_a_single_process():
    assert distributed_settings({}) is None
    # The batch script itself (no srun step) must not wait for peers.
    batch = {k: v for k, v in _srun().items() if not k.startswith("SLURM_STEP")}
    assert distributed_settings(batch) is None


def test_explicit_and_jax_variables():
    assert distributed_settings(dict(JAXALIGN_COORDINATOR_ADDRESS="h:1234",
                                     JAXALIGN_NUM_PROCESSES="4", JAXALIGN_PROCESS_ID="3")) == \
        dict(coordinator_address="h:1234", num_processes=4, process_id=3)
    assert distributed_settings(dict(JAX_COORDINATOR_ADDRESS="h:1")) == {}
    # auto outside SLURM (a TPU pod): JAX discovers the cluster.
    assert distributed_settings(dict(JAXALIGN_DISTRIBUTED="auto")) == {}
    with pytest.raises(ValueError, match="JAXALIGN_DISTRIBUTED='yes'"):
        distributed_settings(dict(JAXALIGN_DISTRIBUTED="yes"))


def test_slurm_one_process_per_gpu():
    want = dict(coordinator_address=f"gpu017:{61440 + 4242 % 4096}", num_processes=16,
                process_id=13, local_device_ids=[5])
    assert distributed_settings(_srun(JAXALIGN_DISTRIBUTED="slurm")) == want
    assert distributed_settings(_srun(JAXALIGN_DISTRIBUTED="auto")) == want
    # SLURM already bound one GPU to each task (--gpus-per-task=1): use what is visible.
    bound = distributed_settings(_srun(JAXALIGN_DISTRIBUTED="slurm", CUDA_VISIBLE_DEVICES="5"))
    assert "local_device_ids" not in bound


def test_slurm_one_process_per_node_and_overrides():
    env = _srun(JAXALIGN_DISTRIBUTED="slurm", SLURM_PROCID="1", SLURM_LOCALID="0",
                SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
                SLURM_TASKS_PER_NODE="1(x2)", JAXALIGN_COORDINATOR_PORT="5555")
    assert distributed_settings(env) == dict(coordinator_address="gpu017:5555",
                                             num_processes=2, process_id=1)
    env["JAXALIGN_COORDINATOR_ADDRESS"] = "10.0.0.1:7000"
    assert distributed_settings(env)["coordinator_address"] == "10.0.0.1:7000"
    one_task = _srun(JAXALIGN_DISTRIBUTED="slurm", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")
    assert distributed_settings(one_task) is None
    with pytest.raises(ValueError, match="srun"):
        distributed_settings(dict(JAXALIGN_DISTRIBUTED="slurm", SLURM_JOB_ID="1"))


def test_slurm_node_lists_and_task_counts():
    assert slurm_first_host("node7") == "node7"
    assert slurm_first_host("a1,b2") == "a1"
    assert slurm_first_host("gpu[003-005,009],cpu1") == "gpu003"
    assert slurm_first_host("gpu[009,003-005]") == "gpu009"
    assert slurm_first_host("rack[2-3]-n[07,09],x") == "rack2-n07"
    assert [slurm_tasks_on_node("8(x2),4", i) for i in range(3)] == [8, 8, 4]
    assert slurm_tasks_on_node("1", 0) == 1
    with pytest.raises(ValueError):
        slurm_tasks_on_node("eight", 0)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["launch/tpu_pod.sh", "launch/slurm.sbatch"])
def test_launch_scripts_are_valid_bash(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)


def test_every_config_file_starts_with_its_launch_command():
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        if os.path.basename(path) == "__init__.py":
            continue
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        assert "python -m launch." in doc, f"{path}: the docstring shows no launch command"
