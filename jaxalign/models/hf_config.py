"""Hugging Face ``config.json`` <-> :class:`TransformerConfig`, per model family.

Reads both the transformers 4.x style (``rope_theta``, ``rope_scaling``,
``rope_local_base_freq``, ``sliding_window_pattern``) and the 5.x style
(``rope_parameters``, nested per layer type for Gemma 3; ``layer_types``).
Writes the 5.x keys together with the 4.x ones, so that either generation of
transformers (and the tools built on them) reads an export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxalign.models.transformer import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """How one HF architecture maps onto the shared decoder."""

    architecture: str
    model_type: str
    # TransformerConfig fields every model of the family has (checked on export).
    fixed: dict[str, Any]
    tie_default: bool
    max_len_default: int
    activation_key: str = "hidden_act"
    # Whether the config.json carries layer_types / a sliding window we can express.
    sliding: str = "none"  # none | all (Mistral) | qwen | gemma2 | gemma3


_GEMMA = dict(norm_plus_one=True, scale_embeddings=True)
_PLAIN = dict(norm_plus_one=False, scale_embeddings=False, post_norms=False, attn_softcap=0.0,
              final_softcap=0.0, query_pre_attn_scalar=0.0, local_rope_theta=0.0)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama",
                    dict(_PLAIN, qkv_bias=False, qk_norm=False), False, 2048),
    "mistral": Family("MistralForCausalLM", "mistral",
                      dict(_PLAIN, qkv_bias=False, qk_norm=False), False, 131072,
                      sliding="all"),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2",
                    dict(_PLAIN, qkv_bias=True, qk_norm=False), False, 32768, sliding="qwen"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3",
                    dict(_PLAIN, qkv_bias=False, qk_norm=True), False, 32768, sliding="qwen"),
    "gemma": Family("GemmaForCausalLM", "gemma",
                    dict(_GEMMA, qkv_bias=False, qk_norm=False, post_norms=False,
                         attn_softcap=0.0, final_softcap=0.0, local_rope_theta=0.0),
                    True, 8192),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2",
                     dict(_GEMMA, qkv_bias=False, qk_norm=False, post_norms=True,
                          local_rope_theta=0.0),
                     True, 8192, activation_key="hidden_activation", sliding="gemma2"),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text",
                     dict(_GEMMA, qkv_bias=False, qk_norm=True, post_norms=True), True, 131072,
                     activation_key="hidden_activation", sliding="gemma3"),
}
_BY_ARCH = {f.architecture: name for name, f in FAMILIES.items()}
_BY_MODEL_TYPE = {f.model_type: name for name, f in FAMILIES.items()}

# HF activation name -> ours, and back.
_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu": "gelu"}
_ACT_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_LAYER_TYPE_FROM_HF = {"full_attention": "full", "sliding_attention": "sliding"}
_LAYER_TYPE_TO_HF = {v: k for k, v in _LAYER_TYPE_FROM_HF.items()}

# Keys carried from a source config.json into an export unchanged (token ids, init scale).
CARRIED_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def read_config_json(path: str) -> dict[str, Any]:
    """Reads ``<path>/config.json`` (``path`` may also be the file itself).

    Raises:
      FileNotFoundError: there is no config.json.
      ValueError: it is not a JSON object.
    """
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found: a Hugging Face checkpoint directory needs a config.json")
    with open(file, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def family_of(hf: dict[str, Any], where: str = "config.json") -> str:
    """The jaxalign family of an HF config (from ``architectures``, else ``model_type``).

    Raises:
      ValueError: the architecture is not supported; the message lists those that are.
    """
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    if not archs and hf.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[hf["model_type"]]
    got = archs or [f"model_type={hf.get('model_type')!r}"]
    hint = ""
    if "Gemma3ForConditionalGeneration" in archs:
        hint = " (multimodal Gemma 3 is not supported; export its text model as Gemma3ForCausalLM)"
    raise ValueError(f"{where}: unsupported architecture {', '.join(map(str, got))}{hint}; "
                     f"jaxalign supports {', '.join(supported_architectures())}")


def _require(hf: dict[str, Any], key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise ValueError(f"{where}: missing required key {key!r}")
    return hf[key]


def _one_rope(params: dict[str, Any], default_theta: float, max_len: int,
              where: str) -> dict[str, Any]:
    """One HF rope dict -> our rope fields."""
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or default_theta)
    out = dict(rope_theta=theta, rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_len=8192)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor="
                         f"{params['partial_rotary_factor']} is not supported")
    if kind == "default":
        return out
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
        return out
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params.get("original_max_position_embeddings")
                                             or max_len))
        return out
    raise ValueError(f"{where}: RoPE type {kind!r} is not supported (supported: default, "
                     "linear, llama3)")


def _parse_rope(hf: dict[str, Any], family: str, max_len: int, where: str) -> dict[str, Any]:
    """RoPE fields from either config style; sliding layers may get their own base."""
    default_global = 1_000_000.0 if family == "gemma3" else 10_000.0
    theta = hf.get("rope_theta")
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if isinstance(params, dict) and ("full_attention" in params
                                     or "sliding_attention" in params):
        full = dict(params.get("full_attention") or {})
        local = params.get("sliding_attention")
    else:
        # 4.x writes rope_scaling next to rope_theta; 5.x folds both into rope_parameters.
        full = dict(params or {})
        if scaling:
            full.update(scaling)
        local = None
    if not full.get("rope_theta"):
        full["rope_theta"] = theta or default_global
    out = _one_rope(full, default_global, max_len, where)
    if family == "gemma3":
        if local is None:
            local = {"rope_theta": hf.get("rope_local_base_freq") or 10_000.0}
        local_rope = _one_rope(local, 10_000.0, max_len, where + " (sliding_attention RoPE)")
        if local_rope["rope_scaling"] != "none":
            raise ValueError(f"{where}: scaled RoPE on sliding layers is not supported")
        out["local_rope_theta"] = local_rope["rope_theta"]
    elif local is not None:
        local_rope = _one_rope(dict(local), out["rope_theta"], max_len, where)
        if local_rope != out:
            if local_rope["rope_scaling"] != "none":
                raise ValueError(f"{where}: scaled RoPE on sliding layers is not supported")
            out["local_rope_theta"] = local_rope["rope_theta"]
    return out


def _parse_layer_types(hf: dict[str, Any], family: str, n_layers: int,
                       where: str) -> tuple[tuple[str, ...], int]:
    """``(layer_types, sliding_window)``; ``()`` means every layer attends fully."""
    kind = FAMILIES[family].sliding
    window = hf.get("sliding_window")
    if kind == "none":
        return (), 0
    if kind == "all":  # Mistral: one window for every layer, or none.
        return ((("sliding",) * n_layers, int(window)) if window else ((), 0))
    names = hf.get("layer_types")
    if names is None:
        if kind == "qwen":
            if not (hf.get("use_sliding_window") and window):
                return (), 0
            first = int(hf.get("max_window_layers", n_layers))
            names = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(n_layers)]
        else:
            # Gemma 2 alternates from its first layer; Gemma 3 makes every 6th layer global.
            pattern = 2 if kind == "gemma2" else int(hf.get("sliding_window_pattern", 6))
            names = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(n_layers)]
    if kind == "qwen" and not hf.get("use_sliding_window", False):
        window = None  # transformers ignores a Qwen window unless use_sliding_window is set
    if len(names) != n_layers:
        raise ValueError(f"{where}: layer_types has {len(names)} entries for "
                         f"num_hidden_layers={n_layers}")
    unknown = sorted(set(names) - set(_LAYER_TYPE_FROM_HF))
    if unknown:
        raise ValueError(f"{where}: layer types {unknown} are not supported (supported: "
                         f"{sorted(_LAYER_TYPE_FROM_HF)})")
    types = tuple(_LAYER_TYPE_FROM_HF[n] for n in names)
    if "sliding" not in types or not window:
        return (), 0
    return types, int(window)


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json",
                   param_dtype: str = "float32", dtype: str = "float32") -> TransformerConfig:
    """Builds the decoder config described by an HF ``config.json`` dict.

    Args:
      hf: the parsed config.json.
      where: names the file in error messages.
      param_dtype: dtype of the parameters.
      dtype: compute dtype.

    Raises:
      ValueError: unsupported architecture or feature, or a missing key; the
        message names the file and the key.
    """
    family = family_of(hf, where)
    fam = FAMILIES[family]
    d = int(_require(hf, "hidden_size", where))
    n_heads = int(_require(hf, "num_attention_heads", where))
    n_layers = int(_require(hf, "num_hidden_layers", where))
    default_head = 256 if family.startswith("gemma") else d // n_heads
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag) and family != "qwen2":
            raise ValueError(f"{where}: {flag}=true is not supported for {fam.architecture}")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{where}: use_bidirectional_attention=true is not supported (decoder "
                         "language models only)")
    act_name = hf.get(fam.activation_key) or hf.get("hidden_act") or (
        "silu" if not family.startswith("gemma") else "gelu_pytorch_tanh")
    if act_name not in _ACT_FROM_HF:
        raise ValueError(f"{where}: activation {act_name!r} is not supported (supported: "
                         f"{sorted(_ACT_FROM_HF)})")
    max_len = int(hf.get("max_position_embeddings") or fam.max_len_default)
    layer_types, window = _parse_layer_types(hf, family, n_layers, where)
    fields: dict[str, Any] = dict(
        family=family,
        vocab_size=int(_require(hf, "vocab_size", where)),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or default_head),
        mlp_dim=int(_require(hf, "intermediate_size", where)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", fam.tie_default)),
        mlp_activation=_ACT_FROM_HF[act_name],
        max_position_embeddings=max_len,
        layer_types=layer_types,
        sliding_window=window,
        param_dtype=param_dtype,
        dtype=dtype,
    )
    fields.update(fam.fixed)
    fields.update(_parse_rope(hf, family, max_len, where))
    if family in ("gemma2", "gemma3"):
        fields["attn_softcap"] = float(hf.get("attn_logit_softcapping") or 0.0)
        fields["final_softcap"] = float(hf.get("final_logit_softcapping") or 0.0)
        fields["query_pre_attn_scalar"] = float(hf.get("query_pre_attn_scalar") or 256)
    return TransformerConfig(**fields)


def _rope_dict(cfg: TransformerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        out.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        out.update(rope_type="llama3", factor=cfg.rope_factor,
                   low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
    return out


def check_exportable(cfg: TransformerConfig) -> None:
    """Raises ValueError when ``cfg.family``'s HF architecture cannot express ``cfg``."""
    fam = FAMILIES[cfg.family]
    bad = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fam.fixed.items()
           if getattr(cfg, k) != v]
    if cfg.family in ("llama", "gemma") and cfg.query_pre_attn_scalar not in (0, cfg.head_dim):
        bad.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (needs head_dim)")
    sliding = "sliding" in cfg.layer_types
    if fam.sliding == "none" and sliding:
        bad.append("sliding-window layers")
    if fam.sliding == "all" and sliding and set(cfg.layer_types) != {"sliding"}:
        bad.append("a mix of sliding and full layers (Mistral slides every layer or none)")
    if fam.sliding == "gemma3" and cfg.local_rope_theta <= 0:
        bad.append("local_rope_theta=0 (Gemma 3 needs the sliding layers' RoPE base)")
    if bad:
        raise ValueError(f"model.family={cfg.family!r} ({fam.architecture}) cannot express: "
                         + "; ".join(bad) + ". Pick the family whose architecture has these "
                         "features.")


