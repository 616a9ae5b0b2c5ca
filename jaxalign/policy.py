"""The policy module: load a model on any mesh, then generate or score log-probs with it.

Everything that samples from or scores with a checkpoint goes through here — the
evals, the RL stages' in-training eval, rejection sampling and the reward-model
scorer — so there is one loader and one batching loop of each kind:

* :func:`load_model`: ``scratch`` / ``hf:DIR`` / ``workdir:DIR`` as the params of a
  module class (the decoder, or ``RewardModel``) sharded on a mesh (one device by
  default), a LoRA run's adapters merged into its base weights or kept.
* :func:`sample_batch`: one laid-out prompt batch through the KV-cache sampler
  (``jaxalign.sampling``), compiled once per architecture, settings and mesh.
* :func:`iter_generate` / :func:`generate`: lists of prompt ids in chunks of a fixed
  row count (the last padded with repeats), left-padded to a width, chunk ``j``
  sampled with ``fold_in(rng, j)``; each completion a :class:`Sample` (trimmed ids and
  whether it stopped).
* :func:`token_logps`: per-token log-probs of id sequences, in the same fixed chunks.
* :class:`Policy`: what evals may ask of a checkpoint; :class:`ModelPolicy` is the
  real one, built by :func:`load_policy` from a run's workdir or an HF directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign import losses, multihost, sampling, storage
from jaxalign import sharding as shd
from jaxalign.data.chat import get_template
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models import hf, hf_config, init_from
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.step import ModelDef

# -- loading ------------------------------------------------------------------------------


class Loaded(NamedTuple):
    """A loaded model: how to rebuild it, and its params (a pure dict, sharded)."""

    model_def: ModelDef
    params: Any


def abstract_model(model_cfg: TransformerConfig,
                   module: type[nnx.Module] = Transformer) -> ModelDef:
    """The :class:`~jaxalign.step.ModelDef` of ``module(model_cfg)``; allocates nothing."""
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: module(model_cfg, rngs=nnx.Rngs(params=0))), nnx.Param)
    return ModelDef(graphdef, abstract)


def param_shardings(model_def: ModelDef, mesh: Mesh, rules: shd.Rules) -> Any:
    """NamedShardings of every parameter (a pure-dict tree), from the logical axis rules."""
    abstract = model_def.abstract_state
    return shd.param_shardings(nnx.to_pure_dict(abstract), shd.logical_axes_tree(abstract),
                               mesh, rules)


def _place(tree: Any, shardings: Any) -> Any:
    # ``tree`` may hold a subset of the shardings' leaves (a partial restore).
    if isinstance(tree, dict):
        return {k: _place(v, shardings[k]) for k, v in tree.items()}
    return jax.device_put(tree, shardings)


def _read(spec: str, model_cfg: TransformerConfig, abstract_params: Any, shardings: Any, *,
          merge_lora: bool, partial: bool) -> Any | None:
    kind, path = init_from.parse(spec)
    if kind == "scratch":
        return None
    if kind in ("hf", "gguf") or (merge_lora and partial):
        # The trainer's own reader: HF or GGUF tensors, or a workdir's params that the model has
        # (logging what the source lacks).
        return init_from.load_params(spec, model_cfg, abstract_params, shardings)
    restore = init_from.restore_merged_params if merge_lora else init_from.restore_workdir_params
    return restore(path, abstract_params, shardings, partial=partial)


def load_model(spec: str, model_cfg: TransformerConfig, *, mesh: Mesh | None = None,
               rules: shd.Rules | None = None, module: type[nnx.Module] = Transformer,
               merge_lora: bool = True, init_seed: int | None = None,
               on_host: bool = False) -> Loaded:
    """The one loader: the params ``spec`` names, as ``module(model_cfg)``'s, on a mesh.

    Args:
      spec: ``scratch``, ``hf:<dir>``, ``gguf:<file>`` or ``workdir:<DIR>`` (the latest
        checkpoint), as ``model.init_from``.
      model_cfg: the architecture (e.g. the run's ``config.json`` model section).
      mesh: where the params live; None puts them on one device.
      rules: logical axis rules (default ``DEFAULT_RULES``).
      module: the NNX module class (``Transformer``, ``models.heads.RewardModel``, ...).
      merge_lora: fold a LoRA run's adapters into its base weights (the model is
        ``model_cfg`` without adapters); False keeps ``model_cfg``'s adapters as params.
      init_seed: params the source lacks (every one, for ``scratch``) keep a fresh
        initialisation with this seed, as the trainer's; None makes them an error.
      on_host: restore (and merge) a workdir checkpoint in host memory, then place it:
        a LoRA merge then does not depend on the accelerator's matmul precision.

    Raises:
      ValueError: ``scratch`` without ``init_seed``, or a missing or misshapen param.
    """
    cfg = dataclasses.replace(model_cfg, lora=None) if merge_lora else model_cfg
    mesh = hf.default_mesh() if mesh is None else mesh
    rules = dict(shd.DEFAULT_RULES) if rules is None else rules
    model_def = abstract_model(cfg, module)
    abstract_params = nnx.to_pure_dict(model_def.abstract_state)
    shardings = param_shardings(model_def, mesh, rules)
    target = shardings
    if on_host:
        host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        target = jax.tree.map(lambda _: host, shardings)
    params = _read(spec, cfg, abstract_params, target, merge_lora=merge_lora,
                   partial=init_seed is not None)
    if on_host and params is not None:
        params = _place(params, shardings)
    if init_seed is None:
        have, want = len(jax.tree.leaves(params or {})), len(jax.tree.leaves(abstract_params))
        if have < want:
            raise ValueError(f"{spec!r} provides {have} of the model's {want} params (pass "
                             "init_seed to initialise the rest)")
        return Loaded(model_def, params)
    if params is None or len(jax.tree.leaves(params)) < len(jax.tree.leaves(abstract_params)):
        fresh = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
            module(cfg, rngs=nnx.Rngs(params=init_seed)), nnx.Param)),
            out_shardings=shardings)()
        params = fresh if params is None else init_from.overlay(fresh, params)
    return Loaded(model_def, params)


def split_model(model: nnx.Module) -> Loaded:
    """An NNX model as ``(model_def, params)`` (the arrays it holds, not copies)."""
    graphdef, state = nnx.split(model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return Loaded(ModelDef(graphdef, abstract), nnx.to_pure_dict(state))


# -- compiled functions ---------------------------------------------------------------------

_COMPILED: dict[Any, Callable[..., Any]] = {}


def _compiled(kind: str, model_def: ModelDef, mesh: Mesh | None, rules: shd.Rules | None,
              build: Callable[[], Callable[..., Any]], *extra: Any) -> Callable[..., Any]:
    """One jitted function per (kind, architecture, settings, mesh, rules).

    Keyed by the graphdef (which fixes the params' structure), so every policy of one
    architecture shares its compilations.
    """
    rules_key = None if mesh is None or rules is None else tuple(sorted(rules.items()))
    key = (kind, model_def.graphdef, mesh, rules_key, *extra)
    if key not in _COMPILED:
        if len(_COMPILED) >= 32:  # do not grow forever over many architectures
            _COMPILED.clear()
        _COMPILED[key] = build()
    return _COMPILED[key]


def place_rows(arrays: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host row arrays on the mesh: row-sharded when the rows split evenly, else replicated.

    Every process passes the whole batch (``jaxalign.multihost``): each device takes its
    own rows. A rollout or eval of ``G`` samples per prompt may have fewer prompts than
    data-parallel devices; the sampler's ``B × G`` rows are sharded either way.
    """
    return multihost.global_rows(arrays, mesh, replicate_uneven=True)


def _placed(arrays: Mapping[str, np.ndarray], mesh: Mesh | None) -> dict[str, jax.Array]:
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in arrays.items()}
    return place_rows(arrays, mesh)


