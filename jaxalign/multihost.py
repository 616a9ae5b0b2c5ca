"""Host data shared by the processes of a multi-process run (``jax.distributed``).

The online stages (RL rollouts, sampled distillation batches, rejection sampling and the
generation evals) sample on the run's global mesh but decode, score and lay out their
batches on the host. They follow one convention, so that any number of processes gives
the numbers of one:

* a process's *share* of a batch is a contiguous block of its rows, in process order:
  the prompt loader hands process ``p`` block ``p`` of every global batch
  (``jaxalign.data.loader``), and :func:`process_share` names the same block of
  anything derived from those rows (e.g. their ``G`` samples each);
* :func:`gather_rows` / :func:`gather_objects` concatenate every process's share
  (arrays with any row count, picklable objects such as prompt records), so every
  process then holds the whole batch and runs the same host code on it;
* :func:`global_rows` puts host arrays that every process holds whole on the mesh,
  row-sharded (or replicated when the rows do not split over the data-parallel
  devices): each device takes its own rows, whatever the processes' device order;
* :func:`fetch` brings global arrays (addressable or not) back whole to every process.

Gathers are collectives: every process must make the same calls in the same order. On
one process each function is the identity or a plain ``device_put``/``device_get``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxalign import sharding as shd


def process_share(n: int, index: int | None = None, count: int | None = None) -> slice:
    """This process's contiguous block of ``n`` rows (blocks differ by at most one row).

    Args:
      n: rows of the whole batch.
      index, count: the process and the number of processes (default: this run's).
    """
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def _stacked(x: np.ndarray) -> np.ndarray:
    """``[processes, *x.shape]``: every process's ``x`` (same shape everywhere)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def _gather_bytes(blob: bytes) -> list[bytes]:
    """Every process's ``blob``, in process order: two small collectives.

    Payloads are padded to a power of two bytes, so a run compiles the all-gather for
    a handful of sizes only.
    """
    sizes = _stacked(np.asarray([len(blob)], np.int64))[:, 0]
    padded = np.zeros(1 << max(int(sizes.max()) - 1, 0).bit_length(), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    stacked = _stacked(padded)
    return [stacked[p, :size].tobytes() for p, size in enumerate(sizes)]


def gather_objects(items: Sequence[Any]) -> list[Any]:
    """Every process's ``items`` (picklable) concatenated in process order."""
    if jax.process_count() == 1:
        return list(items)
    out: list[Any] = []
    for blob in _gather_bytes(pickle.dumps(list(items))):
        # Our own processes' bytes, pickled just above by the same code.
        out += pickle.loads(blob)  # noqa: S301
    return out


def gather_tree(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Every process's rows of each array of a flat dict, concatenated in process order
    (on every process), in one exchange. Row counts may differ between processes; the
    other dimensions and the dtypes must not."""
    tree = {k: np.asarray(v) for k, v in tree.items()}
    if jax.process_count() == 1:
        return tree
    parts = [pickle.loads(b) for b in _gather_bytes(pickle.dumps(tree))]  # noqa: S301
    return {k: np.concatenate([p[k] for p in parts]) for k in tree}


def gather_rows(x: Any) -> np.ndarray:
    """Every process's rows of ``x`` concatenated in process order (on every process);
    see :func:`gather_tree`."""
    return gather_tree({"x": x})["x"]


def agree_max(value: int) -> int:
    """The largest ``value`` of any process (e.g. a padded width all must share)."""
    if jax.process_count() == 1:
        return int(value)
    return int(_stacked(np.asarray([value], np.int64)).max())


def global_rows(arrays: Mapping[str, np.ndarray], mesh: Mesh, *,
                replicate_uneven: bool = False) -> dict[str, jax.Array]:
    """Host arrays that every process holds whole, as global arrays on ``mesh``.

    Rows are sharded over the data-parallel axes (``data``, ``fsdp``). With
    ``replicate_uneven``, arrays whose rows do not split evenly over those devices are
    replicated instead (e.g. a rollout's few prompts; their samples are sharded).
    """
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        sharding = (shd.replicated(mesh) if replicate_uneven and v.shape[0] % dp
                    else shd.batch_sharding(mesh, v.ndim))
        out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    return out


def fetch(tree: Any) -> Any:
    """The whole value of every array of ``tree`` as numpy, on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def whole(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(whole, tree)
