"""One NNX decoder for the Llama / Qwen / Mistral / Gemma families.

Every weight carries logical axis names in its ``logical_axes`` metadata; the
mapping to mesh axes lives in config (see ``jaxalign.sharding``). Activations
are constrained at block boundaries with a separate vocabulary (``act_*``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxalign import losses
from jaxalign.models import lora as lora_lib
from jaxalign.models.attention import (
    KV_CACHE_AXES,
    ROPE_SCALINGS,
    LayerCache,
    attention_mask,
    cache_attention_mask,
    library_attention,
    rope,
    rope_inv_freq,
    softcap,
    splash_attention,
)
from jaxalign.models.dense import project
from jaxalign.sharding import constrain

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def resolve_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """Maps a config string ("float32", "bfloat16", ...) to a JAX dtype.

    ``"auto"`` is bfloat16 on GPU and TPU (where bf16 matmuls run at several times the f32
    rate) and float32 on CPU (where XLA computes bf16 no faster, and less exactly).
    """
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu")
                         else jnp.float32)
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
LAYER_TYPES = ("full", "sliding")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "splash")
# Names of the activations the remat policies below may keep (see `checkpoint_name`).
_QKV = ("query_proj", "key_proj", "value_proj")
REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # keep matmul outputs without batch dims (projections, MLP), recompute attention scores
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*_QKV),
    "attn_proj": jax.checkpoint_policies.save_only_these_names(*_QKV, "out_proj"),
    # like "qkv_proj", but the kept activations wait in host memory for the backward pass
    "offload_qkv_proj": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=_QKV,
        offload_src="device", offload_dst="pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of the decoder; frozen so it can key jit caches.

    The defaults describe a Llama-style decoder. The other fields switch on the
    features of the Mistral, Qwen and Gemma families; ``family`` only names the
    Hugging Face architecture an export writes (``jaxalign.models.hf_config``).
    """

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
    family: str = "llama"
    mlp_activation: str = "silu"
    # Gemma stores RMSNorm weights centred on zero and scales by (1 + w).
    norm_plus_one: bool = False
    # Gemma multiplies the embedding output by sqrt(d_model).
    scale_embeddings: bool = False
    # Gemma 2/3 also normalise the attention and MLP outputs before the residual add.
    post_norms: bool = False
    # tanh soft-capping of attention scores / final logits: cap * tanh(x / cap); 0 = off.
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5; 0 means head_dim.
    query_pre_attn_scalar: float = 0.0
    # Per-layer "full" or "sliding" attention; () = every layer full.
    layer_types: tuple[str, ...] = ()
    # Sliding layers see the last `sliding_window` positions, themselves included.
    sliding_window: int = 0
    # RoPE base of sliding layers (unscaled); 0 = sliding layers use the full layers' RoPE.
    local_rope_theta: float = 0.0
    # RoPE frequency scaling of full layers: none | linear | llama3 (Llama 3.1+).
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Context length the model was trained for (metadata carried into exports).
    max_position_embeddings: int = 8192
    # Low-rank adapters (config.model.lora; rank 0 = None = off). Not an HF field:
    # exports merge the adapters into the base weights (jaxalign.models.lora).
    lora: lora_lib.LoraConfig | None = None
    # Compute switches (not architecture: checkpoints and exports do not depend on them).
    # attention: "xla" (our einsum), "dot_product" (jax.nn.dot_product_attention, XLA),
    # "cudnn" (its cuDNN flash kernel; GPU only), "splash" (the Pallas splash-attention
    # kernel: TPU; interpreted, slowly, on the CPU). Decoding with a KV cache uses "xla".
    attention: str = "xla"
    # Rematerialisation of each block in the backward pass; see REMAT_POLICIES.
    remat: str = "none"
    # Run the blocks as one lax.scan over layer-stacked weights (compile time ~ 1 layer).
    scan_layers: bool = False
    # Log-probs from hidden states `logits_chunk` positions at a time, never holding the
    # [b, t, vocab] logits (0 = whole sequence at once).
    logits_chunk: int = 0

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
        for name, allowed in (("family", FAMILIES), ("mlp_activation", ACTIVATIONS),
                              ("rope_scaling", ROPE_SCALINGS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; expected one of "
                                 f"{list(allowed)}")
        # Configs may hand over a list (JSON, ConfigDict); the dataclass must stay hashable.
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "lora", lora_lib.LoraConfig.from_value(self.lora))
        if self.layer_types:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(f"model.layer_types has {len(self.layer_types)} entries but "
                                 f"model.n_layers={self.n_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"model.layer_types: unknown types {bad}; expected "
                                 f"{list(LAYER_TYPES)}")
            if "sliding" in self.layer_types and self.sliding_window <= 0:
                raise ValueError("model.layer_types has sliding layers but "
                                 f"model.sliding_window={self.sliding_window}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; expected one of "
                             f"{list(ATTENTION_IMPLS)}")
        if self.attention not in ("xla", "splash") and self.attn_softcap:
            raise ValueError(f"model.attention={self.attention!r} cannot soft-cap attention "
                             f"scores (model.attn_softcap={self.attn_softcap}); use 'xla'")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of "
                             f"{list(REMAT_POLICIES)}")
        if self.logits_chunk < 0:
            raise ValueError(f"model.logits_chunk={self.logits_chunk} must be >= 0 (0 = off)")
        if self.scan_layers and len(set(self.layer_types)) > 1:
            raise ValueError("model.scan_layers needs every layer of one type; layer_types "
                             f"mixes {sorted(set(self.layer_types))}")
        if self.rope_scaling != "none" and self.rope_factor <= 0:
            raise ValueError(f"model.rope_factor={self.rope_factor} must be positive")
        if (self.rope_scaling == "llama3"
                and self.rope_high_freq_factor <= self.rope_low_freq_factor):
            raise ValueError("model.rope_high_freq_factor must exceed model.rope_low_freq_factor "
                             "for llama3 RoPE scaling")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """Builds from a config mapping, ignoring keys that are not model fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layer_type(self, i: int) -> str:
        """``"full"`` or ``"sliding"`` attention for layer ``i``."""
        return self.layer_types[i] if self.layer_types else "full"

    def rope_inv_freq(self, layer_type: str = "full") -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim // 2]`` (float32) for a layer type."""
        if layer_type == "sliding" and self.local_rope_theta > 0:
            return rope_inv_freq(self.head_dim, self.local_rope_theta)
        return rope_inv_freq(
            self.head_dim, self.rope_theta, scaling=self.rope_scaling, factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_len=self.rope_original_max_len)

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
    """RMSNorm computed in float32; scale applied as ``x * w`` (or ``x * (1 + w)``)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, axis_name: str = "norm",
                 plus_one: bool = False):
        init = jnp.zeros if plus_one else jnp.ones
        self.scale = nnx.Param(init((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        w = self.scale[...].astype(jnp.float32)
        return (y * (1.0 + w if self.plus_one else w)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias, q/k-norm, soft-capping."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, layer_type: str = "full"):
        pd = resolve_dtype(cfg.param_dtype)
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        std = cfg.init_std
        self.cfg = cfg
        self.layer_type = layer_type
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pd)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pd)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std, pd)
        lora_lib.attach(self, cfg.lora, rngs, lora_lib.ATTENTION)
        if cfg.qkv_bias:
            self.q_bias = _zeros((n, h), ("heads", "head_dim"), pd)
            self.k_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
            self.v_bias = _zeros((k, h), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            norm = dict(eps=cfg.norm_eps, param_dtype=pd, axis_name="head_dim",
                        plus_one=cfg.norm_plus_one)
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)

    def __call__(self, x_btd, positions_bt, mask_b1ts, cache: LayerCache | None = None,
                 cache_index: jax.Array | int = 0):
        """Attention output ``[b, t, d]``; with ``cache``, also the updated cache.

        With a cache, the new keys/values are written at slots ``cache_index ...``
        and the queries attend over every slot; ``mask_b1ts`` is then ``[b, 1, t, s]``.
        """
        cfg = self.cfg
        dt = resolve_dtype(cfg.dtype)
        q_btnh = project(x_btd, self.q_proj[...].astype(dt))
        k_btkh = project(x_btd, self.k_proj[...].astype(dt))
        v_btkh = project(x_btd, self.v_proj[...].astype(dt))
        q_btnh = lora_lib.apply(self, "q_proj", x_btd, q_btnh)
        k_btkh = lora_lib.apply(self, "k_proj", x_btd, k_btkh)
        v_btkh = lora_lib.apply(self, "v_proj", x_btd, v_btkh)
        if cfg.qkv_bias:
            q_btnh = q_btnh + self.q_bias[...].astype(dt)
            k_btkh = k_btkh + self.k_bias[...].astype(dt)
            v_btkh = v_btkh + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        inv_freq = cfg.rope_inv_freq(self.layer_type)
        q_btnh = checkpoint_name(rope(q_btnh, positions_bt, inv_freq), "query_proj")
        k_btkh = checkpoint_name(rope(k_btkh, positions_bt, inv_freq), "key_proj")
        v_btkh = checkpoint_name(v_btkh, "value_proj")
        if cache is not None:
            # From here on the keys/values span the cache's s slots, not the t new tokens.
            cache = LayerCache(*(
                constrain(jax.lax.dynamic_update_slice_in_dim(
                    c_bskh, x_btkh.astype(c_bskh.dtype), cache_index, axis=1), KV_CACHE_AXES)
                for c_bskh, x_btkh in ((cache.k_bskh, k_btkh), (cache.v_bskh, v_btkh))))
            k_btkh, v_btkh = cache.k_bskh.astype(dt), cache.v_bskh.astype(dt)
        q_btnh = constrain(q_btnh, ("act_batch", "act_seq", "act_heads", None))
        b, t, n, h = q_btnh.shape
        scale = (cfg.query_pre_attn_scalar or h) ** -0.5
        if cfg.attention == "splash" and cache is None:
            # Splash takes the packing segments themselves (``mask_b1ts`` is then the
            # ``[b, t]`` segment ids) and builds causality and the window block-sparsely.
            window = cfg.sliding_window if self.layer_type == "sliding" else 0
            out_btnh = splash_attention(q_btnh, k_btkh, v_btkh, mask_b1ts, scale, window,
                                         cfg.attn_softcap)
        elif cfg.attention != "xla" and cache is None:
            out_btnh = library_attention(q_btnh, k_btkh, v_btkh, mask_b1ts, scale,
                                          cfg.attention)
        else:
            g = n // cfg.n_kv_heads
            # Group query heads by their kv head so K/V are never repeated in memory.
            q_btkgh = q_btnh.reshape(b, t, cfg.n_kv_heads, g, h)
            logits_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh,
                                      k_btkh).astype(jnp.float32)
            logits_bkgts = softcap(logits_bkgts * scale, cfg.attn_softcap)
            logits_bkgts = jnp.where(mask_b1ts[:, :, None], logits_bkgts, -1e30)
            probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(dt)
            out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_btkh)
            out_btnh = out_btkgh.reshape(b, t, n, h)
        out_btd = project(out_btnh, self.o_proj[...].astype(dt), 2)
        out_btd = checkpoint_name(out_btd, "out_proj")
        out_btd = lora_lib.apply(self, "o_proj", out_btnh, out_btd)
        return out_btd if cache is None else (out_btd, cache)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)) — SwiGLU (silu) or GeGLU (gelu)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        d, f, std = cfg.d_model, cfg.mlp_dim, cfg.init_std
        self.cfg = cfg
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std, pd)
        lora_lib.attach(self, cfg.lora, rngs, lora_lib.MLP)

    def __call__(self, x_btd):
        dt = resolve_dtype(self.cfg.dtype)
        act = _ACTIVATIONS[self.cfg.mlp_activation]

        def proj(name: str, x):
            return lora_lib.apply(self, name, x, project(x, getattr(self, name)[...].astype(dt)))

        h_btf = constrain(act(proj("gate_proj", x_btd)) * proj("up_proj", x_btd),
                          ("act_batch", "act_seq", "act_mlp"))
        return proj("down_proj", h_btf)


class Block(nnx.Module):
    """Pre-norm decoder block: x + attn(norm(x)); x + mlp(norm(x)).

    With ``post_norms`` (Gemma 2/3) each sub-layer's output is normalised too:
    x + post_norm(attn(norm(x))).
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, layer_type: str = "full"):
        pd = resolve_dtype(cfg.param_dtype)
        norm = dict(eps=cfg.norm_eps, param_dtype=pd, plus_one=cfg.norm_plus_one)
        self.layer_type = layer_type
        self.attn_norm = RMSNorm(cfg.d_model, **norm)
        self.attn = Attention(cfg, rngs=rngs, layer_type=layer_type)
        self.mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.mlp = MLP(cfg, rngs=rngs)
        if cfg.post_norms:
            self.post_attn_norm = RMSNorm(cfg.d_model, **norm)
            self.post_mlp_norm = RMSNorm(cfg.d_model, **norm)
        self.post_norms = cfg.post_norms

    def __call__(self, x_btd, positions_bt, mask_b1ts, cache: LayerCache | None = None,
                 cache_index: jax.Array | int = 0):
        if cache is None:
            attn_btd = self.attn(self.attn_norm(x_btd), positions_bt, mask_b1ts)
        else:
            attn_btd, cache = self.attn(self.attn_norm(x_btd), positions_bt, mask_b1ts,
                                        cache, cache_index)
        if self.post_norms:
            attn_btd = self.post_attn_norm(attn_btd)
        x_btd = x_btd + attn_btd
        mlp_btd = self.mlp(self.mlp_norm(x_btd))
        if self.post_norms:
            mlp_btd = self.post_mlp_norm(mlp_btd)
        x_btd = x_btd + mlp_btd
        x_btd = constrain(x_btd, ("act_batch", "act_seq", "act_embed"))
        return x_btd if cache is None else (x_btd, cache)


