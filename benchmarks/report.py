"""One row format for every benchmark, so ``python -m benchmarks.run`` prints one table.

A row is a dict with ``id`` (B1, B2, ... as in BENCHMARKS.md), ``figure`` (the measured
ratio, as text), ``target``, ``config`` (shape, batch, repetitions) and ``device``;
``median``/``min``/``max`` hold the numbers behind ``figure`` where there are some.
Each benchmark prints its rows as a Markdown table and, with ``--json PATH``, writes
them for the runner.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from typing import Any

import jax

COLUMNS = ("id", "figure", "target", "config", "device")


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    """``median (min a, max b)`` of per-repetition ratios."""
    return (f"{statistics.median(xs):.{digits}f} "
            f"(min {min(xs):.{digits}f}, max {max(xs):.{digits}f})")


def row(bench_id: str, what: str, xs: Sequence[float] | None, target: str, config: str,
        *, device: str | None = None, figure: str | None = None, digits: int = 3,
        **extra: Any) -> dict[str, Any]:
    """A table row; ``xs`` are per-repetition ratios (``figure`` overrides their summary)."""
    out: dict[str, Any] = dict(id=bench_id, what=what, target=target, config=config,
                               device=device or device_label())
    if xs:
        out.update(median=statistics.median(xs), min=min(xs), max=max(xs))
    out["figure"] = figure if figure is not None else f"{what}: {fmt(xs, digits)}"
    out.update(extra)
    return out


def device_label(dtype: str | None = None) -> str:
    """The device in words, e.g. ``cpu (cpu, f32)``."""
    d = jax.devices()[0]
    dtype = dtype or ("f32" if d.platform == "cpu" else "bf16")
    return f"{d.device_kind} ({d.platform}, {dtype})"


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--json PATH``: also write the rows there (what ``benchmarks.run`` reads)."""
    parser.add_argument("--json", default="", help="write the result rows to this file")


def parser(doc: str | None, reps: int | None = 7) -> argparse.ArgumentParser:
    """A benchmark's flags: ``--quick``, ``--reps`` (unless ``reps`` is None), ``--json``;
    callers add their own before parsing."""
    out = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    out.add_argument("--quick", action="store_true", help="a small shape, fewer repetitions")
    if reps is not None:
        out.add_argument("--reps", type=int, default=reps,
                         help="repetitions" + (" (0: 7, quick 3)" if reps == 0 else ""))
    add_args(out)
    return out


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "/") for c in COLUMNS)
                     + " |")
    return "\n".join(lines)


def emit(rows: Sequence[dict[str, Any]], json_path: str = "") -> None:
    """Prints the rows as a table and writes them to ``json_path`` if given."""
    print(table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(list(rows), f, indent=1)
