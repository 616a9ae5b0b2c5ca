"""The training loop shared by every stage: init/restore, jit, step, eval, log, checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from jaxalign import algos, rollout_mesh, storage
from jaxalign import sharding as shd
from jaxalign import step as step_lib
from jaxalign.algos.base import BatchSource, Loader, RunContext
from jaxalign.checkpoint import Checkpointer, abstract_with_shardings
from jaxalign.config import check_config, to_json
from jaxalign.data import holdout, packing
from jaxalign.data.tokenizer import check_vocab, load_tokenizer
from jaxalign.mesh import barrier, make_mesh, maybe_initialize_distributed
from jaxalign.metrics import (
    MetricsWriter,
    Progress,
    StepLog,
    Throughput,
    peak_flops_probe,
    to_python,
)
from jaxalign.models import init_from, lineage, lora
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.optim import make_optimizer
from jaxalign.precompute import PrecomputedColumns, params_digest
from jaxalign.preemption import Preemption

# Model fields that change parameter shapes or meaning: a checkpoint written
# with other values cannot be resumed.
_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "mlp_dim", "qkv_bias", "qk_norm", "tie_embeddings", "post_norms", "param_dtype")


def check_batch_layout(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """Batch sizes must split evenly over micro-batches and data-parallel devices."""
    b, a = config.train.batch_size, config.train.micro_batches
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if a < 1 or b % a:
        raise ValueError(f"train.batch_size={b} is not divisible by train.micro_batches={a}")
    if (b // a) % dp:
        raise ValueError(
            f"micro-batch size {b // a} (train.batch_size={b} / train.micro_batches={a}) is not "
            f"divisible by the data-parallel size {dp} (mesh data={mesh.shape['data']} x "
            f"fsdp={mesh.shape['fsdp']})")
    if config.data.eval_batch_size % dp:
        raise ValueError(f"data.eval_batch_size={config.data.eval_batch_size} is not divisible "
                         f"by the data-parallel size {dp}")


def check_workdir_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir whose checkpoints come from another model or stage."""
    ckpt_dir = storage.join(workdir, "checkpoints")
    path = storage.join(workdir, "config.json")
    if not (storage.isdir(ckpt_dir) and storage.listdir(ckpt_dir) and storage.exists(path)):
        return
    try:
        old = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it records the config the "
                         "checkpoints beside it were written with: restore it or use a new "
                         "--workdir") from e
    diffs = []
    if old.get("stage") != config.stage:
        diffs.append(f"stage: {old.get('stage')!r} -> {config.stage!r}")
    for k in _SHAPE_KEYS:
        before, now = old.get("model", {}).get(k), config.model.get(k)
        if before != now:
            diffs.append(f"model.{k}: {before!r} -> {now!r}")
    diffs += lora.checkpoint_diffs(old, config)
    if diffs:
        raise ValueError(
            f"workdir {workdir} holds checkpoints from an incompatible config ("
            + "; ".join(diffs) + "). Use a new --workdir or restore the old values.")


def state_layout(config: ml_collections.ConfigDict, model_cfg: TransformerConfig,
                 tx: optax.GradientTransformation, mesh: Mesh, rules: shd.Rules,
                 model_cls: type[nnx.Module] = Transformer):
    """Abstract train state and its shardings, derived without any compute.

    Returns ``(model_def, abstract_state, state_shardings, init_fn)`` where
    ``init_fn()`` builds the real state (jit it with ``out_shardings``), and
    ``init_fn(params)`` builds it around given initial params (``model.init_from``; a
    subset of the tree is fine).
    """
    def new_model():
        return model_cls(model_cfg, rngs=nnx.Rngs(params=config.seed))

    graphdef, abstract_nnx = nnx.split(nnx.eval_shape(new_model), nnx.Param)
    trainable = None  # everything trains
    if model_cfg.lora is not None:
        # Only the adapters train, and any head the stage adds to the plain decoder.
        plain = nnx.eval_shape(lambda: Transformer(dataclasses.replace(model_cfg, lora=None),
                                                   rngs=nnx.Rngs(params=0)))
        trainable = lora.trainable_mask(nnx.to_pure_dict(abstract_nnx),
                                        nnx.to_pure_dict(nnx.state(plain, nnx.Param)))

    def init_fn(params=None):
        fresh = nnx.to_pure_dict(nnx.state(new_model(), nnx.Param))
        # Loaded params win; any the source lacks (e.g. a new head) keep the fresh init.
        params = fresh if params is None else init_from.overlay(fresh, params)
        return {
            "params": params,
            "opt_state": tx.init(lora.partition(params, trainable)[0]),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(config.seed),
            "nonfinite_count": jnp.zeros((), jnp.int32),
            "first_nonfinite_step": jnp.full((), -1, jnp.int32),
        }

    abstract_state = jax.eval_shape(init_fn)
    axes = shd.logical_axes_tree(abstract_nnx)
    params_sh = shd.param_shardings(abstract_state["params"], axes, mesh, rules)
    rep = shd.replicated(mesh)
    shardings = {
        "params": params_sh,
        "opt_state": shd.state_shardings_like(abstract_state["opt_state"],
                                              abstract_state["params"], params_sh, mesh),
        "step": rep, "rng": rep, "nonfinite_count": rep, "first_nonfinite_step": rep,
    }
    model_def = step_lib.ModelDef(graphdef, abstract_nnx, trainable)
    return model_def, abstract_state, shardings, init_fn


