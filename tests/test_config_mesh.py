"""Config presets, mesh construction, logical sharding rules and the loss math."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses
from jaxalign import sharding as shd
from jaxalign.algos import get_stage
from jaxalign.mesh import make_mesh, mesh_shape
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.optim import make_optimizer, make_schedule
from jaxalign.train import state_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"sft": ["demo", "world", "test"], "rm": ["demo", "test"], "dpo": ["demo", "test"],
           "kto": ["demo", "test"], "grpo": ["demo", "test"], "ppo": ["demo", "test"],
           "distill": ["demo", "test"]}
# Config files that are not one training stage (a stage list, an eval suite, shared preset
# helpers, ...).
NOT_STAGES = {"__init__", "common", "evals", "pipeline", "rejection"}


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_file_is_listed():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert files - NOT_STAGES == set(PRESETS)


@pytest.mark.parametrize("name,preset", [(n, p) for n, ps in PRESETS.items() for p in ps])
def test_preset_abstract_init(name, preset):
    config = _load(os.path.join(ROOT, "configs", f"{name}.py")).get_config(preset)
    assert config.stage == name
    mesh = make_mesh(config.mesh)
    model_cfg = TransformerConfig.from_mapping(config.model)
    tx, _ = make_optimizer(config.optim, config.train.steps)
    rules = shd.rules_from_config(config.sharding.rules)
    model_cls = getattr(get_stage(config.stage), "make_model", Transformer)
    _, abstract, shardings, _ = state_layout(config, model_cfg, tx, mesh, rules, model_cls)
    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    assert n_params > model_cfg.matmul_params()  # + embedding table and norms
    # Adam moments mirror the params; the two trees of shardings line up leaf by leaf.
    assert len(jax.tree.leaves(shardings["opt_state"])) == len(
        jax.tree.leaves(abstract["opt_state"]))


def test_locked_config_rejects_unknown_key():
    config = _load(os.path.join(ROOT, "configs", "sft.py")).get_config("test")
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optim.learning_rat = 1.0


def test_mesh_shape_resolution_and_errors():
    assert mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(dict(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match=r"data=3, fsdp=1, tensor=1\) has 3 devices but 8"):
        mesh_shape(dict(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(dict(data=-1, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
        mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_logical_to_spec():
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    rules = dict(shd.DEFAULT_RULES)
    P = jax.sharding.PartitionSpec
    assert shd.logical_to_spec(("embed", "mlp"), rules, mesh, (8, 16)) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("act_batch", None), rules, mesh, (8, 3)) == P(("data", "fsdp"),
                                                                             None)
    # A mesh axis is used once per spec; an indivisible dim is replicated.
    assert shd.logical_to_spec(("mlp", "heads"), rules, mesh, (8, 8)) == P("tensor", None)
    assert shd.logical_to_spec(("embed", "mlp"), rules, mesh, (8, 3)) == P("fsdp", None)
    with pytest.raises(KeyError, match="no sharding rule for logical axis 'nope'"):
        shd.logical_to_spec(("nope",), rules, mesh)
    with pytest.raises(ValueError, match="given twice"):
        shd.rules_from_config([("embed", "fsdp"), ("embed", None)])


def test_masked_token_nll_golden():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = -sum(logp[b, t, targets[b, t]] for b in range(2) for t in range(3) if mask[b, t])
    stats = losses.token_stats(jnp.asarray(logits), jnp.asarray(targets), with_hits=True)
    got = -jnp.sum(stats["logps_bt"] * mask)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    hits = jnp.sum(stats["hits_bt"] * mask)
    want_hits = sum(int(np.argmax(logits[b, t]) == targets[b, t])
                    for b in range(2) for t in range(3) if mask[b, t])
    assert float(hits) == want_hits


def test_schedule_warmup_and_cosine():
    cfg = dict(learning_rate=1.0, warmup_steps=4, schedule="cosine", final_lr_fraction=0.1)
    sched = make_schedule(cfg, total_steps=14)
    lrs = [float(sched(i)) for i in range(14)]
    np.testing.assert_allclose(lrs[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    # Decay step k = i + 1 - warmup of 10: lr = 0.1 + 0.9 * (1 + cos(pi * k / 10)) / 2.
    assert lrs[8] == pytest.approx(0.55, rel=1e-5)
    assert lrs[-1] == pytest.approx(0.1, rel=1e-5)


def test_weight_decay_skips_norms_and_biases():
    params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,)), "b": jnp.ones((2,))}
    tx, _ = make_optimizer(dict(name="adamw", learning_rate=0.1, warmup_steps=0,
                                schedule="constant", final_lr_fraction=1.0, b1=0.9, b2=0.95,
                                eps=1e-8, weight_decay=0.5, grad_clip_norm=0.0), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], 0.0)
    np.testing.assert_allclose(updates["b"], 0.0)
