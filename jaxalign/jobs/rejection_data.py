"""Rejection sampling's pure part: select scored completions and write the datasets.

A round's scored samples (:class:`Completion` groups, one per prompt) become SFT
records (the best, or every one over a threshold) or DPO pairs (the best against
the worst) by :func:`build_records`; :func:`write_dataset` writes them with every
sample and a summary. The sampling, scoring and rounds are
``jaxalign.jobs.rejection``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign import storage

MODES = ("sft", "dpo")
SELECTIONS = ("best", "threshold")
DATA_FILE, STATS_FILE = "data.jsonl", "stats.json"
COMPLETIONS_FILE = "completions.jsonl"  # every sample with its score, kept or not
# Fields a generated record sets itself; a prompt record's own fields of these names
# are kept as ``source_<name>`` (e.g. a reference ``response``).
_OWN_FIELDS = ("prompt", "messages", "response", "completion", "chosen", "rejected", "label",
               "score", "scores", "rank", "num_samples", "chosen_score", "rejected_score",
               "completions")


@dataclasses.dataclass(frozen=True)
class Selection:
    """How scored completions become records (the selection keys of ``config.rejection``)."""

    mode: str = "sft"
    select: str = "best"
    keep: int = 1
    threshold: float | None = None
    min_margin: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"rejection.mode={self.mode!r}; expected one of {list(MODES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"rejection.select={self.select!r}; expected one of "
                             f"{list(SELECTIONS)}")
        if self.select == "best" and self.keep < 1:
            raise ValueError(f"rejection.keep={self.keep} must be >= 1 with select=best")
        if self.select == "threshold" and self.threshold is None:
            raise ValueError("rejection.select=threshold needs rejection.threshold")
        if self.min_margin < 0:
            raise ValueError(f"rejection.min_margin={self.min_margin} must be >= 0")

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> Selection:
        threshold = section["threshold"]
        return cls(mode=section["mode"], select=section["select"], keep=int(section["keep"]),
                   threshold=None if threshold is None else float(threshold),
                   min_margin=float(section["min_margin"]))


@dataclasses.dataclass(frozen=True)
class Completion:
    """One scored sample of a prompt: the text, its total score and each reward's part."""

    text: str
    score: float
    components: Mapping[str, float] = dataclasses.field(default_factory=dict)
    length: int = 0
    stopped: bool = True


# -- selection (pure) ---------------------------------------------------------------------

def _ranked(group: Sequence[Completion]) -> list[int]:
    """Non-empty completions, best score first; the earlier sample first among equals."""
    # An empty completion is not a valid SFT response or DPO side.
    return sorted((i for i, c in enumerate(group) if c.text.strip()),
                  key=lambda i: -group[i].score)


def select_completions(group: Sequence[Completion], sel: Selection
                       ) -> tuple[list[int], str | None]:
    """Indices of the completions an SFT round keeps, best first, or why none is kept.

    ``select="best"`` keeps the ``keep`` best-scored distinct texts (among those
    reaching ``threshold`` when it is set); ``select="threshold"`` keeps every
    distinct text scoring at least ``threshold``. Ties rank in sample order.
    """
    ranked = _ranked(group)
    if not ranked:
        return [], "empty completions"
    if sel.threshold is not None:
        ranked = [i for i in ranked if group[i].score >= sel.threshold]
        if not ranked:
            return [], "below threshold"
    kept: list[int] = []
    seen: set[str] = set()
    for i in ranked:
        if group[i].text in seen:  # a repeated sample adds no new demonstration
            continue
        seen.add(group[i].text)
        kept.append(i)
        if sel.select == "best" and len(kept) == sel.keep:
            break
    return kept, None


def mine_pair(group: Sequence[Completion], sel: Selection
              ) -> tuple[tuple[int, int] | None, str | None]:
    """``(chosen, rejected)`` indices: the best-scored completion against the worst.

    Among equal scores the earlier sample is taken. Returns ``(None, reason)`` when
    the prompt yields no pair: its best and worst tie (or are the same text), the gap
    is not above ``min_margin``, or the best is below ``threshold``.
    """
    ranked = _ranked(group)
    if not ranked:
        return None, "empty completions"
    best = ranked[0]
    low = group[ranked[-1]].score
    worst = next(i for i in ranked if group[i].score == low)
    if sel.threshold is not None and group[best].score < sel.threshold:
        return None, "below threshold"
    margin = group[best].score - group[worst].score
    if margin <= 0 or group[best].text == group[worst].text:
        return None, "best and worst tie"
    if margin <= sel.min_margin:
        return None, "margin not above min_margin"
    return (best, worst), None


