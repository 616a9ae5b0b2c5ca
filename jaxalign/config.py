"""Config defaults, the config-file loader and the override parser.

A run's config is an ``ml_collections.ConfigDict``: the sections every stage shares
(defined here) plus the sections of its stage (each stage's ``default_config`` hook in
``jaxalign.algos``; the rejection-sampling job's in ``jaxalign.jobs.rejection``).
Every key is defined with :func:`section` as ``name=(default, meaning)``, so
``python -m launch.config_doc`` can write the reference of every key
(``docs/config.md``). Config files in ``configs/`` only hold presets:
``get_config(arg)`` returns :func:`base_config` with the preset's changes.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxalign.models.presets import PRESETS as RELEASED
from jaxalign.sharding import DEFAULT_RULES

# Meaning of every key defined with ``section`` (dotted path -> text), and of each section.
_MEANINGS: dict[str, str] = {}
_SECTION_DOCS: dict[str, str] = {}


def section(name: str, doc: str, /, **keys: Any) -> ml_collections.ConfigDict:
    """A config section whose keys carry their meaning.

    Args:
      name: the section's dotted path (``""`` for the top level, ``model.lora``).
      doc: one line on what the section configures.
      **keys: ``key=(default, meaning)``, or ``key=<ConfigDict>`` for a nested section
        built with ``section(f"{name}.{key}", ...)``.

    Returns:
      The section with its defaults; the meanings are kept for :func:`meaning`.
    """
    out = ml_collections.ConfigDict()
    _SECTION_DOCS[name] = doc
    for key, spec in keys.items():
        if isinstance(spec, ml_collections.ConfigDict):
            out[key] = spec
            continue
        default, text = spec
        out[key] = default
        _MEANINGS[f"{name}.{key}" if name else key] = text
    return out


def meaning(key: str) -> str:
    """The meaning of a dotted key (e.g. ``optim.learning_rate``); "" if undocumented."""
    return _MEANINGS.get(key, "")


def section_doc(name: str) -> str:
    """What section ``name`` configures; "" if undocumented."""
    return _SECTION_DOCS.get(name, "")


# Llama-shaped presets. "tiny" is for tests (seconds), "small" for the CPU demo.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 mlp_dim=64),
    "small": dict(vocab_size=512, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2,
                  head_dim=32, mlp_dim=512),
    # ~2.6x small: a distillation teacher for the small student.
    "medium": dict(vocab_size=512, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2,
                   head_dim=32, mlp_dim=768),
}
_SHAPE = dict(vocab_size="token ids the embedding and output layer cover",
              d_model="width of the residual stream", n_layers="decoder blocks",
              n_heads="query heads", n_kv_heads="key/value heads (grouped-query attention)",
              head_dim="width of one attention head", mlp_dim="hidden width of the MLP")


def sampling_keys(temperature_note: str = "") -> dict[str, tuple[Any, str]]:
    """The sampler's keys and the reward spec, with defaults and meanings, for the sections
    that sample and score completions (``rl``, ``rejection``)."""
    return dict(
        max_new_tokens=(16, "longest completion, in tokens"),
        temperature=(1.0, "sampling temperature" + temperature_note),
        top_k=(0, "sample among the k likeliest tokens; 0 = all"),
        top_p=(1.0, "nucleus sampling: the smallest set of tokens with this much mass; "
               "1 = all"),
        rewards=("exact_answer", "\"name[:weight],...\" of reward functions "
                 "(jaxalign.rewards), module:function[:weight] for your own, rm:<RM workdir> "
                 "for a reward model"),
    )


def model_config(preset: str) -> ml_collections.ConfigDict:
    """Model section: a preset's shape plus every numerics option with its default.

    ``preset`` is ``tiny``/``small`` or a released architecture from
    ``jaxalign.models.presets`` (e.g. ``llama3.2-1b``, ``qwen2.5-0.5b``).
    """
    if preset not in MODEL_PRESETS and preset not in RELEASED:
        raise ValueError(f"unknown model preset {preset!r}; known: "
                         f"{sorted(MODEL_PRESETS) + sorted(RELEASED)}")
    shape = MODEL_PRESETS.get(preset) or {k: RELEASED[preset][k] for k in MODEL_PRESETS["tiny"]}
    m = section(
        "model", "The decoder's shape and numerics (jaxalign.models.transformer."
        "TransformerConfig), adapters, compute switches and initial weights.",
        **{k: (v, _SHAPE[k]) for k, v in shape.items()},
        rope_theta=(10_000.0, "RoPE base frequency"),
        norm_eps=(1e-6, "epsilon of the RMSNorms"),
        qkv_bias=(False, "biases on the query/key/value projections (Qwen2)"),
        qk_norm=(False, "RMSNorm on queries and keys per head (Qwen3, Gemma 3)"),
        tie_embeddings=(False, "the output layer reuses the embedding table"),
        param_dtype=("float32", "dtype the parameters are stored and updated in"),
        dtype=("float32", "dtype of the activations and matmuls; auto = bfloat16 on GPU/TPU, "
               "float32 on CPU"),
        init_std=(0.02, "standard deviation of the random initial weights"),
        family=("llama", "Hugging Face architecture an export writes: llama | mistral | "
                "qwen2 | qwen3 | gemma | gemma2 | gemma3"),
        mlp_activation=("silu", "gate activation of the gated MLP: silu | gelu_tanh (Gemma) | "
                        "gelu"),
        norm_plus_one=(False, "RMSNorm weights centred on zero, scaling by (1 + w) (Gemma)"),
        scale_embeddings=(False, "multiply the embedding output by sqrt(d_model) (Gemma)"),
        post_norms=(False, "also normalise the attention and MLP outputs before the residual "
                    "add (Gemma 2/3)"),
        attn_softcap=(0.0, "tanh soft-cap of attention scores, cap * tanh(x / cap); 0 = off"),
        final_softcap=(0.0, "tanh soft-cap of the final logits; 0 = off"),
        query_pre_attn_scalar=(0.0, "attention scores are scaled by this ** -0.5; "
                               "0 = head_dim"),
        layer_types=((), "per-layer 'full' or 'sliding' attention; () = every layer full"),
        sliding_window=(0, "sliding layers see the last this many positions, themselves "
                        "included"),
        local_rope_theta=(0.0, "RoPE base of sliding layers (unscaled); 0 = the full layers' "
                          "RoPE"),
        rope_scaling=("none", "RoPE frequency scaling of full layers: none | linear | llama3"),
        rope_factor=(1.0, "RoPE scaling factor"),
        rope_low_freq_factor=(1.0, "llama3 RoPE scaling: low-frequency factor"),
        rope_high_freq_factor=(4.0, "llama3 RoPE scaling: high-frequency factor"),
        rope_original_max_len=(8192, "llama3 RoPE scaling: the original context length"),
        max_position_embeddings=(8192, "context length the model was trained for (metadata "
                                 "carried into exports)"),
        lora=section(
            "model.lora", "LoRA adapters (jaxalign.models.lora); rank 0 = off, i.e. full "
            "fine-tuning.",
            rank=(0, "adapter rank; 0 = no adapters (full fine-tuning)"),
            alpha=(16.0, "adapter scale numerator: the update is alpha / rank * B A"),
            dropout=(0.0, "dropout on the adapter input while training"),
            targets=("all", "comma-separated projections (q_proj, k_proj, v_proj, o_proj, "
                     "gate_proj, up_proj, down_proj) or attention | mlp | all")),
        attention=("xla", "attention kernel (speed and memory only, never the numbers): xla "
                   "(einsum) | dot_product | cudnn (GPU) | splash (TPU)"),
        remat=("none", "rematerialisation of each block in the backward pass: none | full | "
               "dots | qkv_proj | attn_proj | offload_qkv_proj"),
        scan_layers=(False, "one lax.scan over the blocks (compile one layer)"),
        logits_chunk=(0, "> 0: log-probs this many positions at a time, never holding the "
                      "[b, t, vocab] logits; 0 = whole sequence"),
        init_from=("scratch", "initial weights: scratch | hf:<dir> | gguf:<file> (llama.cpp; "
                   "dequantised) | workdir:<dir> (the latest checkpoint of an earlier run; "
                   "jaxalign.models.init_from); <dir>/<file> may be a gs:// URL"),
    )
    m.update({k: v for k, v in RELEASED.get(preset, {}).items() if k not in MODEL_PRESETS["tiny"]})
    return m


def data_config() -> ml_collections.ConfigDict:
    """Data section (``jaxalign.data.loader.DataSettings`` reads it)."""
    return section(
        "data", "Where records come from and how they become batches (jaxalign.data.loader."
        "DataSettings).",
        train=("builtin:tasks", "training source: builtin:<name> | jsonl:<path or glob> | "
               "parquet:<path or glob> | arrow:<save_to_disk dir> | tfds:<name>[/<cfg>][:<ver>]; "
               "jsonl/parquet paths may be gs:// URLs"),
        eval=("auto", "eval source (same forms); auto = a builtin training source's "
              "data.eval_split, or a held-out slice of user training records "
              "(data.eval_fraction; jaxalign.data.holdout); \"\" = no eval"),
        eval_fraction=(0.05, "data.eval=auto over user records: the seeded fraction held out "
                       "of training for evaluation (at least 1 record); 0 = no eval"),
        eval_max_records=(1000, "data.eval=auto over user records: at most this many held "
                          "out"),
        tasks=("", "comma-separated task names: keep only the training records whose "
               "\"task\" field is one of them (e.g. the families an RL stage should practise); "
               "\"\" = every record"),
        train_split=("train", "split of the training source"),
        eval_split=("eval", "split of the eval source"),
        dir=("", "where JSONL/Parquet conversions and TFDS datasets live (a local directory: "
             "conversions are memory-mapped); \"\" = ~/.cache/jaxalign/datasets, TFDS's own"),
        fields=section(
            "data.fields", "Stage field -> source column renames, e.g. "
            "--config.data.fields.prompt=question; \"\" = the same name.",
            **{k: ("", f"source column read as the record's {k!r} field; \"\" = {k!r}")
               for k in ("messages", "prompt", "response", "completion", "chosen",
                         "rejected", "label")}),
        chat_template=("auto", "chat template: auto | plain | chatml | llama3 | gemma | "
                       "mistral | tokenizer | path to a .jinja or tokenizer_config.json"),
        max_len=(48, "positions per sequence row"),
        max_prompt_len=(0, "ids per prompt row of prompt-only batches (RL); 0 = max_len"),
        eval_batch_size=(64, "rows per eval batch"),
        seed=(0, "shuffling seed"),
        shuffle=(True, "shuffle the training records (False keeps the source order every "
                 "epoch)"),
        overlong=("error", "records longer than a row: error | truncate_left (the prompt) | "
                  "truncate_right | drop; counted"),
        on_bad_record=("error", "malformed records: error | skip (counted and logged by "
                       "reason)"),
        pack=(True, "best-fit-decreasing packing of several records per row: SFT and KTO "
              "sequences, preference pairs on both sides at once; prompt batches (RL, "
              "rejection sampling) are never packed, they use data.buckets; False = one "
              "record per row"),
        pack_window=(512, "records per packing window"),
        num_workers=(0, "grain worker processes (0 = in the calling process)"),
        buckets=("pow2", "widths a batch is cut to (the smallest that holds its longest "
                 "row; prompt batches: over prompt ids); the step compiles once per "
                 "width: pow2 (16, 32, 64, ...) | pow2:<floor> | <n> (multiples of n) | "
                 "comma list (64,128,256) | max_len (off: full width); the full width is "
                 "always the last"),
        group_by_length=(0, "sort windows of this many batches by length, then shuffle the "
                         "batch order (less padding, a seeded, resumable order); 0 = off; "
                         "not with pack"),
    )


def _run_sections(stage: str) -> dict[str, Any]:
    """Top-level keys and the mesh/sharding/model/data sections, in config order."""
    return dict(
        stage=(stage, "the training stage (sft, rm, dpo, kto, grpo, ppo) or job (rejection) "
               "the config runs"),
        seed=(0, "seed of the parameter init and the run's random streams"),
        mesh=section(
            "mesh", "Devices per mesh axis; -1 = every device the other axes leave.",
            data=(-1, "devices on the data axis (batch only)"),
            fsdp=(1, "devices on the fsdp axis (batch and parameters/optimizer state)"),
            tensor=(1, "devices on the tensor axis (model parallel)")),
        sharding=section(
            "sharding", "Logical axis names -> mesh axes (jaxalign.sharding), read at trace "
            "time.",
            rules=([list(r) for r in DEFAULT_RULES], "[logical name, mesh axes] pairs, "
                   "first match wins (jaxalign.sharding.DEFAULT_RULES)")),
        model=model_config("tiny"),
        tokenizer=("auto", "auto (the init_from source's: an hf:<dir>'s own, a gguf:<file>'s, "
                   "an earlier run's for workdir:, builtin:world from scratch; "
                   "jaxalign.models.lineage) | builtin:<name> | SentencePiece model | "
                   "tokenizer.json | HF directory (a file or directory may be a gs:// URL)"),
        data=data_config(),
    )


def _loop_sections() -> dict[str, ml_collections.ConfigDict]:
    """The train/optim/checkpoint/metrics sections."""
    return dict(
        train=section(
            "train", "The training loop (jaxalign.train).",
            steps=(100, "optimizer steps"),
            batch_size=(32, "rows per global batch (all devices together)"),
            micro_batches=(1, "gradient accumulation: micro-batches per step"),
            log_every=(10, "steps between logged training rows"),
            eval_every=(50, "steps between evaluations"),
            eval_batches=(0, "eval batches per evaluation; 0 = the whole eval split"),
            eval_at_start=(False, "also evaluate the starting params (logged as step 0)"),
            nonfinite=("stop", "a non-finite loss or gradient: stop | skip (the update is "
                       "skipped and counted)")),
        optim=section(
            "optim", "Optimizer and learning-rate schedule (jaxalign.optim).",
            name=("adamw", "optimizer (adamw)"),
            learning_rate=(1e-3, "peak learning rate"),
            warmup_steps=(10, "steps of linear warmup from 0"),
            warmup_ratio=(0.0, "warmup as a fraction of train.steps; > 0 replaces "
                          "warmup_steps"),
            schedule=("cosine", "decay after warmup: cosine | linear | constant"),
            final_lr_fraction=(0.1, "the decay ends at learning_rate times this"),
            b1=(0.9, "Adam's first-moment decay"),
            b2=(0.95, "Adam's second-moment decay"),
            eps=(1e-8, "Adam's epsilon"),
            weight_decay=(0.01, "decoupled weight decay (matrices only; norms and biases "
                          "skipped)"),
            grad_clip_norm=(1.0, "clip gradients to this global norm; 0 = off")),
        checkpoint=section(
            "checkpoint", "Orbax checkpoints under WORKDIR/checkpoints/ (jaxalign.checkpoint).",
            save_every=(50, "steps between checkpoints (the last step is always saved)"),
            keep=(3, "checkpoints kept; 0 = all"),
            async_save=(True, "write checkpoints in the background"),
            adapters_only=(False, "with LoRA: save only the trainable params (adapters, a new "
                           "head) and their optimizer state; resume and export rebuild the "
                           "frozen base from model.init_from")),
        metrics=section(
            "metrics", "Logging: metrics.jsonl always, TensorBoard and Weights & Biases "
            "optionally (jaxalign.metrics).",
            peak_flops=(0.0, "whole-job FLOP/s for MFU; 0 = measure with a matmul probe"),
            tensorboard=(True, "event files under WORKDIR/tb/"),
            wandb_project=("", "Weights & Biases project (needs `pip install wandb`); \"\" = "
                           "off"),
            wandb_entity=("", "Weights & Biases entity (team or user); \"\" = the default"),
            wandb_name=("", "Weights & Biases run name; \"\" = the workdir's basename"),
            wandb_mode=("", "\"\" (wandb's default) | online | offline | disabled")),
    )


def shared_config(stage: str) -> ml_collections.ConfigDict:
    """The sections every stage reads, with their defaults (no stage section)."""
    return section("", "Run-wide keys.", **_run_sections(stage), **_loop_sections())


# Jobs that ``launch.train`` runs in place of a training stage (``jaxalign.jobs.run_stage``):
# the module (its ``default_config()`` builds the job's own sections, its ``run`` runs it)
# and the stages whose sections it also reads (rejection sampling trains each round as SFT
# or DPO).
JOBS: dict[str, tuple[str, tuple[str, ...]]] = {
    "rejection": ("jaxalign.jobs.rejection", ("sft", "dpo")),
}


def _stage_registry() -> types.ModuleType:
    # Imported on use: jaxalign.algos is a layer above this module (its stages import the
    # model and step stack), and every stage module may import this one.
    import jaxalign.algos

    return jaxalign.algos


def config_stages() -> list[str]:
    """Every valid ``config.stage``: the training stages, then the jobs."""
    return [*_stage_registry().STAGES, *JOBS]


def stage_sections(stage: str) -> dict[str, ml_collections.ConfigDict]:
    """The sections ``stage`` reads beyond the shared ones, with their defaults.

    Raises:
      ValueError: ``stage`` is neither a training stage nor a job.
    """
    if stage in JOBS:
        module, stages = JOBS[stage]
        out = dict(importlib.import_module(module).default_config())
        for name in stages:
            out.update(stage_sections(name))
        return out
    return dict(_stage_registry().get_stage(stage).default_config())


def base_config(stage: str) -> ml_collections.ConfigDict:
    """A complete, runnable config for ``stage`` with the library's defaults (unlocked).

    Args:
      stage: a training stage (``sft``, ``dpo``, ...) or a job (``rejection``).
    """
    config = shared_config(stage)
    for name, value in stage_sections(stage).items():
        config[name] = value
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what ``WORKDIR/config.json`` holds)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def eval_suite_config() -> ml_collections.ConfigDict:
    """Defaults of an eval-suite config (``launch.eval --config``; ``evals`` of a pipeline).

    ``evals`` maps each eval's name to its entry (see ``configs/evals.py``).
    """
    return section(
        "eval_suite", "An eval suite (jaxalign.evals): what launch.eval runs, and the evals a "
        "pipeline runs after each policy stage.",
        seed=(0, "seed of the sampled evals and of the subsets"),
        batch_size=(64, "rows per generation / scoring batch"),
        reference=("init_from", "reference for KL and implicit DPO rewards: \"\" (none), "
                   "init_from (the candidate run's model.init_from), teacher (a distillation "
                   "run's distill.teacher), or a checkpoint (DIR, workdir:DIR, hf:DIR)"),
        rewards=("", "reward for the reward evals, as rl.rewards spells it: \"\" (none) or "
                 "e.g. rm:<RM workdir>"),
        fail_on_reward_hacking=(False, "fail the report when a learned metric rises while its "
                                "verifiable pair falls"),
        watch=([("reward/mean", "task/pass@1")], "extra (learned, verifiable) metric pairs to "
               "watch for reward hacking"),
        evals=(ml_collections.ConfigDict(), "name -> entry: kind (a registered eval), source, "
               "split, limit (0 = every record, else a seeded subset) and the kind's options"),
        gates=([], "dicts of metric, direction (higher | lower is better) and tolerance "
               "(how far, absolute, the candidate may fall behind the baseline)"),
    )


def pipeline_config() -> ml_collections.ConfigDict:
    """Defaults of a pipeline config (``launch.pipeline --config``)."""
    return section(
        "pipeline", "A multi-stage job (jaxalign.jobs.pipeline): stages in order, each "
        "starting from an earlier one, with evals and gates after each policy stage.",
        reference=("", "stage whose model KL and implicit preference rewards are measured "
                   "against; \"\" = none"),
        reward_model=("", "RM stage that scores replies for reward/mean; \"\" = none"),
        report_metrics=([], "metrics of the final table's rows"),
        stages=([], "dicts of name, config (configs/<stage>.py:<preset>), init_from (an "
                "earlier stage), overrides (\"key=value\"; @<stage> = its workdir) and gates"),
        evals=(eval_suite_config(), "the eval suite run after each policy stage (an "
               "eval-suite config)"),
        rl_health=(dict(max_logp_gap=0.05, min_entropy_ratio=0.2, task_tolerance=0.02,
                        window=0.25, reward_metric="reward/mean", task_metric="task/pass@1"),
                   "limits checked after each RL stage (jaxalign.evals.rl_health): sampler/"
                   "trainer log-prob gap, entropy collapse, training reward up while the "
                   "held-out task metric falls; a stage's own rl_health dict overrides keys, "
                   "rl_health=False turns it off"),
    )


# --- Loading config files and applying overrides -------------------------------------------


def load_config_module(path: str) -> types.ModuleType:
    """Executes the config file at ``path`` as a fresh module.

    Raises:
      FileNotFoundError: no such file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    name = "_jaxalign_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_config_file(spec: str, *, root_dir: str = "",
                     lock: bool = True) -> ml_collections.ConfigDict:
    """``configs/dpo.py:demo`` -> the file's ``get_config("demo")`` (``get_config()`` without
    an argument).

    Args:
      spec: ``path[:arg]``.
      root_dir: base of a relative ``path`` (default: the working directory).
      lock: lock the config (unknown keys become errors).

    Raises:
      FileNotFoundError: no such file.
    """
    path, _, arg = spec.partition(":")
    if root_dir and not os.path.isabs(path):
        path = os.path.join(root_dir, path)
    config = load_config_module(path).get_config(*([arg] if arg else []))
    if lock and hasattr(config, "lock"):
        config.lock()
    return config


