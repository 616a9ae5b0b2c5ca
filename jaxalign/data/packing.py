"""Examples -> rows -> fixed-shape batch arrays.

A *row* is one line of a batch: for sequence formats (``sft``, ``unpaired``) a list of
examples laid end to end (one when padding, several when packing), for ``preference``
and ``prompt`` exactly one example. An empty row is padding.

Sequence rows hold next-token arrays of length ``T = max_len``: an example of n ids
fills n - 1 positions with ``inputs = ids[:-1]``, ``targets = ids[1:]``,
``loss_mask = mask[1:]``, its own ``segment_ids`` value (1, 2, ... within the row) and
``positions`` restarting at 0. Segment 0 is padding. The model's attention mask keeps
every query inside its segment, so a packed row computes exactly what the same examples
compute padded one per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Example = Mapping[str, Any]
SEQUENCE_FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_ARANGE = np.arange(8192, dtype=np.int32)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Packs items into as few rows of ``capacity`` as best-fit decreasing finds.

    Items are taken longest first (ties by index, so the result is deterministic); each
    goes into the open row it fills most tightly, or opens a new row.

    Args:
      lengths: each item's size, all in ``[1, capacity]``.
      capacity: the row size.

    Returns:
      Rows as lists of item indices, in the order the rows were opened.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, row), kept sorted
    for i in order:
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            remaining, r = free.pop(k)
            rows[r].append(i)
            remaining -= n
        else:
            r = len(rows)
            rows.append([i])
            remaining = capacity - n
        if remaining:
            bisect.insort(free, (remaining, r))
    return rows


def positions_used(example: Example) -> int:
    """Positions a sequence example occupies once shifted."""
    return len(example["ids"]) - 1


def make_rows(examples: Sequence[Example], max_len: int, pack: bool) -> list[list[Example]]:
    """Groups sequence examples into rows: one each, or best-fit-decreasing packed."""
    if not pack:
        return [[e] for e in examples]
    lengths = [positions_used(e) for e in examples]
    return [[examples[i] for i in row] for row in best_fit_decreasing(lengths, max_len)]


def sequence_batch(rows: Sequence[Sequence[Example]], max_len: int,
                   pad_id: int) -> dict[str, np.ndarray]:
    """Builds ``inputs_bt``, ``targets_bt``, ``loss_mask_bt``, ``segment_ids_bt``,
    ``positions_bt`` (and ``label_b`` for unpaired examples) from rows of examples."""
    b = len(rows)
    out = {f"{k}_bt": np.zeros((b, max_len), np.int32) for k in SEQUENCE_FIELDS}
    out["loss_mask_bt"] = np.zeros((b, max_len), np.float32)
    out["inputs_bt"][:] = pad_id
    out["targets_bt"][:] = pad_id
    labelled = any("label" in e for row in rows for e in row)
    if labelled:
        out["label_b"] = np.zeros((b,), np.float32)
    for r, row in enumerate(rows):
        pos = 0
        for s, e in enumerate(row, start=1):
            ids, mask = e["ids"], e["mask"]
            n = len(ids) - 1
            if pos + n > max_len:
                raise ValueError(f"row {r} overflows: {pos} + {n} > max_len={max_len}")
            out["inputs_bt"][r, pos:pos + n] = ids[:-1]
            out["targets_bt"][r, pos:pos + n] = ids[1:]
            out["loss_mask_bt"][r, pos:pos + n] = mask[1:]
            out["segment_ids_bt"][r, pos:pos + n] = s
            out["positions_bt"][r, pos:pos + n] = _ARANGE[:n] if n <= len(_ARANGE) else np.arange(n)
            pos += n
            if labelled:
                out["label_b"][r] = e["label"]
    return out


def _completion_rows(prompts: Sequence[np.ndarray | None], completions: Sequence[np.ndarray],
                     max_len: int, pad_id: int, prefix: str) -> dict[str, np.ndarray]:
    b = len(prompts)
    out = {f"{prefix}{k}_bt": np.zeros((b, max_len), np.int32) for k in SEQUENCE_FIELDS}
    out[f"{prefix}loss_mask_bt"] = np.zeros((b, max_len), np.float32)
    out[f"{prefix}inputs_bt"][:] = pad_id
    out[f"{prefix}targets_bt"][:] = pad_id
    for r, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if prompt is None:
            continue
        ids = np.concatenate([prompt, completion])
        n = len(ids) - 1
        out[f"{prefix}inputs_bt"][r, :n] = ids[:-1]
        out[f"{prefix}targets_bt"][r, :n] = ids[1:]
        # Targets at index >= len(prompt) - 1 are completion ids: exactly those train.
        out[f"{prefix}loss_mask_bt"][r, len(prompt) - 1:n] = 1.0
        out[f"{prefix}segment_ids_bt"][r, :n] = 1
        out[f"{prefix}positions_bt"][r, :n] = np.arange(n)
    return out


def preference_batch(rows: Sequence[Sequence[Example]], max_len: int,
                     pad_id: int) -> dict[str, np.ndarray]:
    """Builds ``chosen_*_bt`` and ``rejected_*_bt`` sequence arrays (same fields as
    ``sequence_batch``): row r of both holds pair r's shared prompt followed by its
    completion, with the loss mask on the completion ids only."""
    prompts = [row[0]["prompt"] if row else None for row in rows]
    out = {}
    for side in ("chosen", "rejected"):
        completions = [row[0][side] if row else np.zeros((0,), np.int32) for row in rows]
        out.update(_completion_rows(prompts, completions, max_len, pad_id, f"{side}_"))
    return out


def prompt_batch(rows: Sequence[Sequence[Example]], max_prompt_len: int,
                 pad_id: int) -> dict[str, Any]:
    """Builds left-padded ``prompt_tokens_bt``, ``prompt_mask_bt`` (1 = a real id) and
    ``prompt_positions_bt`` (0, 1, ... over the real ids), plus ``extras``: each row's
    other record fields (a list of dicts; empty for padding rows), kept on the host."""
    b = len(rows)
    tokens = np.full((b, max_prompt_len), pad_id, np.int32)
    mask = np.zeros((b, max_prompt_len), np.int32)
    positions = np.zeros((b, max_prompt_len), np.int32)
    extras: list[dict[str, Any]] = []
    for r, row in enumerate(rows):
        if not row:
            extras.append({})
            continue
        ids = row[0]["prompt"]
        n = len(ids)
        tokens[r, max_prompt_len - n:] = ids
        mask[r, max_prompt_len - n:] = 1
        positions[r, max_prompt_len - n:] = np.arange(n)
        extras.append(dict(row[0]["extras"]))
    return {"prompt_tokens_bt": tokens, "prompt_mask_bt": mask,
            "prompt_positions_bt": positions, "extras": extras}


def batch_spec(fmt: str, rows: int, max_len: int,
               max_prompt_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the array fields of a batch of ``rows`` rows."""
    def seq(prefix: str = "") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {f"{prefix}{k}_bt": ((rows, max_len),
                                    np.dtype(np.float32 if k == "loss_mask" else np.int32))
                for k in SEQUENCE_FIELDS}

    if fmt == "sft":
        return seq()
    if fmt == "unpaired":
        return {**seq(), "label_b": ((rows,), np.dtype(np.float32))}
    if fmt == "preference":
        return {**seq("chosen_"), **seq("rejected_")}
    if fmt == "prompt":
        return {f"prompt_{k}_bt": ((rows, max_prompt_len), np.dtype(np.int32))
                for k in ("tokens", "mask", "positions")}
    raise ValueError(f"unknown record format {fmt!r}")


def collate(fmt: str, rows: Sequence[Sequence[Example]], max_len: int, max_prompt_len: int,
            pad_id: int) -> dict[str, Any]:
    """Rows -> the batch dict of format ``fmt``."""
    if fmt in ("sft", "unpaired"):
        out = sequence_batch(rows, max_len, pad_id)
        if fmt == "unpaired" and "label_b" not in out:
            out["label_b"] = np.zeros((len(rows),), np.float32)
        return out
    if fmt == "preference":
        return preference_batch(rows, max_len, pad_id)
    if fmt == "prompt":
        return prompt_batch(rows, max_prompt_len, pad_id)
    raise ValueError(f"unknown record format {fmt!r}")


def real_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """``(non-padding positions, all positions)`` of a batch's sequence arrays."""
    real = total = 0
    for key, value in batch.items():
        if key.endswith("segment_ids_bt") or key == "prompt_mask_bt":
            real += int(np.count_nonzero(value))
            total += int(value.size)
    return real, total
