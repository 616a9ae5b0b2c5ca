"""Distillation: a student trained towards a frozen teacher's token distribution.

``distill.teacher`` (``hf:<dir>``, ``gguf:<file>`` or ``workdir:<DIR>``) is loaded once,
sharded like the student (its own shape: a larger model is fine) and never donated. The
loss is a per-token divergence between the two next-token distributions, averaged over
the completion tokens of the global batch (``jaxalign.losses``: forward KL, reverse KL
or GKD's generalised JSD with mixing β), optionally on the teacher's top-k tokens only.

Where the completions come from (GKD's data sources):

* off-policy: the dataset's completions (SFT records), teacher log-probs in the step or,
  with ``distill.top_k`` > 0, precomputed once (``distill.teacher_logits=precomputed``);
* on-policy: with probability ``distill.on_policy_fraction`` (λ) a step's batch is the
  student's own samples for the batch's prompts (``rl.*`` sampling settings);
* sequence-level KD: ``distill.sequence_kd`` replaces the dataset's completions by the
  teacher's samples (``distill.loss=nll`` then trains plain SFT on them).

The student and teacher must share a vocabulary; cross-tokenizer distillation is out of
scope and refused before any compute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import losses, multihost, pairs, policy, rollout, sampling
from jaxalign import sharding as shd
from jaxalign.algos.base import Loader, RunContext, Stage
from jaxalign.config import section
from jaxalign.data.loader import build_loader
from jaxalign.evals.generation import make_prompt_evaluator
from jaxalign.models import init_from, lineage
from jaxalign.models.transformer import TransformerConfig
from jaxalign.step import Batch, LossOut

LOSSES = (*losses.DISTILL_LOSSES, "nll")
TEACHER = "teacher"


def default_config() -> dict[str, Any]:
    """The ``distill`` section, and the ``rl`` section for on-policy sampling and the eval."""
    return {"rl": rollout.rl_config(num_samples=1, max_new_tokens=32), "distill": section(
        "distill", "Distillation from a frozen teacher (jaxalign.algos.distill).",
        teacher=("", "the teacher: hf:<dir> | gguf:<file> | workdir:<DIR> (same vocabulary "
                 "as the student)"),
        loss=("jsd", "per-token divergence: forward_kl (KL(teacher‖student)) | reverse_kl "
              "(KL(student‖teacher)) | jsd (GKD's generalised JSD, mixing distill.beta) | "
              "nll (no teacher logits: SFT on the completions, for sequence_kd)"),
        beta=(0.5, "jsd's β: 0 is forward KL, 1 reverse KL"),
        temperature=(1.0, "both distributions are softmax(logits / temperature)"),
        top_k=(0, "> 0: compare on the teacher's k likeliest tokens only, each distribution "
               "renormalised over them"),
        teacher_logits=("in_step", "in_step (the teacher runs in the step) | precomputed "
                        "(its top_k logits once before training; off-policy data only)"),
        on_policy_fraction=(0.0, "λ: the chance that a step trains on the student's own "
                            "samples for its prompts (GKD); 0 = the dataset's completions"),
        sequence_kd=(False, "train on the teacher's samples instead of the dataset's "
                     "completions (sequence-level KD)"),
    )}


def check_config(config: Any) -> None:
    """Stops before any compute on an impossible distillation setting."""
    d = config.distill
    if not d.teacher:
        raise ValueError("distill.teacher is empty: name the teacher as hf:<dir>, "
                         "gguf:<file> or workdir:<DIR>")
    kind, _ = init_from.parse(d.teacher)
    if kind == "scratch":
        raise ValueError(f"distill.teacher={d.teacher!r}: a teacher must be trained weights")
    if d.loss not in LOSSES:
        raise ValueError(f"distill.loss={d.loss!r}; known: {', '.join(LOSSES)}")
    if not 0.0 <= d.beta <= 1.0:
        raise ValueError(f"distill.beta={d.beta} must be in [0, 1]")
    if d.temperature <= 0:
        raise ValueError(f"distill.temperature={d.temperature} must be positive")
    if d.top_k < 0:
        raise ValueError(f"distill.top_k={d.top_k} must be >= 0 (0 = every token)")
    if not 0.0 <= d.on_policy_fraction <= 1.0:
        raise ValueError(f"distill.on_policy_fraction={d.on_policy_fraction} must be in "
                         "[0, 1]")
    if d.teacher_logits not in ("in_step", "precomputed"):
        raise ValueError(f"distill.teacher_logits={d.teacher_logits!r}; expected in_step or "
                         "precomputed")
    if d.teacher_logits == "precomputed":
        if d.top_k < 1:
            raise ValueError("distill.teacher_logits=precomputed stores the teacher's top_k "
                             "logits per token: set distill.top_k (e.g. 64)")
        if d.on_policy_fraction > 0 or d.sequence_kd:
            raise ValueError("distill.teacher_logits=precomputed needs fixed data: it cannot "
                             "be used with on_policy_fraction > 0 or sequence_kd")
    if config.rl.num_samples != 1:
        raise ValueError(f"rl.num_samples={config.rl.num_samples}: distillation samples one "
                         "completion per prompt")
    rollout.check_config(config)


def _samples_only(config: Any) -> bool:
    """Every training batch is sampled (no dataset completion is used)."""
    d = config.distill
    return d.on_policy_fraction >= 1.0 or d.sequence_kd


def _uses_teacher_in_step(config: Any) -> bool:
    return config.distill.loss != "nll" and config.distill.teacher_logits == "in_step"


def frozen_models(config: Any) -> tuple[str, ...]:
    """The teacher, when its logits are computed in the step."""
    return (TEACHER,) if _uses_teacher_in_step(config) else ()


# -- the teacher -----------------------------------------------------------------------

def teacher_config(spec: str, student: TransformerConfig) -> TransformerConfig:
    """The teacher's architecture (from its checkpoint) with the student's numerics
    (dtype, remat, logits chunking) and no adapters."""
    arch = init_from.source_architecture(spec)
    merged = {**student.to_dict(), **arch}
    return dataclasses.replace(TransformerConfig.from_mapping(merged), lora=None)


def check_teacher_vocab(config: Any, teacher_cfg: TransformerConfig,
                        student_cfg: TransformerConfig) -> None:
    """Refuses a teacher whose vocabulary is not the student's, naming both."""
    spec = config.distill.teacher
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise ValueError(f"distill.teacher={spec} has a vocabulary of "
                         f"{teacher_cfg.vocab_size} ids but the student's has "
                         f"{student_cfg.vocab_size}: distillation needs one shared tokenizer")
    theirs = lineage.source_tokenizer(spec)
    if theirs is not None:
        try:
            lineage.check_same(spec, config.tokenizer, theirs)
        except ValueError:
            raise ValueError(f"distill.teacher={spec} was trained with tokenizer {theirs!r}, "
                             f"the student with {config.tokenizer!r}: their pieces differ, and "
                             "distillation needs one shared tokenizer") from None


