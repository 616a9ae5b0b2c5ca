"""Rollouts on their own devices: the sampler's mesh, the weight hand-off, in-flight rollouts.

With ``rl.rollout_devices = n`` each process gives its last ``n / processes`` local
devices to the sampler and the training mesh (``config.mesh``) is built on the rest.
The sampler's mesh (``rl.rollout_mesh``) lays the same logical axes over its own
devices with its own sizes — e.g. all data-parallel (weights replicated) for decode
while training shards them FSDP — and before each rollout the trainer's weights are
copied across: the hand-off, one resharding transfer inside the program, whose bytes
and seconds are logged (``handoff/bytes``, ``time/handoff_s``).

With ``rl.async_steps = k > 0`` (which needs its own devices) the sampler works ``k``
rollouts ahead: while the trainer updates, the sampler's devices generate the next
rollout from weights at most ``k`` rollouts old (``jaxalign.rollout.RolloutBatches``).
A checkpoint records the in-flight rollouts themselves (finished, as host arrays:
:func:`encode_rollout`), so a resumed run trains on exactly the batches the
uninterrupted one would have — regenerating them would need the older weights.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxalign.config import section
from jaxalign.mesh import make_mesh

# Stages whose rollouts may run on their own devices (they build ``jaxalign.rollout``).
RL_STAGES = ("grpo", "ppo")


def config_keys() -> dict[str, Any]:
    """The ``rl`` keys of the sampler's devices and asynchrony, with their meanings."""
    return dict(
        rollout_devices=(0, "devices (over all processes) given to the sampler; the "
                         "training mesh uses the rest. 0 = the sampler shares the "
                         "training devices and reads the weights in place"),
        rollout_mesh=section(
            "rl.rollout_mesh", "The sampler's own mesh over rl.rollout_devices (same axes "
                               "as mesh; -1 = the rest).",
            data=(-1, "data-parallel sampler devices"),
            fsdp=(1, "devices sharding the sampler's weights ZeRO-style"),
            tensor=(1, "tensor-parallel sampler devices")),
        async_steps=(0, "rollouts the sampler works ahead of the trainer (needs "
                     "rl.rollout_devices): each batch is sampled from weights up to "
                     "async_steps rollouts old; 0 = synchronous"),
    )


def rollout_device_count(config: ml_collections.ConfigDict) -> int:
    """``rl.rollout_devices`` of an RL stage's config (0 for any other stage)."""
    if config.get("stage") not in RL_STAGES or "rl" not in config:
        return 0
    return int(config.rl.get("rollout_devices", 0))


def split_devices(n_rollout: int, devices: Sequence[jax.Device] | None = None
                  ) -> tuple[list[jax.Device], list[jax.Device]]:
    """``(training devices, sampler devices)``: each process gives its last
    ``n_rollout / processes`` local devices to the sampler.

    Raises:
      ValueError: ``n_rollout`` does not split evenly over the processes, or leaves a
        process no training device.
    """
    devices = list(jax.devices() if devices is None else devices)
    procs = sorted({d.process_index for d in devices})
    if n_rollout < 0 or n_rollout % len(procs):
        raise ValueError(f"rl.rollout_devices={n_rollout} must be a non-negative multiple of "
                         f"the {len(procs)} processes (each gives the sampler as many)")
    per = n_rollout // len(procs)
    train, rollout = [], []
    for p in procs:
        local = [d for d in devices if d.process_index == p]
        if per >= len(local):
            raise ValueError(f"rl.rollout_devices={n_rollout} leaves process {p} none of its "
                             f"{len(local)} devices for training")
        train += local[:len(local) - per]
        rollout += local[len(local) - per:]
    return train, rollout


def training_devices(config: ml_collections.ConfigDict) -> list[jax.Device] | None:
    """The devices the training mesh is built on (None: all of them)."""
    n = rollout_device_count(config)
    return split_devices(n)[0] if n else None


def check_config(config: ml_collections.ConfigDict) -> None:
    """Stops before any compute on impossible sampler-device settings."""
    rl = config.rl
    n, k = int(rl.get("rollout_devices", 0)), int(rl.get("async_steps", 0))
    if k < 0:
        raise ValueError(f"rl.async_steps={k} must be >= 0")
    if n and config.get("stage") not in RL_STAGES:
        raise ValueError(f"rl.rollout_devices={n}: only the {'/'.join(RL_STAGES)} stages "
                         f"sample on their own devices, not stage={config.get('stage')}")
    if k and not n:
        raise ValueError(f"rl.async_steps={k} needs rl.rollout_devices > 0: the sampler can "
                         "only work ahead of the trainer on devices of its own")
    if n:
        split_devices(n)


