"""Length buckets and length grouping: batches only as wide as their rows need.

Real data is skewed in length, so padding every row to ``data.max_len`` spends most of
a step on padding. A batch is instead cut to the smallest *bucket* that holds its
longest row, from a short fixed list of widths (``data.buckets``): a step then compiles
once per bucket, never once per batch.

* ``parse_buckets`` turns the setting into the widths;
* ``fit`` crops a batch collated at full width to its bucket (only padding is dropped);
  ``packing.repad`` widens a batch again, to the width every process agrees on
  (``agree``: the widest local bucket);
* ``group_rows`` orders a window of rows so that each batch holds rows of similar
  length (``data.group_by_length``), then shuffles the order of the batches.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxalign.data import packing

POW2_FLOOR = 16
# Each width compiles the step once: more than this is a mistake, not a setting.
MAX_BUCKETS = 64
SPEC_HELP = ("data.buckets must be 'pow2', 'pow2:<floor>', 'max_len', '<n>' (multiples of "
             "n) or widths separated by commas, e.g. '64,128,256'")


def _positive(text: str, spec: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{SPEC_HELP}; got {spec!r} ({text!r} is not a whole number >= 1)")
    return value


def parse_buckets(spec: str, limit: int) -> tuple[int, ...]:
    """The row widths ``data.buckets`` allows for rows of at most ``limit`` positions.

    Args:
      spec: ``"pow2"`` (16, 32, 64, ...), ``"pow2:<floor>"`` (floor, 2·floor, 4·floor,
        ...), ``"max_len"`` (``limit`` only: every batch full width), ``"<n>"`` (n, 2n,
        3n, ...) or explicit widths separated by commas (``"64,128,256"``). Widths at or
        above ``limit`` are left out; ``limit`` is always the last width.
      limit: the full row width (``data.max_len``, or the prompt width of prompt rows).

    Returns:
      The increasing widths, ending with ``limit``.

    Raises:
      ValueError: naming ``data.buckets``, for a malformed spec.
    """
    if not isinstance(spec, str):
        raise ValueError(f"{SPEC_HELP}; got {spec!r}")
    text = spec.strip().lower()
    if text == "max_len":
        widths: list[int] = []
    elif text == "pow2" or text.startswith("pow2:"):
        floor = _positive(text[5:], spec) if ":" in text else POW2_FLOOR
        widths = [floor << k for k in range(max(limit, 1).bit_length() + 1)
                  if floor << k < limit]
    elif "," in text:
        widths = [_positive(part.strip(), spec) for part in text.split(",")]
    else:
        step = _positive(text, spec)
        widths = list(range(step, limit, step))
    out = tuple(sorted({w for w in widths if w < limit} | {limit}))
    if len(out) > MAX_BUCKETS:
        raise ValueError(f"data.buckets={spec!r} gives {len(out)} widths (at most {MAX_BUCKETS}"
                         "; each compiles the step once): use wider steps or 'pow2'")
    return out


def loss_index_sizes(limit: int) -> tuple[int, ...]:
    """How many loss positions per row a batch's loss index may hold (``k`` of
    ``packing.with_loss_index``): 16, 24, 32, 48, 64, 96, ... (powers of two and their
    midpoints, two sizes per octave: at most a third of the gathered rows are filler),
    ending with ``limit``."""
    sizes = {size for p in parse_buckets("pow2", limit) for size in (p, p + p // 2)}
    return tuple(sorted({s for s in sizes if s < limit} | {limit}))


def pick_width(length: int, widths: Sequence[int]) -> int:
    """The smallest of ``widths`` (increasing) that holds ``length`` positions.

    Raises:
      ValueError: if ``length`` exceeds the last width.
    """
    k = bisect.bisect_left(widths, length)
    if k == len(widths):
        raise ValueError(f"a row of {length} positions exceeds the widest bucket {widths[-1]}")
    return int(widths[k])


def fit(batch: dict[str, Any], fmt: str, widths: Sequence[int], pad_id: int,
        at_least: int = 0) -> dict[str, Any]:
    """Crops a batch collated at ``widths[-1]`` to the bucket of its longest row.

    Args:
      batch: a batch of format ``fmt`` (see ``packing.collate``).
      fmt: its record format.
      widths: the buckets (``parse_buckets``).
      pad_id: the padding id.
      at_least: a width the bucket must hold anyway (e.g. other processes' rows).

    Returns:
      The batch at its bucket's width; only padding positions are dropped.
    """
    if len(widths) == 1:
        return batch
    used = packing.used_width(batch, fmt, pad_id)
    return packing.crop(batch, pick_width(max(used, at_least), widths), fmt)


def _allgather(values: Sequence[int]) -> np.ndarray:
    # Imported here: grain's worker processes import this module and need no JAX.
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))


def agree(values: Sequence[int], process_count: int) -> tuple[int, ...]:
    """The sizes every process uses for a step: the largest of the processes' ``values``,
    element by element (e.g. the batch width and the loss-position count).

    Every process must call this once per step, in the same order (a collective); with
    one process it returns ``values`` and communicates nothing.
    """
    if process_count <= 1:
        return tuple(int(v) for v in values)
    gathered = _allgather(values).reshape(-1, len(values))
    return tuple(int(v) for v in gathered.max(axis=0))


def example_length(example: Mapping[str, Any]) -> int:
    """Positions one encoded example fills in its row (prompt rows: prompt ids)."""
    if "ids" in example:
        return len(example["ids"]) - 1
    if "chosen" in example:
        return len(example["prompt"]) + max(len(example["chosen"]),
                                             len(example["rejected"])) - 1
    return len(example["prompt"])


def group_rows(rows: Sequence[Sequence[Mapping[str, Any]]], size: int,
               rng: np.random.Generator) -> list[Sequence[Mapping[str, Any]]]:
    """Orders rows so that each run of ``size`` rows holds rows of similar length.

    Rows are sorted by length (ties keep their order) and cut into batches of ``size``
    from the start; the whole batches come back in an order drawn from ``rng``, then the
    rows of a last partial batch.
    """
    lengths = [sum(example_length(e) for e in row) for row in rows]
    order = sorted(range(len(rows)), key=lengths.__getitem__)
    whole = len(rows) // size
    out = []
    for k in rng.permutation(whole):
        out.extend(rows[i] for i in order[k * size:(k + 1) * size])
    out.extend(rows[i] for i in order[whole * size:])
    return out