def load_teacher(ctx: RunContext) -> policy.Loaded:
    """The teacher (``(model_def, params)``) on the run's mesh, loaded once per run."""
    def build() -> policy.Loaded:
        spec = ctx.config.distill.teacher
        cfg = teacher_config(spec, ctx.model_cfg)
        check_teacher_vocab(ctx.config, cfg, ctx.model_cfg)
        return policy.load_model(spec, cfg, mesh=ctx.mesh, rules=ctx.rules)
    return ctx.shared(TEACHER, build)


def load_frozen(ctx: RunContext, name: str) -> policy.Loaded | None:
    """The frozen models of this stage are the teacher, not the initial policy."""
    return load_teacher(ctx) if name == TEACHER else None


# -- the loss --------------------------------------------------------------------------

def loss_weights(batch: Batch) -> dict[str, jax.Array]:
    """A mean over every completion token of the global batch."""
    return {"tokens": jnp.sum(batch["loss_mask_bt"].astype(jnp.float32))}


def _teacher_hidden(teacher: nnx.Module, batch: Batch, index_bk: jax.Array | None) -> jax.Array:
    h_btd = teacher.hidden(batch["inputs_bt"], batch["positions_bt"], batch["segment_ids_bt"])
    (h_btd,) = losses.take_positions(index_bk, jax.lax.stop_gradient(h_btd))
    return h_btd


