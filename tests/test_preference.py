"""The RM and DPO-family stage losses on hand-made preference batches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from presets import preset

from jaxalign.algos import dpo, rm
from jaxalign.models.heads import RewardModel, last_real_index
from jaxalign.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, mlp_dim=48)


def _side(rows, t=10):
    """rows: (prompt ids, completion ids) -> the shifted, right-padded sequence arrays."""
    out = {k: np.zeros((len(rows), t), np.int32) for k in
           ("inputs_bt", "targets_bt", "segment_ids_bt", "positions_bt")}
    out["loss_mask_bt"] = np.zeros((len(rows), t), np.float32)
    for r, (prompt, completion) in enumerate(rows):
        ids = prompt + completion
        n = len(ids) - 1
        out["inputs_bt"][r, :n] = ids[:-1]
        out["targets_bt"][r, :n] = ids[1:]
        out["loss_mask_bt"][r, len(prompt) - 1:n] = 1
        out["segment_ids_bt"][r, :n] = 1
        out["positions_bt"][r, :n] = np.arange(n)
    return out


PAIRS = [([1, 5, 6], [7, 8, 2], [9, 2]), ([1, 11], [12, 13, 14, 2], [15, 2]),
         ([1, 20, 21, 22], [23, 2], [24, 25, 26, 2])]


def _batch(pairs=PAIRS):
    chosen = _side([(p, c) for p, c, _ in pairs])
    rejected = _side([(p, r) for p, _, r in pairs])
    batch = {f"chosen_{k}": v for k, v in chosen.items()}
    batch.update({f"rejected_{k}": v for k, v in rejected.items()})
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _config(**dpo_kw):
    c = ml_collections.ConfigDict()
    c.dpo = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
                 simpo_gamma=0.5, rpo_alpha=0.0, reference="in_step")
    c.dpo.update(dpo_kw)
    c.rm = dict(center_coef=0.0)
    return c


def _objective(config, model, batch, frozen=None, stage=dpo):
    loss_fn, weights_fn = stage.make_loss(config)
    kwargs = {} if frozen is None else {"frozen": frozen}
    out = loss_fn(model, batch, **kwargs)
    w = weights_fn(batch)
    return sum(t / w[k] for k, t in out.terms.items()), out


def test_policy_equal_to_reference_gives_log2():
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=0))
    loss, out = _objective(_config(), policy, _batch(), {"reference": reference})
    np.testing.assert_allclose(float(loss), np.log(2.0), rtol=1e-6)
    s, c = out.metrics["rewards/margin"]
    assert float(c) == 3 and abs(float(s)) < 1e-6


def test_in_step_reference_equals_precomputed():
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    batch = _batch()
    ref_c, ref_r = dpo.reference_logps(reference, batch)
    pre = dict(batch, ref_chosen_logps_b=ref_c, ref_rejected_logps_b=ref_r)
    for loss_type in ("sigmoid", "ipo", "aot", "discopop"):
        config = _config(loss_type=loss_type)
        in_step, _ = _objective(config, policy, batch, {"reference": reference})
        precomputed, _ = _objective(config, policy, pre)
        np.testing.assert_allclose(float(in_step), float(precomputed), rtol=1e-6, atol=1e-6)


def test_sequence_logps_count_completion_tokens_only():
    model = Transformer(CFG, rngs=nnx.Rngs(params=0))
    batch = _batch()
    from jaxalign.pairs import stacked
    logps, lengths = dpo.sequence_logps(model, stacked(batch))
    np.testing.assert_array_equal(np.asarray(lengths), [3, 4, 2, 2, 2, 4])
    # Independent: full log-softmax over the unpadded sequence, completion ids only.
    p, c, _ = PAIRS[1]
    ids = jnp.asarray([p + c])
    logp = jax.nn.log_softmax(model(ids[:, :-1]), axis=-1)[0]
    want = sum(float(logp[i - 1, ids[0, i]]) for i in range(len(p), len(p) + len(c)))
    np.testing.assert_allclose(float(logps[1]), want, rtol=1e-5)


def test_rpo_and_orpo_add_token_mean_nll():
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    batch = _batch()
    base, out = _objective(_config(), policy, batch, {"reference": policy})
    rpo, _ = _objective(_config(rpo_alpha=0.5), policy, batch, {"reference": policy})
    s, c = out.metrics["nll/chosen"]
    np.testing.assert_allclose(float(rpo - base), 0.5 * float(s) / float(c), rtol=1e-5)
    orpo, out = _objective(_config(loss_type="orpo", beta=0.25), policy, batch)
    lo_sum, n = out.metrics["log_odds_ratio"]
    assert float(n) == 3
    assert float(orpo) > float(s) / float(c)  # NLL + a positive odds-ratio term


def test_reward_model_reads_last_real_token():
    seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(last_real_index(seg)), [2, 4, 0])
    model = RewardModel(CFG, rngs=nnx.Rngs(params=0))
    assert not hasattr(model, "unembed")
    tokens = jnp.array([[3, 4, 5, 0, 0]])
    padded = model.rewards(tokens, jnp.array([[0, 1, 2, 0, 0]]), seg[:1])
    short = model.rewards(tokens[:, :3], jnp.array([[0, 1, 2]]), jnp.ones((1, 3), jnp.int32))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(short), rtol=1e-5, atol=1e-6)


def test_reward_model_loss_and_accuracy():
    model = RewardModel(CFG, rngs=nnx.Rngs(params=0))
    batch = _batch()
    loss, out = _objective(_config(), model, batch, stage=rm)
    from jaxalign.pairs import stacked
    seq = stacked(batch)
    r = np.asarray(model.rewards(seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"]))
    rc, rr = r[:3], r[3:]
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-(rc - rr)))), rtol=1e-5)
    s, c = out.metrics["accuracy"]
    assert float(s) == np.sum(rc > rr) and float(c) == 3


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="dpo.loss_type='dpo'; known: sigmoid"):
        dpo.make_loss(_config(loss_type="dpo"))


def _stage_config(name, **overrides):
    return preset(name, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("pack", [False, True])
def test_trainer_precomputed_reference_matches_in_step(tmp_path, pack):
    from jaxalign.metrics import read_jsonl
    from jaxalign.train import Trainer

    common = {"train.steps": 4, "train.log_every": 1, "train.eval_every": 4,
              "data.pack": pack}
    rows = {}
    for mode in ("in_step", "precomputed"):
        workdir = tmp_path / mode
        trainer = Trainer(_stage_config("dpo", **common, **{"dpo.reference": mode}),
                          str(workdir))
        assert (mode == "in_step") == bool(trainer.frozen)
        trainer.fit()
        trainer.close()
        rows[mode] = read_jsonl(str(workdir / "metrics.jsonl"))
    for a, b in zip(rows["in_step"], rows["precomputed"], strict=True):
        assert a["step"] == b["step"] and a["split"] == b["split"]
        for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-6, err_msg=key)
    cache = tmp_path / "precomputed" / "precomputed_reference.npz"
    with np.load(cache) as f:
        if pack:  # per pair slot, cut to the most pairs a row holds (several)
            shape = f["ref_chosen_logps_bp"].shape
            assert shape[:2] == (4, 16) and 1 < shape[2] < 48, shape
        else:
            assert f["ref_chosen_logps_b"].shape == (4, 16)
    # A resumed run reloads the cache instead of recomputing it.
    mtime = cache.stat().st_mtime_ns
    again = Trainer(_stage_config("dpo", **common, **{"dpo.reference": "precomputed"}),
                    str(tmp_path / "precomputed"))
    again.close()
    assert cache.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_reward_model_trains_from_sft_workdir(tmp_path):
    """An RM starts from an SFT workdir: the trunk is loaded, the head is new."""
    from jaxalign.train import Trainer

    sft = Trainer(_stage_config("sft", **{"train.steps": 2, "data.eval": ""}),
                  str(tmp_path / "sft"))
    sft.fit()
    sft.close()
    rm_trainer = Trainer(_stage_config("rm", **{"model.init_from": f"workdir:{tmp_path / 'sft'}",
                                                "train.steps": 4}), str(tmp_path / "rm"))
    sft_embed = np.asarray(jax.device_get(sft.state["params"]["embed"]))
    np.testing.assert_array_equal(np.asarray(jax.device_get(rm_trainer.state["params"]["embed"])),
                                  sft_embed)
    assert "reward_head" in rm_trainer.state["params"]
    summary = rm_trainer.fit()
    rm_trainer.close()
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0 and np.isfinite(summary["eval"]["loss"])


def _unpaired(rows, t=12):
    """rows: (prompt ids, completion ids, label) -> an unpaired batch."""
    side = _side([(p, c) for p, c, _ in rows], t)
    side["label_b"] = np.array([float(lab) for _, _, lab in rows], np.float32)
    return {k: jnp.asarray(v) for k, v in side.items()}


KTO_ROWS = [([1, 5, 6], [7, 8, 2], True), ([1, 11], [12, 13, 14, 2], False),
            ([1, 20, 21, 22], [23, 2], True), ([1, 30], [31, 2], False)]


def test_kto_mismatched_rows_pair_prompt_i_with_completion_i_plus_1():
    from jaxalign.algos import kto

    got = jax.tree.map(np.asarray, kto.mismatched(_unpaired(KTO_ROWS)))
    want = _side([(KTO_ROWS[i][0], KTO_ROWS[(i + 1) % 4][1]) for i in range(4)], 12)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.slow
def test_kto_loss_against_independent_formula():
    from jaxalign.algos import kto

    config = _config()
    config.kto = dict(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    loss, out = _objective(config, policy, _unpaired(KTO_ROWS), {"reference": reference},
                           stage=kto)

    def seq_logp(model, prompt, completion):
        ids = jnp.asarray([prompt + completion])
        logp = jax.nn.log_softmax(model(ids[:, :-1]), axis=-1)[0]
        return sum(float(logp[i - 1, ids[0, i]]) for i in range(len(prompt), ids.shape[1]))

    r = np.array([seq_logp(policy, p, c) - seq_logp(reference, p, c) for p, c, _ in KTO_ROWS])
    kl_rows = [(KTO_ROWS[i][0], KTO_ROWS[(i + 1) % 4][1]) for i in range(4)]
    kl = max(np.mean([seq_logp(policy, p, c) - seq_logp(reference, p, c) for p, c in kl_rows]),
             0.0)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    labels = np.array([lab for _, _, lab in KTO_ROWS])
    per = np.where(labels, 1.5 * (1 - sig(0.5 * (r - kl))), 0.7 * (1 - sig(0.5 * (kl - r))))
    np.testing.assert_allclose(float(loss), per.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(out.metrics["kl/estimate"][0]), kl, rtol=1e-4, atol=1e-6)
