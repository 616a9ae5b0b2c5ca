"""Candidate vs baseline: side-by-side reports, regression gates, reward-hacking flags.

:func:`evaluate` is what ``python -m launch.eval`` runs: it loads the candidate (and
the baseline, reference and reward model it is given), runs the config's evals on
each with :func:`jaxalign.evals.suite.run_evals`, and assembles a report with the
pure functions below — :func:`compare`, :func:`check_gates` and
:func:`reward_hacking` — which :func:`write_report` saves as ``report.json`` and
``report.md``.

A gate is ``{"metric": "task/pass@1", "direction": "higher", "tolerance": 0.02}``
(or the string ``"task/pass@1:higher:0.02"``): ``higher`` means higher is better,
and the gate fails when the candidate is worse than the baseline by more than the
tolerance (an absolute difference; a drop of exactly the tolerance passes). An
optional ``threshold`` adds an absolute bound (``higher``: the candidate must be at
least it; ``lower``: at most it), checked with or without a baseline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jaxalign import policy, storage
from jaxalign.evals import suite as eval_suite
from jaxalign.models import init_from

DIRECTIONS = ("higher", "lower")


@dataclasses.dataclass(frozen=True)
class Gate:
    """A regression gate on one metric (see the module docstring)."""

    metric: str
    direction: str
    tolerance: float = 0.0
    threshold: float | None = None

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"gate on {self.metric!r}: direction {self.direction!r}; expected "
                             "'higher' (higher is better) or 'lower'")
        if not self.tolerance >= 0:
            raise ValueError(f"gate on {self.metric!r}: tolerance {self.tolerance} must be >= 0")


def parse_gates(spec: Any) -> list[Gate]:
    """Gates from a config value: a list of dicts / strings / Gates, or one string.

    A string is ``"metric:direction[:tolerance[:threshold]]"``; several may be joined
    with commas.
    """
    if not spec:
        return []
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s.strip()]
    out = []
    for item in spec:
        if isinstance(item, Gate):
            out.append(item)
        elif isinstance(item, str):
            parts = [p.strip() for p in item.split(":")]
            if not 2 <= len(parts) <= 4:
                raise ValueError(f"gate {item!r}: expected metric:direction[:tolerance"
                                 "[:threshold]]")
            tol = float(parts[2]) if len(parts) > 2 and parts[2] else 0.0
            thr = float(parts[3]) if len(parts) > 3 and parts[3] else None
            out.append(Gate(parts[0], parts[1], tol, thr))
        elif isinstance(item, Mapping):
            unknown = set(item) - {"metric", "direction", "tolerance", "threshold"}
            if unknown or "metric" not in item or "direction" not in item:
                raise ValueError(f"gate {dict(item)}: needs metric and direction, optionally "
                                 f"tolerance and threshold (unknown keys: {sorted(unknown)})")
            thr = item.get("threshold")
            out.append(Gate(item["metric"], item["direction"], float(item.get("tolerance", 0.0)),
                            None if thr is None else float(thr)))
        else:
            raise ValueError(f"gate {item!r}: expected a dict or 'metric:direction:tolerance'")
    return out


def _worse_by(gate: Gate, value: float, reference: float) -> float:
    """How much worse ``value`` is than ``reference`` in the gate's direction (< 0: better)."""
    return reference - value if gate.direction == "higher" else value - reference


def _eps(*values: float) -> float:
    # Float noise (0.5 - 0.1 != 0.4) must not fail a gate sitting exactly on its boundary.
    return 1e-9 * max([1.0] + [abs(v) for v in values])


