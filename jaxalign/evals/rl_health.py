"""RL health: three signals that an RL stage went wrong while its own loss looked fine.

Read from the stage's training log (``metrics.jsonl``, train rows) and from the evals
of the stage and of the stage it started from:

* ``logp_mismatch``: the sampler and the trainer disagree on the sampled tokens. The
  mean of ``consistency/logp_gap`` (per-token |trainer log-prob − sampler log-prob|)
  over the last ``window`` share of the logged steps is above ``max_logp_gap``: the
  samples are off-policy by more than a correction is meant for (a bf16 sampler
  drifting from an f32 trainer, stale weights, a sampler bug).
* ``entropy_collapse``: the policy's mean entropy on its completions over the last
  window is below ``min_entropy_ratio`` × its mean over the first window: the policy
  became (nearly) deterministic and has stopped exploring.
* ``reward_hacking``: the training reward (``reward_metric``, mean over the last window
  minus the first) rose while the held-out task metric (``task_metric`` of the
  stage's evals) fell below the starting stage's by more than ``task_tolerance``.

A signal whose metrics were not logged is ``unchecked`` (e.g. ``grpo.entropy_metric``
off, or no task eval). :func:`check` is pure; :func:`limits_from` reads a config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

SIGNALS = ("logp_mismatch", "entropy_collapse", "reward_hacking")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Thresholds of the three signals (see the module docstring); ``None`` turns one off."""

    max_logp_gap: float | None = 0.05
    min_entropy_ratio: float | None = 0.2
    task_tolerance: float | None = 0.02
    window: float = 0.25
    reward_metric: str = "reward/mean"
    task_metric: str = "task/pass@1"

    def __post_init__(self):
        if not 0.0 < self.window <= 0.5:
            raise ValueError(f"rl_health.window {self.window} must be in (0, 0.5]: the "
                             "share of logged steps at each end of the run")
        for name in ("max_logp_gap", "min_entropy_ratio", "task_tolerance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"rl_health.{name} {value!r} must be a number >= 0 "
                                 "(or None to turn the signal off)")


def limits_from(spec: Any) -> Limits | None:
    """``Limits`` from a config value: a mapping of its fields (unknown keys refused),
    ``True``/``None`` for the defaults, ``False`` for none (the check is off)."""
    if spec is False:
        return None
    if spec is None or spec is True:
        return Limits()
    if not isinstance(spec, Mapping) and not hasattr(spec, "items"):
        raise ValueError(f"rl_health: expected a dict of {_fields()} or False, got {spec!r}")
    fields = dict(spec.items())
    unknown = sorted(set(fields) - set(_fields()))
    if unknown:
        raise ValueError(f"rl_health: unknown key(s) {unknown}; known: {_fields()}")
    return Limits(**fields)


def _fields() -> list[str]:
    return [f.name for f in dataclasses.fields(Limits)]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The finite values of ``key`` over the train rows, in step order."""
    out = []
    for row in sorted((r for r in rows if r.get("split", "train") == "train"),
                      key=lambda r: r.get("step", 0)):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append(float(value))
    return out


def ends(values: Sequence[float], window: float) -> tuple[float, float] | None:
    """Means of the first and of the last ``window`` share of ``values`` (at least one
    value each); ``None`` for fewer than two values."""
    if len(values) < 2:
        return None
    n = max(1, int(round(len(values) * window)))
    return sum(values[:n]) / n, sum(values[-n:]) / n


def check(train_rows: Sequence[Mapping[str, Any]], candidate: Mapping[str, float] | None,
          baseline: Mapping[str, float] | None, limits: Limits) -> list[dict[str, Any]]:
    """One row per signal: ``{signal, status (pass|fail|unchecked), value, limit, reason}``.

    Args:
      train_rows: the RL stage's ``metrics.jsonl`` rows.
      candidate: the RL stage's eval metrics (``None`` if it was not evaluated).
      baseline: the eval metrics of the stage it started from.
      limits: the thresholds.
    """
    return [_logp(train_rows, limits), _entropy(train_rows, limits),
            _hacking(train_rows, candidate, baseline, limits)]


def _row(signal: str, status: str, value: Any, limit: Any, reason: str) -> dict[str, Any]:
    return {"signal": signal, "status": status, "value": value, "limit": limit,
            "reason": reason}


def _logged(rows: Sequence[Mapping[str, Any]], key: str, name: str, limit: float | None,
            window: float) -> tuple[tuple[float, float] | None, dict[str, Any] | None]:
    """``(first/last window means of key, None)``, or ``(None, an unchecked row)`` when the
    signal is off or ``key`` was not logged at two steps or more."""
    span = ends(_series(rows, key), window)
    if limit is None:
        return None, _row(name, "unchecked", None, limit, "off")
    if span is None:
        return None, _row(name, "unchecked", None, limit,
                          f"{key} was not logged at two steps or more")
    return span, None


def _logp(rows: Sequence[Mapping[str, Any]], limits: Limits) -> dict[str, Any]:
    name, limit = "logp_mismatch", limits.max_logp_gap
    span, unchecked = _logged(rows, "consistency/logp_gap", name, limit, limits.window)
    if unchecked is not None:
        return unchecked
    late = span[1]
    if late > limit:
        return _row(name, "fail", late, limit,
                    f"sampler and trainer log-probs differ by {late:.4g} per token over the "
                    f"last {limits.window:.0%} of the run (limit {limit:g})")
    return _row(name, "pass", late, limit, f"log-prob gap {late:.4g} <= {limit:g}")


def _entropy(rows: Sequence[Mapping[str, Any]], limits: Limits) -> dict[str, Any]:
    name, ratio = "entropy_collapse", limits.min_entropy_ratio
    span, unchecked = _logged(rows, "policy/entropy", name, ratio, limits.window)
    if unchecked is not None:
        return unchecked
    first, last = span
    value = last / first if first > 0 else 1.0
    if value < ratio:
        return _row(name, "fail", value, ratio,
                    f"sampling entropy fell from {first:.4g} to {last:.4g} nats per token "
                    f"({value:.2f}x the start; limit {ratio:g}x)")
    return _row(name, "pass", value, ratio, f"entropy {first:.4g} -> {last:.4g}")


def _hacking(rows: Sequence[Mapping[str, Any]], candidate: Mapping[str, float] | None,
             baseline: Mapping[str, float] | None, limits: Limits) -> dict[str, Any]:
    name, tol, task = "reward_hacking", limits.task_tolerance, limits.task_metric
    span, unchecked = _logged(rows, limits.reward_metric, name, tol, limits.window)
    if unchecked is not None:
        return unchecked
    if not candidate or not baseline or task not in candidate or task not in baseline:
        return _row(name, "unchecked", None, tol,
                    f"{task} is not in both the stage's and its start's evals")
    d_reward = span[1] - span[0]
    d_task = candidate[task] - baseline[task]
    value = {"reward_delta": d_reward, "task_delta": d_task}
    if d_reward > 0 and d_task < -tol:
        return _row(name, "fail", value, tol,
                    f"training {limits.reward_metric} rose by {d_reward:.4g} while held-out "
                    f"{task} fell by {-d_task:.4g} (tolerance {tol:g})")
    return _row(name, "pass", value, tol,
                f"{limits.reward_metric} {d_reward:+.4g}, {task} {d_task:+.4g}")


def failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``"<signal>: <reason>"`` for each failed signal."""
    return [f"{r['signal']}: {r['reason']}" for r in rows if r["status"] == "fail"]