def _carried(record: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt record's other fields, renamed where a generated field takes the name."""
    return {(f"source_{k}" if k in _OWN_FIELDS else k): v
            for k, v in record.items() if k != "prompt"}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def build_records(records: Sequence[Mapping[str, Any]],
                  groups: Sequence[Sequence[Completion]], sel: Selection
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training records (SFT or DPO, per ``sel.mode``) and the statistics of one round.

    Args:
      records: the prompt records (``prompt`` plus any fields the rewards read).
      groups: the scored completions of each prompt, in sample order.
      sel: how to select.

    Returns:
      ``(out, stats)``: the records to write and a JSON-able summary (prompts,
      samples, records, prompts kept, skipped prompts by reason, score statistics).
    """
    if len(records) != len(groups):
        raise ValueError(f"{len(records)} prompt records but {len(groups)} completion groups")
    out: list[dict[str, Any]] = []
    skipped: collections.Counter = collections.Counter()
    kept_scores: list[float] = []
    prompts_kept = 0
    for record, group in zip(records, groups, strict=True):
        extra = _carried(record)
        if sel.mode == "sft":
            kept, reason = select_completions(group, sel)
            for rank, i in enumerate(kept):
                c = group[i]
                out.append({"prompt": record["prompt"], "response": c.text,
                            "score": _round(c.score),
                            "scores": {k: _round(v) for k, v in c.components.items()},
                            "rank": rank, "num_samples": len(group), **extra})
                kept_scores.append(c.score)
        else:
            pair, reason = mine_pair(group, sel)
            kept = list(pair or ())
            if pair is not None:
                chosen, rejected = group[pair[0]], group[pair[1]]
                out.append({"prompt": record["prompt"], "chosen": chosen.text,
                            "rejected": rejected.text, "chosen_score": _round(chosen.score),
                            "rejected_score": _round(rejected.score),
                            "num_samples": len(group), **extra})
                kept_scores.append(chosen.score)
        if kept:
            prompts_kept += 1
        else:
            skipped[reason] += 1
    samples = [c for g in groups for c in g]
    scores = np.asarray([c.score for c in samples], np.float64)
    best = [max(c.score for c in g) for g in groups if g]
    parts: dict[str, list[float]] = {}
    for c in samples:
        for k, v in c.components.items():
            parts.setdefault(k, []).append(v)
    stats: dict[str, Any] = {
        "mode": sel.mode, "select": sel.select, "keep": sel.keep, "threshold": sel.threshold,
        "prompts": len(groups), "samples": len(samples), "records": len(out),
        "prompts_kept": prompts_kept, "skipped": dict(sorted(skipped.items())),
        "empty_completions": sum(not c.text.strip() for c in samples),
        "distinct_fraction": float(np.mean([len({c.text for c in g}) / len(g)
                                            for g in groups if g])) if best else 0.0,
        "stopped_fraction": float(np.mean([c.stopped for c in samples])) if samples else 0.0,
        "length_mean": float(np.mean([c.length for c in samples])) if samples else 0.0,
        "score": {
            "mean": float(scores.mean()) if samples else 0.0,
            "min": float(scores.min()) if samples else 0.0,
            "max": float(scores.max()) if samples else 0.0,
            "best_of_n_mean": float(np.mean(best)) if best else 0.0,
            "kept_mean": float(np.mean(kept_scores)) if kept_scores else 0.0,
        },
        "components": {k: float(np.mean(v)) for k, v in sorted(parts.items())},
    }
    return out, stats


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` (local or a URL) so a reader never sees half
    (``jaxalign.storage.write_text``)."""
    storage.write_text(path, text)


def _jsonl(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def write_dataset(records: Sequence[Mapping[str, Any]],
                  groups: Sequence[Sequence[Completion]], sel: Selection, out_dir: str, *,
                  extra_stats: Mapping[str, Any] | None = None,
                  write: bool = True) -> dict[str, Any]:
    """Selects records and writes them, every sample and a summary to ``out_dir``.

    * ``data.jsonl``: the selected records, each with its score; readable as ``jsonl:``
      training data by the SFT (or DPO) stage;
    * ``completions.jsonl``: one line per prompt with all its samples (text, score,
      each reward's part, length, stopped), for inspection;
    * ``stats.json``: the :func:`build_records` summary plus ``extra_stats``, written
      last, so its presence means the dataset is complete.

    With ``write=False`` (the other processes of a multi-process run) nothing is
    written.

    Returns:
      The statistics written to ``stats.json``.
    """
    out, stats = build_records(records, groups, sel)
    stats.update(extra_stats or {})
    if not write:
        return stats
    storage.makedirs(out_dir)
    write_atomic(storage.join(out_dir, DATA_FILE), _jsonl(out))
    write_atomic(storage.join(out_dir, COMPLETIONS_FILE), _jsonl([
        {"prompt": r["prompt"], **_carried(r), "completions": [
            {"text": c.text, "score": _round(c.score),
             "scores": {k: _round(v) for k, v in c.components.items()},
             "length": c.length, "stopped": c.stopped} for c in g]}
        for r, g in zip(records, groups, strict=True)]))
    write_atomic(storage.join(out_dir, STATS_FILE), json.dumps(stats, indent=2) + "\n")
    return stats