def make_loss(config: Any):
    """``(loss_fn, loss_weights)`` for ``config.distill``."""
    check_config(config)
    d = config.distill
    nll_only = d.loss == "nll"
    beta = 0.0 if nll_only else losses.distill_beta(d.loss, float(d.beta))
    temperature, top_k = float(d.temperature), int(d.top_k)

    def per_token(s_logits, targets, t_logits=None, t_ids=None, t_top=None):
        out = losses.token_stats(s_logits, targets, with_hits=True)
        if t_logits is not None:
            out["div"] = losses.distill_divergence(s_logits, t_logits, beta=beta,
                                                   temperature=temperature, top_k=top_k)
        elif t_ids is not None:
            out["div"] = losses.topk_distill_divergence(s_logits, t_ids, t_top, beta=beta,
                                                        temperature=temperature)
        return out

    def loss_fn(model: nnx.Module, batch: Batch, frozen: Mapping[str, Any] | None = None
                ) -> LossOut:
        index = batch.get("loss_index_bk")
        h_btd = model.hidden(batch["inputs_bt"], batch["positions_bt"], batch["segment_ids_bt"])
        h, targets, mask = losses.take_positions(index, h_btd, batch["targets_bt"],
                                                 batch["loss_mask_bt"])
        s_fn = model.logits_fn()
        if nll_only:
            def fn(h_s, tgt):
                return per_token(s_fn(h_s), tgt)
            xs = (h, targets)
        elif "teacher_ids_btk" in batch:
            def fn(h_s, tgt, ids, top):
                return per_token(s_fn(h_s), tgt, t_ids=ids, t_top=top)
            # stored cut to the widest batch's loss positions: fit to this batch's
            xs = (h, targets, *(pairs.fit_slots(batch[f"teacher_{c}_btk"], h.shape[1])
                                for c in ("ids", "logits")))
        else:
            teacher = frozen[TEACHER]
            t_fn = teacher.logits_fn()

            def fn(h_s, tgt, h_t):
                return per_token(s_fn(h_s), tgt, t_logits=t_fn(h_t))
            xs = (h, targets, _teacher_hidden(teacher, batch, index))
        chunk = model.cfg.logits_chunk
        stats = (losses.map_position_chunks(fn, chunk, *xs) if chunk and chunk < h.shape[1]
                 else fn(*xs))
        mask = mask.astype(jnp.float32)
        count = jnp.sum(mask)
        nll = -jnp.sum(stats["logps_bt"] * mask)
        metrics = {"nll": (nll, count),
                   "token_accuracy": (jnp.sum(stats["hits_bt"] * mask), count)}
        if nll_only:
            return LossOut({"tokens": nll}, metrics)
        div = jnp.sum(stats["div"] * mask)
        metrics[f"distill/{d.loss}"] = (div, count)
        return LossOut({"tokens": div}, metrics)

    return loss_fn, loss_weights