def _call_block(block: Block, x_btd, positions_bt, mask_b1ts):
    return block(x_btd, positions_bt, mask_b1ts)


def _block_runner(remat: str, in_scan: bool):
    """``run(block, x, positions, mask)``: a block call, rematerialised per ``remat``.

    Outside a scan, XLA's common-subexpression elimination would merge the recomputation
    with the forward pass (undoing the remat) unless it is prevented.
    """
    if remat == "none":
        return _call_block
    return nnx.remat(_call_block, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


def _scan_blocks(layers, run, x_btd, positions_bt, mask_b1ts):
    """All blocks as one ``lax.scan`` over their weights stacked on a leading layer axis.

    Weights stay stored per layer (checkpoints and HF mappings do not change); they are
    stacked inside the step, which costs one copy of the layer weights in temporary
    memory and lets XLA compile a single block.
    """
    splits = [nnx.split(block) for block in layers]
    graphdef = splits[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in splits))

    def body(x_btd, state):
        return run(nnx.merge(graphdef, state), x_btd, positions_bt, mask_b1ts), None

    x_btd, _ = jax.lax.scan(body, x_btd, stacked)
    return x_btd


class Transformer(nnx.Module):
    """Decoder-only language model: ``model(tokens_bt) -> logits_btv``."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        pd = resolve_dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg.init_std, pd)
        self.layers = nnx.List([Block(cfg, rngs=rngs, layer_type=cfg.layer_type(i))
                                for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pd,
                                  plus_one=cfg.norm_plus_one)
        if not cfg.tie_embeddings:
            self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                  cfg.init_std, pd)

    def hidden(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
               segment_ids_bt: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states ``[b, t, d]`` (used by LM and scalar heads)."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        x_btd = self.embed_tokens(tokens_bt)
        if cfg.attention == "splash":  # the kernel masks from the segment ids
            masks = {"full": segment_ids_bt, "sliding": segment_ids_bt}
        else:
            masks = {"full": attention_mask(segment_ids_bt)}
            if "sliding" in cfg.layer_types:
                masks["sliding"] = attention_mask(segment_ids_bt, cfg.sliding_window)
        run = _block_runner(cfg.remat, cfg.scan_layers)
        if cfg.scan_layers:
            x_btd = _scan_blocks(self.layers, run, x_btd, positions_bt,
                                 masks[cfg.layer_type(0)])
        else:
            for block in self.layers:
                x_btd = run(block, x_btd, positions_bt, masks[block.layer_type])
        return self.final_norm(x_btd)

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        """Input embeddings ``[b, t, d]`` in the compute dtype."""
        cfg = self.cfg
        dt = resolve_dtype(cfg.dtype)
        # Gather from a whole table: a gather from a vocab/embed-sharded table
        # forces XLA into a full rematerialisation of its output anyway.
        table_vd = constrain(self.embed[...], (None, None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(dt)
        if cfg.scale_embeddings:
            # Rounded to the compute dtype first, as the reference implementation does.
            x_btd = x_btd * jnp.asarray(cfg.d_model ** 0.5, dt)
        return constrain(x_btd, ("act_batch", "act_seq", "act_embed"))

    def init_cache(self, batch: int, max_len: int) -> tuple[LayerCache, ...]:
        """A zeroed key/value cache of ``max_len`` slots per row, one entry per layer."""
        cfg = self.cfg
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        zeros = lambda: constrain(jnp.zeros(shape, resolve_dtype(cfg.dtype)),  # noqa: E731
                                  KV_CACHE_AXES)
        return tuple(LayerCache(zeros(), zeros()) for _ in self.layers)

    def hidden_cached(self, tokens_bt: jax.Array, positions_bt: jax.Array,
                      cache: tuple[LayerCache, ...], cache_index: jax.Array | int,
                      valid_bs: jax.Array) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Final-norm hidden states of tokens placed in cache slots ``cache_index ...``.

        Used for prefill (all prompt slots at once) and decode (one slot per step).
        Keys and values of ``tokens_bt`` are written into ``cache``; ``valid_bs``
        (bool ``[b, s]``) marks slots holding real tokens — left padding is
        False. Returns the hidden states and the updated cache.
        """
        cfg = self.cfg
        t = tokens_bt.shape[1]
        x_btd = self.embed_tokens(tokens_bt)
        masks = {"full": cache_attention_mask(valid_bs, cache_index, t)}
        if "sliding" in cfg.layer_types:
            masks["sliding"] = cache_attention_mask(valid_bs, cache_index, t,
                                                    cfg.sliding_window)
        new_cache = []
        for block, layer_cache in zip(self.layers, cache, strict=True):
            x_btd, layer_cache = block(x_btd, positions_bt, masks[block.layer_type],
                                       layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.final_norm(x_btd), tuple(new_cache)

    def decode(self, tokens_bt: jax.Array, positions_bt: jax.Array,
               cache: tuple[LayerCache, ...], cache_index: jax.Array | int,
               valid_bs: jax.Array) -> tuple[jax.Array, tuple[LayerCache, ...]]:
        """Logits of tokens decoded against a KV cache (see :meth:`hidden_cached`)."""
        h_btd, cache = self.hidden_cached(tokens_bt, positions_bt, cache, cache_index, valid_bs)
        return self.logits(h_btd), cache

    def logits_fn(self, temperature: float = 1.0) -> Callable[[jax.Array], jax.Array]:
        """A pure ``h_b?d -> float32 logits`` map (soft-capped, then divided by
        ``temperature`` unless it is 0 = greedy or 1), closing over the unembedding."""
        dt = resolve_dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            w_dv = self.embed[...].astype(dt).T
        else:
            w_dv = self.unembed[...].astype(dt)
        cap = self.cfg.final_softcap

        def fn(h_bcd: jax.Array) -> jax.Array:
            logits_bcv = project(h_bcd, w_dv, preferred_element_type=jnp.float32)
            logits_bcv = softcap(logits_bcv, cap)
            return logits_bcv if temperature in (0.0, 1.0) else logits_bcv / temperature

        return fn

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """Projects hidden states to float32 vocabulary logits (soft-capped if configured)."""
        return constrain(self.logits_fn()(h_btd), ("act_batch", "act_seq", "act_vocab"))

    def token_stats(self, h_btd: jax.Array, targets_bt: jax.Array, *, temperature: float = 1.0,
                    with_hits: bool = False, with_entropy: bool = False
                    ) -> dict[str, jax.Array]:
        """``logps_bt`` of ``targets_bt`` after hidden states ``h_btd`` (and, if asked,
        argmax ``hits_bt`` and ``entropy_bt``) under ``softmax(logits / temperature)``.

        With ``model.logits_chunk`` > 0 the logits are made chunk by chunk and never
        held whole (:func:`jaxalign.losses.chunked_token_stats`).
        """
        fn = self.logits_fn(temperature)
        chunk = self.cfg.logits_chunk
        if chunk and chunk < h_btd.shape[1]:
            return losses.chunked_token_stats(h_btd, fn, targets_bt, chunk=chunk,
                                              with_hits=with_hits, with_entropy=with_entropy)
        logits_btv = constrain(fn(h_btd), ("act_batch", "act_seq", "act_vocab"))
        return losses.token_stats(logits_btv, targets_bt, with_hits=with_hits,
                                  with_entropy=with_entropy)

    def __call__(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None,
                 segment_ids_bt: jax.Array | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens_bt, positions_bt, segment_ids_bt))
