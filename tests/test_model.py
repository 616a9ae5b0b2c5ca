"""The decoder against an independent NumPy forward pass, and its masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.transformer import Transformer, TransformerConfig

CFG = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, mlp_dim=48, rope_theta=500.0)


def _np_rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _np_rope(x_tnh, pos_t, theta):
    h = x_tnh.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = pos_t[:, None] * inv[None]  # [t, h/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None]
    half = h // 2
    rot = np.concatenate([-x_tnh[..., half:], x_tnh[..., :half]], -1)
    return x_tnh * cos + rot * sin


def _np_forward(p, cfg, tokens_t):
    """Llama-style forward for one sequence, float64, heads repeated for GQA."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    t = len(tokens_t)
    pos = np.arange(t, dtype=np.float64)
    x = p["embed"][tokens_t]
    rep = cfg.n_heads // cfg.n_kv_heads
    for i in range(cfg.n_layers):
        lp = p["layers"][i]
        a = lp["attn"]
        h = _np_rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
        q = np.einsum("td,dnh->tnh", h, a["q_proj"])
        k = np.repeat(np.einsum("td,dkh->tkh", h, a["k_proj"]), rep, axis=1)
        v = np.repeat(np.einsum("td,dkh->tkh", h, a["v_proj"]), rep, axis=1)
        q, k = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("nts,snh->tnh", w, v)
        x = x + np.einsum("tnh,nhd->td", o, a["o_proj"])
        m = lp["mlp"]
        h = _np_rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        g = h @ m["gate_proj"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"])) @ m["down_proj"]
    x = _np_rms(x, p["final_norm"]["scale"], cfg.norm_eps)
    return x @ p["unembed"]


def _model(cfg=CFG, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
    # Non-trivial norm scales so a swapped or missing norm shows up.
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] == "scale":
            var[...] = 1.0 + 0.1 * jnp.arange(var.shape[0], dtype=var.dtype) / var.shape[0]
    return model


def test_matches_numpy_reference():
    model = _model()
    tokens = np.array([[5, 17, 3, 60, 2, 9, 33, 1, 0, 12]], np.int32)
    got = np.asarray(model(jnp.asarray(tokens)))[0]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = _np_forward(params, CFG, tokens[0])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_causal():
    model = _model()
    a = jnp.array([[4, 8, 15, 16, 23, 42]])
    b = a.at[0, 4].set(7)
    la, lb = model(a), model(b)
    np.testing.assert_allclose(la[0, :4], lb[0, :4], atol=1e-6)
    assert not np.allclose(la[0, 4:], lb[0, 4:])


@pytest.mark.slow
def test_packed_segments_equal_separate_sequences():
    model = _model()
    s1, s2 = [3, 9, 27, 11], [5, 25, 60]
    packed = jnp.array([s1 + s2 + [0]])
    seg = jnp.array([[1] * 4 + [2] * 3 + [0]])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    out = model(packed, pos, seg)[0]
    np.testing.assert_allclose(out[:4], model(jnp.array([s1]))[0], atol=1e-5)
    np.testing.assert_allclose(out[4:7], model(jnp.array([s2]))[0], atol=1e-5)


def test_right_padding_does_not_change_real_positions():
    model = _model()
    real = jnp.array([[7, 1, 44, 2]])
    padded = jnp.array([[7, 1, 44, 2, 0, 0]])
    seg = jnp.array([[1, 1, 1, 1, 0, 0]])
    pos = jnp.array([[0, 1, 2, 3, 0, 0]])
    np.testing.assert_allclose(model(padded, pos, seg)[0, :4], model(real)[0], atol=1e-5)
    assert np.all(np.isfinite(np.asarray(model(padded, pos, seg))))


@pytest.mark.slow
@pytest.mark.parametrize("opts", [dict(qkv_bias=True), dict(qk_norm=True),
                                  dict(tie_embeddings=True), dict(dtype="bfloat16")])
def test_options_build_and_run(opts):
    cfg = TransformerConfig(**{**CFG.to_dict(), **opts})
    model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert ("unembed" in params) == (not cfg.tie_embeddings)
    assert ("q_bias" in params["layers"][0]["attn"]) == cfg.qkv_bias
    assert ("q_norm" in params["layers"][0]["attn"]) == cfg.qk_norm
    logits = model(jnp.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, CFG.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_flops_formula():
    # attn 2*(32*4*8*2 + 32*2*8*2) = 6144, mlp 2*3*32*48 = 9216, unembed 32*64 = 2048
    assert CFG.matmul_params() == 6144 + 9216 + 2048
    assert CFG.flops_per_token(16) == 6 * (6144 + 9216 + 2048) + 6 * 2 * 16 * 32


def test_config_validation():
    with pytest.raises(ValueError, match="n_heads=6 must be a multiple of model.n_kv_heads=4"):
        TransformerConfig(**{**CFG.to_dict(), "n_heads": 6, "n_kv_heads": 4})
