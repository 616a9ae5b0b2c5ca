"""Attention kernels of the decoder: RoPE, masks (causal, packed segments, sliding
window, KV cache) and the library / Pallas splash attention backends."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxalign.sharding import bound_mesh_rules, logical_to_spec

ROPE_SCALINGS = ("none", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, *, scaling: str = "none", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_len: int = 8192) -> np.ndarray:
    """RoPE inverse frequencies, optionally scaled (linear, or Llama 3.1's banded scheme).

    Computed once on the host in float64 and rounded to float32, so every layer
    and every trace sees the same constants.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling == "linear":
        inv = inv / factor
    elif scaling == "llama3":
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and
        # the band between interpolated smoothly (Llama 3.1's context extension).
        wavelen = 2 * np.pi / inv
        low_wavelen = original_max_len / low_freq_factor
        high_wavelen = original_max_len / high_freq_factor
        smooth = (original_max_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / factor,
                       np.where(wavelen < high_wavelen, inv, mid))
    elif scaling != "none":
        raise ValueError(f"unknown RoPE scaling {scaling!r}; expected one of {ROPE_SCALINGS}")
    return inv.astype(np.float32)


def rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float | np.ndarray) -> jax.Array:
    """Rotary embedding, half-split layout (as in HF Llama's ``rotate_half``).

    Args:
      x_btnh: queries or keys.
      positions_bt: token positions.
      theta: the RoPE base, or precomputed inverse frequencies ``[h // 2]``
        (see :func:`rope_inv_freq`).
    """
    h = x_btnh.shape[-1]
    freq_h = np.asarray(theta, np.float32)
    if freq_h.ndim == 0:
        freq_h = rope_inv_freq(h, float(theta))
    angle_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(freq_h)
    sin, cos = jnp.sin(angle_bth)[:, :, None, :], jnp.cos(angle_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def attention_mask(segment_ids_bt: jax.Array, sliding_window: int = 0) -> jax.Array:
    """Causal mask AND same-segment mask (AND a sliding window); segment 0 marks padding.

    Returns a boolean ``[b, 1, t, s]`` mask. Padding queries attend to themselves
    only so that no row is fully masked (their outputs carry no loss). With
    ``sliding_window > 0`` query ``t`` sees keys ``s`` with ``t - s < sliding_window``
    (itself included), as Mistral and Gemma 2/3 do.
    """
    t = segment_ids_bt.shape[1]
    causal_ts = jnp.tril(jnp.ones((t, t), dtype=bool))
    if sliding_window > 0:
        causal_ts = causal_ts & ~jnp.tril(jnp.ones((t, t), dtype=bool), k=-sliding_window)
    same_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    real_bs = (segment_ids_bt != 0)[:, None, :]
    mask_bts = causal_ts[None] & same_bts & real_bs
    mask_bts = mask_bts | jnp.eye(t, dtype=bool)[None]
    return mask_bts[:, None]


def softcap(x: jax.Array, cap: float) -> jax.Array:
    return x if cap <= 0 else cap * jnp.tanh(x / cap)


class LayerCache(NamedTuple):
    """One layer's key/value cache: keys and values after RoPE (and k-norm), per slot."""

    k_bskh: jax.Array
    v_bskh: jax.Array


KV_CACHE_AXES = ("act_batch", "act_seq", "act_kv_heads", None)


def cache_attention_mask(valid_bs: jax.Array, cache_index: jax.Array | int, t: int,
                         sliding_window: int = 0) -> jax.Array:
    """``[b, 1, t, s]`` mask of queries in cache slots ``cache_index + [0, t)`` over all slots.

    A query sees the valid slots at or before its own (within the window), and
    always itself, as :func:`attention_mask` does. Real tokens fill consecutive
    slots (prompts are left-padded), so slot distance equals position distance.
    """
    s = valid_bs.shape[1]
    q_slot_t1 = cache_index + jnp.arange(t)[:, None]
    k_slot_1s = jnp.arange(s)[None, :]
    seen_ts = k_slot_1s <= q_slot_t1
    if sliding_window > 0:
        seen_ts = seen_ts & (q_slot_t1 - k_slot_1s < sliding_window)
    mask_bts = (valid_bs[:, None, :] & seen_ts[None]) | (k_slot_1s == q_slot_t1)[None]
    return mask_bts[:, None]


def library_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                       mask_b1ts: jax.Array, scale: float, impl: str) -> jax.Array:
    """Attention through ``jax.nn.dot_product_attention`` (XLA or cuDNN), same masking.

    ``mask_b1ts`` carries causality, packing segments and sliding windows, so every
    backend sees exactly the mask of the einsum path.
    """
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("model.attention='cudnn' needs a GPU backend; this process runs on "
                         f"{jax.default_backend()!r} (use 'xla' or 'dot_product')")
    # Causal on top of the mask it already implies: cuDNN then skips the blocks above the
    # diagonal instead of reading them from the mask.
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, scale=scale,
        is_causal=q_btnh.shape[1] == k_bskh.shape[1],
        implementation="cudnn" if impl == "cudnn" else "xla")


