"""Packed preference pairs and packed KTO examples: the same loss and gradients as one
per row (DPO family, reward model, KTO), the packers, and the loader's packed layouts."""

import random

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxalign import step
from jaxalign.algos import dpo, kto, rm
from jaxalign.data import packing
from jaxalign.data.builtin import load_builtin
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models.heads import RewardModel
from jaxalign.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                        head_dim=8, mlp_dim=48)
T = 24
PAD = 0


def _ids(rng, n):
    return np.asarray([rng.randrange(3, 50) for _ in range(n)], np.int32)


def _pairs(n=7, seed=0):
    rng = random.Random(seed)
    return [{"prompt": _ids(rng, rng.randint(1, 7)), "chosen": _ids(rng, rng.randint(1, 6)),
             "rejected": _ids(rng, rng.randint(1, 8))} for _ in range(n)]


def _unpaired(n=7, seed=1):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt, completion = _ids(rng, rng.randint(2, 7)), _ids(rng, rng.randint(1, 6))
        out.append({"ids": np.concatenate([prompt, completion]),
                    "mask": np.asarray([0] * len(prompt) + [1] * len(completion), np.int8),
                    "label": np.float32(i % 3 != 1)})
    return out


def _packed_and_padded(fmt, examples, rows):
    """The same examples packed into ``rows`` rows (some left empty) and one per row, in
    the packed batch's row-major order."""
    packed_rows = packing.pack_rows(fmt, examples, T, True)
    assert len(packed_rows) < rows and max(len(r) for r in packed_rows) > 1
    packed_rows += [[]] * (rows - len(packed_rows))
    order = [[e] for row in packed_rows for e in row]
    to_jax = lambda b: {k: jnp.asarray(v) for k, v in b.items()}  # noqa: E731
    return (to_jax(packing.collate(fmt, packed_rows, T, T, PAD, pack=True)),
            to_jax(packing.collate(fmt, order, T, T, PAD)))


