"""The jitted train/eval step shared by every stage.

A stage supplies two functions:

* ``loss_weights(batch) -> {name: W}``: the normalisers of its loss terms
  (loss-bearing tokens, pairs, ...), computed from the *whole global batch*
  before any gradient, so they never depend on parameters, mesh shape or
  micro-batching;
* ``loss_fn(model, batch[, frozen]) -> LossOut``: for one micro-batch, the
  *sum* of each loss term (coefficients applied) and metric (sum, count) pairs.

The objective is ``sum_k terms[k] / W[k]``: summed over micro-batches it equals
the global-batch mean of every term exactly, whatever the mesh or accumulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd
from jaxalign.models import lora

Batch = Mapping[str, jax.Array]
TrainState = dict[str, Any]


class LossOut(NamedTuple):
    """What a stage's loss function returns for one (micro-)batch."""

    terms: dict[str, jax.Array]
    metrics: dict[str, tuple[jax.Array, jax.Array]]


LossFn = Callable[..., LossOut]
WeightsFn = Callable[[Batch], dict[str, jax.Array]]


def combine(terms: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]) -> jax.Array:
    """``sum_k terms[k] / max(weights[k], 1)`` — the normalised objective."""
    return sum(t / jnp.maximum(weights[k], 1.0) for k, t in terms.items())


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything needed to rebuild the NNX model from a pure params dict.

    ``trainable`` is a bool tree like the params (None: all train). The step takes
    gradients, and the optimizer keeps state, for the True leaves only (LoRA).
    """

    graphdef: Any
    abstract_state: nnx.State
    trainable: Any = None

    def merge(self, params: Mapping[str, Any]) -> nnx.Module:
        # tree.map rebuilds the Variables, so the abstract template is never mutated.
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)


def split_micro_batches(batch: Batch, num_micro: int, mesh: Mesh) -> Batch:
    """``[B, ...] -> [A, B/A, ...]`` with micro-batch ``i`` = rows ``i::A``.

    Interleaving keeps every micro-batch spread over all data-parallel devices
    (a contiguous split would put micro-batch 0 on the first devices only).
    """
    def split(x):
        b = x.shape[0]
        x = x.reshape(b // num_micro, num_micro, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        spec = jax.sharding.PartitionSpec(None, shd.BATCH_AXES, *([None] * (x.ndim - 2)))
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree.map(split, dict(batch))


def _objective(loss_fn: LossFn, model_def: ModelDef, frozen_defs: Mapping[str, ModelDef],
               policy_frozen: Collection[str] = ()):
    """``fn(params, batch, weights, frozen_params, fixed=None, rng=None)``.

    ``params`` (differentiated) joined with ``fixed`` are the policy's params; ``rng``
    turns on LoRA dropout. Frozen models named in ``policy_frozen`` run on the
    policy's own params (stop-gradient) through their own definition, e.g. the
    LoRA base with its adapters off.
    """
    def fn(params, batch, weights, frozen_params, fixed=None, rng=None):
        full = lora.join(params, fixed)
        kwargs = {}
        if frozen_defs:
            kwargs["frozen"] = {
                k: d.merge(jax.lax.stop_gradient(full) if k in policy_frozen
                           else frozen_params[k])
                for k, d in frozen_defs.items()}
        model = model_def.merge(full)
        if rng is not None:
            lora.set_dropout_rng(model, rng)
        out = loss_fn(model, batch, **kwargs)
        return combine(out.terms, weights), (out.terms, out.metrics)
    return fn


def _accumulate(objective: Callable, grad_fn: Callable, params: Any, micro: Batch,
                num_micro: int, args: tuple[Any, Any, Any], dropout_rng: jax.Array
                ) -> tuple[Any, Any, Any]:
    """Sums gradients, loss terms and metric (sum, count) pairs over the micro-batches."""
    weights, frozen, fixed = args

    def accumulate(carry, xs):
        mb, i = xs
        grads_acc, terms_acc, metrics_acc = carry
        (_, (terms, metrics)), grads = grad_fn(
            params, mb, weights, frozen, fixed, jax.random.fold_in(dropout_rng, i))
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        terms_acc = jax.tree.map(jnp.add, terms_acc, terms)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (grads_acc, terms_acc, metrics_acc), None

    first = jax.tree.map(lambda x: x[0], micro)
    _, (terms_shape, metrics_shape) = jax.eval_shape(objective, params, first, weights,
                                                     frozen, fixed)
    zeros = lambda tree: jax.tree.map(  # noqa: E731
        lambda s: jnp.zeros(s.shape, s.dtype), tree)
    init = (jax.tree.map(jnp.zeros_like, params), zeros(terms_shape), zeros(metrics_shape))
    (grads, terms, metric_sums), _ = jax.lax.scan(
        accumulate, init, (micro, jnp.arange(num_micro)))
    return grads, terms, metric_sums


def _guarded_update(state: TrainState, params: Any, fixed: Any, updates: Any,
                    new_opt_state: Any, loss: jax.Array, grad_norm: jax.Array
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The next state, unless the loss, gradient or update is non-finite: then the old
    params and optimizer state are kept and the step is counted."""
    new_params = optax.apply_updates(params, updates)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    step = state["step"]
    new_state = {
        "params": lora.join(keep(new_params, params), fixed),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "step": step + 1,
        "rng": jax.random.fold_in(state["rng"], step),
        "nonfinite_count": state["nonfinite_count"] + (~finite).astype(jnp.int32),
        "first_nonfinite_step": jnp.where(
            (state["first_nonfinite_step"] < 0) & ~finite, step,
            state["first_nonfinite_step"]),
    }
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(new_state["params"]),
        "update_norm": update_norm,
        "_nonfinite": (~finite).astype(jnp.float32),
    }
    return new_state, metrics