# -- generation -------------------------------------------------------------------------------


class Sample(NamedTuple):
    """One generated completion: its ids (the stop token included if ``stopped``)."""

    ids: list[int]
    stopped: bool


def sample_batch(model_def: ModelDef, params: Any, tokens_bt: np.ndarray, mask_bt: np.ndarray,
                 rng: jax.Array, cfg: sampling.SamplingConfig, *, mesh: Mesh | None = None,
                 rules: shd.Rules | None = None, fetch: bool = True) -> sampling.SampleOut:
    """One laid-out prompt batch (left-padded host arrays) through the KV-cache sampler.

    Args:
      model_def, params: the model (params sharded on ``mesh``, or on one device).
      tokens_bt, mask_bt: left-padded prompt ids and their mask, ``[B, T]``.
      rng: the batch's key.
      cfg: sampling settings.
      mesh, rules: shard activations, the KV cache and the prompt rows over ``mesh``;
        None samples on one device, unconstrained.
      fetch: False returns the device arrays at once, while the sampler still runs
        (asynchronous rollouts); pass them to ``multihost.fetch`` when needed.

    Returns:
      The :class:`~jaxalign.sampling.SampleOut` (``B * num_samples`` rows), on the host.
      With several processes every process passes (and gets back) the whole batch; the
      rows are sampled on the devices that hold them.
    """
    def build():
        return sampling.make_sampler(model_def, cfg, mesh=mesh, rules=rules)

    sampler = _compiled("sample", model_def, mesh, rules, build, cfg)
    placed = _placed({"t": tokens_bt, "m": mask_bt}, mesh)
    out = sampler(params, placed["t"], placed["m"], rng)
    return multihost.fetch(out) if fetch else out