def config_to_hf(cfg: TransformerConfig, *, dtype: str = "float32",
                 carried: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF ``config.json`` dict for ``cfg`` (``cfg.family`` picks the architecture).

    Args:
      cfg: the decoder config.
      dtype: the dtype the safetensors are written in.
      carried: values for :data:`CARRIED_KEYS` (token ids, ...), e.g. from the
        checkpoint the run started from.

    Raises:
      ValueError: the family's architecture cannot express ``cfg``.
    """
    check_exportable(cfg)
    fam = FAMILIES[cfg.family]
    out: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        fam.activation_key: _ACT_TO_HF[cfg.mlp_activation],
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.family != "qwen2":
        out["attention_bias"] = False
    if cfg.family == "llama":
        out["mlp_bias"] = False
    rope = _rope_dict(cfg)
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = None if cfg.rope_scaling == "none" else {
        k: v for k, v in rope.items() if k != "rope_theta"}
    out["rope_parameters"] = rope
    layer_types = cfg.layer_types or ("full",) * cfg.n_layers
    hf_types = [_LAYER_TYPE_TO_HF[t] for t in layer_types]
    sliding = "sliding" in layer_types
    if fam.sliding == "all":
        out["sliding_window"] = cfg.sliding_window if sliding else None
    elif fam.sliding == "qwen":
        out["use_sliding_window"] = sliding
        out["sliding_window"] = cfg.sliding_window if sliding else None
        out["max_window_layers"] = (layer_types.index("sliding") if sliding else cfg.n_layers)
        out["layer_types"] = hf_types
    elif fam.sliding in ("gemma2", "gemma3"):
        # A model without sliding layers still needs a window value; any covers the context.
        out["sliding_window"] = cfg.sliding_window or cfg.max_position_embeddings
        out["layer_types"] = hf_types
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        # transformers 5 validates this field as an int.
        out["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        out["attn_logit_softcapping"] = cfg.attn_softcap or None
        out["final_logit_softcapping"] = cfg.final_softcap or None
    if cfg.family == "gemma3":
        # transformers before layer_types (4.50-4.52) only knew "every k-th layer is global".
        for k in range(1, cfg.n_layers + 2):
            if layer_types == tuple("sliding" if (i + 1) % k else "full"
                                    for i in range(cfg.n_layers)):
                out["sliding_window_pattern"] = k
                break
        local = {"rope_type": "default", "rope_theta": cfg.local_rope_theta}
        out["rope_local_base_freq"] = cfg.local_rope_theta
        out["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    for key, value in (carried or {}).items():
        if key in CARRIED_KEYS:
            out[key] = value
    return out
