"""Batch columns computed once by a frozen model and cached in the workdir.

The precomputed DPO reference is the main user: before training, one pass over
the exact batches the run will see (the iterator is deterministic) stores the
reference log-probs of every pair; the train step then reads them from the
batch instead of running a second model. The cache is keyed by the settings
that determine its contents, so a resumed run reloads it and a changed run
recomputes it.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign import storage

ColumnsFn = Callable[[Any, Mapping[str, jax.Array]], dict[str, jax.Array]]


def _gather(tree: Any) -> dict[str, np.ndarray]:
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return {k: np.asarray(v) for k, v in jax.device_get(tree).items()}


def _local_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """This process's contiguous block of a global per-row column."""
    start = jax.process_index() * rows
    return x[start:start + rows]


def params_digest(params: Any) -> str:
    """A digest of a parameter tree's values (per leaf: shape, sum and sum of squares in
    float32, reduced on device); equal trees on the same mesh give equal digests."""

    @jax.jit
    def stats(tree):
        return [jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.square(
            x.astype(jnp.float32)))]) for x in jax.tree.leaves(tree)]

    # each result is replicated: every process reads its own copy
    values = [np.asarray(v.addressable_data(0)).tolist() for v in stats(params)]
    shapes = [list(x.shape) for x in jax.tree.leaves(params)]
    return hashlib.sha256(json.dumps([shapes, values]).encode()).hexdigest()


def _stack(columns: list[np.ndarray]) -> np.ndarray:
    """Per-batch columns stacked on a new step axis.

    Per-slot columns (``[b, s, ...]``, packed pairs or loss positions: ``s`` is the
    batch's width) are padded with zeros to the widest, then cut after the last slot any
    batch fills: a slot no row uses holds 0, which is what the reader pads with again.
    """
    if columns[0].ndim < 2:
        return np.stack(columns)

    def used(c: np.ndarray) -> np.ndarray:
        filled = np.flatnonzero(c.reshape(c.shape[0], c.shape[1], -1).any(axis=(0, 2)))
        return c[:, :int(filled[-1]) + 1] if len(filled) else c[:, :1]

    # Each batch's own used slots first, so no [steps, b, width] copy is ever held.
    parts = [used(c) for c in columns]
    s = max(c.shape[1] for c in parts)
    return np.stack([np.pad(c, ((0, 0), (0, s - c.shape[1])) + ((0, 0),) * (c.ndim - 2))
                     for c in parts])


class PrecomputedColumns:
    """Per-row columns for the train batches (cached on disk) and eval batches (in memory)."""

    def __init__(self, path: str, fingerprint: Mapping[str, Any], columns_fn: Callable,
                 mesh: Mesh, device_fields: Callable[[dict], dict]):
        self.path = path
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str)
                                  .encode()).hexdigest()
        self.columns_fn = columns_fn
        self.mesh = mesh
        self.device_fields = device_fields
        self.train: dict[str, np.ndarray] | None = None
        self.eval: list[dict[str, np.ndarray]] | None = None

    def _compute(self, batches: Iterator[dict]) -> list[dict[str, np.ndarray]]:
        return [_gather(self.columns_fn(shd.global_batch(self.device_fields(host), self.mesh)))
                for host in batches]

    def prepare_train(self, make_iterator: Callable[[], Any], steps: int) -> bool:
        """Loads the cache or computes it over batches ``0..steps-1``; True if computed."""
        if storage.exists(self.path):
            try:
                # allow_pickle=False (numpy's default, spelled out): a planted pickle in
                # the workdir is refused, never unpickled.
                with np.load(io.BytesIO(storage.read_bytes(self.path)),
                             allow_pickle=False) as f:
                    if str(f["key"]) == self.key:
                        self.train = {k: f[k] for k in f.files if k != "key"}
                        return False
                logging.warning("%s was computed for other settings; recomputing", self.path)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logging.warning("%s is unreadable (%s: %s); recomputing", self.path,
                                type(e).__name__, e)
        it = make_iterator()
        try:
            rows = self._compute(next(it) for _ in range(steps))
        finally:
            it.close()
        self.train = {k: _stack([r[k] for r in rows]) for k in rows[0]}
        if jax.process_index() == 0:
            buf = io.BytesIO()
            np.savez(buf, key=np.asarray(self.key), **self.train)
            storage.write_bytes(self.path, buf.getvalue())
        return True

    def for_train_batch(self, step: int, local_rows: int) -> dict[str, np.ndarray]:
        return {k: _local_rows(v[step], local_rows) for k, v in self.train.items()}

    def for_eval_batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Eval batches with their columns (computed on the first eval, then reused)."""
        batches = list(batches)
        if self.eval is None:
            self.eval = self._compute(iter(batches))
        for host, cols in zip(batches, self.eval, strict=True):
            rows = len(next(iter(self.device_fields(host).values())))
            yield {**host, **{k: _local_rows(v, rows) for k, v in cols.items()}}
