"""LoRA: low-rank adapters on the decoder's projections, and their merge for export.

With ``model.lora.rank > 0`` every targeted projection ``W`` (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``)
gets a sibling module ``<name>_lora`` holding ``a`` and ``b``, and computes

    y = x·W + (alpha / rank) · dropout(x)·A·B

``A`` spans ``W``'s input dims plus a rank dim, ``B`` the rank dim plus ``W``'s
output dims, and each carries ``W``'s logical axes on its side (the rank dim is
unsharded), so adapters shard like their base weights. ``B`` starts at zero:
the adapted model starts equal to the base. ``A`` is drawn from a side key, so
the base weights are initialised exactly as without LoRA.

The adapters live in the model's forward, so every stage, the sampler and the
evals see them. Which leaves train (the adapters plus any head a stage adds to
the decoder), the adapters-off view of the model (a DPO/KTO reference that
costs no second copy of the weights) and the merge into the base weights are
all functions of the pure params dict, here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
_ALIASES = {"all": TARGETS, "attention": ATTENTION, "mlp": MLP}
# How many leading dims of each base weight are its input (o_proj reads [n, h]).
_INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
               "down_proj": 1}
SUFFIX = "_lora"
# Adapter A draws from the params key folded with this tag, never from the stream itself.
_SIDE_KEY_TAG = 0x4C6F5241


def parse_targets(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"q_proj,v_proj"``, ``"attention"``, ``"mlp"``, ``"all"`` or a sequence -> names.

    Raises:
      ValueError: an unknown module name, or none at all (naming ``model.lora.targets``).
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        names = _ALIASES.get(item, (item,))
        for name in names:
            if name not in _INPUT_DIMS:
                raise ValueError(f"model.lora.targets: unknown module {name!r}; expected "
                                 f"names from {list(TARGETS)} or one of {sorted(_ALIASES)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"model.lora.targets={value!r} names no module; expected names from "
                         f"{list(TARGETS)} or one of {sorted(_ALIASES)}")
    return tuple(sorted(out, key=TARGETS.index))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings (``config.model.lora``); frozen and hashable like the model config."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"model.lora.rank={self.rank!r} must be a positive integer "
                             "(0 in the config turns LoRA off)")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @classmethod
    def from_value(cls, value: Any) -> LoraConfig | None:
        """A config section (dict / ConfigDict / LoraConfig / None) -> LoraConfig, or None if off.

        Raises:
          ValueError: a negative rank, a bad alpha/dropout, unknown targets or keys.
        """
        if value is None or isinstance(value, LoraConfig):
            return value
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        value = dict(value)
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model.lora: unknown keys {unknown}; expected rank, alpha, "
                             "dropout, targets")
        rank = value.get("rank", 0)
        if rank == 0:
            return None
        if isinstance(rank, int) and not isinstance(rank, bool) and rank < 0:
            raise ValueError(f"model.lora.rank={rank} must be positive (or 0 for no LoRA)")
        return cls(**value)


class Adapter(nnx.Module):
    """The low-rank update of one projection: ``x -> scale * dropout(x)·A·B``."""

    def __init__(self, base: nnx.Param, n_in: int, cfg: LoraConfig, key: jax.Array):
        shape = tuple(base.shape)
        axes = tuple(base.get_metadata()["logical_axes"])
        dtype = base.dtype
        fan_in = math.prod(shape[:n_in])
        # Kaiming-uniform bound as in PEFT: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = fan_in ** -0.5
        self.a = nnx.Param(
            jax.random.uniform(key, (*shape[:n_in], cfg.rank), dtype, -bound, bound),
            logical_axes=(*axes[:n_in], None))
        self.b = nnx.Param(jnp.zeros((cfg.rank, *shape[n_in:]), dtype),
                           logical_axes=(None, *axes[n_in:]))
        self.n_in = n_in
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        # Set on a merged model only: see `set_dropout_rng` and `without_adapters`.
        self.dropout_key = None
        self.enabled = True

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.dropout > 0 and self.dropout_key is not None:
            keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        r = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=self.n_in)
        # Scaling the rank-r intermediate is the cheapest place for it.
        r = r * jnp.asarray(self.scale, x.dtype)
        return jnp.tensordot(r, self.b[...].astype(x.dtype), axes=1)


def attach(module: nnx.Module, cfg: LoraConfig | None, rngs: nnx.Rngs,
           names: Sequence[str]) -> None:
    """Adds an ``<name>_lora`` adapter next to each projection of ``names`` that LoRA targets.

    A's key is folded from the params key and the stream's current count without
    drawing from it, so the base weights initialise exactly as without LoRA.
    """
    if cfg is None:
        return
    stream = rngs.params
    side = jax.random.fold_in(jax.random.fold_in(stream.key[...], _SIDE_KEY_TAG),
                              stream.count[...])
    for i, name in enumerate(names):
        if name in cfg.targets:
            adapter = Adapter(getattr(module, name), _INPUT_DIMS[name], cfg,
                              jax.random.fold_in(side, i))
            setattr(module, name + SUFFIX, adapter)


def apply(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` (the projection ``name`` of ``x``) plus its adapter's update, if it has one."""
    adapter = getattr(module, name + SUFFIX, None)
    if adapter is None or not adapter.enabled:
        return y
    return y + adapter(x).astype(y.dtype)


def _adapters(model: nnx.Module) -> list[Adapter]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, Adapter)]


