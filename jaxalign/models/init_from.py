"""Where a run's initial parameters come from: ``config.model.init_from``.

* ``scratch`` — random initialisation.
* ``hf:<dir>`` — a Hugging Face checkpoint directory (config.json + safetensors).
* ``gguf:<file>`` — a llama.cpp GGUF file (Llama, Qwen 2/3, Gemma 1/2/3 architectures;
  F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensors, dequantised to ``param_dtype`` on
  load). Its metadata gives the architecture, and its vocabulary and chat template
  are the tokenizer ``gguf:<file>`` (``config.tokenizer`` may name it; an export ships
  it as ``tokenizer.json`` or ``tokenizer.model``). See :mod:`jaxalign.models.gguf`.
* ``workdir:<DIR>`` — the latest checkpoint of an earlier jaxalign run (SFT -> DPO).

Any of these may be a URL (``hf:gs://bucket/model``, ``workdir:gs://bucket/run``): a
workdir is read in place (through ``jaxalign.storage`` and Orbax), an HF directory or
a GGUF file is copied to a local temporary directory once per process (their
weights are memory-mapped).
  A LoRA run's adapters are merged into its base weights on the way in, so a
  LoRA run on top starts fresh adapters from (and uses as its reference) the
  earlier run's adapted model. An adapters-only run's base is rebuilt from its
  own ``init_from``.

The source fixes the architecture: its values for every architecture key of
``config.model`` replace the run's own (each replaced value is logged), so a
stage config need not restate the shape of the model it starts from. The
numerics keys (``param_dtype``, ``dtype``, ``init_std``) stay the run's own.
A run that has checkpoints of its own always resumes from them instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from jaxalign import storage
from jaxalign.models import gguf, gguf_tokenizer, hf, lora
from jaxalign.models.transformer import Transformer, TransformerConfig

HF_PREFIX = "hf:"
GGUF_PREFIX = "gguf:"
WORKDIR_PREFIX = "workdir:"
# Fields the run keeps whatever the source says (a source's LoRA adapters are merged).
RUN_KEYS = ("param_dtype", "dtype", "init_std", "lora")
ARCH_KEYS = tuple(f.name for f in dataclasses.fields(TransformerConfig) if f.name not in RUN_KEYS)


def parse(spec: str) -> tuple[str, str]:
    """``"hf:/x"`` -> ``("hf", "/x")``; ``"scratch"`` -> ``("scratch", "")``; also ``gguf:``.

    Raises:
      ValueError: an unknown scheme or an empty path.
    """
    if spec == "scratch":
        return "scratch", ""
    for kind, prefix in (("hf", HF_PREFIX), ("gguf", GGUF_PREFIX),
                         ("workdir", WORKDIR_PREFIX)):
        if spec.startswith(prefix):
            path = spec[len(prefix):]
            if not path:
                raise ValueError(f"model.init_from={spec!r} names no "
                                 f"{'file' if kind == 'gguf' else 'directory'} (the hf "
                                 "presets need --config.model.init_from=hf:<dir>, "
                                 "gguf:<file> or workdir:<dir>)")
            if kind in ("hf", "gguf") and storage.is_url(path):
                try:
                    return kind, storage.local_copy(path)
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"model.init_from={spec}: {e}") from None
            return kind, os.path.expanduser(path)
    raise ValueError(f"model.init_from={spec!r}; expected 'scratch', 'hf:<dir>', "
                     "'gguf:<file>' or 'workdir:<dir>'")


def read_run_config(workdir: str) -> dict[str, Any]:
    """The resolved config (``WORKDIR/config.json``) of an earlier run."""
    path = storage.join(workdir, "config.json")
    if not storage.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.init_from=workdir:{workdir} needs "
                                "the directory of an earlier jaxalign run")
    return json.loads(storage.read_text(path))


def source_architecture(spec: str) -> dict[str, Any]:
    """The architecture keys that ``init_from`` dictates (empty for scratch)."""
    kind, path = parse(spec)
    if kind == "scratch":
        return {}
    if kind in ("hf", "gguf"):
        cfg = hf.load_config(path) if kind == "hf" else gguf.load_config(path)
        return {k: getattr(cfg, k) for k in ARCH_KEYS}
    model = read_run_config(path).get("model", {})
    # An earlier run's config may predate some keys: those keep the dataclass default.
    base = TransformerConfig(**{k: model[k] for k in ("vocab_size", "d_model", "n_layers",
                                                      "n_heads", "n_kv_heads", "head_dim",
                                                      "mlp_dim")})
    merged = TransformerConfig.from_mapping({**base.to_dict(), **model})
    return {k: getattr(merged, k) for k in ARCH_KEYS}


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose model architecture is the ``init_from`` source's.

    Each value that changes is logged; the caller's config is not modified.
    """
    arch = source_architecture(config.model.init_from)
    if not arch:
        return config
    out = config.copy_and_resolve_references()
    changed = []
    for key, value in arch.items():
        if key not in out.model:
            continue
        before = out.model[key]
        if isinstance(value, tuple):
            value = list(value) if isinstance(before, list) else value
        if _normalise(before) != _normalise(value):
            changed.append(f"{key}: {before!r} -> {value!r}")
            with out.unlocked():
                out.model[key] = value
    if changed:
        logging.warning("model.init_from=%s sets the architecture; replaced config.model values: "
                        "%s", config.model.init_from, "; ".join(changed))
    out.lock()
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    """``{("layers", "0", "attn", "q_proj"): leaf}``; keys as strings (as Orbax stores them)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def _subset(tree: Any, keep: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> Any:
    """The part of a nested dict whose leaf paths are in ``keep`` (original key types)."""
    out = {}
    for key, value in tree.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            sub = _subset(value, keep, path)
            if sub:
                out[key] = sub
        elif path in keep:
            out[key] = value
    return out


def overlay(fresh: Any, loaded: Any) -> Any:
    """``fresh`` params with every leaf that ``loaded`` (a subset of its tree) provides replaced."""
    if not isinstance(fresh, dict):
        return loaded
    return {k: overlay(v, loaded[k]) if k in loaded else v for k, v in fresh.items()}


def _log_coverage(source: str, target: Any, loaded: Any) -> None:
    # Fresh LoRA adapters are expected: no source provides them.
    fresh = sorted("/".join(p) for p in set(_flat(target)) - set(_flat(loaded))
                   if not lora.is_adapter_path(p))
    if fresh:
        logging.warning("%s provides no value for %d parameter(s), which keep their fresh "
                        "initialisation: %s", source, len(fresh), ", ".join(fresh[:8]))


def load_params(spec: str, model_cfg: TransformerConfig, abstract_params: Any,
                shardings: Any) -> Any | None:
    """The initial parameters ``init_from`` names, placed on ``shardings``; None for scratch.

    Only parameters the run's model has are loaded; ones the source lacks (say a
    reward head on a supervised trunk) are missing from the result, and the caller
    keeps their fresh initialisation (:func:`overlay`), with a logged warning.

    Args:
      spec: ``config.model.init_from``.
      model_cfg: the run's model config (after :func:`resolve_config`).
      abstract_params: ShapeDtypeStruct tree of the run's params.
      shardings: the matching tree of shardings.
    """
    kind, path = parse(spec)
    if kind == "scratch":
        return None
    if kind == "hf":
        logging.info("loading initial parameters from the HF checkpoint %s", path)
        loaded = hf.load_params(path, model_cfg, shardings)
    elif kind == "gguf":
        logging.info("loading initial parameters from the GGUF file %s", path)
        loaded = gguf.load_params(path, model_cfg, shardings)
    else:
        logging.info("loading initial parameters from the latest checkpoint of %s", path)
        loaded = restore_merged_params(path, lora.strip(abstract_params), lora.strip(shardings),
                                       partial=True)
    _log_coverage(spec, abstract_params, loaded)
    return loaded


def run_model_config(run: dict[str, Any]) -> TransformerConfig:
    """The model config (LoRA included) of an earlier run's ``config.json``."""
    return TransformerConfig.from_mapping(run.get("model", {}))