def samples(out: sampling.SampleOut) -> list[Sample]:
    """Each row of a sampler output as a :class:`Sample` (trimmed at its length)."""
    tokens_bn, lengths_b, stopped_b = (np.asarray(x) for x in jax.device_get(
        (out.tokens_bn, out.lengths_b, out.stopped_b)))
    return [Sample([int(x) for x in tokens_bn[r, :lengths_b[r]]], bool(stopped_b[r]))
            for r in range(len(lengths_b))]


def iter_generate(model_def: ModelDef, params: Any, prompts: Sequence[Sequence[int]],
                  rng: jax.Array, cfg: sampling.SamplingConfig, *, rows: int, width: int,
                  mesh: Mesh | None = None, rules: shd.Rules | None = None
                  ) -> Iterator[tuple[int, list[list[Sample]]]]:
    """The one generation loop, a chunk of ``rows`` prompts at a time.

    Every sampler call has ``rows`` prompts (the last chunk is padded with repeats of
    its last prompt, whose samples are dropped) left-padded to ``width`` ids, so one
    shape is compiled; chunk ``j`` samples with ``fold_in(rng, j)``.

    Yields:
      ``(start, groups)``: the index of the chunk's first prompt, and for each of its
      prompts the ``cfg.num_samples`` samples, in order.
    """
    g = cfg.num_samples
    for j, start in enumerate(range(0, len(prompts), rows)):
        chunk = [list(p) for p in prompts[start:start + rows]]
        n = len(chunk)
        chunk += [chunk[-1]] * (rows - n)  # static shapes: pad with a repeat
        tokens_bt, mask_bt = sampling.left_pad(chunk, cfg.pad_id, width)
        flat = samples(sample_batch(model_def, params, tokens_bt, mask_bt,
                                    jax.random.fold_in(rng, j), cfg, mesh=mesh, rules=rules))
        yield start, [flat[p * g:(p + 1) * g] for p in range(n)]