def set_dropout_rng(model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Turns on adapter dropout in a merged (training) model; each adapter gets its own key.

    Models merged without it (eval, sampling, frozen references) are deterministic.
    """
    for i, adapter in enumerate(_adapters(model)):
        if adapter.dropout > 0:
            # Marked as data: NNX refuses a (non-traced) array on a static attribute.
            adapter.dropout_key = nnx.data(jax.random.fold_in(key, i))
    return model


def without_adapters(graphdef: Any, abstract_state: nnx.State) -> Any:
    """The graphdef of the same model with every adapter switched off (the frozen base).

    It merges with the policy's own params dict, so a reference model needs no copy.
    """
    model = nnx.merge(graphdef, abstract_state)
    for adapter in _adapters(model):
        adapter.enabled = False
    off, _ = nnx.split(model, nnx.Param)
    return off


# -- run configs ------------------------------------------------------------------


def _shape_key(section: Any) -> tuple[int, tuple[str, ...]]:
    cfg = LoraConfig.from_value(section) if section else None
    return (0, ()) if cfg is None else (cfg.rank, cfg.targets)


def checkpoint_diffs(old_run: Mapping[str, Any], config: Any) -> list[str]:
    """What makes an earlier run's checkpoints (its ``config.json``) unreadable by ``config``."""
    diffs = []
    before = _shape_key(old_run.get("model", {}).get("lora"))
    now = _shape_key(config.model.get("lora"))
    if before != now:
        diffs.append(f"model.lora rank/targets: {before} -> {now}")
    was = bool(old_run.get("checkpoint", {}).get("adapters_only", False))
    if was != bool(config.checkpoint.get("adapters_only", False)):
        diffs.append(f"checkpoint.adapters_only: {was} -> {not was}")
    return diffs


def check_checkpoint_config(config: Any) -> None:
    """``checkpoint.adapters_only`` needs adapters.

    Raises:
      ValueError: naming both keys.
    """
    if (config.checkpoint.get("adapters_only", False)
            and LoraConfig.from_value(config.model.get("lora")) is None):
        raise ValueError("checkpoint.adapters_only=True needs LoRA adapters: set "
                         "model.lora.rank > 0 (or checkpoint.adapters_only=False)")


# -- pure params dicts ----------------------------------------------------------


def is_adapter_path(path: Sequence[Any]) -> bool:
    return any(str(k).endswith(SUFFIX) for k in path)


def _paths(tree: Any, prefix: tuple = ()) -> set[tuple]:
    if not isinstance(tree, Mapping):
        return {prefix}
    return set().union(*(_paths(v, (*prefix, k)) for k, v in tree.items())) if tree else set()


def _map_with_path(fn: Callable[[tuple, Any], Any], tree: Any, prefix: tuple = ()) -> Any:
    if not isinstance(tree, Mapping):
        return fn(prefix, tree)
    return {k: _map_with_path(fn, v, (*prefix, k)) for k, v in tree.items()}


def adapter_mask(params: Any) -> Any:
    """Bool tree like ``params``: True for adapter leaves."""
    return _map_with_path(lambda p, _: is_adapter_path(p), params)


def trainable_mask(params: Any, base_params: Any) -> Any:
    """Bool tree like ``params``: True for adapters and for leaves ``base_params`` lacks.

    A stage's head on the decoder (a reward or value head) is new, so it trains
    with the adapters; everything the plain decoder has stays frozen.
    """
    base = _paths(base_params)
    return _map_with_path(lambda p, _: is_adapter_path(p) or p not in base, params)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)`` sub-dicts of a nested params dict; ``mask=None`` trains all."""
    if mask is None:
        return params, {}
    train, fixed = {}, {}
    for k, v in params.items():
        if isinstance(v, Mapping):
            t, f = partition(v, mask[k])
            if t:
                train[k] = t
            if f:
                fixed[k] = f
        elif mask[k]:
            train[k] = v
        else:
            fixed[k] = v
    return train, fixed


def join(a: Any, b: Any) -> Any:
    """The union of two nested dicts with disjoint leaves (inverse of :func:`partition`)."""
    if not b:
        return a
    if not a:
        return b
    out = dict(a)
    for k, v in b.items():
        out[k] = join(out[k], v) if k in out else v
    return out


def strip(params: Any) -> Any:
    """``params`` without its adapter leaves."""
    out = {}
    for k, v in params.items():
        if str(k).endswith(SUFFIX):
            continue
        out[k] = strip(v) if isinstance(v, Mapping) else v
    return out


def merge_params(params: Any, cfg: LoraConfig) -> Any:
    """Base weights with their adapters folded in (``W + scale·A·B``), adapters removed.

    Computed in float32 and cast back to each base weight's dtype. Works under
    ``jax.jit`` (give it the base weights' shardings as ``out_shardings``).
    """
    out = {}
    for k, v in params.items():
        if str(k).endswith(SUFFIX):
            continue
        adapter = params.get(f"{k}{SUFFIX}") if isinstance(k, str) else None
        if isinstance(v, Mapping):
            out[k] = merge_params(v, cfg)
        elif adapter is None:
            out[k] = v
        else:
            delta = jnp.tensordot(jnp.asarray(adapter["a"], jnp.float32),
                                  jnp.asarray(adapter["b"], jnp.float32), axes=1)
            out[k] = (jnp.asarray(v, jnp.float32) + cfg.scale * delta).astype(v.dtype)
    return out


def count(params: Any, mask: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of a (possibly abstract) params dict."""
    train, _ = partition(params, mask)
    size = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
    return size(train), size(params)