class SamplerDevices:
    """The sampler's mesh and its copy of the weights (``rl.rollout_devices > 0``).

    Args:
      config: the run's config (``rl.rollout_devices``, ``rl.rollout_mesh``).
      train_mesh: the training mesh; must not share a device with the sampler's.
      param_shardings: the training params' shardings, whose partition specs (by the
        same logical rules) are laid over the sampler's mesh.
      trainable: a bool tree like the params (LoRA: the adapters), or None (all train).
        Frozen leaves never change, so after the first hand-off only the trainable
        ones are copied; the sampler keeps its first copy of the rest.
    """

    def __init__(self, config: ml_collections.ConfigDict, train_mesh: Mesh,
                 param_shardings: Any, trainable: Any = None):
        devices = split_devices(int(config.rl.rollout_devices))[1]
        shared = set(devices) & set(train_mesh.devices.flat)
        if shared:
            raise ValueError(f"rl.rollout_devices: the training mesh already uses sampler "
                             f"device(s) {sorted(d.id for d in shared)}; build the run's "
                             "mesh without them (the default when no mesh is passed)")
        self.mesh = make_mesh(config.rl.rollout_mesh, devices)
        self.shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s.spec),
                                      param_shardings)
        self._replicate = jax.jit(lambda x: x, out_shardings=NamedSharding(
            train_mesh, jax.sharding.PartitionSpec()))
        self._trainable = (None if trainable is None
                           else [bool(t) for t in jax.tree.leaves(trainable)])
        self._frozen: list[jax.Array | None] | None = None  # the sampler's frozen leaves

    def place(self, params: Any, shardings: Any = None) -> Any:
        """A copy of ``params`` (sharded like the training params, or by ``shardings`` of
        the same structure) on the sampler's mesh.

        One process: a direct device-to-device resharding. Several: JAX reshards across
        hosts only between equal device sets, so each leaf is first gathered whole onto
        the training devices (an all-gather inside the training mesh; skipped when already
        replicated), then every process copies the pieces its sampler devices hold from
        its own replica — one leaf at a time, so at most one extra whole leaf per device.
        """
        shardings = self.shardings if shardings is None else shardings
        if jax.process_count() == 1:
            return jax.device_put(params, shardings)
        return jax.tree.map(self._place_leaf, params, shardings)

    def _place_leaf(self, x: jax.Array, target: NamedSharding) -> jax.Array:
        whole = x if x.is_fully_replicated else self._replicate(x)
        local = whole.addressable_shards[0].data
        pieces = [jax.device_put(local[idx], d)
                  for d, idx in target.addressable_devices_indices_map(x.shape).items()]
        return jax.make_array_from_single_device_arrays(x.shape, target, pieces)

    def handoff(self, params: Any) -> tuple[Any, dict[str, float]]:
        """The weights copied onto the sampler's mesh, with the copy's bytes and seconds
        (after the first hand-off, the trainable leaves only).

        Waits for the update that produced ``params`` first, so the seconds are the
        transfer's alone.
        """
        jax.block_until_ready(params)
        t0 = time.perf_counter()
        leaves, treedef = jax.tree.flatten(params)
        moved = (self._trainable if self._trainable is not None and self._frozen is not None
                 else [True] * len(leaves))
        sub = [x for x, m in zip(leaves, moved, strict=True) if m]
        sub_shardings = [s for s, m in zip(jax.tree.leaves(self.shardings), moved,
                                           strict=True) if m]
        copied = iter(jax.block_until_ready(self.place(sub, sub_shardings)))
        out = [next(copied) if m else self._frozen[i] for i, m in enumerate(moved)]
        if self._trainable is not None and self._frozen is None:
            self._frozen = [None if t else x for x, t in zip(out, self._trainable, strict=True)]
        return jax.tree.unflatten(treedef, out), {
            "time/handoff_s": time.perf_counter() - t0,
            "handoff/bytes": float(sum(x.nbytes for x in sub))}


# -- in-flight rollouts in a checkpoint --------------------------------------------------------


def _encode_array(x: np.ndarray) -> dict[str, Any]:
    x = np.ascontiguousarray(x)
    return {"dtype": x.dtype.str, "shape": list(x.shape),
            "data": base64.b64encode(x.tobytes()).decode("ascii")}


def _decode_array(d: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["data"])
    return np.frombuffer(raw, np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def encode_rollout(parts: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, float]]]
                   ) -> list[dict[str, Any]]:
    """A finished rollout's training batches (host arrays, host metrics) as JSON values."""
    return [{"host": {k: _encode_array(v) for k, v in host.items()},
             "metrics": {k: float(v) for k, v in metrics.items()}}
            for host, metrics in parts]


def decode_rollout(items: Sequence[Mapping[str, Any]]
                   ) -> list[tuple[dict[str, np.ndarray], dict[str, float]]]:
    """The inverse of :func:`encode_rollout` (bit-exact arrays)."""
    return [({k: _decode_array(v) for k, v in item["host"].items()}, dict(item["metrics"]))
            for item in items]
