"""One NNX decoder for the Llama / Qwen / Mistral / Gemma families.

Every weight carries logical axis names in its ``logical_axes`` metadata; the
mapping to mesh axes lives in config (see ``jaxalign.sharding``). Activations
are constrained at block boundaries with a separate vocabulary (``act_*``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.sharding import constrain

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """Maps a config string ("float32", "bfloat16", ...) to a JAX dtype."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of the decoder; frozen so it can key jit caches."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"
    init_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} must be a multiple of "
                f"model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        resolve_dtype(self.param_dtype)
        resolve_dtype(self.dtype)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """Builds from a config mapping, ignoring keys that are not model fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls (embedding lookup excluded, unembedding kept)."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * d * self.mlp_dim
        return self.n_layers * (attn + mlp) + d * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N_matmul + 6·L·T·D for causal attention."""
        return 6.0 * self.matmul_params() + 6.0 * self.n_layers * seq_len * self.d_model


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float,
           dtype) -> nnx.Param:
    init = jax.nn.initializers.normal(stddev=std)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scale applied as ``x * w``."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm"):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split layout (as in HF Llama's ``rotate_half``)."""
    h = x_btnh.shape[-1]
    freq_h = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angle_bth = positions_bt.astype(jnp.float32)[..., None] * freq_h
    sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def attention_mask(segment_ids_bt: jax.Array) -> jax.Array:
    """Causal mask AND same-segment mask; segment 0 marks padding.

    Returns a boolean ``[b, 1, t, s]`` mask. Padding queries attend to themselves
    only so that no row is fully masked (their outputs carry no loss).
    """
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    real_bs = (segment_ids_bt != 0)[:, None, :]
    mask_bts = causal_ts[None] & same_bts & real_bs
    mask_bts = mask_bts | jnp.eye(t, dtype=bool)[None]
    return mask_bts[:, None]


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and q/k-norm."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.cfg = cfg
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pd)
        if cfg.qkv_bias:
            self.q_bias = _zeros((n, h), ("heads", "head_dim"), pd)
            self.k_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.norm_eps, param_dtype=pd, axis_name="head_dim")
            self.k_norm = RMSNorm(h, eps=cfg.norm_eps, param_dtype=pd, axis_name="head_dim")

    def __call__(self, x_btd, positions_bt, mask_b1ts):
        cfg = self.cfg
        dt = resolve_dtype(cfg.dtype)
        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q_proj[...].astype(dt))
        k_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.k_proj[...].astype(dt))
        v_btkh = jnp.einsum("btd,dkh->btkh", x_btd, self.v_proj[...].astype(dt))
        if cfg.qkv_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(dt)
            k_btkh = k_btkh + self.k_bias[...].astype(dt)
            v_btkh = v_btkh + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        q_btnh = rope(q_btnh, positions_bt, cfg.rope_theta)
        k_btkh = rope(k_btkh, positions_bt, cfg.rope_theta)
        q_btnh = constrain(q_btnh, ("act_batch", "act_seq", "act_heads", None))
        b, t, n, h = q_btnh.shape
        g = n // cfg.n_kv_heads
        # Group query heads by their kv head so K/V are never repeated in memory.
        q_btkgh = q_btnh.reshape(b, t, cfg.n_kv_heads, g, h)
        logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh).astype(jnp.float32)
        logits_bkgts = logits_bkgts * (h ** -0.5)
        logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, -1e30)
        probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dt)
        out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_btkh)
        out_btnh = out_btkgh.reshape(b, t, n, h)
        out_btd = jnp.einsum("btnh,nhd->btd", out_btnh, self.o_proj[...].astype(dt))
        return out_btd


class MLP(nnx.Module):
    """Gated MLP (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        d, f, std = cfg.d_model, cfg.mlp_dim, cfg.init_std
        self.cfg = cfg
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std, pd)

    def __call__(self, x_btd):
        dt = resolve_dtype(self.cfg.dtype)
        gate_btf = x_btd @ self.gate_proj[...].astype(dt)
        up_btf = x_btd @ self.up_proj[...].astype(dt)
        h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("act_batch", "act_seq", "act_mlp"))
        return h_btf @ self.down_proj[...].astype(dt)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, mask_b1ts):
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, mask_b1ts)
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, ("act_batch", "act_seq", "act_embed"))


class Transformer(nnx.Module):
    """Decoder-only language model: ``model(tokens_bt) -> logits_btv``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg.init_std, pd)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.init_std, pd)

    def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``[b, t, d]`` (used by LM and scalar heads)."""
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        dt = resolve_dtype(self.cfg.dtype)
        # Gather from a whole table: a gather from a vocab/embed-sharded table
        # forces XLA into a full rematerialisation of its output anyway.
        table_vd = constrain(self.embed[...], (None, None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(dt)
        x_btd = constrain(x_btd, ("act_batch", "act_seq", "act_embed"))
        mask_b1ts = attention_mask(segment_ids_bt)
        for block in self.layers:
            x_btd = block(x_btd, positions_bt, mask_b1ts)
        return self.final_norm(x_btd)

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """Projects hidden states to float32 vocabulary logits."""
        dt = resolve_dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            w_dv = self.embed[...].astype(dt).T
        else:
            w_dv = self.unembed[...].astype(dt)
        logits_btv = jnp.einsum("btd,dv->btv", h_btd, w_dv, preferred_element_type=jnp.float32)
        return constrain(logits_btv, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))
