"""Shared config skeleton and model presets; stage configs in ``configs/`` build on it."""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from jaxalign.sharding import DEFAULT_RULES

# Llama-shaped presets. "tiny" is for tests (seconds), "small" for the CPU demo.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 mlp_dim=64),
    "small": dict(vocab_size=384, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                  head_dim=32, mlp_dim=512),
}


def model_config(preset: str) -> ml_collections.ConfigDict:
    """Model section: a preset's shape plus every numerics option with its default."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {sorted(MODEL_PRESETS)}")
    m = ml_collections.ConfigDict()
    m.update(MODEL_PRESETS[preset])
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-6
    m.qkv_bias = False
    m.qk_norm = False
    m.tie_embeddings = False
    m.param_dtype = "float32"
    m.dtype = "float32"
    m.init_std = 0.02
    m.init_from = "scratch"
    return m


def base_config(stage: str) -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults. Stage configs override values."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = [list(r) for r in DEFAULT_RULES]

    c.model = model_config("tiny")
    c.tokenizer = "builtin:tasks"

    c.data = ml_collections.ConfigDict()
    c.data.train = "builtin:tasks"
    c.data.eval = "builtin:tasks"
    c.data.max_len = 48
    c.data.eval_batch_size = 64
    c.data.seed = 0
    c.data.overlong = "error"  # error | skip (counted, logged) | truncate

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 32
    c.train.micro_batches = 1
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 0  # 0 = the whole eval split
    c.train.nonfinite = "stop"  # stop | skip (the update is skipped and counted)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip_norm = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops = 0.0  # whole-job FLOP/s for MFU; 0 = measure with a matmul probe
    return c


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what ``WORKDIR/config.json`` holds)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