def restore_merged_params(workdir: str, abstract_params: Any, shardings: Any,
                          step: int | None = None, *, partial: bool = False) -> Any:
    """A run's params with its LoRA adapters (if any) merged into the base weights.

    Args:
      workdir: the earlier run's directory.
      abstract_params: ShapeDtypeStruct tree of the params wanted, without adapters.
      shardings: the matching tree of shardings (the adapters are read replicated).
      step: which checkpoint; the latest by default.
      partial: as in :func:`restore_workdir_params`.
    """
    cfg = run_model_config(read_run_config(workdir))
    if cfg.lora is None:
        return restore_workdir_params(workdir, abstract_params, shardings, step, partial=partial)
    source = nnx.to_pure_dict(hf.abstract_model(cfg)[1])
    adapters, _ = lora.partition(source, lora.adapter_mask(source))
    some = jax.tree.leaves(shardings)[0]
    replicated = (jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())
                  if isinstance(some, jax.sharding.NamedSharding) else some)
    params = restore_workdir_params(
        workdir, lora.join(abstract_params, adapters),
        lora.join(shardings, jax.tree.map(lambda _: replicated, adapters)), step,
        partial=partial)
    adapters, base = lora.partition(params, lora.adapter_mask(params))
    out_sh = jax.tree.map(lambda x: x.sharding, base)
    # The base buffers are donated: the merged weights take their place in memory.
    return jax.jit(lambda b, a: lora.merge_params(lora.join(b, a), cfg.lora),
                   out_shardings=out_sh, donate_argnums=0)(base, adapters)