def precomputed_columns(config: Any):
    """``("teacher", fn)``: the teacher's top-k ids and logits at every loss position,
    computed once, when ``distill.teacher_logits=precomputed``."""
    d = config.distill
    if d.loss == "nll" or d.teacher_logits != "precomputed":
        return None
    k = int(d.top_k)

    def columns(teacher: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        h_btd = _teacher_hidden(teacher, batch, batch.get("loss_index_bk"))
        fn = teacher.logits_fn()

        def top(h):
            logits_btk, ids_btk = jax.lax.top_k(fn(h), k)
            return logits_btk, ids_btk.astype(jnp.int32)

        logits_btk, ids_btk = jax.lax.map(top, h_btd)  # one row's logits at a time
        return {"teacher_ids_btk": ids_btk, "teacher_logits_btk": logits_btk}

    return TEACHER, columns


# -- data ------------------------------------------------------------------------------

def build_data(config: Any, tokenizer: Any, split: str, *, process_index: int,
               process_count: int):
    """Train: SFT records (prompt records when every batch is sampled); eval: prompts."""
    pinfo = dict(process_index=process_index, process_count=process_count)
    if split == "eval" or _samples_only(config):
        # train.batch_size prompts per step (one sample each), eval_batch_size for eval
        return rollout.build_data(config, tokenizer, split, **pinfo)
    return build_loader(config, tokenizer, split, "sft", loss_index=True, **pinfo)


class DistillBatches:
    """Training batches that mix the dataset's completions with sampled ones.

    At step ``n`` a coin seeded by ``(seed, n)`` picks the student's own samples with
    probability λ; otherwise the dataset's batch (or, under ``sequence_kd``, the
    teacher's samples). Sampling reads the student's current params in place, so each
    step waits for the previous update. Both data positions are checkpointed with every
    step, and a sampled batch is made again from the same key on resume.
    """

    synchronous = True
    at_boundary = True

    def __init__(self, ctx: RunContext, records: Loader | None, prompts: Loader):
        self.ctx = ctx
        d, rl = ctx.config.distill, ctx.config.rl
        self.fraction, self.sequence_kd = float(d.on_policy_fraction), bool(d.sequence_kd)
        self.records = records.iterator() if records is not None else None
        self.prompts = prompts.iterator()
        tok = ctx.tokenizer
        self.sampling = sampling.SamplingConfig(
            max_new_tokens=rl.max_new_tokens, temperature=float(rl.temperature),
            top_k=rl.top_k, top_p=float(rl.top_p), stop_tokens=(tok.eos_id,),
            pad_id=tok.pad_id or 0)
        self._key = jax.random.PRNGKey(ctx.config.seed + 2)
        self._teacher = load_teacher(ctx) if self.sequence_kd else None

    def _on_policy(self, step: int) -> bool:
        if self.fraction >= 1.0 or self.records is None and not self.sequence_kd:
            return True
        return bool(np.random.default_rng([self.ctx.config.seed, step, 7]).random()
                    < self.fraction)

    def _sampled(self, model_def: Any, params: Any, step: int) -> tuple[dict, dict]:
        """This process's rows of a batch sampled from its share of the prompts (every
        process samples the gathered whole batch: rows as on one process)."""
        host = next(self.prompts)
        t0 = time.perf_counter()
        prompts = multihost.gather_tree({k: host[k] for k in ("prompt_tokens_bt",
                                                              "prompt_mask_bt")})
        out = policy.sample_batch(model_def, params, prompts["prompt_tokens_bt"],
                                  prompts["prompt_mask_bt"], jax.random.fold_in(self._key, step),
                                  self.sampling, mesh=self.ctx.mesh, rules=self.ctx.rules)
        seq = jax.device_get(sampling.completion_batch(prompts["prompt_tokens_bt"],
                                                       prompts["prompt_mask_bt"], out))
        real_b = multihost.gather_rows(np.asarray([bool(e) for e in host["extras"]],
                                                  np.float32))
        batch = {"inputs_bt": seq["tokens_bt"], "targets_bt": seq["targets_bt"],
                 "positions_bt": seq["positions_bt"], "segment_ids_bt": seq["segment_ids_bt"],
                 # padding prompts (empty records) carry no loss
                 "loss_mask_bt": seq["completion_mask_bt"] * real_b[:, None]}
        lengths = np.asarray(out.lengths_b)[real_b > 0]
        metrics = {"time/rollout_s": time.perf_counter() - t0,
                   "completion/length": float(lengths.mean()) if len(lengths) else 0.0}
        own = multihost.process_share(len(real_b))
        return {k: np.asarray(v)[own] for k, v in batch.items()}, metrics

    def next(self, state: Mapping[str, Any], step: int):
        on_policy = self._on_policy(step)
        if on_policy:
            batch, metrics = self._sampled(self.ctx.model_def, state["params"], step)
        elif self.sequence_kd:
            batch, metrics = self._sampled(self._teacher.model_def, self._teacher.params, step)
        else:
            host = next(self.records)
            batch = {k: v for k, v in host.items() if isinstance(v, np.ndarray)}
            metrics = {}
        metrics["distill/on_policy"] = float(on_policy)
        return shd.global_batch(batch, self.ctx.mesh), batch, metrics

    def after_update(self, metrics: Any, host_metrics: dict[str, float]) -> dict[str, float]:
        del metrics
        return host_metrics

    def get_state(self) -> dict[str, Any]:
        state = {"prompts": self.prompts.get_state()}
        if self.records is not None:
            state["records"] = self.records.get_state()
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.prompts.set_state(dict(state["prompts"]))
        if self.records is not None:
            self.records.set_state(dict(state["records"]))

    def metrics(self) -> dict[str, float]:
        out = dict(self.prompts.metrics())
        if self.records is not None:
            out.update(self.records.metrics())
        return out

    def close(self) -> None:
        self.prompts.close()
        if self.records is not None:
            self.records.close()


def make_batches(ctx: RunContext, train: Loader) -> DistillBatches | None:
    """None (the loader's batches) for off-policy data; sampled batches otherwise."""
    config = ctx.config
    d = config.distill
    if d.on_policy_fraction <= 0 and not d.sequence_kd:
        return None
    if _samples_only(config):  # the train loader holds prompts already
        return DistillBatches(ctx, None, train)
    prompts = rollout.build_data(config, ctx.tokenizer, "train",
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return DistillBatches(ctx, train, prompts)


# -- evaluation ------------------------------------------------------------------------

def make_evaluator(ctx: RunContext):
    """Greedy answers on the eval prompts (task metrics, ``rl.rewards``) and the student's
    per-token reverse KL to the teacher on those answers (``distill/teacher_kl``)."""
    teacher = load_teacher(ctx)
    model_def = ctx.model_def

    def kl_sums(params, seq):
        with shd.axis_rules(ctx.mesh, ctx.rules):
            student, t = model_def.merge(params), teacher.model_def.merge(teacher.params)
            args = (seq["inputs_bt"], seq["positions_bt"], seq["segment_ids_bt"])
            kl_bt = losses.distill_divergence(student(*args), t(*args), beta=1.0)
        mask = seq["loss_mask_bt"]
        return jnp.sum(kl_bt * mask), jnp.sum(mask)

    kl_jit = jax.jit(kl_sums)

    def on_batch(params, host, out) -> dict[str, tuple[float, float]]:
        seq = jax.device_get(sampling.completion_batch(host["prompt_tokens_bt"],
                                                       host["prompt_mask_bt"], out))
        real_b = np.asarray([bool(e) for e in host["extras"]], np.float32)
        arrays = {"inputs_bt": seq["tokens_bt"], "positions_bt": seq["positions_bt"],
                  "segment_ids_bt": seq["segment_ids_bt"],
                  "loss_mask_bt": np.asarray(seq["completion_mask_bt"]) * real_b[:, None]}
        total, count = multihost.fetch(kl_jit(params, multihost.global_rows(
            {k: np.asarray(v) for k, v in arrays.items()}, ctx.mesh)))
        return {"distill/teacher_kl": (float(total), float(count))}

    return make_prompt_evaluator(ctx, on_batch=on_batch)


STAGE = Stage(name="distill", make_loss=make_loss, build_data=build_data,
              default_config=default_config, check_config=check_config,
              frozen_models=frozen_models, load_frozen=load_frozen,
              precomputed_columns=precomputed_columns, make_batches=make_batches,
              make_evaluator=make_evaluator)
