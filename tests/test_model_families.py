"""Family features of the decoder: sliding windows with packing, RoPE scaling, Gemma norms."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.transformer import (
    RMSNorm,
    Transformer,
    TransformerConfig,
    attention_mask,
    rope_inv_freq,
)

GEMMA3ISH = TransformerConfig(
    family="gemma3", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
    mlp_dim=48, norm_plus_one=True, scale_embeddings=True, post_norms=True, qk_norm=True,
    tie_embeddings=True, mlp_activation="gelu_tanh", attn_softcap=20.0, final_softcap=10.0,
    query_pre_attn_scalar=12.0, layer_types=("sliding", "full", "sliding"), sliding_window=2,
    rope_theta=1e6, local_rope_theta=1e4, rope_scaling="linear", rope_factor=4.0)


def test_sliding_mask_combines_with_segments_and_padding():
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 0]])
    got = np.asarray(attention_mask(seg, sliding_window=2))[0, 0]
    want = np.zeros((7, 7), bool)
    for t in range(7):
        for s in range(7):
            same = seg[0, t] == seg[0, s] != 0
            want[t, s] = same and 0 <= t - s < 2
    want[6, 6] = True  # a padding query sees itself only
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(attention_mask(seg))[0, 0],
                                  np.asarray(attention_mask(seg, 1000))[0, 0])


def _jitted(cfg):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
    forward = jax.jit(lambda st, *args: nnx.merge(graphdef, st)(*args))
    return lambda *args: forward(state, *args)


@pytest.mark.slow
def test_packed_segments_equal_separate_sequences_with_sliding_layers():
    model = _jitted(GEMMA3ISH)
    s1, s2 = [3, 9, 27, 11, 40], [5, 25, 60, 7]
    packed = jnp.array([s1 + s2 + [0]])
    seg = jnp.array([[1] * 5 + [2] * 4 + [0]])
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]])
    out = model(packed, pos, seg)[0]
    np.testing.assert_allclose(out[:5], model(jnp.array([s1]))[0], atol=1e-5)
    np.testing.assert_allclose(out[5:9], model(jnp.array([s2]))[0], atol=1e-5)
    # The window matters: the same model with full attention everywhere differs.
    full = dataclasses.replace(GEMMA3ISH, layer_types=(), sliding_window=0)
    other = _jitted(full)
    assert not np.allclose(np.asarray(other(jnp.array([s1]))), np.asarray(model(jnp.array([s1]))))
    # Final soft-capping bounds every logit.
    assert float(jnp.abs(out).max()) < GEMMA3ISH.final_softcap


def test_llama3_rope_scaling_bands():
    h, theta, factor, orig = 16, 500_000.0, 8.0, 64
    base = 1.0 / theta ** (np.arange(0, h, 2) / h)
    got = rope_inv_freq(h, theta, scaling="llama3", factor=factor, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_len=orig)
    wavelen = 2 * np.pi / base
    high = wavelen < orig / 4  # short wavelengths: unchanged
    low = wavelen > orig / 1  # long wavelengths: slowed by the factor
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(got[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(got[low], base[low] / factor, rtol=1e-6)
    mid = ~high & ~low
    assert np.all((got[mid] < base[mid]) & (got[mid] > base[mid] / factor))
    np.testing.assert_allclose(rope_inv_freq(h, theta, scaling="linear", factor=4.0),
                               base / 4, rtol=1e-6)
    cfg = dataclasses.replace(GEMMA3ISH)
    np.testing.assert_allclose(cfg.rope_inv_freq("sliding"), rope_inv_freq(8, 1e4), rtol=0)
    np.testing.assert_allclose(cfg.rope_inv_freq("full"),
                               rope_inv_freq(8, 1e6, scaling="linear", factor=4.0), rtol=0)


def test_plus_one_norm_starts_as_identity_scale():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)
    gemma = RMSNorm(8, eps=1e-6, param_dtype=jnp.float32, plus_one=True)
    plain = RMSNorm(8, eps=1e-6, param_dtype=jnp.float32)
    assert not np.asarray(gemma.scale[...]).any()
    np.testing.assert_allclose(np.asarray(gemma(x)), np.asarray(plain(x)), rtol=1e-6)
    gemma.scale[...] = jnp.full((8,), 0.5)
    np.testing.assert_allclose(np.asarray(gemma(x)), 1.5 * np.asarray(plain(x)), rtol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(layer_types=("sliding",)), "layer_types has 1 entries but model.n_layers=3"),
    (dict(sliding_window=0), "sliding layers but model.sliding_window=0"),
    (dict(layer_types=("sliding", "local", "full")), r"unknown types \['local'\]"),
    (dict(rope_scaling="yarn"), "rope_scaling='yarn'"),
    (dict(family="gpt2"), "family='gpt2'"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**GEMMA3ISH.to_dict(), **bad})
