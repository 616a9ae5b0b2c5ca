"""Architectures of released models, by name, as ``TransformerConfig`` fields.

Select one in a stage config with ``config.model = model_config("qwen2.5-0.5b")``
(``jaxalign.config.model_config``). A preset fixes the shape, so a run can be
planned (sharding, memory, FLOPs) before any weights exist; to start from the
released weights, set ``model.init_from = "hf:<dir>"`` as well.

``PUBLISHED_PARAMS`` holds the parameter counts the model cards report; a test
abstract-initialises each preset and checks its count against them.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = dict(rope_theta=500_000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192,
                    max_position_embeddings=131_072)
_GEMMA = dict(norm_plus_one=True, scale_embeddings=True, tie_embeddings=True,
              mlp_activation="gelu_tanh", norm_eps=1e-6)


def _gemma2_types(n: int) -> tuple[str, ...]:
    return tuple("sliding" if (i + 1) % 2 else "full" for i in range(n))


def _gemma3_types(n: int) -> tuple[str, ...]:
    return tuple("sliding" if (i + 1) % 6 else "full" for i in range(n))


PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        family="llama", vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=32, head_dim=128, mlp_dim=11_008, rope_theta=10_000.0, norm_eps=1e-5,
        max_position_embeddings=4096),
    "llama3.2-1b": dict(
        family="llama", vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32,
        n_kv_heads=8, head_dim=64, mlp_dim=8192, norm_eps=1e-5, tie_embeddings=True,
        rope_factor=32.0, **_LLAMA3_ROPE),
    "llama3.1-8b": dict(
        family="llama", vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=8, head_dim=128, mlp_dim=14_336, norm_eps=1e-5, rope_factor=8.0,
        **_LLAMA3_ROPE),
    # Mistral-7B-v0.1: every layer attends within a 4096-token window.
    "mistral-7b": dict(
        family="mistral", vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=8, head_dim=128, mlp_dim=14_336, rope_theta=10_000.0, norm_eps=1e-5,
        sliding_window=4096, layer_types=("sliding",) * 32, max_position_embeddings=32_768),
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=151_936, d_model=896, n_layers=24, n_heads=14,
        n_kv_heads=2, head_dim=64, mlp_dim=4864, qkv_bias=True, tie_embeddings=True,
        rope_theta=1_000_000.0, norm_eps=1e-6, max_position_embeddings=32_768),
    "qwen2.5-7b": dict(
        family="qwen2", vocab_size=152_064, d_model=3584, n_layers=28, n_heads=28,
        n_kv_heads=4, head_dim=128, mlp_dim=18_944, qkv_bias=True, rope_theta=1_000_000.0,
        norm_eps=1e-6, max_position_embeddings=32_768),
    "qwen3-0.6b": dict(
        family="qwen3", vocab_size=151_936, d_model=1024, n_layers=28, n_heads=16,
        n_kv_heads=8, head_dim=128, mlp_dim=3072, qk_norm=True, tie_embeddings=True,
        rope_theta=1_000_000.0, norm_eps=1e-6, max_position_embeddings=40_960),
    "qwen3-8b": dict(
        family="qwen3", vocab_size=151_936, d_model=4096, n_layers=36, n_heads=32,
        n_kv_heads=8, head_dim=128, mlp_dim=12_288, qk_norm=True, rope_theta=1_000_000.0,
        norm_eps=1e-6, max_position_embeddings=40_960),
    "gemma-2b": dict(
        family="gemma", vocab_size=256_000, d_model=2048, n_layers=18, n_heads=8,
        n_kv_heads=1, head_dim=256, mlp_dim=16_384, rope_theta=10_000.0,
        max_position_embeddings=8192, **_GEMMA),
    "gemma2-2b": dict(
        family="gemma2", vocab_size=256_000, d_model=2304, n_layers=26, n_heads=8,
        n_kv_heads=4, head_dim=256, mlp_dim=9216, rope_theta=10_000.0, post_norms=True,
        attn_softcap=50.0, final_softcap=30.0, query_pre_attn_scalar=256.0,
        sliding_window=4096, layer_types=_gemma2_types(26), max_position_embeddings=8192,
        **_GEMMA),
    "gemma3-1b": dict(
        family="gemma3", vocab_size=262_144, d_model=1152, n_layers=26, n_heads=4,
        n_kv_heads=1, head_dim=256, mlp_dim=6912, qk_norm=True, post_norms=True,
        rope_theta=1_000_000.0, local_rope_theta=10_000.0, query_pre_attn_scalar=256.0,
        sliding_window=512, layer_types=_gemma3_types(26), max_position_embeddings=32_768,
        **_GEMMA),
}

# Total parameter counts from the model cards / safetensors metadata of the releases.
PUBLISHED_PARAMS: dict[str, float] = {
    "llama2-7b": 6.74e9,
    "llama3.2-1b": 1.236e9,
    "llama3.1-8b": 8.03e9,
    "mistral-7b": 7.24e9,
    "qwen2.5-0.5b": 0.494e9,
    "qwen2.5-7b": 7.62e9,
    "qwen3-0.6b": 0.596e9,
    "qwen3-8b": 8.19e9,
    "gemma-2b": 2.51e9,
    "gemma2-2b": 2.61e9,
    "gemma3-1b": 1.0e9,
}


def get_preset(name: str) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of a released architecture.

    Raises:
      ValueError: unknown name (the message lists the known ones).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dict(PRESETS[name])