def generate(model_def: ModelDef, params: Any, prompts: Sequence[Sequence[int]],
             rng: jax.Array, cfg: sampling.SamplingConfig, *, rows: int, width: int,
             mesh: Mesh | None = None, rules: shd.Rules | None = None) -> list[list[Sample]]:
    """``cfg.num_samples`` samples of each prompt: :func:`iter_generate`, collected."""
    return [group for _, groups in iter_generate(model_def, params, prompts, rng, cfg,
                                                 rows=rows, width=width, mesh=mesh, rules=rules)
            for group in groups]


# -- scoring ----------------------------------------------------------------------------------


def token_logps(model_def: ModelDef, params: Any, sequences: Sequence[Sequence[int]], *,
                rows: int, width: int, pad_id: int = 0, mesh: Mesh | None = None,
                rules: shd.Rules | None = None) -> list[np.ndarray]:
    """The one scoring loop: ``log p(ids[t + 1] | ids[:t + 1])`` of each sequence (n − 1).

    One full forward per chunk of ``rows`` sequences (the last padded with repeats),
    right-padded to ``width`` ids.
    """
    def build():
        def fn(params, tokens_bt, positions_bt, segment_ids_bt):
            def forward():
                logits_btv = model_def.merge(params)(tokens_bt, positions_bt, segment_ids_bt)
                return losses.token_logps(logits_btv[:, :-1], tokens_bt[:, 1:])
            if mesh is None:
                return forward()
            with shd.axis_rules(mesh, dict(shd.DEFAULT_RULES) if rules is None else rules):
                return forward()
        return jax.jit(fn)

    fn = _compiled("logps", model_def, mesh, rules, build)
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), rows):
        chunk = [list(s) for s in sequences[start:start + rows]]
        n = len(chunk)
        chunk += [chunk[-1]] * (rows - n)
        tokens_bt = np.full((rows, width), pad_id, np.int32)
        segment_ids_bt = np.zeros((rows, width), np.int32)
        for r, s in enumerate(chunk):
            tokens_bt[r, :len(s)] = s
            segment_ids_bt[r, :len(s)] = 1
        positions_bt = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width))
        placed = _placed({"t": tokens_bt, "p": np.ascontiguousarray(positions_bt),
                          "s": segment_ids_bt}, mesh)
        logps_bt = multihost.fetch(fn(params, placed["t"], placed["p"], placed["s"]))
        out += [logps_bt[r, :len(chunk[r]) - 1] for r in range(n)]
    return out


# -- the evals' view of a checkpoint ----------------------------------------------------------


