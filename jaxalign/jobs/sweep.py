"""Hyper-parameter sweeps: a config's ``get_sweep`` → runs, launch commands and a summary.

A config file may define ``get_sweep(arg, preset)`` returning a list of override
dicts (dotted config keys → values), one per run; ``arg`` is the sweep's name and
``preset`` the part of ``--config`` after the colon, so a sweep can be scaled to
its preset. Each run gets a filesystem-safe name built from its overrides and
trains in ``ROOT/<name>/``.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jaxalign import storage
from jaxalign.config import apply_overrides, load_config_module
from jaxalign.jobs import run_stage
from jaxalign.mesh import maybe_initialize_distributed
from jaxalign.metrics import read_jsonl

Overrides = dict[str, Any]

# Train-row metrics that describe the machinery rather than the model; left out of
# the summary (the curves are in metrics.jsonl and the plots).
_BOOKKEEPING = ("learning_rate", "tokens_per_s", "positions_per_s", "mfu", "grad_norm",
                "update_norm")


def split_config_arg(config_arg: str) -> tuple[str, str | None]:
    """``configs/dpo.py:demo`` → ``("configs/dpo.py", "demo")``."""
    path, _, preset = config_arg.partition(":")
    return path, (preset or None)


def load_sweep(config_arg: str, name: str) -> list[Overrides]:
    """Calls the config file's ``get_sweep(name, preset)``.

    Raises:
      ValueError: the file defines no ``get_sweep`` or it returns something other
        than a non-empty list of dicts.
    """
    path, preset = split_config_arg(config_arg)
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg, preset); nothing to sweep")
    runs = module.get_sweep(name) if preset is None else module.get_sweep(name, preset)
    if not runs or not all(isinstance(r, Mapping) for r in runs):
        raise ValueError(f"{path}: get_sweep({name!r}) must return a non-empty list of dicts "
                         f"of dotted config keys -> values, got {runs!r}")
    return [dict(r) for r in runs]


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component of each key, or the whole key where that is ambiguous."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves,
                                                                           strict=True)}


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return "-".join(_name_value(x) for x in v)
    return str(v)


def run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Filesystem-safe, distinct names such as ``learning_rate=0.003,beta=0.1``."""
    all_keys = list(dict.fromkeys(k for r in runs for k in r))
    short = _short_keys(all_keys)
    names: list[str] = []
    for r in runs:
        name = ",".join(f"{short[k]}={_name_value(v)}" for k, v in r.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:200]
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def cli_value(v: Any) -> str:
    """A value as ``--config.key=<value>`` text that ml_collections' flags parse back."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple):
        return repr(tuple(v))
    return str(v)


def launch_command(config_arg: str, workdir: str, overrides: Mapping[str, Any],
                   base_overrides: Mapping[str, Any] | None = None) -> str:
    """The ``python -m launch.train`` command of one run (shell-quoted)."""
    merged = {**(base_overrides or {}), **overrides}
    args = ["python", "-m", "launch.train", f"--config={config_arg}", f"--workdir={workdir}"]
    args += [f"--config.{k}={cli_value(v)}" for k, v in merged.items()]
    return shlex.join(args)


def final_metrics(workdir: str) -> dict[str, float]:
    """Summary numbers of a run: last train loss, last eval row, stage metrics.

    Keys are ``step`` (the last logged step), ``train/<metric>`` from the last
    train row (without learning rate, throughput, norms and data counters) and
    ``eval/<metric>`` from the last eval row.
    """
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return {}
    last: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(path):
        last[row.get("split", "train")] = row
    out: dict[str, float] = {}
    steps = [int(r["step"]) for r in last.values() if "step" in r]
    if steps:
        out["step"] = max(steps)
    for split, row in sorted(last.items()):
        for k, v in row.items():
            if k in ("step", "split") or k in _BOOKKEEPING or k.startswith("data_"):
                continue
            try:
                out[f"{split}/{k}"] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def run_sweep(config: ml_collections.ConfigDict, runs: Sequence[Mapping[str, Any]], root: str,
              train_fn: Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]] | None
              = None) -> list[dict[str, Any]]:
    """Trains every run one after another in ``root/<name>/``; a failure does not stop the rest.

    Every override is checked against the config before the first run starts.
    A run stopped by SIGTERM (after its checkpoint) ends the sweep; rerunning the
    same sweep resumes each run from its workdir. ``root/sweep_summary.json`` and
    ``.md`` are rewritten after every run.

    Args:
      config: the base config (preset and command-line overrides applied).
      runs: the override dicts, one per run.
      root: the sweep directory.
      train_fn: ``(config, workdir) -> summary``; default ``jaxalign.jobs.run_stage``.

    Returns:
      One result per run: ``name``, ``workdir``, ``overrides``, ``status`` (``ok``,
      ``failed``, ``preempted`` or ``pending``), ``error`` and ``metrics``.
    """
    train_fn = train_fn or run_stage
    # On a pod every process runs the same sweep; process 0 alone writes the summary.
    maybe_initialize_distributed()
    main = jax.process_index() == 0
    configs = [apply_overrides(config, r, where="sweep") for r in runs]
    results = [{"name": n, "workdir": storage.join(root, n), "overrides": dict(r),
                "status": "pending", "error": "", "metrics": {}}
               for n, r in zip(run_names(runs), runs, strict=True)]
    if main:
        storage.makedirs(root)
    for i, (result, cfg) in enumerate(zip(results, configs, strict=True)):
        if main:
            print(f"=== sweep run {i + 1}/{len(results)}: {result['name']} -> "
                  f"{result['workdir']}", flush=True)
        try:
            summary = train_fn(cfg, result["workdir"])
            result["status"] = "preempted" if summary.get("preempted") else "ok"
        except Exception as e:  # noqa: BLE001 -- one failed run must not end the sweep
            traceback.print_exc(file=sys.stderr)
            result["status"], result["error"] = "failed", f"{type(e).__name__}: {e}"
        result["metrics"] = final_metrics(result["workdir"])
        if main:
            write_summary(root, results)
        if result["status"] == "preempted":
            break
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _json_safe(x: Any) -> Any:
    """Non-finite floats as strings ("nan", "inf"), as in metrics.jsonl."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def summary_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: one row per run, its status and final metrics."""
    cols = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    first = [c for c in ("step", "train/loss", "eval/loss") if c in cols]
    cols = first + sorted(c for c in cols if c not in first)
    header = ["run", "status", *cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        status = r["status"] + (f" ({r['error'].splitlines()[0][:80]})" if r["error"] else "")
        cells = [r["name"], status, *(_fmt(r["metrics"].get(c)) for c in cols)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def write_summary(root: str, results: Sequence[Mapping[str, Any]]) -> None:
    """Writes ``root/sweep_summary.json`` and ``root/sweep_summary.md``."""
    storage.write_json(storage.join(root, "sweep_summary.json"), _json_safe(list(results)),
                       indent=2, default=str)
    storage.write_text(storage.join(root, "sweep_summary.md"), summary_table(results) + "\n")
