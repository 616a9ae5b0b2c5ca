"""Logical axis rules: weight and activation names -> mesh axes.

Weights carry logical names (``embed``, ``mlp``, ``heads``, ...) in their
``logical_axes`` metadata; activations use a separate ``act_*`` vocabulary.
The rules table comes from config and is bound with :func:`axis_rules` inside
the traced function, so it is read at trace time only.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

# Weights shard over fsdp (ZeRO-3 style) and tensor (Megatron style); the batch
# of every activation shards over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

BATCH_AXES = ("data", "fsdp")


def rules_from_config(pairs: Sequence[Sequence[Any]]) -> dict[str, MeshAxes]:
    """Normalises a config list of ``(logical, mesh axes)`` pairs into a dict.

    Raises:
      ValueError: a pair is malformed or a logical name repeats.
    """
    rules: dict[str, MeshAxes] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"sharding rule {pair!r} must be (logical_name, mesh_axes)")
        name, axes = pair
        if name in rules:
            raise ValueError(f"sharding rule for {name!r} is given twice")
        if isinstance(axes, list | tuple):
            axes = tuple(axes) if axes else None
        rules[name] = axes
    return rules


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Maps logical dim names to a PartitionSpec on ``mesh``.

    A mesh axis is used at most once per spec (later dims lose it), axes of size
    1 are dropped, and a dim that the mapped axes do not divide is replicated.

    Raises:
      KeyError: a name has no rule.
    """
    used: set[str] = set()
    out: list[MeshAxes] = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}; add it to "
                           f"config.sharding.rules (known: {sorted(rules)})")
        axes = rules[name]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape is not None and axes and shape[i] % size:
            _warn_once(f"dim {name!r} of size {shape[i]} is not divisible by mesh axes "
                       f"{axes} (size {size}); replicating it")
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        logging.warning(msg)


class _Context(threading.local):
    def __init__(self):
        self.stack: list[tuple[Mesh, Rules]] = []


_CTX = _Context()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Binds ``mesh`` and ``rules`` for :func:`constrain` while tracing."""
    _CTX.stack.append((mesh, rules))
    try:
        yield
    finally:
        _CTX.stack.pop()


def bound_mesh_rules() -> tuple[Mesh, Rules] | None:
    """The ``(mesh, rules)`` bound by :func:`axis_rules` while tracing, or None."""
    return _CTX.stack[-1] if _CTX.stack else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; no-op when unbound."""
    if not _CTX.stack:
        return x
    mesh, rules = _CTX.stack[-1]
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key(entry: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def logical_axes_tree(abstract_state: nnx.State) -> dict:
    """Pure-dict tree of each parameter's logical axes (from ``logical_axes`` metadata).

    Raises:
      ValueError: a variable has no ``logical_axes`` or their count differs from its rank.
    """
    variables = {
        tuple(_key(e) for e in path): var
        for path, var in jax.tree_util.tree_flatten_with_path(
            abstract_state, is_leaf=_is_variable)[0]
    }

    def axes_of(path, leaf):
        key = tuple(_key(e) for e in path)
        where = "/".join(map(str, key))
        axes = variables[key].get_metadata().get("logical_axes")
        if axes is None:
            raise ValueError(f"parameter {where} has no logical_axes metadata")
        if len(axes) != len(leaf.shape):
            raise ValueError(f"parameter {where} has shape {leaf.shape} but axes {axes}")
        return tuple(axes)

    return jax.tree_util.tree_map_with_path(axes_of, nnx.to_pure_dict(abstract_state))


def param_shardings(abstract_params: Any, axes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a params tree, from its logical axes tree."""
    return jax.tree.map(
        lambda p, axes: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, p.shape)),
        abstract_params, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Shards the leading (batch) dim over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's rows of a batch into global arrays sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in host_batch.items()
    }


def state_shardings_like(abstract_tree: Any, params: Any, params_sharding: Any,
                         mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose subtrees mirror ``params``.

    A leaf whose path ends with a parameter's path and has that parameter's
    shape gets the parameter's sharding (Adam moments); anything else (step
    counters, scalars) is replicated.
    """
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree.leaves(params_sharding), strict=True):
        by_path[tuple(path)] = (tuple(p.shape), s)

    def pick(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_tree)