def make_train_step(loss_fn: LossFn, loss_weights: WeightsFn, *, model_def: ModelDef,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], num_micro: int, mesh: Mesh,
                    rules: shd.Rules, frozen_defs: Mapping[str, ModelDef] | None = None,
                    policy_frozen: Collection[str] = ()
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """Builds ``train_step(state, batch, frozen=None) -> (state, metrics)`` (jit it).

    ``frozen`` maps names to the params of frozen models (a reference policy, a
    reward model) whose definitions are ``frozen_defs``; they reach ``loss_fn``
    as ``frozen={name: model}``, are never differentiated and never donated.
    Those named in ``policy_frozen`` take no params of their own: they run on the
    policy's (see ``_objective``).

    Only ``model_def.trainable`` leaves get gradients and updates; ``opt_state``
    covers those leaves only, and the others pass through bitwise unchanged.

    A non-finite loss, gradient or update never reaches the parameters: the update is
    skipped, counted in ``state['nonfinite_count']`` and the first offending
    step recorded, so the loop can stop (or carry on) without a poisoned state.
    """
    frozen_defs = dict(frozen_defs or {})
    objective = _objective(loss_fn, model_def, frozen_defs, policy_frozen)
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: Batch, frozen: Mapping[str, Any] | None = None):
        with shd.axis_rules(mesh, rules):
            params, fixed = lora.partition(state["params"], model_def.trainable)
            frozen = jax.lax.stop_gradient(dict(frozen or {}))
            weights = loss_weights(batch)
            micro = split_micro_batches(batch, num_micro, mesh)
            # A stream of its own, so that dropout never reuses a key drawn elsewhere.
            dropout_rng = jax.random.fold_in(state["rng"], 0x4C6F5241)
            grads, terms, metric_sums = _accumulate(
                objective, grad_fn, params, micro, num_micro,
                (weights, frozen, fixed), dropout_rng)
            loss = combine(terms, weights)
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = tx.update(grads, state["opt_state"], params)
            new_state, metrics = _guarded_update(state, params, fixed, updates, new_opt_state,
                                                 loss, grad_norm)
            metrics["learning_rate"] = schedule(state["step"])
            metrics["nonfinite"] = metrics.pop("_nonfinite")
            for name, w in weights.items():
                metrics[f"count/{name}"] = w
            for name, (s, c) in metric_sums.items():
                metrics[name] = s / jnp.maximum(c, 1.0)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, loss_weights: WeightsFn, *, model_def: ModelDef,
                   mesh: Mesh, rules: shd.Rules,
                   frozen_defs: Mapping[str, ModelDef] | None = None,
                   policy_frozen: Collection[str] = ()
                   ) -> Callable[..., dict[str, Any]]:
    """Builds ``eval_step(params, batch, frozen=None) -> sums`` to add up over an eval set.

    Returns ``{"terms": ..., "weights": ..., "metrics": {name: (sum, count)}}``;
    :func:`finish_eval` turns the totals into the eval loss and metrics.
    """
    objective = _objective(loss_fn, model_def, dict(frozen_defs or {}), policy_frozen)

    def eval_step(params, batch, frozen=None):
        with shd.axis_rules(mesh, rules):
            weights = loss_weights(batch)
            _, (terms, metrics) = objective(params, batch, weights, dict(frozen or {}))
        return {"terms": terms, "weights": weights, "metrics": metrics}
    return eval_step


def finish_eval(totals: Mapping[str, Any]) -> dict[str, float]:
    """Eval-set loss (each term over its eval-set normaliser) and metric means."""
    out = {"loss": float(combine(totals["terms"], totals["weights"]))}
    for name, (s, c) in totals["metrics"].items():
        out[name] = float(s / max(float(c), 1.0))
    return out