class UnknownKeyError(KeyError, ValueError):
    """An override names no config key (a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _parse_text(text: str, field_type: Any, current: Any) -> Any:
    """Command-line text as a value of the field's type (ValueError if it is none)."""
    if text in ("None", "none") and (current is None or field_type is type(None)):
        return None
    if field_type is str:
        return text
    if field_type is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise ValueError("expected true or false")
    if field_type is float:
        return float(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if field_type in (int, list, tuple):
            raise ValueError(f"expected a Python literal of type {field_type.__name__}") from None
        return text
    if field_type in (list, tuple) and isinstance(value, list | tuple):
        return field_type(value)
    return value


def _check_type(value: Any, field_type: Any, current: Any) -> None:
    """Raises ValueError unless ``value`` fits a field of ``field_type`` now holding ``current``."""
    if value is None and current is None:
        return
    allowed = {float: (int, float), list: (list, tuple), tuple: (list, tuple)}.get(
        field_type, (field_type,))
    if value is None or (field_type in (int, float) and isinstance(value, bool)) or (
            isinstance(field_type, type) and field_type is not type(None)
            and not isinstance(value, allowed)):
        raise ValueError(f"expected {getattr(field_type, '__name__', field_type)}, got "
                         f"{type(value).__name__}")


def _items(overrides: Mapping[str, Any] | Sequence[str], where: str
           ) -> list[tuple[str, Any, bool]]:
    """``(key, value, is_text)`` triples from a dict or from ``"key=value"`` strings."""
    if isinstance(overrides, Mapping):
        return [(str(k), v, False) for k, v in overrides.items()]
    out = []
    for item in overrides:
        key, sep, text = str(item).partition("=")
        if not sep:
            raise ValueError(f"{where}override {item!r} is not key=value")
        out.append((key.strip(), text.strip(), True))
    return out


def _parent(config: ml_collections.ConfigDict, key: str, where: str
            ) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding dotted ``key`` and the key's last part (UnknownKeyError if none)."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean {'.'.join(parts[:i] + close)}?)" if close else ""
            raise UnknownKeyError(f"{where}override {key!r} names no config key{hint}")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Sequence[str], *,
                    where: str = "") -> ml_collections.ConfigDict:
    """A locked copy of ``config`` with dotted-key overrides applied.

    Args:
      config: the config (left unchanged).
      overrides: ``{"optim.learning_rate": 1e-3}`` (values as they are) or
        ``["optim.learning_rate=1e-3", ...]`` (text parsed by the key's type, as
        ``--config.<key>=<value>`` is: a string key takes the text as it is).
      where: what the overrides belong to, for error messages (e.g. ``stage 'dpo'``).

    Raises:
      UnknownKeyError: a key is not in the config (a KeyError and a ValueError).
      ValueError: a value does not fit its key's type, or an item is not ``key=value``.
    """
    where = f"{where}: " if where else ""
    config = copy.deepcopy(config)
    for key, value, is_text in _items(overrides, where):
        node, leaf = _parent(config, key, where)
        current, field_type = node[leaf], node.get_type(leaf)
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"{where}override {key!r} names a section; override its keys")
        try:
            if is_text:
                value = _parse_text(value, field_type, current)
            _check_type(value, field_type, current)
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}override {key}={value!r}: {e}") from None
    config.lock()
    return config


