"""Examples -> rows -> fixed-shape batch arrays.

A *row* is one line of a batch: for sequence formats (``sft``, ``unpaired``) a list of
examples laid end to end (one when padding, several when packing), for ``preference``
one pair, or several when packing (segment k of a row holds pair k on both the chosen
and the rejected side; see ``jaxalign.pairs``), for ``prompt`` exactly one example.
Packed ``unpaired`` rows carry ``label_bt``, each segment's label at its positions. An
empty row is padding.

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


# --- packed pairs and labelled segments ---------------------------------------------------

# Formats ``data.pack`` applies to; prompt rows are generation inputs, never packed.
PACKABLE = ("sft", "preference", "unpaired")


def best_fit_decreasing_pairs(sizes: Sequence[tuple[int, int]],
                              capacity: int) -> list[list[int]]:
    """Packs two-sided items into rows of ``capacity`` positions on *each* side.

    Best-fit decreasing on two dimensions: items are taken by their larger side, longest
    first (ties: larger total, then index); each goes into the open row where both sides
    fit and the least room is left over (ties: the earliest row), or opens a new row.

    Args:
      sizes: each item's (first side, second side) size, both in ``[1, capacity]``.
      capacity: the row size of each side.

    Returns:
      Rows as lists of item indices, in the order the rows were opened.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-max(sizes[i]), -sum(sizes[i]), i))
    rows: list[list[int]] = []
    free = np.zeros((len(sizes), 2), np.int64)  # room left on each side of each row
    for i in order:
        need = np.asarray(sizes[i], np.int64)
        if not (0 < need.min() and need.max() <= capacity):
            raise ValueError(f"item {i} has sizes {tuple(sizes[i])}, outside [1, {capacity}]")
        room = free[:len(rows)] - need
        fits = (room >= 0).all(axis=1)
        if fits.any():
            r = int(np.argmin(np.where(fits, room.sum(axis=1), 2 * capacity + 1)))
            rows[r].append(i)
        else:
            r = len(rows)
            rows.append([i])
            free[r] = capacity
        free[r] -= need
    return rows


def pair_positions(example: Example) -> tuple[int, int]:
    """Positions a preference example occupies on the (chosen, rejected) sides."""
    n = len(example["prompt"]) - 1
    return max(n + len(example["chosen"]), 1), max(n + len(example["rejected"]), 1)


def pack_rows(fmt: str, examples: Sequence[Example], max_len: int,
              pack: bool) -> list[list[Example]]:
    """Groups examples of format ``fmt`` into rows: one each, or packed when ``pack``
    (sequence formats one-dimensionally, preference pairs on both sides at once)."""
    if not pack or fmt not in PACKABLE:
        return [[e] for e in examples]
    if fmt == "preference":
        sizes = [pair_positions(e) for e in examples]
        return [[examples[i] for i in row]
                for row in best_fit_decreasing_pairs(sizes, max_len)]
    return make_rows(examples, max_len, True)


def packed_preference_batch(rows: Sequence[Sequence[Example]], max_len: int,
                            pad_id: int) -> dict[str, np.ndarray]:
    """``chosen_*_bt`` and ``rejected_*_bt`` of rows holding several pairs: pair ``k`` of
    row ``r`` is segment ``k + 1`` of row ``r`` on both sides (prompt + that side's
    completion, positions from 0, loss mask on the completion ids). One pair per row
    gives exactly ``preference_batch``."""
    b = len(rows)
    out = {}
    for side in ("chosen", "rejected"):
        arr = {k: np.zeros((b, max_len), np.int32) for k in SEQUENCE_FIELDS}
        arr["loss_mask"] = np.zeros((b, max_len), np.float32)
        arr["inputs"][:] = pad_id
        arr["targets"][:] = pad_id
        for r, row in enumerate(rows):
            pos = 0
            for s, e in enumerate(row, start=1):
                ids = np.concatenate([e["prompt"], e[side]])
                n = len(ids) - 1
                if pos + n > max_len:
                    raise ValueError(f"{side} row {r} overflows: {pos} + {n} > {max_len}")
                arr["inputs"][r, pos:pos + n] = ids[:-1]
                arr["targets"][r, pos:pos + n] = ids[1:]
                # Targets from index len(prompt) - 1 on are completion ids: those train.
                arr["loss_mask"][r, pos + max(len(e["prompt"]) - 1, 0):pos + n] = 1.0
                arr["segment_ids"][r, pos:pos + n] = s
                arr["positions"][r, pos:pos + n] = np.arange(n)
                pos += n
        out.update({f"{side}_{k}_bt": v for k, v in arr.items()})
    return out


