"""Device mesh from config, and multi-host initialisation."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when launched as one of several processes.

    Multi-host runs set ``JAXALIGN_COORDINATOR_ADDRESS`` (host:port),
    ``JAXALIGN_NUM_PROCESSES`` and ``JAXALIGN_PROCESS_ID`` (or JAX's own
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), or
    ``JAXALIGN_DISTRIBUTED``: ``slurm`` reads SLURM's task variables (see
    :func:`slurm_settings`), ``auto`` does so inside a SLURM step and otherwise lets
    JAX discover the cluster (TPU pods). On one host with none of these set this is
    a no-op.
    """
    if jax.distributed.is_initialized():
        return
    settings = distributed_settings(os.environ)
    if settings is None:
        return
    # CPU processes need gloo for cross-process collectives; other backends ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def distributed_settings(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments the environment asks for.

    Returns:
      ``None`` when this is the only process (nothing to initialise), ``{}`` when
      JAX should discover the cluster itself, else explicit keyword arguments.

    Raises:
      ValueError: ``JAXALIGN_DISTRIBUTED`` has an unknown value, or asks for SLURM
        outside a SLURM job step.
    """
    mode = env.get("JAXALIGN_DISTRIBUTED", "")
    if mode not in ("", "auto", "slurm"):
        raise ValueError(f"JAXALIGN_DISTRIBUTED={mode!r}; expected auto or slurm")
    if mode == "slurm" or (mode == "auto" and "SLURM_PROCID" in env
                           and _slurm_step_nodelist(env)):
        return slurm_settings(env)
    if mode == "auto":
        return {}
    if env.get("JAXALIGN_COORDINATOR_ADDRESS"):
        return dict(coordinator_address=env["JAXALIGN_COORDINATOR_ADDRESS"],
                    num_processes=int(env["JAXALIGN_NUM_PROCESSES"]),
                    process_id=int(env["JAXALIGN_PROCESS_ID"]))
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return {}
    return None


def _slurm_step_nodelist(env: Mapping[str, str]) -> str:
    # Only srun sets the step's variables: the batch script itself (where
    # SLURM_PROCID is 0 of all the job's tasks) must not wait for peers.
    return env.get("SLURM_STEP_NODELIST", "")


def slurm_settings(env: Mapping[str, str]) -> dict[str, Any] | None:
    """``jax.distributed`` arguments for one task of an ``srun`` job step.

    One process per node or one per GPU both work. The coordinator is the step's
    first node, on ``JAXALIGN_COORDINATOR_PORT`` (default: a port derived from the
    job id, so concurrent jobs on shared nodes differ);
    ``JAXALIGN_COORDINATOR_ADDRESS`` overrides both. With several tasks on a node
    that each see all of its GPUs, task ``SLURM_LOCALID`` takes GPU ``SLURM_LOCALID``;
    a task that SLURM already bound to one GPU (``--gpus-per-task=1``) or the only
    task on its node uses every GPU it sees.

    Returns:
      ``None`` for a one-task step, else keyword arguments for ``initialize``.

    Raises:
      ValueError: a SLURM variable is missing (not inside ``srun``).
    """
    nodelist = _slurm_step_nodelist(env)
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    if not nodelist or missing:
        raise ValueError("JAXALIGN_DISTRIBUTED=slurm needs the variables srun sets "
                         f"(missing: {missing or ['SLURM_STEP_NODELIST']}); launch the "
                         "command with srun inside the allocation")
    num_processes = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    if num_processes == 1:
        return None
    port = env.get("JAXALIGN_COORDINATOR_PORT") or str(
        61440 + int(env["SLURM_JOB_ID"]) % 4096)
    coordinator = (env.get("JAXALIGN_COORDINATOR_ADDRESS")
                   or f"{slurm_first_host(nodelist)}:{port}")
    settings: dict[str, Any] = dict(coordinator_address=coordinator,
                                    num_processes=num_processes,
                                    process_id=int(env["SLURM_PROCID"]))
    per_node = slurm_tasks_on_node(
        env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"),
        int(env.get("SLURM_NODEID", "0")))
    visible = env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""
    bound_to_one = visible != "" and len(visible.split(",")) == 1
    if per_node > 1 and not bound_to_one:
        settings["local_device_ids"] = [int(env["SLURM_LOCALID"])]
    return settings


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``gpu[003-005,009],cpu1`` -> ``gpu003``)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    # Each bracket group contributes its first element ("003" of "003-005,009").
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from SLURM's compressed count (``8(x2),4`` -> 8, 8, 4)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def mesh_shape(cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
    """Resolves ``(data, fsdp, tensor)``; at most one axis may be -1 (= the rest).

    Raises:
      ValueError: the sizes do not multiply to ``num_devices``.
    """
    sizes = [int(cfg[a]) for a in MESH_AXES]
    desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh ({desc}): at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh ({desc}): sizes must be positive or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh ({desc}): {num_devices} devices are not divisible by "
                             f"the fixed axes' product {known}")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh ({desc}) has {known} devices but {num_devices} are available; "
                         "set one axis to -1 to use the rest")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh with Auto axis types."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def barrier(name: str, timeout_s: int = 900) -> None:
    """Waits until every process arrives, through the coordination service (no collectives).

    Gloo gives a process only 30 s to join the first cross-process collective; a
    process still validating data or compiling when another reaches it would make
    the run fail. Meeting here first keeps the processes in step. No-op on one process.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client's barrier has no public wrapper

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"jaxalign:{name}", timeout_in_ms=timeout_s * 1000)

