"""Compute switches change speed and memory, never the numbers: remat policies, scan over
layers, the attention backend and chunked log-probs give the loss and gradients of the
plain model; chunking and remat really shrink the step's temporary memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from presets import preset

from jaxalign import losses
from jaxalign import sharding as shd
from jaxalign.algos import grpo, sft
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import Transformer, TransformerConfig

BASE = TransformerConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=64)


def _batch(b=3, t=12, vocab=96, seed=0):
    """A packed batch: two segments in row 0, right padding in row 2."""
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[0, 7:] = 2
    seg[2, 9:] = 0
    pos = np.concatenate([np.arange(7), np.arange(t - 7)])[None].repeat(b, 0)
    pos[1:] = np.arange(t)
    mask = (seg > 0).astype(np.float32)
    mask[:, :2] = 0
    return {"inputs_bt": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "targets_bt": jnp.asarray(rng.integers(0, vocab, (b, t)), jnp.int32),
            "loss_mask_bt": jnp.asarray(mask), "segment_ids_bt": jnp.asarray(seg),
            "positions_bt": jnp.asarray(pos, jnp.int32)}


def _split(cfg):
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))


def _loss_and_grads(cfg, state, batch, loss=sft.loss_fn):
    graphdef, _ = _split(cfg)

    def f(state):
        out = loss(nnx.merge(graphdef, state), batch)
        (total,) = out.terms.values()
        return total, out.metrics

    (total, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(state)
    return total, metrics, grads


def _close(a, b, rtol=2e-5, atol=2e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_chunked_token_stats_match_full_logits_values_and_grads():
    rng = np.random.default_rng(1)
    h_btd = jnp.asarray(rng.normal(size=(2, 11, 16)), jnp.float32)
    w_dv = jnp.asarray(rng.normal(size=(16, 50)), jnp.float32)
    tgt_bt = jnp.asarray(rng.integers(0, 50, (2, 11)), jnp.int32)
    fn = lambda w: lambda h: jnp.einsum("bcd,dv->bcv", h, w) / 0.7  # noqa: E731

    def full(h, w):
        return losses.token_stats(fn(w)(h), tgt_bt, with_hits=True, with_entropy=True)

    def chunked(h, w):  # 11 positions in chunks of 4: the last one is zero-padded
        return losses.chunked_token_stats(h, fn(w), tgt_bt, chunk=4, with_hits=True,
                                          with_entropy=True)

    _close(full(h_btd, w_dv), chunked(h_btd, w_dv), rtol=1e-5, atol=1e-6)
    scalar = lambda stats: jnp.sum(stats["logps_bt"] * jnp.arange(11.0)) + jnp.sum(  # noqa: E731
        stats["entropy_bt"])
    g_full = jax.grad(lambda h, w: scalar(full(h, w)), argnums=(0, 1))(h_btd, w_dv)
    g_chunk = jax.grad(lambda h, w: scalar(chunked(h, w)), argnums=(0, 1))(h_btd, w_dv)
    _close(g_full, g_chunk, rtol=1e-5, atol=1e-5)


SWITCHES = {
    "remat=dots": dict(remat="dots"),
    "remat=offload_qkv_proj": dict(remat="offload_qkv_proj"),
    "scan_layers+remat=full": dict(scan_layers=True, remat="full"),
    "attention=dot_product": dict(attention="dot_product"),
    "logits_chunk=5": dict(logits_chunk=5),
    "everything": dict(scan_layers=True, remat="attn_proj", attention="dot_product",
                       logits_chunk=4),
}


@pytest.fixture(scope="module")
def plain():
    _, state = _split(BASE)
    batch = _batch()
    return state, batch, _loss_and_grads(BASE, state, batch)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_keeps_sft_loss_and_grads(plain, name):
    state, batch, (total, metrics, grads) = plain
    cfg = dataclasses.replace(BASE, **SWITCHES[name])
    got_total, got_metrics, got_grads = _loss_and_grads(cfg, state, batch)
    np.testing.assert_allclose(got_total, total, rtol=1e-5)
    _close(got_metrics, metrics)
    _close(got_grads, grads)


@pytest.mark.slow
def test_rl_loss_with_chunked_logps_and_entropy_matches():
    config = preset("grpo", **{"grpo.entropy_metric": True, "rl.temperature": 0.8,
                               "rl.kl_coef": 0.0})
    loss, _ = grpo.make_loss(config)
    batch = _batch()
    batch["weight_b"] = jnp.ones((3,))
    batch["advantages_b"] = jnp.asarray([1.0, -0.5, 0.25])
    batch["sampler_logps_bt"] = jnp.full((3, 12), -4.0)
    _, state = _split(BASE)
    want = _loss_and_grads(BASE, state, batch, loss)
    got = _loss_and_grads(dataclasses.replace(BASE, logits_chunk=5), state, batch, loss)
    for w, g in zip(want, got, strict=True):
        _close(g, w)


# Gemma 2-like: grouped queries, a sliding layer and soft-capped scores, so the splash
# kernel's window, soft cap and per-kv-head calls are all exercised.
SPLASH_BASE = dataclasses.replace(BASE, n_layers=2, layer_types=("sliding", "full"),
                                  sliding_window=40, attn_softcap=20.0)


@pytest.mark.slow
def test_splash_attention_matches_einsum_on_a_packed_batch():
    batch = _batch(b=4, t=128)
    _, state = _split(SPLASH_BASE)
    want = _loss_and_grads(SPLASH_BASE, state, batch)
    splash = dataclasses.replace(SPLASH_BASE, attention="splash")
    got = _loss_and_grads(splash, state, batch)
    for w, g in zip(want, got, strict=True):
        _close(g, w, rtol=1e-4, atol=1e-5)
    # Per shard under a (data 2, fsdp 2, tensor 2) mesh: heads split over tensor keep
    # each query head with its kv head.
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    with shd.axis_rules(mesh, dict(shd.DEFAULT_RULES)):
        sharded = _loss_and_grads(splash, state, batch)
    for w, g in zip(want, sharded, strict=True):
        _close(g, w, rtol=1e-4, atol=1e-5)


def _temp_bytes(cfg, batch):
    graphdef, state = _split(cfg)

    def f(state):
        out = sft.loss_fn(nnx.merge(graphdef, state), batch)
        return sum(out.terms.values())

    compiled = jax.jit(jax.grad(f)).lower(state).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunking_and_remat_shrink_temporary_memory():
    # A vocabulary much wider than the model: the [b, t, v] logits dominate.
    wide = dataclasses.replace(BASE, vocab_size=4096, n_layers=2)
    batch = _batch(b=4, t=128, vocab=4096)
    logits_bytes = 4 * 128 * 4096 * 4
    plain, chunked = _temp_bytes(wide, batch), _temp_bytes(
        dataclasses.replace(wide, logits_chunk=16), batch)
    assert plain - chunked > logits_bytes, (plain, chunked)
    # A deep, narrow model: block activations dominate. (On the CPU backend remat lowers
    # the peak only under scan_layers; unrolled, XLA's CPU schedule keeps it.)
    deep = dataclasses.replace(BASE, n_layers=6, vocab_size=64, scan_layers=True)
    batch = _batch(b=4, t=128, vocab=64)
    none, full = _temp_bytes(deep, batch), _temp_bytes(dataclasses.replace(deep, remat="full"),
                                                       batch)
    assert full * 3 < none, (none, full)


def test_bad_switches_name_the_field():
    with pytest.raises(ValueError, match="model.remat='sometimes'"):
        dataclasses.replace(BASE, remat="sometimes")
    with pytest.raises(ValueError, match="model.attention='flash'"):
        dataclasses.replace(BASE, attention="flash")
    with pytest.raises(ValueError, match="attn_softcap"):
        dataclasses.replace(BASE, attention="dot_product", attn_softcap=50.0)
    with pytest.raises(ValueError, match="model.logits_chunk=-1"):
        dataclasses.replace(BASE, logits_chunk=-1)
    with pytest.raises(ValueError, match="scan_layers"):
        dataclasses.replace(BASE, scan_layers=True, layer_types=("full", "sliding", "full"),
                            sliding_window=4)
    with pytest.raises(ValueError, match="multiple of 128"):
        cfg = dataclasses.replace(BASE, attention="splash")
        _loss_and_grads(cfg, _split(cfg)[1], _batch())
    if jax.default_backend() != "gpu":
        cfg = dataclasses.replace(BASE, attention="cudnn")
        with pytest.raises(ValueError, match="needs a GPU"):
            _loss_and_grads(cfg, _split(cfg)[1], _batch())
