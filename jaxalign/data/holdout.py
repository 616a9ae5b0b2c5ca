"""Evaluation on a held-out slice of the user's own records (``data.eval=auto``).

A run given only ``data.train=<user source>`` evaluates on a seeded, disjoint slice of
those records: ``data.eval_fraction`` of them (at least one, at most
``data.eval_max_records``), chosen by a permutation of the record indices seeded by
``data.seed``. The training side reads every other record. The choice depends only on
the number of records and the seed, so every process, every resume and every later stage
over the same file agree on it. A builtin source keeps its own eval split instead, and
``data.eval_fraction=0`` turns evaluation off (with a one-line notice).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from jaxalign.data.records import Location

AUTO = "auto"
TRAIN, EVAL = "train", "eval"


def _seed(seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"holdout:{seed}".encode()).digest()[:8], "little")


def held_out(n: int, fraction: float, max_records: int, seed: int) -> np.ndarray:
    """Sorted indices (of ``n`` records) held out for evaluation.

    Raises:
      ValueError: a fraction outside [0, 1), or too few records to leave any for training.
    """
    if not 0.0 <= fraction < 1.0 or max_records < 0:
        raise ValueError(f"data.eval_fraction={fraction} must be in [0, 1) and "
                         f"data.eval_max_records={max_records} >= 0")
    if fraction == 0.0 or max_records == 0:
        return np.zeros((0,), np.int64)
    k = min(max(1, round(fraction * n)), max_records)
    if k >= n:
        raise ValueError(f"data.eval=auto holds out {k} of {n} records "
                         f"(data.eval_fraction={fraction}), leaving none to train on; give "
                         "more records, data.eval=<source> or data.eval_fraction=0")
    order = np.random.default_rng(_seed(seed)).permutation(n)
    return np.sort(order[:k])


class SubsetSource:
    """The records of ``source`` at ``indices`` (in that order), located as in the source."""

    def __init__(self, source: Any, indices: np.ndarray, name: str):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]

    def locate(self, index: int) -> Location:
        return self.source.locate(int(self.indices[index]))


def split(source: Any, side: str, fraction: float, max_records: int, seed: int) -> SubsetSource:
    """The ``train`` (every record not held out) or ``eval`` (held-out) side of ``source``."""
    n = len(source)
    held = held_out(n, fraction, max_records, seed)
    if side == EVAL:
        return SubsetSource(source, held, f"{source.name} (held out: {len(held)} of {n})")
    keep = np.setdiff1d(np.arange(n, dtype=np.int64), held, assume_unique=True)
    return SubsetSource(source, keep, f"{source.name} (training: {len(keep)} of {n})")


def uses_holdout(data: Any) -> bool:
    """Whether ``config.data`` evaluates on a held-out slice of its training records."""
    return (data.eval == AUTO and not data.train.startswith("builtin:")
            and data.eval_fraction > 0 and data.eval_max_records > 0)


def has_eval(data: Any) -> bool:
    """Whether ``config.data`` names any evaluation data."""
    if data.eval == AUTO:
        return data.train.startswith("builtin:") or uses_holdout(data)
    return bool(data.eval)


def task_names(spec: str) -> tuple[str, ...]:
    """``data.tasks`` (comma-separated names) as a tuple; ``""`` = no filter."""
    return tuple(t.strip() for t in str(spec or "").split(",") if t.strip())


def of_tasks(source: Any, tasks: tuple[str, ...]) -> SubsetSource:
    """The records of ``source`` whose ``task`` field is one of ``tasks`` (``data.tasks``).

    A record that cannot be read or is not an object stays in, so that validation reports
    it where it lives.

    Raises:
      ValueError: naming the source, the names asked for and those it has, if no record
        matches.
    """
    keep, seen, matched = [], set(), 0
    for i in range(len(source)):
        try:
            record = source[i]
        except Exception:  # reported with its location by the loader's validation
            keep.append(i)
            continue
        if not isinstance(record, dict):
            keep.append(i)
            continue
        task = record.get("task")
        seen.add(str(task))
        if task in tasks:
            keep.append(i)
            matched += 1
    if not matched:
        raise ValueError(f"{source.name}: no record has a task in data.tasks={list(tasks)}; "
                         f"its tasks: {sorted(seen)[:20]}")
    return SubsetSource(source, np.asarray(keep, np.int64),
                        f"{source.name} (tasks {','.join(tasks)}: {len(keep)} of {len(source)})")
