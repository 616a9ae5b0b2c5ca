"""Shared config skeleton and model presets; stage configs in ``configs/`` build on it."""

from __future__ import annotations

import difflib
import json
import math
from typing import Any

import ml_collections

from jaxalign.sharding import DEFAULT_RULES

# Llama-shaped presets. "tiny" is for tests (seconds), "small" for the CPU demo.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 mlp_dim=64),
    "small": dict(vocab_size=512, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                  head_dim=32, mlp_dim=512),
}


def model_config(preset: str) -> ml_collections.ConfigDict:
    """Model section: a preset's shape plus every numerics option with its default.

    ``preset`` is ``tiny``/``small`` or a released architecture from
    ``jaxalign.models.presets`` (e.g. ``llama3.2-1b``, ``qwen2.5-0.5b``).
    """
    from jaxalign.models.presets import PRESETS as RELEASED

    if preset not in MODEL_PRESETS and preset not in RELEASED:
        raise ValueError(f"unknown model preset {preset!r}; known: "
                         f"{sorted(MODEL_PRESETS) + sorted(RELEASED)}")
    m = ml_collections.ConfigDict()
    m.update(MODEL_PRESETS.get(preset) or {
        k: v for k, v in RELEASED[preset].items() if k in MODEL_PRESETS["tiny"]})
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-6
    m.qkv_bias = False
    m.qk_norm = False
    m.tie_embeddings = False
    m.param_dtype = "float32"
    m.dtype = "float32"
    m.init_std = 0.02
    # Model families beyond Llama (see jaxalign.models.transformer.TransformerConfig).
    m.family = "llama"
    m.mlp_activation = "silu"
    m.norm_plus_one = False
    m.scale_embeddings = False
    m.post_norms = False
    m.attn_softcap = 0.0
    m.final_softcap = 0.0
    m.query_pre_attn_scalar = 0.0
    m.layer_types = ()
    m.sliding_window = 0
    m.local_rope_theta = 0.0
    m.rope_scaling = "none"
    m.rope_factor = 1.0
    m.rope_low_freq_factor = 1.0
    m.rope_high_freq_factor = 4.0
    m.rope_original_max_len = 8192
    m.max_position_embeddings = 8192
    # LoRA adapters (see jaxalign.models.lora); rank 0 = off, i.e. full fine-tuning.
    # targets: comma-separated projections (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    # down_proj) or attention | mlp | all.
    m.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets="all"))
    # Compute switches: speed and memory only, never the numbers (tests/test_compute_switches).
    m.attention = "xla"      # xla (einsum) | dot_product | cudnn (GPU) | splash (TPU)
    m.remat = "none"         # none | full | dots | qkv_proj | attn_proj | offload_qkv_proj
    m.scan_layers = False    # one lax.scan over the blocks (compile one layer)
    m.logits_chunk = 0       # >0: log-probs `logits_chunk` positions at a time (no [b,t,V])
    m.update({k: v for k, v in RELEASED.get(preset, {}).items() if k not in MODEL_PRESETS["tiny"]})
    m.init_from = "scratch"  # scratch | hf:<dir> | workdir:<dir> (see jaxalign.models.init_from)
    return m


def data_config() -> ml_collections.ConfigDict:
    """Data section (see jaxalign.data.loader.DataSettings for what each key does)."""
    d = ml_collections.ConfigDict()
    d.train = "builtin:tasks"  # builtin:<name> | jsonl:<path or glob> | tfds:<name>[/<cfg>][:<ver>]
    d.eval = "builtin:tasks"  # "" = no eval
    d.train_split = "train"
    d.eval_split = "eval"
    d.dir = ""  # JSONL conversions and TFDS datasets; "" = ~/.cache/jaxalign/datasets, TFDS's
    # Stage field -> source column, e.g. --config.data.fields.prompt=question; "" = same name.
    d.fields = ml_collections.ConfigDict({k: "" for k in (
        "messages", "prompt", "response", "completion", "chosen", "rejected", "label")})
    d.chat_template = "auto"  # auto | plain | chatml | llama3 | gemma | mistral | tokenizer | path
    d.max_len = 48
    d.max_prompt_len = 0  # prompt-only batches (RL); 0 = max_len
    d.eval_batch_size = 64
    d.seed = 0
    d.shuffle = True
    d.overlong = "error"  # error | truncate_left (prompt) | truncate_right | drop; counted
    d.on_bad_record = "error"  # error | skip (counted and logged by reason)
    d.pack = False  # SFT: best-fit-decreasing packing of several records per row
    d.pack_window = 512  # records per packing window
    d.num_workers = 0  # grain worker processes
    return d