@functools.cache
def _splash_kernel(group: int, t: int, window: int, softcap: float, interpret: bool):
    """The splash MQA kernel for ``group`` query heads per kv head over ``t`` positions:
    causal, within ``window`` positions when > 0, packing segments given per call."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    block = next(x for x in (512, 256, 128) if t % x == 0)
    mask = (masks.LocalMask((t, t), window_size=(window - 1, 0), offset=0) if window > 0
            else masks.CausalMask((t, t)))
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # its mask tables are constants, safe to cache
        return splash.make_splash_mqa_single_device(
            masks.MultiHeadMask([mask] * group), block_sizes=sizes,
            attn_logits_soft_cap=softcap or None, interpret=interpret)


def splash_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                      segment_ids_bt: jax.Array, scale: float, window: int,
                      softcap: float) -> jax.Array:
    """Attention through the Pallas splash kernel (block-sparse causal/sliding mask,
    packing segments as segment ids, optional soft-capping), one MQA call per kv head.

    Under a bound mesh the kernel runs per shard (``shard_map``): batch as the rules
    shard it, heads over the same axes for queries and keys/values (or not at all).
    Padding (segment 0) never meets a real token; padding rows carry no loss.
    """
    backend = jax.default_backend()
    if backend == "gpu":
        raise ValueError("model.attention='splash' is a TPU kernel; on a GPU use 'cudnn'")
    b, t, n, h = q_btnh.shape
    if t % 128:
        raise ValueError(f"model.attention='splash' needs a sequence length that is a "
                         f"multiple of 128 (data.max_len); got {t}")
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    kernel = _splash_kernel(n // k_btkh.shape[2], t, window, float(softcap), backend != "tpu")

    def attend(q_btnh, k_btkh, v_btkh, seg_bt):
        def one(q_tnh, k_tkh, v_tkh, seg_t):
            kh = k_tkh.shape[1]
            q_kgth = q_tnh.reshape(t, kh, -1, h).transpose(1, 2, 0, 3)
            ids = SegmentIds(seg_t, seg_t)
            o_kgth = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(
                q_kgth, k_tkh.transpose(1, 0, 2), v_tkh.transpose(1, 0, 2))
            return o_kgth.transpose(2, 0, 1, 3).reshape(t, -1, h)
        return jax.vmap(one)(q_btnh * scale, k_btkh, v_btkh, seg_bt)

    bound = bound_mesh_rules()
    if bound is not None:
        mesh, rules = bound
        q_spec = logical_to_spec(("act_batch", None, "act_heads", None), rules, mesh,
                                 q_btnh.shape)
        kv_spec = logical_to_spec(("act_batch", None, "act_kv_heads", None), rules, mesh,
                                  k_btkh.shape)
        if q_spec[2] != kv_spec[2]:  # heads split alike or not at all keeps the groups
            q_spec = P(q_spec[0], None, None, None)
            kv_spec = P(kv_spec[0], None, None, None)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                            P(q_spec[0], None)),
                               out_specs=q_spec, check_vma=False)
    return attend(q_btnh, k_btkh, v_btkh, segment_ids_bt)
