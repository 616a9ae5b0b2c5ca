"""The stage protocol: every hook a training stage may provide, with its signature.

A stage is a :class:`Stage` value (``STAGE`` in its module, registered in
``jaxalign.algos``). ``jaxalign.train`` calls these hooks and nothing else of a
stage; a stage never sees the trainer object: hooks that need the run (RL rollouts,
generation evals) get a :class:`RunContext`: read-only facts of the run plus the
initial params, computed on first use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.models.transformer import Transformer, TransformerConfig

Metrics = dict[str, float]
Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


class Loader(Protocol):
    """A stage's data for one split (``jaxalign.data.loader.Loader`` is the real one)."""

    def iterator(self) -> Any:
        """A checkpointable iterator of host batches (``get_state``/``set_state``)."""
        ...

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """One pass over the split, in order, for evaluation."""
        ...

    def batch_spec(self) -> Spec:
        """Per-process shapes and dtypes of one batch (for ahead-of-time compilation)."""
        ...


class BatchSource(Protocol):
    """Where the loop's training batches come from: a loader, or an RL stage's rollouts.

    The loop calls ``next`` once per step (the step is compiled once per batch shape:
    a source may vary the row width, e.g. by length bucket), then ``after_update`` once
    the step is queued; it checkpoints only when ``at_boundary`` (a rollout's later minibatches
    are in no checkpoint) and saves ``get_state()`` as the data position.
    """

    synchronous: bool  # every step waits for the device (RL); metrics are read at once
    # Optional: True when ``next``'s host batch holds every process's rows (a rollout's),
    # not only this process's share (a loader's); throughput counts tokens by it.
    host_is_global: bool

    def next(self, state: Mapping[str, Any], step: int
             ) -> tuple[dict[str, jax.Array], dict[str, Any], Metrics]:
        """``(global batch, host batch, host metrics)`` for ``step``."""
        ...

    def after_update(self, metrics: Mapping[str, Any], host_metrics: Metrics) -> Metrics:
        """Host metrics once the step that used the batch is queued (RL: its time split)."""
        ...

    @property
    def at_boundary(self) -> bool:
        """Whether the data position can be checkpointed now."""
        ...

    def get_state(self) -> dict[str, Any]:
        ...

    def set_state(self, state: Mapping[str, Any]) -> None:
        ...

    def metrics(self) -> Metrics:
        """The data pipeline's own counters (skipped records, packing efficiency, ...)."""
        ...

    def close(self) -> None:
        ...


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a stage hook may know of the run; built by ``jaxalign.train``, read-only.

    ``initial_params`` builds (once) the params the run started from
    (``model.init_from`` over a fresh init), sharded like the policy: the KL
    reference of RL stages and the frozen reference of DPO.
    """

    config: ml_collections.ConfigDict
    tokenizer: Any
    mesh: Mesh
    rules: shd.Rules
    model_cfg: TransformerConfig
    model_def: Any  # jaxalign.step.ModelDef
    eval_data: Loader | None
    param_shardings: Any
    initial_params_fn: Callable[[], Any]
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def initial_params(self) -> Any:
        """The run's starting params (computed on first use, then shared)."""
        if "initial_params" not in self._cache:
            self._cache["initial_params"] = self.initial_params_fn()
        return self._cache["initial_params"]

    def shared(self, name: str, build: Callable[[], Any]) -> Any:
        """One object per run under ``name`` (e.g. the reward scorer that both the
        rollout and the eval use), built on first use."""
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]


def _no_config_check(config: ml_collections.ConfigDict) -> None:
    del config


def _no_frozen(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    del config
    return ()


def _no_columns(config: ml_collections.ConfigDict) -> None:
    del config
    return None


def _no_section() -> Mapping[str, ml_collections.ConfigDict]:
    return {}


def _no_context_hook(ctx: RunContext) -> None:
    del ctx
    return None


def _no_frozen_source(ctx: RunContext, name: str) -> None:
    del ctx, name
    return None


def _no_batch_source(ctx: RunContext, loader: Loader) -> None:
    del ctx, loader
    return None


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: the hooks ``jaxalign.train`` calls, and only those.

    Attributes:
      name: the ``config.stage`` value.
      make_loss: ``config -> (loss_fn, loss_weights)`` (see ``jaxalign.step``).
      build_data: ``(config, tokenizer, split, *, process_index, process_count) ->
        Loader`` for ``split`` in ``("train", "eval")``.
      default_config: ``() -> {section name: ConfigDict}``, the sections the stage
        reads beyond the shared ones (its own ``config.<name>``; RL stages also
        ``rl``), with their defaults; ``jaxalign.config.base_config`` adds them.
      check_config: raises ``ValueError`` on impossible options, before any work.
      make_model: the NNX module class the stage trains (default: the decoder).
      frozen_models: ``config -> names`` of frozen models the step takes as
        non-donated inputs (e.g. ``("reference",)``), starting from the run's initial
        params unless ``load_frozen`` gives them.
      load_frozen: ``(ctx, name) -> jaxalign.policy.Loaded | None``: a frozen model of
        its own shape and weights (a distillation teacher), on the run's mesh; None
        means the run's initial params in the policy's shape. It also feeds
        ``precomputed_columns``.
      precomputed_columns: ``config -> (name, fn) | None``; ``fn(frozen_model,
        batch) -> columns`` computed once before training and added to every batch.
      make_batches: ``(ctx, train_loader) -> BatchSource | None``; an online stage
        turns prompt batches into training batches (rollouts) here; None means the
        loader's batches are the training batches.
      make_evaluator: ``ctx -> (params -> metrics) | None``; None means the eval
        split's loss (the step's own metrics).
    """

    name: str
    make_loss: Callable[[ml_collections.ConfigDict], tuple[Callable, Callable]]
    build_data: Callable[..., Loader]
    default_config: Callable[[], Mapping[str, ml_collections.ConfigDict]] = _no_section
    check_config: Callable[[ml_collections.ConfigDict], None] = _no_config_check
    make_model: type[nnx.Module] = Transformer
    frozen_models: Callable[[ml_collections.ConfigDict], tuple[str, ...]] = _no_frozen
    load_frozen: Callable[[RunContext, str], Any] = _no_frozen_source
    precomputed_columns: Callable[[ml_collections.ConfigDict], Any] = _no_columns
    make_batches: Callable[[RunContext, Loader], BatchSource | None] = _no_batch_source
    make_evaluator: Callable[[RunContext], Callable[[Any], Metrics] | None] = _no_context_hook
