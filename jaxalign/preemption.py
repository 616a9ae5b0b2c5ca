"""Stopping at a step boundary on SIGTERM or a preemption notice, agreed by every process."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class Preemption:
    """A context that turns SIGTERM into a flag checked at step boundaries.

    With several processes a local SIGTERM is only a vote: a process stopping on its
    own would leave the others waiting in their next collective. The votes are
    combined by a max over all processes that is read one step boundary later, so
    every process stops at the same step without waiting for the device each step.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.signalled = False
        self._vote: jax.Array | None = None
        self._restore: Callable[[], None] = lambda: None

    def __enter__(self) -> Preemption:
        def handler(signum, frame):
            self.signalled = True

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            return self
        self._restore = lambda: signal.signal(signal.SIGTERM, previous)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, step: int) -> bool:
        """Whether to stop after the checkpoint of ``step``."""
        if jax.process_count() == 1:
            return self.signalled
        vote, self._vote = self._vote, _any_process(self.signalled, self.mesh)
        if vote is not None and int(vote.addressable_data(0)):
            return True
        # All processes agree on the step at which to stop (JAX's preemption service).
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:
            return False


@functools.cache
def _vote_max(mesh: Mesh) -> tuple[NamedSharding, Callable[[jax.Array], jax.Array]]:
    flat = Mesh(mesh.devices.reshape(-1), ("all",))
    return (NamedSharding(flat, P("all")),
            jax.jit(jnp.max, out_shardings=NamedSharding(flat, P())))


def _any_process(flag: bool, mesh: Mesh) -> jax.Array:
    """Starts a max of ``flag`` over every process; returns it without waiting (replicated)."""
    sharding, vote_max = _vote_max(mesh)
    local = np.full((len(mesh.local_devices),), int(flag), np.int32)
    return vote_max(jax.make_array_from_process_local_data(sharding, local))
