"""Multi-stage pipelines: SFT -> RM -> DPO -> GRPO as one resumable job, with eval gates.

A pipeline config (``configs/pipeline.py``) lists stages in order. Each names a
stage config (``configs/<stage>.py:<preset>``), overrides (``"key=value"``
strings, as on the command line) and, optionally, the earlier stage whose workdir
it starts from (``init_from``: its ``model.init_from`` is set to that workdir). In
override values ``@<stage>`` stands for an earlier stage's workdir, e.g.
``rl.rewards=exact_answer,rm:@rm:0.2``. Stage ``i`` runs in ``ROOT/<i>-<name>/``.

After a policy stage finishes, the pipeline's evals (an evals config, see
``configs/evals.py``) run on it once and are cached in ``ROOT/<i>-<name>/evals.json``;
its gates compare it with the stage it started from, and a failed gate stops the
pipeline. After an RL stage (GRPO, PPO) its training log is also checked for the
health signals of :mod:`jaxalign.evals.rl_health` (log-prob mismatch, entropy
collapse, reward up while the held-out task falls). Re-running the same command
skips finished stages (``DONE.json``) and resumes an interrupted one from its latest
checkpoint. The final report —
``ROOT/report.md`` / ``report.json`` — is a table with one column per policy stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from jaxalign import storage
from jaxalign.config import apply_overrides, load_config_file
from jaxalign.evals import report as eval_report
from jaxalign.evals import rl_health
from jaxalign.evals import suite as eval_suite
from jaxalign.jobs import run_stage
from jaxalign.metrics import read_jsonl
from jaxalign.policy import load_policy

DONE = "DONE.json"
EVALS = "evals.json"


class GateFailed(RuntimeError):
    """A stage regressed past a gate: the pipeline stops after that stage."""


class Pipeline:
    """The stages of a pipeline config rooted at ``root``; :meth:`run` runs what is left."""

    def __init__(self, config: Mapping[str, Any], root: str, *, repo_dir: str = ""):
        self.config = config
        self.root = root
        self.repo_dir = repo_dir
        self.stages = [dict(s) for s in config["stages"]]
        names = [s["name"] for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline stage names must be unique: {names}")
        for i, s in enumerate(self.stages):
            ref = s.get("init_from", "")
            if ref and ref not in names[:i]:
                raise ValueError(f"stage {s['name']!r}: init_from={ref!r} is not an earlier "
                                 f"stage ({names[:i]})")
        self.dirs = {s["name"]: storage.join(root, f"{i}-{s['name']}")
                     for i, s in enumerate(self.stages)}

    def stage_config(self, stage: Mapping[str, Any]) -> ml_collections.ConfigDict:
        """The stage's config with the pipeline's wiring and overrides applied."""
        config = load_config_file(stage["config"], root_dir=self.repo_dir)
        overrides = list(stage.get("overrides", ()))
        if stage.get("init_from"):
            overrides.append(f"model.init_from=workdir:{self.dirs[stage['init_from']]}")
        # "@<stage>" in a value is that stage's workdir (e.g. rl.rewards=rm:@rm).
        for name in sorted(self.dirs, key=len, reverse=True):
            overrides = [o.replace(f"@{name}", self.dirs[name]) for o in overrides]
        return apply_overrides(config, overrides, where=f"stage {stage['name']!r}")

    def done(self, name: str) -> dict[str, Any] | None:
        path = storage.join(self.dirs[name], DONE)
        if not storage.isfile(path):
            return None
        return json.loads(storage.read_text(path))

    def run(self, *, stop_after: str = "") -> dict[str, Any]:
        """Runs every unfinished stage in order, evaluating and gating policy stages.

        Args:
          stop_after: stop once this stage is finished (for tests and partial runs).

        Returns:
          The final report (see :meth:`report`).

        Raises:
          GateFailed: a stage regressed past one of its gates.
        """
        storage.makedirs(self.root)
        for stage in self.stages:
            name, workdir = stage["name"], self.dirs[stage["name"]]
            if self.done(name) is None:
                config = self.stage_config(stage)
                logging.info("pipeline: stage %s (%s) in %s", name, stage["config"], workdir)
                t0 = time.perf_counter()
                result = run_stage(config, workdir)
                if result.get("preempted"):
                    raise SystemExit(f"stage {name!r} was preempted; rerun the same command "
                                     "to resume it")
                storage.write_json(
                    storage.join(workdir, DONE),
                    {"stage": config.stage, "seconds": time.perf_counter() - t0,
                     "train": result["train"], "eval": result["eval"]},
                    indent=1, default=float)
            if config_is_policy(self.done(name)):
                self.evaluate(stage)
                self.check_gates(stage)
                self.check_rl_health(stage)
            if name == stop_after:
                break
        return self.report()

    def _suite(self) -> dict[str, Any]:
        evals = dict(self.config["evals"])
        evals.setdefault("seed", 0)
        return evals

    def evaluate(self, stage: Mapping[str, Any]) -> dict[str, Any]:
        """The pipeline's evals on a policy stage, computed once and cached."""

        name = stage["name"]
        path = storage.join(self.dirs[name], EVALS)
        ref_name = self.config.get("reference", "")
        rm_name = self.config.get("reward_model", "")
        have_ref = bool(ref_name) and self.done(ref_name) is not None
        have_rm = bool(rm_name) and self.done(rm_name) is not None
        cached = None
        if storage.isfile(path):
            cached = json.loads(storage.read_text(path))
            # Evals skipped for want of a reference or reward model that exists now (an
            # SFT stage is evaluated before the RM is trained) run now; the rest is kept.
            if not cached["skipped"] or (cached.get("had_reference") == have_ref
                                         and cached.get("had_rewards") == have_rm):
                return cached
        suite = self._suite()
        bs = int(suite.get("batch_size", 32))
        policy = load_policy(self.dirs[name], batch_size=bs)
        # The reference stage is its own reference (KL 0, implicit rewards 0), so every
        # column measures the same quantities.
        reference = load_policy(self.dirs[ref_name], batch_size=bs) \
            if have_ref else None
        scorer = (eval_suite.load_rewards(f"rm:{self.dirs[rm_name]}", policy.tokenizer)
                  if have_rm else None)
        entries = {k: dict(v) for k, v in dict(suite["evals"]).items()}
        if cached is not None:
            entries = {k: v for k, v in entries.items() if k in cached["skipped"]}
        # A stage evaluated before the reference stage exists (the untrained base) waits for
        # it on the evals measured against it, so every column measures the same thing.
        waiting = {k for k, v in entries.items() if ref_name and not have_ref and (
            v["kind"] == "kl" or (v["kind"] == "preference"
                                  and v.get("score", "implicit") == "implicit"))}
        t0 = time.perf_counter()
        run = eval_suite.run_evals(
            eval_suite.EvalContext(policy, reference=reference, rewards=scorer,
                                   seed=int(suite["seed"])),
            {k: v for k, v in entries.items() if k not in waiting},
            out_dir=storage.join(self.dirs[name], "eval"), label=name)
        run["skipped"] = {**run["skipped"], **{
            k: f"waits for the reference stage {ref_name!r}" for k in waiting}}
        run["eval_seconds"] = time.perf_counter() - t0
        if cached is not None:
            merged = dict(cached)
            merged["metrics"] = {**cached["metrics"], **run["metrics"]}
            merged["skipped"] = run["skipped"]
            merged["eval_seconds"] = cached.get("eval_seconds", 0.0) + run["eval_seconds"]
            run = merged
        run["had_reference"], run["had_rewards"] = have_ref, have_rm
        storage.write_json(path, run, indent=1, default=float)
        return run

    def check_gates(self, stage: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Checks a stage's gates against the stage it started from."""

        gates = eval_report.parse_gates(list(stage.get("gates", ())))
        base_name = stage.get("init_from", "")
        if not gates or not base_name or not config_is_policy(self.done(base_name)):
            return []
        cand = self.evaluate(stage)
        base = self.evaluate(next(s for s in self.stages if s["name"] == base_name))
        rows = eval_report.check_gates(gates, cand["metrics"], base["metrics"],
                                       skipped=set(cand["skipped"]) | set(base["skipped"]))
        failed = [g for g in rows if g["status"] == "fail"]
        if failed:
            raise GateFailed(f"stage {stage['name']!r} failed its gates against "
                             f"{base_name!r}: " + "; ".join(
                                 f"{g['metric']}: {g['reason']}" for g in failed))
        return rows

    def check_rl_health(self, stage: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Checks an RL stage's health signals (:mod:`jaxalign.evals.rl_health`); saves
        them in ``rl_health.json`` and raises ``GateFailed`` naming each failed signal."""
        name = stage["name"]
        if (self.done(name) or {}).get("stage") not in RL_STAGES:
            return []
        spec = stage.get("rl_health", {})
        if spec is False or self.config.get("rl_health", {}) is False:
            return []
        limits = rl_health.limits_from({**dict(self.config.get("rl_health", {})),
                                        **dict(spec or {})})
        log = storage.join(self.dirs[name], "metrics.jsonl")
        rows = read_jsonl(log) if storage.isfile(log) else []
        base_name = stage.get("init_from", "")
        base = (self.evaluate(next(s for s in self.stages if s["name"] == base_name))
                if base_name and config_is_policy(self.done(base_name)) else None)
        checked = rl_health.check(rows, self.evaluate(stage)["metrics"],
                                  None if base is None else base["metrics"], limits)
        storage.write_json(storage.join(self.dirs[name], "rl_health.json"), checked,
                           indent=1, default=float)
        failed = rl_health.failures(checked)
        if failed:
            raise GateFailed(f"stage {name!r} failed its RL health check: " + "; ".join(failed))
        return checked

    def report(self) -> dict[str, Any]:
        """One column per finished policy stage; rows are the configured metrics."""
        columns = [s["name"] for s in self.stages
                   if config_is_policy(self.done(s["name"]))
                   and storage.isfile(storage.join(self.dirs[s["name"]], EVALS))]
        results = {n: self.evaluate(next(s for s in self.stages if s["name"] == n))
                   for n in columns}
        rows = list(self.config.get("report_metrics", ()))
        if not rows:
            rows = sorted({m for r in results.values() for m in r["metrics"]})
        table = {m: {n: results[n]["metrics"].get(m) for n in columns} for m in rows}
        seconds = {s["name"]: (self.done(s["name"]) or {}).get("seconds")
                   for s in self.stages}
        report = {"columns": columns, "metrics": table, "train_seconds": seconds,
                  "eval_seconds": {n: results[n].get("eval_seconds") for n in columns},
                  "ceiling": self._ceilings(results)}
        storage.write_json(storage.join(self.root, "report.json"), report, indent=1,
                           default=float)
        storage.write_text(storage.join(self.root, "report.md"), render_table(report))
        return report


    def _ceilings(self, results: Mapping[str, Any]) -> list[dict[str, Any]]:
        """For each RL stage: how much of its start's pass@k − greedy pass@1 gap it closed."""
        out = []
        for stage in self.stages:
            name, start = stage["name"], stage.get("init_from", "")
            if (name in results and start in results
                    and (self.done(name) or {}).get("stage") in RL_STAGES):
                row = ceiling_closed(results[start]["metrics"], results[name]["metrics"])
                if row is not None:
                    out.append({"stage": name, "start": start, **row})
        return out


RL_STAGES = ("grpo", "ppo")


def ceiling_closed(start: Mapping[str, float], after: Mapping[str, float],
                   task: str = "task") -> dict[str, float] | None:
    """The share of ``start``'s gap between pass@k and greedy pass@1 that ``after``'s greedy
    pass@1 closed (the largest k ``start`` measured); None without a pass@k."""
    ks = [int(m.rsplit("@", 1)[1]) for m in start if m.startswith(f"{task}/pass@")
          and "/" not in m[len(task) + 1:] and m.rsplit("@", 1)[1].isdigit()]
    ks = [k for k in ks if k > 1]
    p1, q1 = start.get(f"{task}/pass@1"), after.get(f"{task}/pass@1")
    if not ks or p1 is None or q1 is None:
        return None
    k = max(ks)
    ceiling = start[f"{task}/pass@{k}"]
    gap = ceiling - p1
    return {"k": k, "start_pass@1": p1, "start_pass@k": ceiling, "pass@1": q1, "gap": gap,
            "closed": (q1 - p1) / gap if gap > 0 else float("nan")}


def config_is_policy(done: Mapping[str, Any] | None) -> bool:
    """A finished stage that trains a policy (every stage but the reward model)."""
    return done is not None and done.get("stage") != "rm"


def render_table(report: Mapping[str, Any]) -> str:
    """The before/after table as Markdown (one column per policy stage)."""
    cols = report["columns"]
    lines = ["| metric | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for metric, values in report["metrics"].items():
        cells = ["—" if values.get(c) is None else f"{values[c]:.3f}" for c in cols]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    for c in report.get("ceiling", ()):
        lines.append(f"\n{c['stage']}: greedy pass@1 {c['start_pass@1']:.3f} -> {c['pass@1']:.3f}"
                     f", {c['closed']:.0%} of {c['start']}'s gap to its pass@{c['k']} "
                     f"({c['start_pass@k']:.3f}) closed")
    return "\n".join(lines) + "\n"