def base_config(stage: str) -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults. Stage configs override values."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = [list(r) for r in DEFAULT_RULES]

    c.model = model_config("tiny")
    c.tokenizer = "builtin:world"  # builtin:<name> | SentencePiece model | tokenizer.json | HF dir

    c.data = data_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.batch_size = 32
    c.train.micro_batches = 1
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 0  # 0 = the whole eval split
    c.train.eval_at_start = False  # also evaluate the starting params (logged as step 0)
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
    # With LoRA: save only the trainable params (adapters, a new head) and their optimizer
    # state; resume and export rebuild the frozen base from model.init_from.
    c.checkpoint.adapters_only = False

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops = 0.0  # whole-job FLOP/s for MFU; 0 = measure with a matmul probe
    c.metrics.tensorboard = True  # event files under WORKDIR/tb/
    # Weights & Biases (needs `pip install wandb`): on when a project is named.
    c.metrics.wandb_project = ""
    c.metrics.wandb_entity = ""
    c.metrics.wandb_name = ""  # "" = the workdir's basename
    c.metrics.wandb_mode = ""  # "" (wandb's default) | online | offline | disabled
    return c


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what ``WORKDIR/config.json`` holds)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


# Sections whose keys are all defined by ``base_config``: any other key there is a typo.
_CLOSED_SECTIONS = ("mesh", "data", "train", "optim", "checkpoint", "metrics")
# Whole numbers and their least allowed value.
_INT_MIN = {"train.steps": 1, "train.batch_size": 1, "train.micro_batches": 1,
            "train.log_every": 1, "train.eval_every": 1, "train.eval_batches": 0,
            "data.max_len": 1, "data.max_prompt_len": 0, "data.eval_batch_size": 1,
            "data.pack_window": 1, "data.num_workers": 0, "data.seed": 0,
            "checkpoint.save_every": 1, "checkpoint.keep": 0, "optim.warmup_steps": 0,
            **{f"model.{k}": 1 for k in MODEL_PRESETS["tiny"]}}
# Non-negative numbers (an infinite learning rate stays possible, for NaN-guard tests).
_NON_NEGATIVE = ("optim.learning_rate", "optim.final_lr_fraction", "optim.b1", "optim.b2",
                 "optim.eps", "optim.weight_decay", "optim.grad_clip_norm",
                 "metrics.peak_flops")


def _unknown_keys(have: Any, want: Any, prefix: str) -> list[str]:
    out = []
    for key in have.keys():
        name = f"{prefix}.{key}"
        if key not in want:
            close = difflib.get_close_matches(key, list(want.keys()), n=1)
            out.append(f"unknown key {name}" + (f" (did you mean {prefix}.{close[0]}?)"
                                                 if close else ""))
        elif isinstance(want[key], ml_collections.ConfigDict) and hasattr(have[key], "keys"):
            out += _unknown_keys(have[key], want[key], name)
    return out


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks keys, types and ranges of the shared sections before any work starts.

    Unknown keys in the sections every stage shares (a typo such as
    ``train.stpes`` in a config file) and sizes that cannot work (``train.log_every=0``,
    a negative ``data.max_len``, ``None`` for a step count) are reported together.

    Raises:
      ValueError: naming every offending key and what it must be.
    """
    base = base_config(str(config.get("stage", "sft")))
    problems = []
    for section in _CLOSED_SECTIONS:
        if section in config and hasattr(config[section], "keys"):
            problems += _unknown_keys(config[section], base[section], section)

    def get(name: str) -> tuple[bool, Any]:
        node: Any = config
        for part in name.split("."):
            if not hasattr(node, "keys") or part not in node:
                return False, None
            node = node[part]
        return True, node

    for name, least in _INT_MIN.items():
        found, value = get(name)
        if found and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            problems.append(f"{name}={value!r} must be a whole number >= {least}")
    for name in _NON_NEGATIVE:
        found, value = get(name)
        if found and (isinstance(value, bool) or not isinstance(value, int | float)
                      or math.isnan(value) or value < 0):
            problems.append(f"{name}={value!r} must be a number >= 0")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