def _log_eval_source(data: Any, eval_data: Any) -> None:
    """One line saying what a run over user records evaluates on under ``data.eval=auto``."""
    if data.eval != holdout.AUTO or data.train.startswith("builtin:"):
        return
    if eval_data is None:
        logging.warning("data.eval=auto and data.eval_fraction=%g: no evaluation (name a source "
                        "with data.eval=<source>)", data.eval_fraction)
        return
    logging.warning("data.eval=auto: evaluating on %s records held out of %s (data.eval_fraction"
                    "=%g, seed %d), training on the rest", getattr(eval_data, "num_records", "?"),
                    data.train, data.eval_fraction, data.seed)


def _width(batch: Mapping[str, Any]) -> int:
    """The padded row width of a batch (its widest ``[rows, positions]`` array)."""
    return max((v.shape[1] for v in batch.values() if getattr(v, "ndim", 0) == 2), default=0)


def device_fields(host: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The array fields of a host batch (prompt batches also carry host-only ``extras``)."""
    return {k: v for k, v in host.items() if isinstance(v, np.ndarray)}


class LoaderBatches:
    """The loop's batches straight from a stage's loader (a ``BatchSource``), with any
    precomputed columns of a frozen model added."""

    synchronous = False
    at_boundary = True

    def __init__(self, loader: Loader, columns: PrecomputedColumns | None, mesh: Mesh):
        self.iterator = loader.iterator()
        self.columns, self.mesh = columns, mesh

    def next(self, state: Mapping[str, Any], step: int):
        del state
        host = next(self.iterator)
        if self.columns is not None:
            rows = len(host[next(iter(device_fields(host)))])
            host = {**host, **self.columns.for_train_batch(step, rows)}
        return shd.global_batch(device_fields(host), self.mesh), host, {}

    def after_update(self, metrics: Any, host_metrics: dict[str, float]) -> dict[str, float]:
        del metrics
        return host_metrics

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.iterator.set_state(dict(state))

    def metrics(self) -> dict[str, float]:
        return self.iterator.metrics()

    def close(self) -> None:
        self.iterator.close()


class Trainer:
    """One run: its data, state, jitted steps and checkpoints; ``fit()`` runs the loop.

    Stages see none of it: their hooks get the config, the data or a read-only
    :class:`~jaxalign.algos.base.RunContext` (``self.context``).
    """

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 mesh: Mesh | None = None):
        check_config(config)  # typos and impossible sizes fail before any work
        maybe_initialize_distributed()
        self.workdir = workdir
        # An RL stage may keep devices for its sampler (rl.rollout_devices).
        self.mesh = mesh if mesh is not None else make_mesh(
            config.mesh, rollout_mesh.training_devices(config))
        check_batch_layout(config, self.mesh)
        self.stage = algos.get_stage(config.stage)
        self.stage.check_config(config)  # stage options fail before any data or model work
        # An hf:/workdir: source dictates the architecture (changed keys are logged) and, under
        # tokenizer=auto, the tokenizer.
        self.config = config = lineage.resolve_tokenizer(init_from.resolve_config(config))
        self.model_cfg = TransformerConfig.from_mapping(config.model)
        if config.train.nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.nonfinite={config.train.nonfinite!r}; expected stop or skip")
        check_workdir_compatible(workdir, config)
        MetricsWriter.check_sinks(config.metrics)
        storage.makedirs(workdir)

        self.tokenizer = load_tokenizer(config.tokenizer)
        check_vocab(self.tokenizer, self.model_cfg.vocab_size)
        init_from.check_hf_tokenizer(config.model.init_from, config.tokenizer,
                                     self.model_cfg.vocab_size)
        pinfo = dict(process_index=jax.process_index(), process_count=jax.process_count())
        self.train_data = self.stage.build_data(config, self.tokenizer, "train", **pinfo)
        self.eval_data = (self.stage.build_data(config, self.tokenizer, "eval", **pinfo)
                          if holdout.has_eval(config.data) else None)
        _log_eval_source(config.data, self.eval_data)
        self.rules = shd.rules_from_config(config.sharding.rules)
        self.tx, self.schedule = make_optimizer(config.optim, config.train.steps)
        self._build_state_layout()
        # Orbax's manager runs the first cross-process collective, and gloo gives a late
        # process only 30 s to join one: meet first (data validation times differ).
        barrier("init")
        self._write_run_config()
        self.checkpointer = Checkpointer(
            storage.join(workdir, "checkpoints"), save_every=config.checkpoint.save_every,
            keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
        self.state, restored_data = self._init_or_restore()
        self.context = RunContext(
            config=config, tokenizer=self.tokenizer, mesh=self.mesh, rules=self.rules,
            model_cfg=self.model_cfg, model_def=self.model_def, eval_data=self.eval_data,
            param_shardings=self.state_shardings["params"],
            initial_params_fn=self._load_initial_params)
        self._build_steps()
        self.columns = self._precomputed_columns()
        # Online RL stages turn prompt batches into training batches (rollouts); the
        # loop consumes either the same way.
        self.batches: BatchSource = (
            self.stage.make_batches(self.context, self.train_data)
            or LoaderBatches(self.train_data, self.columns, self.mesh))
        if restored_data:
            self.batches.set_state(restored_data)
        self.evaluator = self.stage.make_evaluator(self.context)

    # -- state -----------------------------------------------------------------

    def _build_state_layout(self) -> None:
        layout = state_layout(self.config, self.model_cfg, self.tx, self.mesh, self.rules,
                              model_cls=self.stage.make_model)
        self.model_def, self.abstract_state, self.state_shardings, self._init_state = layout
        lora.check_checkpoint_config(self.config)
        if self.model_def.trainable is not None:
            n_train, n_all = lora.count(self.abstract_state["params"], self.model_def.trainable)
            Progress(0).line(f"LoRA rank {self.model_cfg.lora.rank}: {n_train:,} of {n_all:,} "
                             f"params train ({100 * n_train / n_all:.2f}%)")

    def _write_run_config(self) -> None:
        """Writes ``config.json`` only now, with every process past its compatibility
        check (which reads the old file), and atomically, so a kill mid-write never
        leaves a truncated file (``storage.write_text``)."""
        if jax.process_index() == 0:
            storage.write_text(storage.join(self.workdir, "config.json"), to_json(self.config))

    def _build_steps(self) -> None:
        """Jits the train and eval steps; frozen models stay outside the donated state."""
        loss_fn, loss_weights = self.stage.make_loss(self.config)
        # Frozen models (an in-step DPO reference) start from the run's initial params,
        # unless the stage loads its own (a distillation teacher).
        names = self.stage.frozen_models(self.config)
        frozen_defs = {name: self.model_def for name in names}
        # With LoRA the reference is the frozen base itself: the policy's params with the
        # adapters off, so it needs no copy of the weights.
        shared = ("reference",) if self.model_cfg.lora and "reference" in names else ()
        for name in shared:
            frozen_defs[name] = step_lib.ModelDef(
                lora.without_adapters(self.model_def.graphdef, self.model_def.abstract_state),
                self.model_def.abstract_state)
        self.frozen = {}
        for name in names:
            if name in shared:
                continue
            own = self.stage.load_frozen(self.context, name)
            if own is not None:
                frozen_defs[name], self.frozen[name] = own.model_def, own.params
            else:
                self.frozen[name] = self.context.initial_params()
        params_sh = self.state_shardings["params"]
        frozen_sh = {name: jax.tree.map(lambda x: x.sharding, p)
                     for name, p in self.frozen.items()}
        common = dict(model_def=self.model_def, mesh=self.mesh, rules=self.rules,
                      frozen_defs=frozen_defs, policy_frozen=shared)
        self._executables: dict[tuple, Any] = {}
        self.train_step = jax.jit(
            step_lib.make_train_step(loss_fn, loss_weights, tx=self.tx, schedule=self.schedule,
                                     num_micro=self.config.train.micro_batches, **common),
            in_shardings=(self.state_shardings, None, frozen_sh),
            out_shardings=(self.state_shardings, None), donate_argnums=0)
        self.eval_step = jax.jit(step_lib.make_eval_step(loss_fn, loss_weights, **common),
                                 in_shardings=(params_sh, None, frozen_sh))

    def _checkpointed(self, tree: dict[str, Any]) -> dict[str, Any]:
        """The part of a state-like tree that checkpoints hold.

        With ``checkpoint.adapters_only`` that is only the trainable params (plus the
        rest of the state): the frozen base is rebuilt from ``model.init_from``.
        """
        if not self.config.checkpoint.adapters_only:
            return tree
        return {**tree, "params": lora.partition(tree["params"], self.model_def.trainable)[0]}

    def _precomputed_columns(self) -> PrecomputedColumns | None:
        """Columns a frozen model adds to every batch, computed once before training."""
        spec = self.stage.precomputed_columns(self.config)
        if spec is None:
            return None
        name, fn = spec
        own = self.stage.load_frozen(self.context, name)
        params, model_def = ((own.params, own.model_def) if own is not None
                             else (self.context.initial_params(), self.model_def))
        mesh, rules = self.mesh, self.rules

        def columns(p, batch):
            with shd.axis_rules(mesh, rules):
                return fn(model_def.merge(p), batch)

        jitted = jax.jit(columns, in_shardings=(jax.tree.map(lambda x: x.sharding, params),
                                                None))
        c = self.config
        fingerprint = {"stage": c.stage, "model": c.model.to_dict(), "data": c.data.to_dict(),
                       "steps": c.train.steps, "batch_size": c.train.batch_size,
                       "options": c[c.stage].to_dict() if c.stage in c else {},
                       # the frozen model's weights themselves: a teacher or reference
                       # retrained at the same path must not reuse the old columns
                       "frozen_params": params_digest(params)}
        cols = PrecomputedColumns(
            storage.join(self.workdir, f"precomputed_{name}.npz"), fingerprint,
            lambda batch: jitted(params, batch), self.mesh, device_fields)
        t0 = time.perf_counter()
        if cols.prepare_train(self.train_data.iterator, c.train.steps):
            Progress(0).line(f"precomputed {name} columns for {c.train.steps} batches in "
                             f"{time.perf_counter() - t0:.1f}s")
        return cols

    def _load_initial_params(self) -> Any:
        """The params a fresh run starts from (``model.init_from`` over a fresh init)."""
        params = init_from.load_params(
            self.config.model.init_from, self.model_cfg, self.abstract_state["params"],
            self.state_shardings["params"])
        init = jax.jit(lambda p=None: self._init_state(p)["params"],
                       out_shardings=self.state_shardings["params"])
        return init() if params is None else init(params)

    def _init_or_restore(self) -> tuple[dict[str, Any], dict[str, Any]]:
        target = abstract_with_shardings(self._checkpointed(self.abstract_state),
                                         self._checkpointed(self.state_shardings))
        restored = self.checkpointer.restore_latest_intact(target)
        if restored is None:
            # Only a fresh run starts from init_from; a resumed one prefers its own checkpoint.
            params = init_from.load_params(
                self.config.model.init_from, self.model_cfg, self.abstract_state["params"],
                self.state_shardings["params"])
            init = jax.jit(self._init_state, out_shardings=self.state_shardings)
            state = init() if params is None else init(params)
            return state, {}
        step, state, data_state = restored
        if self.config.checkpoint.adapters_only:
            state["params"] = init_from.overlay(self._load_initial_params(), state["params"])
        logging.info("resumed from step %d (%s)", step, self.checkpointer.directory)
        return state, data_state

    @property
    def data_state(self) -> dict[str, Any]:
        """The data position a checkpoint taken now records."""
        return self.batches.get_state()

    # -- loop ------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The stage's eval of the current params, or the eval split's loss."""
        if self.evaluator is not None:
            return self.evaluator(self.state["params"])
        totals = None
        limit = self.config.train.eval_batches
        batches = itertools.islice(self.eval_data.eval_batches(), limit or None)
        if self.columns is not None:
            batches = self.columns.for_eval_batches(batches)
        for host in batches:
            out = self.eval_step(self.state["params"],
                                 shd.global_batch(device_fields(host), self.mesh), self.frozen)
            out = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(out))
            totals = out if totals is None else jax.tree.map(np.add, totals, out)
        return {} if totals is None else step_lib.finish_eval(totals)

    def _check_nonfinite(self, metrics: Mapping[str, Any], step: int) -> None:
        """Under ``train.nonfinite=stop``, raises if any update so far was non-finite.

        Called at every log line and before every checkpoint, so the error comes within
        one logging interval and no checkpoint holds a state after a non-finite update.
        """
        if self.config.train.nonfinite == "skip":
            return
        first = int(jax.device_get(self.state["first_nonfinite_step"]))
        if first < 0:
            return
        names = [k for k in ("loss", "grad_norm", "update_norm") if k in metrics]
        host = to_python({k: metrics[k] for k in names})
        m = {k: host[k] for k in names}
        bad = [k for k, v in m.items() if not np.isfinite(v)]
        now = (f"{' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} non-finite" if bad
               else "the logged metrics are finite again")
        last = self.checkpointer.latest_step()
        raise FloatingPointError(
            f"non-finite loss, gradient or update at step {first + 1}: the update was not "
            f"applied and the run stops (train.nonfinite=stop). At step {step}: {now} ("
            + ", ".join(f"{k}={v}" for k, v in m.items()) + "). Last good checkpoint: "
            f"{'none' if last is None else f'step {last}'} in {self.checkpointer.directory}. "
            "Lower optim.learning_rate, check the data, or set train.nonfinite=skip to skip "
            "such updates.")

    def _save(self, step: int, metrics: Mapping[str, Any] | None, *,
              force: bool = False) -> None:
        """Checkpoints ``step`` (on schedule, or with ``force``) unless an update was non-finite."""
        if force or step % self.checkpointer.save_every == 0:
            self._check_nonfinite(metrics or {}, step)
        self.checkpointer.save(step, self._checkpointed(self.state), lambda: self.data_state,
                               force=force)

    def _start_log(self, start: int) -> StepLog:
        """The run's log, after one header line with the FLOP convention and the mesh."""
        cfg, model_cfg = self.config, self.model_cfg
        # Rows past the restored step were logged by a run that died before its next
        # checkpoint; this run recomputes them.
        writer = MetricsWriter(self.workdir, cfg.metrics, resume_step=start,
                               run_config=cfg.to_dict())
        progress = Progress(cfg.train.steps)
        seq_len = cfg.data.max_len
        flops_tok = model_cfg.flops_per_token(seq_len)
        # Fake CPU devices share one host's cores: the probe already measures the whole host.
        n_chips = 1 if jax.devices()[0].platform == "cpu" else jax.device_count()
        peak = cfg.metrics.peak_flops or peak_flops_probe() * n_chips
        peak_src = "config" if cfg.metrics.peak_flops else "matmul probe"
        n = model_cfg.matmul_params()
        progress.line(
            f"model: {n:,} matmul params; FLOPs/token = 6*N_matmul + 6*L*T*D = 6*{n} + "
            f"6*{model_cfg.n_layers}*T*{model_cfg.d_model} ({flops_tok:.3e} at T = "
            f"max_len {seq_len}; T = each batch's padded width; where a batch gathers its "
            f"loss positions, the unembedding's 6*V*D only at those); peak {peak:.3e} "
            f"FLOP/s ({peak_src}). tokens_per_s and mfu count non-padding tokens only, "
            "positions_per_s every padded position")
        progress.line(f"mesh {dict(self.mesh.shape)} on {self.mesh.size} of {jax.device_count()} "
                      f"{jax.devices()[0].platform} devices; starting at step {start}")
        throughput = Throughput(model_cfg.flops_per_token, peak,
                                unembed_flops=6.0 * model_cfg.d_model * model_cfg.vocab_size)
        return StepLog(writer, progress, throughput, start=start, total=cfg.train.steps,
                       check=self._check_nonfinite)

    def _log_step(self, log: StepLog, done: int, stop: int, metrics: Any,
                  host_metrics: dict[str, float], host: Mapping[str, Any],
                  flush_now: bool) -> None:
        """Books one step: the previous row is read now, this one is held (or read at
        once when an eval, a checkpoint or the end follows)."""
        log.flush()
        real, positions = packing.real_tokens(host)
        # A loader's host batch is this process's share (the others' are alike in size);
        # a rollout's is already the global batch.
        local = bool(device_fields(host)) and not getattr(self.batches, "host_is_global", False)
        share = jax.process_count() if local else 1
        unembedded = packing.unembedded_tokens(host)
        log.throughput.add(real * share, positions * share, _width(host),
                           None if unembedded is None else unembedded * share)
        cfg = self.config.train
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.hold(done, metrics, host_metrics, self.batches.metrics())
            if (flush_now or self.batches.synchronous or done == stop
                    or done % self.checkpointer.save_every == 0):
                log.flush()

    def _eval_due(self, done: int) -> bool:
        cfg = self.config.train
        return self.eval_data is not None and (done % cfg.eval_every == 0
                                               or done == cfg.steps)

    def fit(self, num_steps: int | None = None) -> dict[str, Any]:
        """Runs from the current step to ``train.steps``; returns the last metrics.

        Args:
          num_steps: stop after this many steps (checkpointing there) instead of at
            ``train.steps``; the schedule still spans ``train.steps``.
        """
        cfg = self.config.train
        start = int(jax.device_get(self.state["step"]))
        stop = cfg.steps if num_steps is None else min(cfg.steps, start + num_steps)
        log = self._start_log(start)
        metrics, preempted = {}, False
        with Preemption(self.mesh) as preemption:
            try:
                if cfg.eval_at_start and start == 0 and self.eval_data is not None:
                    # The starting point's numbers, for before/after comparisons in one file.
                    log.eval(0, self.evaluate())
                for step in range(start, stop):
                    batch, host, host_metrics = self.batches.next(self.state, step)
                    step_fn = self._executable(batch, log)
                    self.state, metrics = step_fn(self.state, batch, self.frozen)
                    host_metrics = self.batches.after_update(metrics, host_metrics)
                    done, eval_due = step + 1, self._eval_due(step + 1)
                    self._log_step(log, done, stop, metrics, host_metrics, host,
                                   eval_due or preemption.signalled)
                    if eval_due:
                        log.eval(done, self.evaluate())
                    if not self.batches.at_boundary:
                        # Mid-rollout: the rest of its batches are in no checkpoint, so
                        # saving (or stopping) waits for its last update.
                        continue
                    self._save(done, {**metrics, **host_metrics})
                    if preemption.requested(done):
                        preempted = True
                        log.progress.line(f"preempted at step {done}: checkpointing and "
                                          "exiting; rerun the same command to resume")
                        break
                log.flush()
                end = int(jax.device_get(self.state["step"]))
                if self.checkpointer.latest_step() != end:
                    self._save(end, metrics, force=True)
            finally:
                self.checkpointer.wait()
                log.close(failed=sys.exc_info()[0] is not None)
        skipped = int(jax.device_get(self.state["nonfinite_count"]))
        if skipped:
            logging.warning("%d update(s) skipped for non-finite loss or gradient", skipped)
        return {"train": log.last_train, "eval": log.last_eval, "nonfinite_skipped": skipped,
                "preempted": preempted, "wall_s": log.wall_s}

    def _executable(self, batch: Mapping[str, jax.Array], log: StepLog):
        """The train step compiled for this batch's shapes: once per shape (length bucket),
        its compile time and memory logged once and left out of the throughput."""
        key = tuple(sorted((k, v.shape) for k, v in batch.items()))
        if key not in self._executables:
            t0 = time.perf_counter()
            compiled = self.train_step.lower(self.state, batch, self.frozen).compile()
            rows = next(iter(batch.values())).shape[0]
            ks = sorted({v.shape[1] for k, v in batch.items() if k.endswith("loss_index_bk")})
            at = f" ({'/'.join(map(str, ks))} loss positions a row)" if ks else ""
            msg = (f"train_step compiled for {rows} rows x {_width(batch)} positions{at} in "
                   f"{time.perf_counter() - t0:.1f}s")
            mem = compiled.memory_analysis()
            if mem is not None:
                msg += (f"; per-device bytes: arguments {mem.argument_size_in_bytes:,}, "
                        f"temp {mem.temp_size_in_bytes:,}, output {mem.output_size_in_bytes:,}")
            log.progress.line(msg)
            # Processes compile at their own pace; meet before the step's collectives.
            barrier(f"compiled_{len(self._executables)}")
            self._executables[key] = compiled
            log.throughput.exclude(time.perf_counter() - t0)
        return self._executables[key]

    def close(self) -> None:
        self.batches.close()
        self.checkpointer.close()


def train(config: ml_collections.ConfigDict, workdir: str,
          mesh: Mesh | None = None) -> dict[str, Any]:
    """Trains ``config.stage`` in ``workdir`` (resuming if it holds checkpoints)."""
    trainer = Trainer(config, workdir, mesh=mesh)
    try:
        return trainer.fit()
    finally:
        trainer.close()
