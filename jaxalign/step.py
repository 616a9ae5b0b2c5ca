"""The jitted train/eval step shared by every stage.

A stage supplies ``loss_fn(model, batch) -> LossOut``: a loss *sum* with its
normalising weight (tokens, pairs, ...) and metric (sum, count) pairs. Sums
are accumulated over micro-batches and the mean is taken once over the global
batch, so the update does not depend on mesh shape or micro-batching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxalign import sharding as shd

Batch = Mapping[str, jax.Array]
TrainState = dict[str, Any]


class LossOut(NamedTuple):
    """What a stage's loss function returns for one (micro-)batch."""

    loss_sum: jax.Array
    weight: jax.Array
    metrics: dict[str, tuple[jax.Array, jax.Array]]


LossFn = Callable[[nnx.Module, Batch], LossOut]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Everything needed to rebuild the NNX model from a pure params dict."""

    graphdef: Any
    abstract_state: nnx.State

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


def _sum_loss(loss_fn: LossFn, model_def: ModelDef):
    def fn(params, batch):
        out = loss_fn(model_def.merge(params), batch)
        return out.loss_sum, (out.weight, out.metrics)
    return fn


def make_train_step(loss_fn: LossFn, *, model_def: ModelDef, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], num_micro: int, mesh: Mesh,
                    rules: shd.Rules) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds ``train_step(state, batch) -> (state, metrics)`` (to be jitted by the caller).

    A non-finite loss, gradient or update never reaches the parameters: the update is
    skipped, counted in ``state['nonfinite_count']`` and the first offending
    step recorded, so the loop can stop (or carry on) without a poisoned state.
    """
    grad_fn = jax.value_and_grad(_sum_loss(loss_fn, model_def), has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        with shd.axis_rules(mesh, rules):
            params = state["params"]
            micro = split_micro_batches(batch, num_micro, mesh)

            def accumulate(carry, mb):
                grads_acc, loss_acc, weight_acc, metrics_acc = carry
                (loss_sum, (weight, metrics)), grads = grad_fn(params, mb)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
                return (grads_acc, loss_acc + loss_sum, weight_acc + weight, metrics_acc), None

            zero_grads = jax.tree.map(jnp.zeros_like, params)
            first = jax.tree.map(lambda x: x[0], micro)
            _, (_, metrics_shape) = jax.eval_shape(_sum_loss(loss_fn, model_def), params, first)
            zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)
            init = (zero_grads, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                    zero_metrics)
            (grads, loss_sum, weight, metric_sums), _ = jax.lax.scan(accumulate, init, micro)

            denom = jnp.maximum(weight, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            loss = loss_sum / denom
            grad_norm = optax.tree.norm(grads)
            updates, new_opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)

            update_norm = optax.tree.norm(updates)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda n, o: jnp.where(finite, n, o), new, old)
            step = state["step"]
            new_state = {
                "params": keep(new_params, params),
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
                "learning_rate": schedule(step),
                "weight": weight,
                "nonfinite": (~finite).astype(jnp.float32),
            }
            for name, (s, c) in metric_sums.items():
                metrics[name] = s / jnp.maximum(c, 1.0)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn, *, model_def: ModelDef, mesh: Mesh,
                   rules: shd.Rules) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Builds ``eval_step(params, batch) -> sums`` to be summed over an eval set."""
    def eval_step(params, batch):
        with shd.axis_rules(mesh, rules):
            out = loss_fn(model_def.merge(params), batch)
        sums = {"loss": (out.loss_sum, out.weight)}
        sums.update(out.metrics)
        return sums
    return eval_step
