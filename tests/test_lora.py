"""LoRA: adapters in the forward, adapter-only training, checkpoints, merge on export."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from presets import preset

from jaxalign import sharding as shd
from jaxalign import step as step_lib
from jaxalign.config import MODEL_PRESETS
from jaxalign.mesh import make_mesh
from jaxalign.models import export, heads, hf, init_from, lora
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.train import Trainer, device_fields, state_layout

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.dropout": 0.1}
TOKENS_BT = jnp.array([[1, 5, 9, 13, 17, 21, 25, 29], [2, 4, 6, 8, 10, 12, 14, 16]])


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _leaves(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state):
    return nnx.merge(graphdef, state)(TOKENS_BT)


def _model_logits(model):
    """Logits of TOKENS_BT, jitted (eager NNX calls compile every op on its own)."""
    return np.asarray(_forward(*nnx.split(model)))


def _logits(model_def, params):
    return _model_logits(model_def.merge(params))


def _numpy_model(cfg, seed=0):
    """A model with NumPy-random params: jitted RNG inits take seconds to compile on CPU."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.1).astype(np.float32),
                          nnx.to_pure_dict(abstract))
    return graphdef, abstract, params


def _merge(graphdef, abstract, params):
    return step_lib.ModelDef(graphdef, abstract).merge(params)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An adapters-only SFT run (with LoRA dropout): 2 steps, then resumed by a new trainer."""
    root = tmp_path_factory.mktemp("lora")
    workdir = str(root / "sft")
    config = preset("sft", **LORA, **{"checkpoint.adapters_only": True, "train.steps": 4,
                                      "train.log_every": 1, "data.eval": "",
                                      "checkpoint.save_every": 2})
    first = Trainer(config, workdir)
    initial = _host(first.state)
    first.fit(2)
    first.close()
    at_two = _host(first.state)
    resumed = Trainer(config, workdir)
    restored = _host(resumed.state)
    resumed.fit()
    resumed.close()
    return dict(root=root, workdir=workdir, trainer=resumed, initial=initial, at_two=at_two,
                restored=restored, final=_host(resumed.state))


def test_zero_b_is_the_base_and_merge_is_exact():
    base_cfg = TransformerConfig(**MODEL_PRESETS["tiny"])
    cfg = TransformerConfig(**MODEL_PRESETS["tiny"], lora=dict(
        rank=4, alpha=8.0, dropout=0.5, targets="q_proj,o_proj,down_proj"))
    graphdef, abstract, params = _numpy_model(cfg)
    plain_def, plain_abstract, _ = _numpy_model(base_cfg)
    base_logits = _model_logits(_merge(plain_def, plain_abstract, lora.strip(params)))
    # Only adapters have leaves named "b".
    zero_b = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == "b" else x, params)
    # With B = 0 the adapted model is the base, bit for bit.
    np.testing.assert_array_equal(_model_logits(_merge(graphdef, abstract, zero_b)), base_logits)

    logits = _model_logits(_merge(graphdef, abstract, params))
    assert np.abs(logits - base_logits).max() > 1e-3
    merged = jax.jit(lambda p: lora.merge_params(p, cfg.lora))(params)
    assert lora._paths(merged) == lora._paths(lora.strip(params))
    np.testing.assert_allclose(_model_logits(_merge(plain_def, plain_abstract, merged)), logits,
                               atol=1e-5, rtol=0)

    # Dropout only where a key is set (training); deterministic otherwise.
    model_def = step_lib.ModelDef(graphdef, abstract)
    dropped = jax.jit(lambda p, key: lora.set_dropout_rng(model_def.merge(p), key)(TOKENS_BT))(
        params, jax.random.PRNGKey(0))
    assert np.abs(np.asarray(dropped) - logits).max() > 1e-4
    # The adapters-off view (a LoRA run's reference) is the base again.
    off = step_lib.ModelDef(lora.without_adapters(graphdef, abstract), abstract)
    np.testing.assert_array_equal(_logits(off, params), base_logits)


@pytest.mark.slow
def test_only_adapters_train_and_hold_optimizer_state(sft_run):
    before, after = _leaves(sft_run["initial"]["params"]), _leaves(sft_run["final"]["params"])
    assert before.keys() == after.keys()
    adapters = [k for k in before if "_lora" in k]
    assert len(adapters) == 2 * 7 * 2  # (a, b) x 7 projections x 2 layers
    for key, x in before.items():
        if key in adapters:
            assert not np.array_equal(x, after[key]), f"{key} did not train"
        else:
            np.testing.assert_array_equal(x, after[key], err_msg=key)
    opt = _leaves(sft_run["final"]["opt_state"])
    arrays = [k for k, x in opt.items() if x.ndim > 0]
    assert arrays and all("_lora" in k for k in arrays), arrays
    assert len(arrays) == 2 * len(adapters)  # Adam's mu and nu


@pytest.mark.slow
def test_adapters_only_checkpoint_resumes_exactly(sft_run):
    # The checkpoint holds adapters only; the base came back from init_from (a fresh init).
    step_dir = os.path.join(sft_run["workdir"], "checkpoints", "2")
    manager_meta = init_from.ocp.CheckpointManager(
        os.path.dirname(step_dir), item_handlers={
            "state": init_from.ocp.PyTreeCheckpointHandler(),
            "data": init_from.ocp.JsonCheckpointHandler()})
    stored = init_from._flat(dict(manager_meta.item_metadata(2)["state"])["params"])
    manager_meta.close()
    assert stored and all(lora.is_adapter_path(k) for k in stored)
    saved, restored = _leaves(sft_run["at_two"]), _leaves(sft_run["restored"])
    assert saved.keys() == restored.keys()
    for key, x in saved.items():
        np.testing.assert_array_equal(x, restored[key], err_msg=key)
    assert int(sft_run["final"]["step"]) == 4


@pytest.mark.slow
def test_export_merges_adapters(sft_run):
    out = str(sft_run["root"] / "export")
    export.export_workdir(sft_run["workdir"], out)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        assert "lora" not in json.dumps(json.load(f))
    loaded = hf.load_model(out)
    trainer = sft_run["trainer"]
    want = _logits(trainer.model_def, trainer.state["params"])
    np.testing.assert_allclose(_model_logits(loaded), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_dpo_from_lora_sft_uses_the_base_as_reference(sft_run):
    """The SFT adapters merge on load; the DPO reference is that base with adapters off."""
    config = preset("dpo", **LORA, **{"model.init_from": f"workdir:{sft_run['workdir']}",
                                      "train.steps": 2, "train.log_every": 1, "data.eval": "",
                                      "optim.learning_rate": 1e-2})
    trainer = Trainer(config, str(sft_run["root"] / "dpo"))
    assert trainer.frozen == {}  # no copy of the weights for the reference
    sft = sft_run["trainer"]
    np.testing.assert_allclose(_logits(trainer.model_def, trainer.state["params"]),
                               _logits(sft.model_def, sft.state["params"]), atol=1e-5, rtol=0)
    initial = _host(trainer.state["params"])
    summary = trainer.fit()
    trainer.close()
    rows = [json.loads(line) for line in open(os.path.join(trainer.workdir, "metrics.jsonl"))]
    first = next(r for r in rows if r["split"] == "train")
    # At step 0 the policy is its reference: zero margin, loss log 2.
    np.testing.assert_allclose(first["rewards/margin"], 0.0, atol=1e-6)
    np.testing.assert_allclose(first["loss"], np.log(2.0), atol=1e-6)
    assert summary["train"]["rewards/margin"] != 0.0

    # After training, the shared reference still equals a separate copy of the initial params.
    host = next(trainer.train_data.iterator())
    batch = shd.global_batch(device_fields(host), trainer.mesh)
    loss_fn, loss_weights = trainer.stage.make_loss(config)
    with_copy = jax.jit(step_lib.make_eval_step(
        loss_fn, loss_weights, model_def=trainer.model_def, mesh=trainer.mesh,
        rules=trainer.rules, frozen_defs={"reference": trainer.model_def}))
    initial = jax.device_put(initial, trainer.state_shardings["params"])
    want = with_copy(trainer.state["params"], batch, {"reference": initial})
    got = trainer.eval_step(trainer.state["params"], batch, {})
    for key, x in _leaves(_host(want)).items():
        np.testing.assert_allclose(_leaves(_host(got))[key], x, atol=1e-5, rtol=0, err_msg=key)


def test_adapter_shardings_follow_the_base_weights():
    config = preset("sft", **LORA, **{"model.lora.targets": "attention,down_proj"})
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    model_cfg = TransformerConfig.from_mapping(config.model)
    assert model_cfg.lora.targets == ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    tx = optax.adamw(1e-3)
    rules = shd.rules_from_config(config.sharding.rules)
    model_def, abstract, shardings, _ = state_layout(config, model_cfg, tx, mesh, rules)
    layer = shardings["params"]["layers"][0]
    checked = 0
    for module in ("attn", "mlp"):
        for name, n_in in lora._INPUT_DIMS.items():
            if f"{name}_lora" not in layer[module]:
                continue
            base = tuple(layer[module][name].spec)
            base += (None,) * (len(abstract["params"]["layers"][0][module][name].shape)
                               - len(base))
            a = tuple(layer[module][f"{name}_lora"]["a"].spec)
            b = tuple(layer[module][f"{name}_lora"]["b"].spec)
            assert a[:n_in] == base[:n_in] and a[n_in:] in ((), (None,)), (name, a, base)
            assert b[1:] == base[n_in:len(b) - 1 + n_in] and b[0] is None, (name, b, base)
            checked += 1
    assert checked == 5 and "gate_proj_lora" not in layer["mlp"]
    assert tuple(layer["attn"]["q_proj_lora"]["a"].spec) == ("fsdp", None)
    assert tuple(layer["attn"]["q_proj_lora"]["b"].spec)[:2] == (None, "tensor")
    # Adam's moments shard like their adapters.
    mu = shardings["opt_state"][0].mu["layers"][0]["attn"]["q_proj_lora"]["b"]
    assert mu == layer["attn"]["q_proj_lora"]["b"]

    # A reward model trains its new head along with the adapters.
    rm_def, _, _, _ = state_layout(config, model_cfg, tx, mesh, rules,
                                   model_cls=heads.RewardModel)
    assert rm_def.trainable["reward_head"] and rm_def.trainable["reward_bias"]
    assert not rm_def.trainable["embed"] and "unembed" not in rm_def.trainable


@pytest.mark.parametrize("overrides, match", [
    ({"model.lora.rank": -2}, "model.lora.rank"),
    ({"model.lora.rank": 4, "model.lora.targets": "q_proj,qkv"}, r"model.lora.targets.*'qkv'"),
    ({"model.lora.rank": 4, "model.lora.targets": ""}, "model.lora.targets"),
    ({"model.lora.rank": 4, "model.lora.alpha": 0.0}, "model.lora.alpha"),
    ({"model.lora.rank": 4, "model.lora.dropout": 1.0}, "model.lora.dropout"),
])
def test_bad_lora_config_names_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig.from_mapping(preset("sft", **overrides).model)


def test_adapters_only_without_lora_is_refused():
    with pytest.raises(ValueError, match="checkpoint.adapters_only.*model.lora.rank"):
        lora.check_checkpoint_config(preset("sft", **{"checkpoint.adapters_only": True}))