# --- Checks of the shared sections ---------------------------------------------------------

# Sections whose keys are all defined by ``shared_config``: any other key there is a typo.
_CLOSED_SECTIONS = ("mesh", "data", "train", "optim", "checkpoint", "metrics")
# Whole numbers and their least allowed value.
_INT_MIN = {"train.steps": 1, "train.batch_size": 1, "train.micro_batches": 1,
            "train.log_every": 1, "train.eval_every": 1, "train.eval_batches": 0,
            "data.max_len": 1, "data.max_prompt_len": 0, "data.eval_batch_size": 1,
            "data.pack_window": 1, "data.num_workers": 0, "data.seed": 0,
            "data.group_by_length": 0, "data.eval_max_records": 0,
            "checkpoint.save_every": 1, "checkpoint.keep": 0, "optim.warmup_steps": 0,
            **{f"model.{k}": 1 for k in MODEL_PRESETS["tiny"]}}
# Non-negative numbers (an infinite learning rate stays possible, for NaN-guard tests).
_NON_NEGATIVE = ("optim.learning_rate", "optim.final_lr_fraction", "optim.b1", "optim.b2",
                 "optim.eps", "optim.weight_decay", "optim.grad_clip_norm",
                 "metrics.peak_flops", "optim.warmup_ratio", "data.eval_fraction")


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
    base = shared_config(str(config.get("stage", "sft")))
    problems = []
    for name in _CLOSED_SECTIONS:
        if name in config and hasattr(config[name], "keys"):
            problems += _unknown_keys(config[name], base[name], name)

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