def check_gates(gates: Iterable[Gate], candidate: Mapping[str, float],
                baseline: Mapping[str, float] | None = None, *,
                skipped: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Checks each gate on a candidate's metrics against the baseline's.

    Args:
      gates: the gates.
      candidate: the candidate's metrics.
      baseline: the baseline's metrics; None = no baseline (only thresholds apply).
      skipped: names of eval entries that did not run; a gate on one of their
        metrics is ``unchecked`` rather than failed.

    Returns:
      One dict per gate: the gate's fields, ``candidate``, ``baseline``, ``delta``
      (candidate − baseline), ``status`` (``pass``, ``fail`` or ``unchecked``) and a
      ``reason`` saying why.
    """
    skipped = set(skipped)
    out = []
    for gate in gates:
        row: dict[str, Any] = {**dataclasses.asdict(gate), "candidate": candidate.get(gate.metric),
                               "baseline": None, "delta": None}
        cand = row["candidate"]
        entry = gate.metric.split("/", 1)[0]
        failures, notes = [], []
        if cand is None:
            if entry in skipped:
                out.append({**row, "status": "unchecked",
                            "reason": f"eval {entry!r} was skipped"})
                continue
            failures.append(f"{gate.metric} is missing from the candidate's metrics")
        elif math.isnan(cand):
            failures.append(f"{gate.metric} is NaN")
        if cand is not None and not failures and baseline is not None:
            base = baseline.get(gate.metric)
            row["baseline"] = base
            if base is None:
                failures.append(f"{gate.metric} is missing from the baseline's metrics")
            else:
                row["delta"] = cand - base
                worse = _worse_by(gate, cand, base)
                if worse > gate.tolerance + _eps(cand, base, gate.tolerance):
                    word = "fell" if gate.direction == "higher" else "rose"
                    failures.append(f"{gate.metric} {word} from {base:.6g} to {cand:.6g} "
                                    f"(by {worse:.6g}; tolerance {gate.tolerance:g})")
                else:
                    notes.append(f"within tolerance {gate.tolerance:g} of the baseline")
        if cand is not None and not failures and gate.threshold is not None:
            if _worse_by(gate, cand, gate.threshold) > _eps(cand, gate.threshold):
                bound = "at least" if gate.direction == "higher" else "at most"
                failures.append(f"{gate.metric} = {cand:.6g}, must be {bound} "
                                f"{gate.threshold:g}")
            else:
                notes.append(f"meets threshold {gate.threshold:g}")
        if failures:
            out.append({**row, "status": "fail", "reason": "; ".join(failures)})
        elif notes:
            out.append({**row, "status": "pass", "reason": "; ".join(notes)})
        else:
            out.append({**row, "status": "unchecked", "reason": "no baseline to compare with"})
    return out


def reward_hacking(candidate: Mapping[str, float], baseline: Mapping[str, float] | None,
                   pairs: Iterable[Sequence[str]]) -> list[dict[str, Any]]:
    """Flags each ``(learned, verifiable)`` pair where the learned reward rose while the
    verifiable score fell, candidate vs baseline (both strictly).

    Pairs missing from the candidate are left out; without a baseline both values
    are reported and nothing is flagged.
    """
    out = []
    seen = set()
    for learned, verifiable in pairs:
        if (learned, verifiable) in seen or learned not in candidate or (
                verifiable not in candidate):
            continue
        seen.add((learned, verifiable))
        row: dict[str, Any] = {"learned": learned, "verifiable": verifiable,
                               "candidate": [candidate[learned], candidate[verifiable]],
                               "baseline": None, "learned_delta": None,
                               "verifiable_delta": None, "flagged": False}
        if baseline is not None and learned in baseline and verifiable in baseline:
            d_learned = candidate[learned] - baseline[learned]
            d_verifiable = candidate[verifiable] - baseline[verifiable]
            row.update(baseline=[baseline[learned], baseline[verifiable]],
                       learned_delta=d_learned, verifiable_delta=d_verifiable,
                       flagged=bool(d_learned > 0 and d_verifiable < 0))
        out.append(row)
    return out


def compare(candidate: Mapping[str, float],
            baseline: Mapping[str, float] | None) -> list[dict[str, Any]]:
    """Rows ``{metric, candidate, baseline, delta}`` over both reports' metrics."""
    names = list(candidate) + [k for k in (baseline or {}) if k not in candidate]
    rows = []
    for name in names:
        c = candidate.get(name)
        b = None if baseline is None else baseline.get(name)
        rows.append({"metric": name, "candidate": c, "baseline": b,
                     "delta": None if c is None or b is None else c - b})
    return rows


def build_report(candidate: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                 gates: Iterable[Gate], *, watch: Iterable[Sequence[str]] = (),
                 fail_on_reward_hacking: bool = False,
                 settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The report of one candidate (and its baseline) from their ``run_evals`` outputs.

    ``passed`` is False when a gate fails, or (with ``fail_on_reward_hacking``) when a
    reward-hacking pair is flagged.
    """
    base_metrics = None if baseline is None else baseline["metrics"]
    skipped = set(candidate["skipped"]) | set((baseline or {}).get("skipped", {}))
    gate_rows = check_gates(gates, candidate["metrics"], base_metrics, skipped=skipped)
    pairs = [tuple(p) for p in candidate.get("watch", [])] + [tuple(p) for p in watch]
    hacking = reward_hacking(candidate["metrics"], base_metrics, pairs)
    passed = all(g["status"] != "fail" for g in gate_rows)
    if fail_on_reward_hacking:
        passed = passed and not any(h["flagged"] for h in hacking)
    return {"candidate": dict(candidate), "baseline": None if baseline is None else dict(baseline),
            "comparison": compare(candidate["metrics"], base_metrics), "gates": gate_rows,
            "reward_hacking": hacking, "passed": passed, "settings": dict(settings or {})}


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and x.is_integer() and abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4g}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: metrics table (side by side with deltas), gates, flags."""
    cand, base = report["candidate"], report["baseline"]
    lines = ["# Evaluation report", "", f"Candidate: `{cand['name']}`"]
    if base is not None:
        lines.append(f"Baseline: `{base['name']}`")
    lines.append("")
    if base is None:
        lines += ["| metric | candidate |", "|---|---:|"]
        lines += [f"| {r['metric']} | {_fmt(r['candidate'])} |" for r in report["comparison"]]
    else:
        lines += ["| metric | baseline | candidate | Δ |", "|---|---:|---:|---:|"]
        lines += [f"| {r['metric']} | {_fmt(r['baseline'])} | {_fmt(r['candidate'])} | "
                  f"{_signed(r['delta'])} |" for r in report["comparison"]]
    skipped = {**(base or {}).get("skipped", {}), **cand["skipped"]}
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in sorted(skipped.items()))]
    notes = {k: v for r in (base, cand) if r for k, v in r.get("notes", {}).items()}
    if notes:
        lines += ["", "Notes: " + "; ".join(f"`{k}`: {', '.join(v)}" for k, v in notes.items())]
    if report["gates"]:
        lines += ["", "## Gates", "", "| gate | status | why |", "|---|---|---|"]
        for g in report["gates"]:
            bound = "" if g["threshold"] is None else f", threshold {g['threshold']:g}"
            name = (f"{g['metric']} ({g['direction']} is better, tolerance "
                    f"{g['tolerance']:g}{bound})")
            lines.append(f"| {name} | **{g['status'].upper()}** | {g['reason']} |")
    if report["reward_hacking"]:
        lines += ["", "## Reward hacking", "",
                  "| learned reward | verifiable score | Δ learned | Δ verifiable | flag |",
                  "|---|---|---:|---:|---|"]
        for h in report["reward_hacking"]:
            flag = "**FLAGGED**: the learned reward rose while the verifiable score fell" \
                if h["flagged"] else "—"
            lines.append(f"| {h['learned']} | {h['verifiable']} | {_signed(h['learned_delta'])} "
                         f"| {_signed(h['verifiable_delta'])} | {flag} |")
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out_dir: str) -> tuple[str, str]:
    """Writes ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    storage.makedirs(out_dir)
    json_path, md_path = storage.join(out_dir, "report.json"), storage.join(out_dir, "report.md")
    storage.write_json(json_path, report, indent=2, default=str)
    storage.write_text(md_path, render_markdown(report))
    return json_path, md_path


def resolve_reference(setting: str, candidate: str) -> str:
    """The reference checkpoint: ``""`` (none), a spec, ``init_from`` (the candidate
    run's own ``model.init_from``, when it names a workdir or an HF directory) or
    ``teacher`` (a distillation run's ``distill.teacher``: the ``kl`` eval is then the
    student's KL to its teacher on held-out prompts)."""
    if setting not in ("init_from", "teacher"):
        return setting
    kind, path = policy.parse_checkpoint(candidate)
    if kind != "workdir":
        return ""
    run = init_from.read_run_config(path)
    if setting == "teacher":
        return run.get("distill", {}).get("teacher", "")
    spec = run.get("model", {}).get("init_from", "scratch")
    return "" if spec == "scratch" else spec


def evaluate(config: Mapping[str, Any], candidate: str, *, baseline: str = "",
             reference: str | None = None, rm: str = "", out_dir: str | None = None,
             extra_gates: Sequence[Any] = ()) -> dict[str, Any]:
    """Evaluates ``candidate`` (and ``baseline``) on the config's evals; writes the report.

    Args:
      config: an evals config (``configs/evals.py``): ``seed``, ``batch_size``,
        ``reference``, ``rewards``, ``evals``, ``gates``, ``watch``,
        ``fail_on_reward_hacking``.
      candidate, baseline: checkpoints (``DIR`` / ``workdir:DIR`` / ``hf:DIR``).
      reference: overrides ``config.reference``.
      rm: an RM workdir; overrides ``config.rewards`` with ``rm:<rm>``.
      out_dir: where ``report.json``, ``report.md`` and ``samples/`` go (None: nowhere).
      extra_gates: gates added to the config's.

    Returns:
      The report (see :func:`build_report`).
    """
    bs, seed = int(config["batch_size"]), int(config["seed"])
    cand = policy.load_policy(candidate, batch_size=bs)
    ref_spec = resolve_reference(config["reference"], candidate) if reference is None \
        else reference
    ref = policy.load_policy(ref_spec, batch_size=bs) if ref_spec else None
    reward_spec = f"rm:{rm}" if rm else config["rewards"]
    scorer = eval_suite.load_rewards(reward_spec, cand.tokenizer) if reward_spec else None
    base = policy.load_policy(baseline, batch_size=bs) if baseline else None
    entries = {k: dict(v) for k, v in dict(config["evals"]).items()}
    gates = parse_gates(list(config["gates"])) + parse_gates(list(extra_gates))
    base_run = None
    if base is not None:
        # The baseline first: its greedy replies are cached for the candidate's win rate.
        base_run = eval_suite.run_evals(
            eval_suite.EvalContext(base, reference=ref, rewards=scorer, seed=seed), entries,
            out_dir=out_dir, label="baseline")
    cand_run = eval_suite.run_evals(
        eval_suite.EvalContext(cand, reference=ref, baseline=base, rewards=scorer, seed=seed),
        entries, out_dir=out_dir, label="candidate")
    settings = {"seed": seed, "reference": ref_spec, "rewards": reward_spec,
                "evals": entries, "gates": [dataclasses.asdict(g) for g in gates]}
    report = build_report(cand_run, base_run, gates, watch=config.get("watch", ()),
                          fail_on_reward_hacking=bool(config.get("fail_on_reward_hacking")),
                          settings=settings)
    if out_dir is not None:
        write_report(report, out_dir)
    return report
