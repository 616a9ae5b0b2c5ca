"""Rejection sampling and expert iteration: sample, score, keep the best, train, repeat.

One round:

1. the current policy samples ``rejection.num_samples`` (n) completions of every
   prompt of ``rejection.prompts`` with the KV-cache sampler;
2. ``rejection.rewards`` scores them (reward functions and ``rm:<workdir>`` reward
   models, as in the RL stages);
3. ``rejection.mode="sft"`` keeps, per prompt, the ``keep`` best-scored completions
   (``select="best"``, optionally only those reaching ``threshold``) or every one
   reaching ``threshold`` (``select="threshold"``) as prompt/response records;
   ``mode="dpo"`` mines one pair per prompt, the best-scored completion against the
   worst (prompts whose best and worst tie carry no preference: skipped, counted);
4. the records, each with its score, are written to ``WORKDIR/round_<r>/data.jsonl``
   with a summary in ``stats.json``, and the SFT (or DPO) stage trains on them
   (``jsonl:``) in ``WORKDIR/round_<r>/``, starting from the policy that sampled them.

Round 0 samples from ``model.init_from``, round r from round r - 1's checkpoint.
Greedy answers to held-out prompts (``rejection.eval_prompts``) are scored before the
first round and after each one; every round's generation statistics and evaluation
go to ``WORKDIR/metrics.jsonl`` (step r + 1 = after round r). Rerunning the same
command skips finished rounds and resumes an interrupted one: its data is reused and
its training resumes from its checkpoints.

The stage runs through ``jaxalign.train.train`` (its ``run`` hook), so the usual
launcher works::

    python -m launch.train --config=configs/rejection.py:demo --workdir=runs/rejection-demo

With several processes every process reads every prompt, the sampler draws each chunk's
rows on the devices that hold them, each process scores its own block of the
completions (the scores are gathered) and process 0 writes the files.

:func:`generate_dataset` is the library entry for one dataset without training. Loading
and sampling go through ``jaxalign.policy``; the selection and the written datasets
(pure) are ``jaxalign.jobs.rejection_data``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from ml_collections import config_dict

from jaxalign import multihost, policy, rewards, sampling
from jaxalign import sharding as shd
from jaxalign.config import sampling_keys, section, to_json
from jaxalign.data.encode import Encoder
from jaxalign.data.records import Location, OverlongError, RecordError
from jaxalign.data.sources import open_source
from jaxalign.data.tokenizer import check_vocab, load_tokenizer
from jaxalign.evals.scoring import generation_metrics
from jaxalign.jobs.rejection_data import (
    DATA_FILE,
    STATS_FILE,
    Completion,
    Selection,
    write_atomic,
    write_dataset,
)
from jaxalign.mesh import barrier, make_mesh, maybe_initialize_distributed
from jaxalign.metrics import MetricsWriter, Progress
from jaxalign.models import init_from, lineage
from jaxalign.models.transformer import TransformerConfig
from jaxalign.train import train

DONE_FILE, INITIAL_EVAL_FILE = "done.json", "initial_eval.json"


def default_config() -> dict[str, ml_collections.ConfigDict]:
    """The job's own section (``base_config("rejection")`` adds the stages it trains)."""
    return {"rejection": rejection_config()}