def packed_unpaired_batch(rows: Sequence[Sequence[Example]], max_len: int,
                          pad_id: int) -> dict[str, np.ndarray]:
    """``sequence_batch`` of labelled examples packed several per row, with ``label_bt``
    (each segment's label at its positions, 0 on padding) instead of ``label_b``."""
    out = sequence_batch(rows, max_len, pad_id)
    out.pop("label_b", None)
    label_bt = np.zeros((len(rows), max_len), np.float32)
    for r, row in enumerate(rows):
        pos = 0
        for e in row:
            n = positions_used(e)
            label_bt[r, pos:pos + n] = e["label"]
            pos += n
    out["label_bt"] = label_bt
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


def batch_spec(fmt: str, rows: int, max_len: int, max_prompt_len: int,
               pack: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the array fields of a batch of ``rows`` rows (``pack``: packed
    unpaired rows carry ``label_bt`` instead of ``label_b``)."""
    def seq(prefix: str = "") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {f"{prefix}{k}_bt": ((rows, max_len),
                                    np.dtype(np.float32 if k == "loss_mask" else np.int32))
                for k in SEQUENCE_FIELDS}

    if fmt == "sft":
        return seq()
    if fmt == "unpaired" and pack:
        return {**seq(), "label_bt": ((rows, max_len), np.dtype(np.float32))}
    if fmt == "unpaired":
        return {**seq(), "label_b": ((rows,), np.dtype(np.float32))}
    if fmt == "preference":
        return {**seq("chosen_"), **seq("rejected_")}
    if fmt == "prompt":
        return {f"prompt_{k}_bt": ((rows, max_prompt_len), np.dtype(np.int32))
                for k in ("tokens", "mask", "positions")}
    raise ValueError(f"unknown record format {fmt!r}")


def collate(fmt: str, rows: Sequence[Sequence[Example]], max_len: int, max_prompt_len: int,
            pad_id: int, pack: bool = False) -> dict[str, Any]:
    """Rows -> the batch dict of format ``fmt`` (``pack``: rows may hold several examples)."""
    if pack and fmt == "unpaired":
        return packed_unpaired_batch(rows, max_len, pad_id)
    if pack and fmt == "preference":
        return packed_preference_batch(rows, max_len, pad_id)
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


def unembedded_tokens(batch: Mapping[str, Any]) -> int | None:
    """Loss-bearing tokens of the sides whose batch gathers its loss positions
    (``<side>loss_index_bk``: the step unembeds only those); None when no side does."""
    sides = [k[: -len("loss_index_bk")] for k in batch if k.endswith("loss_index_bk")]
    if not sides:
        return None
    return sum(int(np.count_nonzero(batch[f"{side}loss_mask_bt"])) for side in sides)


# --- row width: what bucketing (``buckets``) and multi-process agreement change -----------

# Formats whose rows are padded on the left (the real ids end at the last position).
# The row sides whose loss-bearing positions a stage may gather (``loss_index``).
LOSS_SIDES = {"sft": ("",), "preference": ("chosen_", "rejected_")}


def loss_positions(batch: Mapping[str, Any], fmt: str) -> int:
    """The most loss-bearing positions any row of the batch has (either side of a pair)."""
    return max(int(batch[f"{side}loss_mask_bt"].sum(axis=1).max(initial=0))
               for side in LOSS_SIDES[fmt])


def with_loss_index(batch: Mapping[str, Any], fmt: str, k: int) -> dict[str, Any]:
    """The batch plus ``<side>loss_index_bk`` (int32 ``[b, k]``): each row's loss-bearing
    positions in order, then its other positions in order, cut at ``k``.

    With ``k >= loss_positions(batch)`` every loss-bearing position is kept, and the loss
    mask gathered at the index is 1 exactly there (the filler positions bear no loss), so
    a loss computed on the gathered positions equals the loss on the whole row.
    """
    out = dict(batch)
    for side in LOSS_SIDES[fmt]:
        not_loss_bt = batch[f"{side}loss_mask_bt"] == 0
        out[f"{side}loss_index_bk"] = np.argsort(not_loss_bt, axis=1,
                                                 kind="stable")[:, :k].astype(np.int32)
    return out


LEFT_PADDED = ("prompt",)
_PAD_ID_FIELDS = ("inputs_bt", "targets_bt", "tokens_bt")


def pad_value(key: str, pad_id: int) -> int:
    """What a padding position of batch field ``key`` holds: ``pad_id`` for ids, else 0."""
    return pad_id if key.endswith(_PAD_ID_FIELDS) else 0


def _row_fields(batch: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    """The ``*_bt`` arrays of a batch: those with a position axis (axis 1)."""
    return [(k, v) for k, v in batch.items()
            if k.endswith("_bt") and isinstance(v, np.ndarray) and v.ndim >= 2]


def batch_width(batch: Mapping[str, Any]) -> int:
    """Positions per row of ``batch``.

    Raises:
      ValueError: if its ``*_bt`` fields disagree (or there are none).
    """
    widths = {v.shape[1] for _, v in _row_fields(batch)}
    if len(widths) != 1:
        raise ValueError(f"batch fields have no single row width: {sorted(widths)}")
    return widths.pop()


def used_width(batch: Mapping[str, Any], fmt: str, pad_id: int) -> int:
    """The fewest positions per row that keep every non-padding value of ``batch``."""
    used = 0
    for key, value in _row_fields(batch):
        real_t = (value != pad_value(key, pad_id)).reshape(
            value.shape[0], value.shape[1], -1).any(axis=(0, 2))
        cols = np.flatnonzero(real_t)
        if cols.size:
            t = value.shape[1]
            used = max(used, t - int(cols[0]) if fmt in LEFT_PADDED else int(cols[-1]) + 1)
    return used


def crop(batch: Mapping[str, Any], width: int, fmt: str) -> dict[str, Any]:
    """``batch`` with ``width`` positions per row: drops trailing (prompt rows: leading)
    positions, which the caller knows to be padding (``used_width``)."""
    out = dict(batch)
    for key, value in _row_fields(batch):
        t = value.shape[1]
        if width != t:
            part = value[:, t - width:] if fmt in LEFT_PADDED else value[:, :width]
            out[key] = np.ascontiguousarray(part)
    return out


def repad(batch: Mapping[str, Any], width: int, fmt: str, pad_id: int) -> dict[str, Any]:
    """``batch`` widened to ``width`` positions per row, as if collated at that width.

    Sequence fields gain padding on the right (prompt rows on the left) holding what a
    padding position holds: ``pad_id`` in ids, 0 in masks, segments and positions. Every
    ``*_bt`` field is widened, so any row layout of ``collate`` is covered.

    Raises:
      ValueError: if ``width`` is narrower than the batch.
    """
    out = dict(batch)
    for key, value in _row_fields(batch):
        t = value.shape[1]
        if width < t:
            raise ValueError(f"cannot repad {key} of width {t} to the narrower {width}")
        if width > t:
            pad = [(0, 0)] * value.ndim
            pad[1] = (width - t, 0) if fmt in LEFT_PADDED else (0, width - t)
            out[key] = np.pad(value, pad, constant_values=pad_value(key, pad_id))
    return out