def _config(pack, **dpo_kw):
    c = ml_collections.ConfigDict()
    c.dpo = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
                 simpo_gamma=0.5, rpo_alpha=0.0, reference="in_step")
    c.dpo.update(dpo_kw)
    c.rm = dict(center_coef=0.01)
    c.kto = dict(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    c.data = dict(pack=pack)
    return c


def _loss_and_grads(stage, config, model, batch, frozen=None):
    loss_fn, weights_fn = stage.make_loss(config)
    graphdef, state = nnx.split(model)
    kwargs = {} if frozen is None else {"frozen": frozen}

    def objective(state, batch):
        out = loss_fn(nnx.merge(graphdef, state), batch, **kwargs)
        return step.combine(out.terms, weights_fn(batch)), (out.metrics, weights_fn(batch))

    (loss, (metrics, weights)), grads = jax.jit(
        jax.value_and_grad(objective, has_aux=True))(state, batch)
    return float(loss), metrics, weights, grads


def _assert_same(packed, padded):
    (lp, mp, wp, gp), (lu, mu, wu, gu) = packed, padded
    np.testing.assert_allclose(lp, lu, rtol=1e-5)
    assert {k: float(v) for k, v in wp.items()} == {k: float(v) for k, v in wu.items()}
    for name in mu:
        np.testing.assert_allclose([float(x) for x in mp[name]], [float(x) for x in mu[name]],
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    flat_p, flat_u = jax.tree.leaves(gp), jax.tree.leaves(gu)
    scale = max(float(jnp.max(jnp.abs(g))) for g in flat_u)
    assert scale > 0
    for a, b in zip(flat_p, flat_u, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


# --- packers --------------------------------------------------------------------------


def test_best_fit_decreasing_pairs_golden_and_properties():
    # By hand: (6, 2) opens row 0; (5, 5) row 1; (2, 6) fits row 0 exactly on both sides
    # ... room (2, 6) - (2, 6) = 0; (3, 3) fits row 1 (room (0, 0)); (1, 1) opens row 2.
    assert packing.best_fit_decreasing_pairs([(5, 5), (6, 2), (2, 6), (3, 3), (1, 1)],
                                             8) == [[1, 2], [0, 3], [4]]
    rng = random.Random(0)
    for _ in range(10):
        sizes = [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(200)]
        rows = packing.best_fit_decreasing_pairs(sizes, 64)
        assert sorted(i for row in rows for i in row) == list(range(200))
        for side in (0, 1):
            assert all(sum(sizes[i][side] for i in row) <= 64 for row in rows)
        # Far fewer rows than one pair per row.
        assert len(rows) < 0.75 * len(sizes)
    with pytest.raises(ValueError, match=r"item 1 has sizes \(3, 9\)"):
        packing.best_fit_decreasing_pairs([(3, 3), (3, 9)], 8)


def test_packed_preference_rows_pair_segments_on_both_sides():
    examples = _pairs()
    rows = packing.pack_rows("preference", examples, T, True)
    batch = packing.packed_preference_batch(rows, T, PAD)
    for r, row in enumerate(rows):
        for s, e in enumerate(row, start=1):
            for side in ("chosen", "rejected"):
                sel = batch[f"{side}_segment_ids_bt"][r] == s
                ids = np.concatenate([e["prompt"], e[side]])
                np.testing.assert_array_equal(batch[f"{side}_inputs_bt"][r][sel], ids[:-1])
                np.testing.assert_array_equal(batch[f"{side}_targets_bt"][r][sel], ids[1:])
                np.testing.assert_array_equal(batch[f"{side}_positions_bt"][r][sel],
                                              np.arange(len(ids) - 1))
                trained = batch[f"{side}_targets_bt"][r][sel & (
                    batch[f"{side}_loss_mask_bt"][r] == 1)]
                np.testing.assert_array_equal(trained, e[side])
    one = packing.packed_preference_batch([[e] for e in examples], T, PAD)
    want = packing.preference_batch([[e] for e in examples], T, PAD)
    for k in want:
        np.testing.assert_array_equal(one[k], want[k], err_msg=k)


# --- losses: packed == one pair per row ------------------------------------------------


@pytest.mark.parametrize("loss_type, extra", [
    ("sigmoid", {"rpo_alpha": 0.5}), ("ipo", {}), ("simpo", {}),
    pytest.param("aot", {}, marks=pytest.mark.slow),
    pytest.param("orpo", {}, marks=pytest.mark.slow)])
def test_dpo_packed_equals_padded(loss_type, extra):
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    frozen = None if loss_type in dpo.REFERENCE_FREE else {"reference": reference}
    packed, padded = _packed_and_padded("preference", _pairs(), rows=6)
    got = _loss_and_grads(dpo, _config(True, loss_type=loss_type, **extra), policy, packed,
                          frozen)
    want = _loss_and_grads(dpo, _config(False, loss_type=loss_type, **extra), policy, padded,
                           frozen)
    _assert_same(got, want)
    assert float(got[2]["pairs"]) == 7


def test_packed_reference_logps_match_rows():
    """The in-step reference sees the packed batch: per-slot values equal per-row ones."""
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    packed, padded = _packed_and_padded("preference", _pairs(), rows=6)
    c_p, r_p = jax.jit(lambda b: dpo.reference_logps(reference, b, T))(packed)
    c_u, r_u = jax.jit(lambda b: dpo.reference_logps(reference, b))(padded)
    valid = np.asarray(packed["chosen_segment_ids_bt"]).max(axis=1)
    flat = lambda x: np.concatenate([np.asarray(x)[r, :n] for r, n in enumerate(valid)])  # noqa: E731
    np.testing.assert_allclose(flat(c_p), np.asarray(c_u), rtol=1e-5)
    np.testing.assert_allclose(flat(r_p), np.asarray(r_u), rtol=1e-5)


def test_dpo_packed_micro_batches_sum_to_the_global_objective():
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    packed, _ = _packed_and_padded("preference", _pairs(9, seed=3), rows=6)
    loss_fn, weights_fn = dpo.make_loss(_config(True, rpo_alpha=0.2))
    weights = weights_fn(packed)
    terms = jax.jit(lambda b: loss_fn(policy, b, {"reference": reference}).terms)
    full = step.combine(terms(packed), weights)
    split = sum(step.combine(terms({k: v[i::2] for k, v in packed.items()}), weights)
                for i in range(2))
    np.testing.assert_allclose(float(split), float(full), rtol=1e-5)


def test_reward_model_packed_equals_padded():
    model = RewardModel(CFG, rngs=nnx.Rngs(params=0))
    packed, padded = _packed_and_padded("preference", _pairs(), rows=6)
    _assert_same(_loss_and_grads(rm, _config(True), model, packed),
                 _loss_and_grads(rm, _config(False), model, padded))


def test_kto_packed_mismatched_sequences_equal_padded_ones():
    examples = _unpaired()
    # A long completion after a short one: its mismatched sequence is cut at T, as unpadded.
    examples[3] = {"ids": np.arange(T + 1, dtype=np.int32) % 47 + 3,
                   "mask": np.asarray([0] + [1] * T, np.int8), "label": np.float32(1)}
    packed, padded = _packed_and_padded("unpaired", examples, rows=6)
    seq_p, valid_p = jax.jit(kto.mismatched_packed, static_argnums=1)(packed, T)
    seq_u = jax.jit(kto.mismatched)(padded)
    got = [], []
    n_slots = np.asarray(valid_p).sum(axis=1).astype(int)
    for r, n in enumerate(n_slots):
        for s in range(1, n + 1):
            sel = np.asarray(seq_p["segment_ids_bt"][r]) == s
            got[0].append([np.asarray(seq_p[k][r])[sel].tolist()
                           for k in ("inputs_bt", "targets_bt", "loss_mask_bt", "positions_bt")])
    for r in range(len(examples)):
        sel = np.asarray(seq_u["segment_ids_bt"][r]) == 1
        got[1].append([np.asarray(seq_u[k][r])[sel].tolist()
                       for k in ("inputs_bt", "targets_bt", "loss_mask_bt", "positions_bt")])
    assert got[0] == got[1]
    assert max(len(x[0]) for x in got[1]) == T  # one was cut


def test_kto_packed_equals_padded():
    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    packed, padded = _packed_and_padded("unpaired", _unpaired(), rows=6)
    assert "label_bt" in packed and "label_b" not in packed
    frozen = {"reference": reference}
    got = _loss_and_grads(kto, _config(True), policy, packed, frozen)
    want = _loss_and_grads(kto, _config(False), policy, padded, frozen)
    _assert_same(got, want)
    assert abs(float(got[1]["kl/estimate"][0])) > 1e-4  # the KL term is really in play


def test_packed_precomputed_reference_equals_in_step():
    """Per-slot reference columns, stacked over batches and cut to the slots used (as the
    precompute cache stores them), give the in-step reference's loss and gradients."""
    from jaxalign.precompute import _stack

    policy = Transformer(CFG, rngs=nnx.Rngs(params=0))
    reference = Transformer(CFG, rngs=nnx.Rngs(params=1))
    packed, _ = _packed_and_padded("preference", _pairs(), rows=6)
    config = _config(True, reference="precomputed")
    _, columns_fn = dpo.precomputed_columns(config)
    cols = jax.jit(columns_fn)(reference, packed)
    assert cols["ref_chosen_logps_bp"].shape == (6, T)
    narrow = {k: v[:, :T // 2] for k, v in cols.items()}  # a narrower batch of the run
    stored = {k: _stack([np.asarray(cols[k]), np.asarray(narrow[k])])[0] for k in cols}
    slots = int(packed["chosen_segment_ids_bt"].max())
    assert slots > 1 and stored["ref_chosen_logps_bp"].shape == (6, slots)
    got = _loss_and_grads(dpo, config, policy, {**packed, **stored})
    want = _loss_and_grads(dpo, _config(True), policy, packed, {"reference": reference})
    _assert_same(got, want)


# --- the loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:world")


def _loader(tok, records, fmt, **kw):
    settings = DataSettings(**{"source": "test", "split": "train", "fmt": fmt,
                               "batch_size": 4, "max_len": 96, "shuffle": False, **kw})
    return Loader(settings, tok, records=records)


def test_loader_packs_preference_pairs(tok):
    pairs = load_builtin("world", "preference")[:24]
    loader = _loader(tok, pairs, "preference", pack=True, pack_window=24)
    seen = []
    for batch in loader.eval_batches():
        assert set(batch) == set(loader.batch_spec())
        for r in range(4):
            seg_c, seg_r = batch["chosen_segment_ids_bt"][r], batch["rejected_segment_ids_bt"][r]
            assert seg_c.max() == seg_r.max()
            for s in range(1, seg_c.max() + 1):
                texts = []
                for side, seg in (("chosen", seg_c), ("rejected", seg_r)):
                    sel = (seg == s) & (batch[f"{side}_loss_mask_bt"][r] == 0)
                    texts.append(batch[f"{side}_inputs_bt"][r][sel].tolist())
                    trained = (seg == s) & (batch[f"{side}_loss_mask_bt"][r] == 1)
                    texts.append(tok.decode(batch[f"{side}_targets_bt"][r][trained]))
                assert texts[0] == texts[2]  # one prompt on both sides
                seen.append((texts[1], texts[3]))
    assert sorted(seen) == sorted((p["chosen"], p["rejected"]) for p in pairs)
    padded = _loader(tok, pairs, "preference")
    it_p, it_u = loader.iterator(), padded.iterator()
    for _ in range(3):
        next(it_p), next(it_u)
    eff_p = it_p.metrics()["data_packing_efficiency"]
    eff_u = it_u.metrics()["data_packing_efficiency"]
    assert eff_p > 1.5 * eff_u, (eff_p, eff_u)


def test_loader_packs_unpaired_with_labels_per_segment(tok):
    records = load_builtin("world", "kto")[:16]
    loader = _loader(tok, records, "unpaired", pack=True, pack_window=16)
    batch = next(iter(loader.eval_batches()))
    assert set(batch) == set(loader.batch_spec()) and "label_bt" in batch
    assert (batch["segment_ids_bt"].max(axis=1) > 1).any()
    by_text = {r["completion"]: float(r["label"]) for r in records}
    for r in range(4):
        seg = batch["segment_ids_bt"][r]
        assert (batch["label_bt"][r][seg == 0] == 0).all()
        for s in range(1, seg.max() + 1):
            labels = set(batch["label_bt"][r][seg == s].tolist())
            text = tok.decode(batch["targets_bt"][r][(seg == s) & (batch["loss_mask_bt"][r] == 1)])
            assert labels == {by_text[text]}


def test_loader_refuses_packed_prompt_batches(tok):
    with pytest.raises(ValueError, match="data.pack does not apply to 'prompt' batches"):
        _loader(tok, load_builtin("world", "rl")[:4], "prompt", pack=True)


def test_packed_preference_iterator_resumes_exactly(tok):
    pairs = load_builtin("world", "preference")[:30]
    make = lambda: _loader(tok, pairs, "preference", pack=True, pack_window=8,  # noqa: E731
                           shuffle=True, seed=2).iterator()
    full_it = make()
    full = [next(full_it) for _ in range(6)]
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = make()
    resumed.set_state(state)
    for i, want in enumerate(full[3:]):
        if i == 1:  # a second restore inside the window the first one replayed
            state = resumed.get_state()
            resumed = make()
            resumed.set_state(state)
        got = next(resumed)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