def rejection_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``rejection`` config section with its defaults (``base_config("rejection")``)."""
    out = section(
        "rejection", "Rejection sampling / expert iteration: each round samples, scores and "
        "keeps completions, then trains on them (jaxalign.jobs.rejection).",
        rounds=(2, "sample-select-train rounds"),
        mode=("sft", "sft: the best completions as SFT records | dpo: best vs worst pairs"),
        prompts=("builtin:world", "prompt records ({\"prompt\", ...fields rewards read})"),
        prompts_split=("rl", "split of the prompt source"),
        prompts_per_round=(0, "0 = every prompt; else a fresh random subset each round"),
        num_samples=(8, "n completions sampled per prompt"),
        **sampling_keys(),
        select=("best", "best: the `keep` best per prompt | threshold: all >= threshold"),
        keep=(1, "completions kept per prompt with select=best"),
        threshold=(config_dict.placeholder(float), "score floor for a kept completion; "
                   "None = no floor (select=best, mode=dpo)"),
        min_margin=(0.0, "dpo: a pair needs best - worst > min_margin"),
        batch_size=(64, "prompts per sampler call"),
        epochs=(0.0, "> 0: train.steps = ceil(epochs * records / train.batch_size)"),
        eval_prompts=("builtin:world", "held-out prompts answered greedily before and after "
                      "each round; \"\" = no eval"),
        eval_split=("eval", "split of the eval prompts"),
        eval_limit=(0, "0 = every eval prompt; else this many, evenly spaced"),
    )
    out.update(overrides)
    return out


# -- sampling and scoring -------------------------------------------------------------------

class Generator:
    """Samples and scores completions with one model architecture; compiled once per run.

    Args:
      config: a rejection config (``model``, ``tokenizer``, ``data``, ``sharding``,
        ``rejection``).
      mesh: the device mesh.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        self.rules = shd.rules_from_config(config.sharding.rules)
        resolved = lineage.resolve_tokenizer(init_from.resolve_config(config))
        # A LoRA source comes back merged (the loader), so sampling needs no adapters.
        self.model_cfg = dataclasses.replace(TransformerConfig.from_mapping(resolved.model),
                                             lora=None)
        self.model_def = policy.abstract_model(self.model_cfg)
        self.tokenizer = load_tokenizer(resolved.tokenizer)
        check_vocab(self.tokenizer, self.model_cfg.vocab_size)
        self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id or 0
        rj = config.rejection
        self.options = rj.to_dict()
        self.scorer = rewards.Rewards(rj.rewards, options=self.options, mesh=mesh,
                                      rules=self.rules, eos_id=self.eos_id, pad_id=self.pad_id)
        self.width = config.data.max_prompt_len or config.data.max_len
        self.batch_size = int(rj.batch_size)
        self._cached: tuple[str, Any] | None = None

    def sampling_config(self, *, greedy: bool = False) -> sampling.SamplingConfig:
        """The round's sampling settings, or greedy decoding (one sample) for evaluation."""
        rj = self.config.rejection
        if greedy:
            return sampling.SamplingConfig(max_new_tokens=rj.max_new_tokens, temperature=0.0,
                                           stop_tokens=(self.eos_id,), pad_id=self.pad_id)
        return sampling.SamplingConfig(
            max_new_tokens=rj.max_new_tokens, temperature=float(rj.temperature),
            top_k=rj.top_k, top_p=float(rj.top_p), stop_tokens=(self.eos_id,),
            num_samples=rj.num_samples, pad_id=self.pad_id)

    def load(self, spec: str) -> Any:
        """The params an ``init_from`` string names (``scratch``, ``hf:``, ``workdir:``).

        Any the source lacks keep a fresh initialisation (the trainer's, same seed). The
        last loaded params are cached, so an evaluation and the next round's sampling
        share one restore.
        """
        if self._cached is not None and self._cached[0] == spec:
            return self._cached[1]
        self._cached = None  # free the previous params before restoring new ones
        params = policy.load_model(spec, self.model_cfg, mesh=self.mesh, rules=self.rules,
                                   init_seed=self.config.seed).params
        self._cached = (spec, params)
        return params

    def forget(self) -> None:
        """Drops the cached params (before a round's training needs the memory)."""
        self._cached = None

    def prompts(self, source: str, split: str, *, fields: Mapping[str, str] | None = None
                ) -> tuple[list[dict[str, Any]], list[list[int]], collections.Counter]:
        """Every usable prompt record of a source, its prompt ids and dropped-record counts.

        Records are validated and encoded as the RL stages' prompt batches are
        (``data.chat_template``, ``data.overlong``, ``data.on_bad_record``), with
        ``data.max_prompt_len`` (or ``data.max_len``) ids at most.
        """
        d = self.config.data
        opened = open_source(source, split, data_dir=d.dir, fields=fields)
        encoder = Encoder("prompt", self.tokenizer, template=d.chat_template, max_len=d.max_len,
                          max_prompt_len=self.width, overlong=d.overlong,
                          on_bad_record=d.on_bad_record)
        records, ids, dropped = [], [], collections.Counter()
        for i in range(len(opened)):
            try:
                raw = opened[i]
                example = encoder(raw, Location(opened.name, i))
            except RecordError as e:
                if d.on_bad_record != "skip" or isinstance(e, OverlongError):
                    raise opened.locate(i).error(e.field, e.detail, type(e)) from None
                dropped[e.reason] += 1
                continue
            if "dropped" in example:
                dropped[example["dropped"]] += 1
                continue
            records.append(dict(raw))
            ids.append([int(x) for x in example["prompt"]])
        if dropped:
            Progress(0).line(f"{source} [{split}]: {sum(dropped.values())} prompt records "
                             f"dropped: {dict(dropped)}")
        return records, ids, dropped

    def complete(self, params: Any, records: Sequence[Mapping[str, Any]],
                 prompt_ids: Sequence[Sequence[int]], cfg: sampling.SamplingConfig,
                 rng: jax.Array) -> list[list[Completion]]:
        """``cfg.num_samples`` scored completions of each prompt, in sample order."""
        groups: list[list[Completion]] = []
        for start, chunk in policy.iter_generate(
                self.model_def, params, prompt_ids, rng, cfg, rows=self.batch_size,
                width=self.width, mesh=self.mesh, rules=self.rules):
            # Scored a chunk at a time, as sampled: a reward model sees batches of one size.
            end = start + len(chunk)
            groups += self._score(records[start:end], prompt_ids[start:end], chunk,
                                  cfg.max_new_tokens)
        return groups

    def _score(self, records: Sequence[Mapping[str, Any]], prompt_ids: Sequence[Sequence[int]],
               chunk: Sequence[Sequence[policy.Sample]],
               max_new_tokens: int) -> list[list[Completion]]:
        g = len(chunk[0])
        flat = [s for group in chunk for s in group]
        lengths = np.asarray([len(s.ids) for s in flat], np.int32)
        stopped = np.asarray([s.stopped for s in flat], bool)
        texts = [self.tokenizer.decode([x for x in s.ids if x != self.eos_id]) for s in flat]
        # Each process scores its own block of the rows; every process gets every score.
        own = range(len(flat))[multihost.process_share(len(flat))]
        ctx = rewards.RewardContext(
            lengths=lengths[own.start:own.stop], stopped=stopped[own.start:own.stop],
            max_new_tokens=max_new_tokens,
            prompt_ids=[list(prompt_ids[r // g]) for r in own],
            completion_ids=[flat[r].ids for r in own], options=self.options)
        total, parts = self.scorer([texts[r] for r in own], [records[r // g] for r in own], ctx,
                                   gather=True)
        return [[Completion(texts[r], float(total[r]), {k: float(v[r]) for k, v in parts.items()},
                            int(lengths[r]), bool(stopped[r])) for r in range(p * g, (p + 1) * g)]
                for p in range(len(chunk))]

    def evaluate(self, params: Any, records: Sequence[Mapping[str, Any]],
                 prompt_ids: Sequence[Sequence[int]]) -> dict[str, float]:
        """Greedy answers to held-out prompts: task accuracy, refusal rates and rewards."""
        groups = self.complete(params, records, prompt_ids, self.sampling_config(greedy=True),
                               jax.random.PRNGKey(0))
        answers = [g[0] for g in groups]
        result = generation_metrics([c.text for c in answers], list(records))
        if answers:
            result["reward/mean"] = float(np.mean([c.score for c in answers]))
            for k in answers[0].components:
                result[f"reward/{k}"] = float(np.mean([c.components[k] for c in answers]))
        return result


def _subset(n: int, per_round: int, seed: int, round_index: int) -> np.ndarray:
    """The prompt indices a round samples: all, or a fresh seeded subset each round."""
    if not per_round or per_round >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(n, per_round, replace=False))


def generate_dataset(config: ml_collections.ConfigDict, policy: str, out_dir: str, *,
                     round_index: int = 0, mesh: Mesh | None = None,
                     generator: Generator | None = None) -> dict[str, Any]:
    """Samples, scores and selects one dataset from ``policy``; writes it to ``out_dir``.

    Args:
      config: a rejection config (see ``configs/rejection.py``).
      policy: where the sampling params come from, as ``model.init_from``
        (``workdir:<DIR>``, ``hf:<dir>`` or ``scratch``).
      out_dir: receives ``data.jsonl``, ``completions.jsonl`` and ``stats.json`` (see
        :func:`write_dataset`).
      round_index: picks the round's prompt subset and sampling key.
      mesh: the device mesh (default: from ``config.mesh``).
      generator: a :class:`Generator` to reuse (its compiled sampler, cached params).

    Returns:
      The statistics written to ``stats.json``.
    """
    t0 = time.perf_counter()
    check_config(config)
    gen = generator or Generator(config, mesh if mesh is not None else make_mesh(config.mesh))
    rj = config.rejection
    sel = Selection.from_config(rj)
    fields = {k: v for k, v in dict(config.data.fields).items() if v}
    records, ids, dropped = gen.prompts(rj.prompts, rj.prompts_split, fields=fields)
    if not records:
        raise ValueError(f"{rj.prompts} [{rj.prompts_split}]: no usable prompt records")
    pick = _subset(len(records), rj.prompts_per_round, config.seed, round_index)
    records = [records[i] for i in pick]
    ids = [ids[i] for i in pick]
    params = gen.load(policy)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), round_index)
    t1 = time.perf_counter()
    groups = gen.complete(params, records, ids, gen.sampling_config(), key)
    t2 = time.perf_counter()
    # Every process holds every completion; process 0 writes them.
    extra = {"policy": policy, "round": round_index, "prompts_dropped": dict(dropped),
             "time": {"sample_and_score_s": t2 - t1, "total_s": time.perf_counter() - t0}}
    stats = write_dataset(records, groups, sel, out_dir, extra_stats=extra,
                          write=jax.process_index() == 0)
    barrier("rejection_dataset")  # the others read the files next
    return stats


# -- rounds -----------------------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
    """Stops before any compute on impossible rejection-sampling settings."""
    rj = config.rejection
    Selection.from_config(rj)
    for name in ("rounds", "num_samples", "max_new_tokens", "batch_size"):
        if rj[name] < 1:
            raise ValueError(f"rejection.{name}={rj[name]} must be at least 1")
    if rj.prompts_per_round < 0 or rj.eval_limit < 0 or rj.epochs < 0:
        raise ValueError("rejection.prompts_per_round, eval_limit and epochs must be >= 0")
    if rj.mode == "dpo" and rj.num_samples < 2:
        raise ValueError("rejection.mode=dpo needs rejection.num_samples >= 2 (a pair)")
    if rj.mode == "dpo" and "dpo" not in config:
        raise ValueError("rejection.mode=dpo needs a config.dpo section (configs/rejection.py "
                         "has one)")
    try:
        rewards.check_spec(rj.rewards)
    except ValueError as e:
        raise ValueError(str(e).replace("rl.rewards", "rejection.rewards")) from None


def round_dir(workdir: str, round_index: int) -> str:
    """Where round ``round_index`` keeps its data, stats and training run."""
    return os.path.join(workdir, f"round_{round_index}")


def round_config(config: ml_collections.ConfigDict, data_path: str, init: str,
                 records: int) -> ml_collections.ConfigDict:
    """The SFT (or DPO) config that trains one round on its generated records.

    Every section but ``rejection`` carries over; ``data.train`` becomes the round's
    ``jsonl:`` file (in the stage's own field names) and ``model.init_from`` the
    policy that sampled it. ``rejection.epochs`` > 0 sets ``train.steps``.
    """
    d = config.to_dict()
    mode = d.pop("rejection")["mode"]
    if mode != "dpo":
        d.pop("dpo", None)
    inner = ml_collections.ConfigDict(d)
    inner.stage = mode
    inner.model.init_from = init
    inner.data.train = f"jsonl:{os.path.abspath(data_path)}"
    for k in inner.data.fields:
        inner.data.fields[k] = ""
    if config.rejection.epochs > 0:
        inner.train.steps = max(1, math.ceil(config.rejection.epochs * records
                                             / inner.train.batch_size))
    inner.lock()
    return inner


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _flat_stats(stats: Mapping[str, Any]) -> dict[str, float]:
    """A round's generation statistics as metrics-row numbers."""
    out = {k: float(stats[k]) for k in ("prompts", "samples", "records", "prompts_kept",
                                        "distinct_fraction", "stopped_fraction", "length_mean")}
    out["prompts_kept_fraction"] = out["prompts_kept"] / max(out["prompts"], 1.0)
    out.update({f"score/{k}": float(v) for k, v in stats["score"].items()})
    out.update({f"reward/{k}": float(v) for k, v in stats["components"].items()})
    out.update({f"skipped/{k.replace(' ', '_')}": float(v)
                for k, v in stats["skipped"].items()})
    return out


def _fmt(metrics: Mapping[str, float], keys: Sequence[str]) -> str:
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


_EVAL_KEYS = ("task_accuracy", "refusal_rate", "over_refusal_rate", "reward/mean")


def _log(workdir: str, config: ml_collections.ConfigDict,
         rows: Sequence[tuple[int, str, Mapping[str, float]]],
         resume_step: int | None = None) -> None:
    """Writes metric rows to the run's sinks (``metrics.jsonl``, TensorBoard, W&B).

    The writer is open only while writing, so it never overlaps a round's own run
    (W&B holds one run per process at a time).
    """
    writer = MetricsWriter(workdir, config.metrics, resume_step=resume_step,
                           run_config=config.to_dict())
    try:
        for step, split, metrics in rows:
            writer.write(step, split, metrics)
    finally:
        writer.close()


def _eval_set(gen: Generator, rj: ml_collections.ConfigDict) -> tuple[list, list]:
    records, ids, _ = gen.prompts(rj.eval_prompts, rj.eval_split)
    # Evenly spaced, so that a limit still covers a source ordered by task.
    pick = np.unique(np.linspace(0, len(records) - 1, rj.eval_limit or len(records))
                     .round().astype(int))
    return [records[i] for i in pick], [ids[i] for i in pick]


def _write_main(path: str, text: str) -> None:
    """Process 0 writes ``path`` (atomically); every process waits until it is there."""
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_atomic(path, text)
    barrier("rejection_write")


def _policy_of(config: ml_collections.ConfigDict, workdir: str, r: int) -> str:
    """What round ``r`` samples from: the newest earlier round that trained, else init_from."""
    for q in range(r - 1, -1, -1):
        if _read_json(os.path.join(round_dir(workdir, q), DONE_FILE))["trained"]:
            return f"workdir:{os.path.abspath(round_dir(workdir, q))}"
    return config.model.init_from


def _run_round(config: ml_collections.ConfigDict, workdir: str, r: int, gen: Generator,
               mesh: Mesh, eval_set: tuple[list, list] | None) -> dict[str, Any]:
    """Generates (or reuses) round ``r``'s data, trains on it and evaluates the result.

    Returns what ``done.json`` records, or ``{"preempted": summary}`` when the round's
    training stopped on SIGTERM.
    """
    rj, progress, rdir = config.rejection, Progress(0), round_dir(workdir, r)
    policy = _policy_of(config, workdir, r)
    stats_path = os.path.join(rdir, STATS_FILE)
    t0 = time.perf_counter()
    if os.path.exists(stats_path):
        stats = _read_json(stats_path)
        progress.line(f"round {r}: reusing the {stats['records']} records in {rdir}")
    else:
        progress.line(f"round {r}: sampling {rj.num_samples} completions per prompt from "
                      f"{policy}")
        stats = generate_dataset(config, policy, rdir, round_index=r, generator=gen)
    t1 = time.perf_counter()
    metrics = _flat_stats(stats)
    progress.line(
        f"round {r}: {stats['records']} records from {stats['prompts_kept']}/"
        f"{stats['prompts']} prompts (score mean {stats['score']['mean']:.3f}, best-of-"
        f"{rj.num_samples} {stats['score']['best_of_n_mean']:.3f}; skipped "
        f"{stats['skipped'] or 'none'}) in {t1 - t0:.0f}s -> {os.path.join(rdir, DATA_FILE)}")
    trained, nonfinite = stats["records"] > 0, 0
    if trained:
        gen.forget()  # the trainer needs the memory
        inner = round_config(config, os.path.join(rdir, DATA_FILE), policy, stats["records"])
        if not config.metrics.wandb_name:
            inner.metrics.wandb_name = f"{os.path.basename(os.path.normpath(workdir))}/round_{r}"
        summary = train(inner, rdir, mesh=mesh)
        if summary["preempted"]:
            return {"preempted": summary}
        nonfinite = summary["nonfinite_skipped"]
        metrics.update({k: float(v) for k, v in summary["train"].items()
                        if k in ("loss", "token_accuracy", "accuracy", "margin")})
        metrics["steps"] = float(inner.train.steps)
    else:
        progress.line(f"round {r}: no records kept; the policy stays {policy}")
    t2 = time.perf_counter()
    metrics.update({"time/generate_s": t1 - t0, "time/train_s": t2 - t1})
    evaluation: dict[str, float] = {}
    if eval_set is not None:
        params = gen.load(f"workdir:{os.path.abspath(rdir)}" if trained else policy)
        evaluation = gen.evaluate(params, *eval_set)
        metrics["time/eval_s"] = time.perf_counter() - t2
        progress.line(f"eval after round {r}: " + _fmt(evaluation, _EVAL_KEYS))
    _log(workdir, config, [(r + 1, "train", metrics)]
         + ([(r + 1, "eval", evaluation)] if evaluation else []))
    info = {"round": r, "policy": policy, "trained": trained, "metrics": metrics,
            "eval": evaluation, "nonfinite_skipped": nonfinite}
    _write_main(os.path.join(rdir, DONE_FILE), json.dumps(info, indent=2) + "\n")
    return info


def run(config: ml_collections.ConfigDict, workdir: str,
        mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs ``rejection.rounds`` rounds in ``workdir``; finished rounds are not redone.

    Returns the trainer's summary shape: ``train`` (the last round's generation and
    training numbers), ``eval`` (greedy held-out metrics after it), ``preempted``,
    ``nonfinite_skipped`` and ``wall_s``.
    """
    t_start = time.perf_counter()
    maybe_initialize_distributed()
    check_config(config)
    rj = config.rejection
    mesh = mesh if mesh is not None else make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    # Every process sees which rounds are done before any process writes.
    barrier("rejection_start")
    _write_main(os.path.join(workdir, "config.json"), to_json(config))
    gen = Generator(config, mesh)
    eval_set = _eval_set(gen, rj) if rj.eval_prompts else None

    done = 0
    while done < rj.rounds and os.path.exists(os.path.join(round_dir(workdir, done),
                                                           DONE_FILE)):
        done += 1
    initial_path = os.path.join(workdir, INITIAL_EVAL_FILE)
    have_initial = eval_set is None or os.path.exists(initial_path)
    # Rows past the finished rounds (all rows, before the first evaluation) come from an
    # interrupted run: they are logged again.
    _log(workdir, config, [], resume_step=done if have_initial else -1)
    last_eval: dict[str, float] = {}
    if not have_initial:
        t0 = time.perf_counter()
        last_eval = gen.evaluate(gen.load(config.model.init_from), *eval_set)
        _log(workdir, config, [(0, "eval", last_eval)])
        _write_main(initial_path, json.dumps(last_eval, indent=2) + "\n")
        Progress(0).line(f"eval before round 0 ({time.perf_counter() - t0:.0f}s): "
                         + _fmt(last_eval, _EVAL_KEYS))
    elif eval_set is not None:
        last_eval = _read_json(initial_path)
    last_train: dict[str, float] = {}
    nonfinite = 0
    for r in range(rj.rounds):
        if r < done:
            info = _read_json(os.path.join(round_dir(workdir, r), DONE_FILE))
            Progress(0).line(f"round {r}: finished earlier ({round_dir(workdir, r)})")
        else:
            info = _run_round(config, workdir, r, gen, mesh, eval_set)
            if "preempted" in info:
                return {**info["preempted"], "eval": {},
                        "nonfinite_skipped": nonfinite + info["preempted"]["nonfinite_skipped"],
                        "wall_s": time.perf_counter() - t_start}
        last_train, last_eval = info["metrics"], info["eval"] or last_eval
        nonfinite += info["nonfinite_skipped"]
    return {"train": last_train, "eval": last_eval, "preempted": False,
            "nonfinite_skipped": nonfinite, "wall_s": time.perf_counter() - t_start}
