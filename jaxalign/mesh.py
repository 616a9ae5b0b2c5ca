"""Device mesh from config, and multi-host initialisation."""

from __future__ import annotations

import os
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
    ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``). On a
    TPU pod or under SLURM, ``JAXALIGN_DISTRIBUTED=auto`` lets JAX discover them.
    On one host with none of these set this is a no-op.
    """
    if jax.distributed.is_initialized():
        return
    if any(os.environ.get(k) for k in ("JAXALIGN_DISTRIBUTED", "JAXALIGN_COORDINATOR_ADDRESS",
                                       "JAX_COORDINATOR_ADDRESS")):
        # CPU processes need gloo for cross-process collectives; other backends ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if os.environ.get("JAXALIGN_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
    elif os.environ.get("JAXALIGN_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAXALIGN_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAXALIGN_NUM_PROCESSES"]),
            process_id=int(os.environ["JAXALIGN_PROCESS_ID"]),
        )
    elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


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

