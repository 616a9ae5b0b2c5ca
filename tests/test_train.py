"""End-to-end trainer properties on the tiny SFT preset."""

import json
import os

import jax
import numpy as np
import pytest
from presets import preset

from jaxalign.mesh import make_mesh
from jaxalign.metrics import read_jsonl
from jaxalign.train import Trainer, train


def _config(**overrides):
    return preset("sft", **overrides)


def _params(trainer):
    return jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


def _run(tmp_path, name, mesh_shape=None, devices=None, num_steps=None, **overrides):
    config = _config(**overrides)
    mesh = None
    if mesh_shape is not None:
        d, f, t = mesh_shape
        mesh = make_mesh(dict(data=d, fsdp=f, tensor=t), devices=devices)
    workdir = str(tmp_path / name)
    trainer = Trainer(config, workdir, mesh=mesh)
    trainer.fit(num_steps)
    trainer.close()
    rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    return trainer, rows


def _assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b),
                            strict=True):
        np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_mesh_invariance(tmp_path):
    """Losses and final params agree across (1,1,1) on one device, (8,1,1), (2,4,1), (2,2,2)."""
    # Rows padded to max_len, the shapes these tolerances were set for: at this preset's
    # learning rate Adam magnifies summation-order noise in near-zero gradients, and
    # which elements it hits depends on the batch width.
    common = dict(**{"train.steps": 3, "train.log_every": 1, "data.eval": "",
                     "data.buckets": "max_len"})
    ref, ref_rows = _run(tmp_path, "one", (1, 1, 1), jax.devices()[:1], **common)
    assert len(ref_rows) == 3
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        got, rows = _run(tmp_path, "x".join(map(str, shape)), shape, **common)
        np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in ref_rows],
                                   atol=1e-5, rtol=0)
        _assert_trees_close(_params(got), _params(ref), atol=1e-5)


@pytest.mark.slow
def test_gradient_accumulation_matches_big_batch(tmp_path):
    """4 micro-batches of 8 give the same update as one batch of 32."""
    # A small learning rate: Adam divides by |g|, which magnifies float summation-order
    # noise in near-zero gradients by ~lr / |g| at a large rate.
    common = dict(**{"train.steps": 2, "train.log_every": 1, "data.eval": "",
                     "train.batch_size": 32, "optim.learning_rate": 1e-3})
    big, big_rows = _run(tmp_path, "big", (8, 1, 1), **common, **{"train.micro_batches": 1})
    acc, acc_rows = _run(tmp_path, "acc", (4, 2, 1), **common, **{"train.micro_batches": 4})
    for key in ("loss", "grad_norm", "token_accuracy", "count/tokens"):
        np.testing.assert_allclose([r[key] for r in acc_rows], [r[key] for r in big_rows],
                                   atol=1e-5, rtol=0, err_msg=key)
    _assert_trees_close(_params(acc), _params(big), atol=1e-5)


@pytest.mark.slow
def test_loss_falls_and_artifacts(tmp_path):
    summary = train(_config(), str(tmp_path / "run"))
    workdir = tmp_path / "run"
    rows = read_jsonl(str(workdir / "metrics.jsonl"))
    train_rows = [r for r in rows if r["split"] == "train"]
    eval_rows = [r for r in rows if r["split"] == "eval"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 1.0, train_rows
    assert eval_rows[-1]["loss"] < eval_rows[0]["loss"]
    for key in ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate",
                "tokens_per_s", "mfu", "token_accuracy"):
        assert key in train_rows[-1], key
    assert summary["train"]["loss"] == train_rows[-1]["loss"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["stage"] == "sft" and saved["train"]["steps"] == 30
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps[-1] == 30 and len(steps) <= 3


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    """Stopping after step 10 and resuming gives the params of an uninterrupted run."""
    common = {"train.steps": 20, "checkpoint.save_every": 10, "data.eval": ""}
    full, full_rows = _run(tmp_path, "full", **common)
    stopped, _ = _run(tmp_path, "split", num_steps=10, **common)
    assert int(jax.device_get(stopped.state["step"])) == 10
    # A new trainer on the same workdir restores step 10 (params, optimizer, data position).
    resumed, resumed_rows = _run(tmp_path, "split", **common)
    assert int(jax.device_get(resumed.state["step"])) == 20
    _assert_trees_close(_params(resumed), _params(full), atol=0)
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in full_rows]


def test_shardings_follow_rules(tmp_path):
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    trainer = Trainer(_config(), str(tmp_path / "w"), mesh=mesh)
    params, opt = trainer.state["params"], trainer.state["opt_state"]
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    assert spec(params["embed"]) == ("tensor", "fsdp")  # (vocab, embed)
    assert spec(params["layers"][0]["mlp"]["gate_proj"]) == ("fsdp", "tensor")  # (embed, mlp)
    assert spec(params["layers"][0]["mlp"]["down_proj"]) == ("tensor", "fsdp")  # (mlp, embed)
    assert spec(params["layers"][1]["attn"]["q_proj"])[:2] == ("fsdp", "tensor")
    assert all(s is None for s in spec(params["final_norm"]["scale"]))
    adam = opt[1][0]
    assert spec(adam.mu["layers"][0]["mlp"]["gate_proj"]) == ("fsdp", "tensor")
    assert spec(adam.nu["embed"]) == ("tensor", "fsdp")
    shard = params["layers"][0]["mlp"]["gate_proj"].addressable_shards[0].data
    assert shard.shape == (32 // 2, 64 // 2)
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss(tmp_path, mode):
    config = _config(**{"train.steps": 6, "train.log_every": 2, "data.eval": "",
                        "optim.learning_rate": float("inf"), "optim.warmup_steps": 0,
                        "optim.grad_clip_norm": 0.0, "train.nonfinite": mode})
    if mode == "stop":
        with pytest.raises(FloatingPointError,
                           match=r"non-finite loss, gradient or update at step 1: "):
            train(config, str(tmp_path / mode))
    else:
        summary = train(config, str(tmp_path / mode))
        assert summary["nonfinite_skipped"] == 6


def test_bad_batch_layout_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train.batch_size=30 is not divisible by "
                                         r"train.micro_batches=4"):
        Trainer(_config(**{"train.batch_size": 30, "train.micro_batches": 4}), str(tmp_path))
    with pytest.raises(ValueError, match=r"micro-batch size 4 .* data-parallel size 8"):
        Trainer(_config(**{"train.batch_size": 16, "train.micro_batches": 4}), str(tmp_path))
    with pytest.raises(ValueError, match=r"mesh \(data=3, fsdp=1, tensor=1\) has 3 devices "
                                         r"but 8"):
        Trainer(_config(**{"mesh.data": 3}), str(tmp_path))


def test_incompatible_workdir_is_refused(tmp_path):
    workdir = str(tmp_path / "w")
    train(_config(**{"train.steps": 2, "data.eval": ""}), workdir)
    with pytest.raises(ValueError, match=r"model.d_model: 32 -> 64"):
        Trainer(_config(**{"model.d_model": 64}), workdir)
    # The record of that config is written atomically; a damaged one is named, not parsed
    # into a traceback.
    assert not os.path.exists(os.path.join(workdir, "config.json.tmp"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write('{"stage": "sf')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        Trainer(_config(), workdir)