def restore_workdir_params(workdir: str, abstract_params: Any, shardings: Any,
                           step: int | None = None, *, partial: bool = False) -> Any:
    """Restores the params of a run's latest (or given) checkpoint onto ``shardings``.

    Args:
      workdir: the earlier run's directory.
      abstract_params: ShapeDtypeStruct tree of the params to restore.
      shardings: the matching tree of shardings.
      step: which checkpoint; the latest by default.
      partial: restore only the params both trees have (the rest is left out of the
        result) instead of requiring the checkpoint to hold exactly these params.

    The checkpoints of a ``checkpoint.adapters_only`` run hold no base weights:
    those come from the run's own ``init_from`` (its fresh init for ``scratch``).

    Raises:
      FileNotFoundError: the run has no checkpoint.
      ValueError: a parameter's shape differs, or (unless ``partial``) is missing.
    """
    directory = storage.absolute(storage.join(workdir, "checkpoints"))
    if not storage.isdir(directory):
        raise FileNotFoundError(f"{directory} not found: no checkpoints in {workdir}")
    manager = ocp.CheckpointManager(directory, item_handlers={
        "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        stored = _flat(dict(manager.item_metadata(step)["state"]).get("params", {}))
        target = _flat(abstract_params)
        where = storage.join(directory, str(step))
        for key, leaf in target.items():
            if key in stored and tuple(stored[key].shape) != tuple(leaf.shape):
                raise ValueError(f"{where}: parameter {'/'.join(key)} has shape "
                                 f"{list(stored[key].shape)}, the model expects "
                                 f"{list(leaf.shape)}")
        absent = set(target) - set(stored)
        run = read_run_config(workdir) if absent else {}
        rebuild = absent if run.get("checkpoint", {}).get("adapters_only") else set()
        missing = sorted("/".join(k) for k in absent - rebuild)
        if missing and not partial:
            raise ValueError(f"{where}: parameter {missing[0]} is missing "
                             f"({len(missing)} missing)")
        keep = set(target) & set(stored)
        item = {"params": _subset(jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_params, shardings), keep)}
        args = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)
        restored = manager.restore(step, args=ocp.args.Composite(state=args))
    finally:
        manager.close()
    params = restored["state"]["params"]
    if rebuild:
        base = _rebuild_base(run, _subset(abstract_params, rebuild), _subset(shardings, rebuild))
        missing = sorted("/".join(k) for k in rebuild - set(_flat(base)))
        if missing and not partial:
            raise ValueError(f"{where}: parameter {missing[0]} is neither in the adapters-only "
                             f"checkpoint nor in the run's base ({len(missing)} missing)")
        params = lora.join(params, base)
    return params


def _rebuild_base(run: dict[str, Any], abstract_params: Any, shardings: Any) -> Any:
    """The params an adapters-only run did not save: its ``init_from``, else its fresh init."""
    cfg = run_model_config(run)
    spec = run.get("model", {}).get("init_from", "scratch")
    logging.info("adapters-only checkpoint: rebuilding the base weights from %s", spec)
    loaded = load_params(spec, cfg, abstract_params, shardings) or {}
    rest = set(_flat(abstract_params)) - set(_flat(loaded))
    if not rest:
        return loaded
    seed = int(run.get("seed", 0))

    def init():
        # The trainer's fresh init: same model, same seed (adapters draw from a side key).
        model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
        return _subset(nnx.to_pure_dict(nnx.state(model, nnx.Param)), rest)

    have = set(_flat(jax.eval_shape(init)))
    fresh = jax.jit(init, out_shardings=_subset(shardings, have))()
    return lora.join(loaded, fresh)


def hf_source_dir(spec: str, *, _seen: frozenset[str] = frozenset()) -> str | None:
    """The HF directory a run's weights descend from, following ``workdir:`` chains."""
    kind, path = parse(spec)
    if kind == "hf":
        return path
    if kind == "workdir" and path not in _seen and storage.isfile(
            storage.join(path, "config.json")):
        earlier = read_run_config(path).get("model", {}).get("init_from", "scratch")
        return hf_source_dir(earlier, _seen=_seen | {path})
    return None


def check_hf_tokenizer(spec: str, tokenizer_spec: str, vocab_size: int) -> None:
    """For ``hf:<dir>`` or ``gguf:<file>``: its tokenizer must fit the embedding; warn if
    the run uses another."""
    kind, path = parse(spec)
    if kind == "gguf":
        size = gguf_tokenizer.tokenizer_vocab_size(path)
        if size > vocab_size:
            raise ValueError(f"{path}: the tokenizer has {size} ids but the model's embedding "
                             f"has vocab_size={vocab_size} rows")
        own = tokenizer_spec.startswith(GGUF_PREFIX) and os.path.abspath(
            parse(tokenizer_spec)[1]) == os.path.abspath(path)
        if not own and tokenizer_spec != "auto":
            logging.warning("model.init_from=%s ships a tokenizer but config.tokenizer=%s; the "
                            "run tokenizes with the latter", spec, tokenizer_spec)
        return
    if kind != "hf":
        return
    hf.check_tokenizer_fits(path, vocab_size)
    has_own = hf.tokenizer_vocab_size(path) is not None
    if has_own and os.path.abspath(storage.local_copy(tokenizer_spec)) != os.path.abspath(path):
        logging.warning("model.init_from=%s ships a tokenizer but config.tokenizer=%s; the "
                        "run tokenizes with the latter", spec, tokenizer_spec)