class Policy(Protocol):
    """What an eval may ask of a checkpoint."""

    name: str
    tokenizer: Any
    template: Any

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 num_samples: int = 1, temperature: float = 0.0,
                 seed: int = 0) -> list[list[Sample]]:
        """``num_samples`` completions per prompt (greedy when ``temperature`` is 0)."""
        ...

    def token_logps(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per sequence, ``log p(ids[t + 1] | ids[:t + 1])`` for every t (length n − 1)."""
        ...


def bucket(n: int) -> int:
    """Widths rounded up to 64, 128, ... 1024, then multiples of 1024: a handful of
    shapes (and compilations) serve every eval, for a little padding."""
    if n > 1024:
        return -(-n // 1024) * 1024
    return max(64, 1 << (n - 1).bit_length())


class ModelPolicy:
    """A :class:`Policy` over an NNX ``Transformer``, on one device or a mesh.

    Batches have a fixed number of rows (``batch_size``; generation divides it by the
    samples per prompt) and widths rounded up to a power of two (:func:`bucket`), so a
    run compiles a handful of shapes. Generations are cached, so evals (and a
    candidate's win rate against this policy) that ask for the same prompts reuse them.

    Args:
      model: the model (its params on one device, or sharded on ``mesh``).
      tokenizer, template: how its prompts were encoded.
      name: shown in reports.
      batch_size: rows per forward.
      mesh, rules: shard activations over ``mesh``; None runs unconstrained on one device.
    """

    def __init__(self, model: nnx.Module, tokenizer: Any, template: Any, *, name: str,
                 batch_size: int = 32, mesh: Mesh | None = None,
                 rules: shd.Rules | None = None):
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id or 0
        self.model_def, self.params = split_model(model)
        self._cache: dict[Any, list[list[Sample]]] = {}

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 num_samples: int = 1, temperature: float = 0.0,
                 seed: int = 0) -> list[list[Sample]]:
        seed = seed if temperature else 0  # greedy ignores the key: share the cache entry
        key = (tuple(map(tuple, prompts)), max_new_tokens, num_samples, temperature, seed)
        if key not in self._cache:
            cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                          stop_tokens=(self.eos_id,), num_samples=num_samples,
                                          pad_id=self.pad_id)
            # A fixed row count (not the prompt count): evals of any size share compilations.
            self._cache[key] = generate(
                self.model_def, self.params, prompts, jax.random.PRNGKey(seed), cfg,
                rows=max(1, self.batch_size // num_samples),
                width=bucket(max(len(p) for p in prompts)), mesh=self.mesh, rules=self.rules)
        return self._cache[key]

    def token_logps(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return token_logps(self.model_def, self.params, sequences, rows=self.batch_size,
                           width=bucket(max(len(s) for s in sequences)), pad_id=self.pad_id,
                           mesh=self.mesh, rules=self.rules)


def parse_checkpoint(spec: str) -> tuple[str, str]:
    """``"hf:DIR"`` / ``"workdir:DIR"`` / a bare ``DIR`` -> ``(kind, path)``.

    A bare directory is a workdir unless it holds a ``config.json`` with safetensors
    beside it and no ``checkpoints/`` (an HF checkpoint). A URL (``gs://...``) is read
    through ``jaxalign.storage``: a workdir in place, an HF directory from a local copy.
    """
    for kind in ("hf", "workdir"):
        if spec.startswith(kind + ":"):
            path = os.path.expanduser(spec[len(kind) + 1:])
            return kind, storage.local_copy(path) if kind == "hf" else path
    path = os.path.expanduser(spec)
    if (storage.isdir(path) and not storage.isdir(storage.join(path, "checkpoints"))
            and any(f.endswith(".safetensors") for f in storage.listdir(path))):
        return "hf", storage.local_copy(path)
    return "workdir", path


def load_policy(spec: str, *, batch_size: int = 32, mesh: Mesh | None = None,
                rules: shd.Rules | None = None) -> ModelPolicy:
    """A policy from a run's workdir (latest checkpoint, LoRA merged) or an HF directory.

    Args:
      spec: see :func:`parse_checkpoint`.
      batch_size: rows per forward.
      mesh, rules: shard the params and activations over ``mesh`` (default: one device).

    Raises:
      ValueError: the workdir is a reward-model run (score with it instead, as a
        reward: ``rm:<DIR>``).
    """
    kind, path = parse_checkpoint(spec)
    if kind == "hf":
        # The checkpoint's own dtype, as transformers would load it.
        dtype = hf.checkpoint_dtype(hf_config.read_config_json(path))
        cfg = hf.load_config(path, param_dtype=dtype, dtype=dtype)
        tokenizer = hf.load_tokenizer(path)
        template = get_template("auto", tokenizer)
        loaded = load_model(f"hf:{path}", cfg, mesh=mesh, rules=rules)
    else:
        run = init_from.read_run_config(path)
        if run.get("stage") == "rm":
            raise ValueError(f"{path} is a reward-model run; it scores completions rather "
                             f"than writing them: pass it as --rm={path} (rewards 'rm:{path}')")
        cfg = init_from.run_model_config(run)
        tokenizer = load_tokenizer(run["tokenizer"])
        template = get_template(run.get("data", {}).get("chat_template", "auto"), tokenizer)
        loaded = load_model(f"workdir:{path}", cfg, mesh=mesh, rules=rules, on_host=True)
    return ModelPolicy(loaded.model_def.merge(loaded.params), tokenizer, template, name=spec,
                       batch_size=batch_size, mesh=mesh, rules=rules)
