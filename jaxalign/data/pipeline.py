"""Records -> fixed-shape numpy batches for SFT.

The stages are kept apart so that later formats reuse them: ``render_sft`` turns one
record into token ids plus a per-token loss flag (a chat template would be another
renderer), ``shift_and_pad`` turns those into next-token arrays of one static length
(packing would be another packer), and ``SFTBatches`` owns ordering, sharding across
processes and batching.

Example arrays carry the ``_t`` suffix and batch arrays ``_bt`` (see the dimension
legend in the design notes): ``inputs``, ``targets``, ``loss_mask``, ``segment_ids``
and ``positions``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from jaxalign.data.tokenizer import Tokenizer

OVERLONG_POLICIES = ("error", "skip", "truncate")
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
_DTYPES = {name: np.float32 if name == "loss_mask" else np.int32 for name in FIELDS}

# The minimal single-turn template; chat templates arrive with the messages format.
USER_PREFIX = "User: "
ASSISTANT_PREFIX = "\nAssistant: "


class RecordError(ValueError):
    """A record that cannot be used, located by source, index and field."""

    def __init__(self, source: str, index: int, field: str, detail: str):
        self.source = source
        self.index = index
        self.field = field
        self.detail = detail
        super().__init__(f"{source or '<records>'}, record {index}, field {field!r}: {detail}")

    def __reduce__(self):
        # Keeps the error picklable (e.g. across data-loader worker processes) despite
        # the custom constructor.
        return type(self), (self.source, self.index, self.field, self.detail)


def _get_str(
    record: Mapping[str, Any], field: str, *, source: str, index: int, allow_empty: bool
) -> str:
    if field not in record:
        raise RecordError(source, index, field, f"missing (record has {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise RecordError(source, index, field, f"expected str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(source, index, field, "is empty or whitespace only")
    return value


def render_sft(
    record: Mapping[str, Any], tokenizer: Tokenizer, *, source: str = "", index: int = 0
) -> tuple[list[int], list[int]]:
    """Validates a prompt/response record and renders it with the minimal template.

    Args:
      record: ``{"prompt": str, "response": str}``; other keys are ignored.
      tokenizer: the tokenizer.
      source: the record's source, for error messages.
      index: the record's index in its source, for error messages.

    Returns:
      ``(ids, flags)``: ``[bos] + encode("User: " + prompt + "\\nAssistant: ")`` followed
      by ``encode(response) + [eos]``, and 1 for each response id (eos included), 0 else.

    Raises:
      RecordError: if a field is missing, not a string, or the response is empty.
    """
    if not isinstance(record, Mapping):
        raise RecordError(
            source, index, "<record>", f"expected a dict, got {type(record).__name__}"
        )
    prompt = _get_str(record, "prompt", source=source, index=index, allow_empty=True)
    response = _get_str(record, "response", source=source, index=index, allow_empty=False)
    # Prompt and response are encoded separately so the boundary is exact: a piece can
    # never straddle the last prompt character and the first response character.
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(USER_PREFIX + prompt + ASSISTANT_PREFIX)]
    response_ids = [*tokenizer.encode(response), tokenizer.eos_id]
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _fit(
    ids: list[int], flags: list[int], max_len: int, overlong: str, *, source: str, index: int
) -> tuple[list[int], list[int]] | None:
    # Shifting drops one id, so max_len + 1 ids fill max_len positions exactly.
    if len(ids) <= max_len + 1:
        return ids, flags
    if overlong == "error":
        raise RecordError(
            source,
            index,
            "response",
            f"sequence of {len(ids)} ids needs max_len >= {len(ids) - 1}, got max_len={max_len} "
            "(set overlong='skip' or 'truncate' to allow this)",
        )
    if overlong == "truncate" and any(flags[1 : max_len + 1]):
        return ids[: max_len + 1], flags[: max_len + 1]
    # "skip", or a truncation that would leave no response token to learn from.
    return None


def padding_example(max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Returns an example that is padding only: ``pad_id`` ids, zero mask, segment 0."""
    out = {f"{name}_t": np.zeros((max_len,), dtype=_DTYPES[name]) for name in FIELDS}
    out["inputs_t"][:] = pad_id
    out["targets_t"][:] = pad_id
    return out


def shift_and_pad(
    ids: Sequence[int], flags: Sequence[int], max_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Builds next-token arrays of length ``max_len`` from one sequence.

    Args:
      ids: token ids, at most ``max_len + 1`` of them.
      flags: per-id loss flag (1 = the model is trained to predict this id).
      max_len: the output length.
      pad_id: the id written into padding positions of inputs and targets.

    Returns:
      ``inputs_t = ids[:-1]``, ``targets_t = ids[1:]``, ``loss_mask_t = flags[1:]``,
      ``segment_ids_t`` (1 on real positions) and ``positions_t`` (0, 1, ... on real
      positions), all right-padded with zeros (``pad_id`` for inputs and targets).
    """
    n = len(ids) - 1
    if not 0 < n <= max_len:
        raise ValueError(f"need 2 to max_len + 1 = {max_len + 1} ids, got {len(ids)}")
    out = padding_example(max_len, pad_id)
    out["inputs_t"][:n] = ids[:-1]
    out["targets_t"][:n] = ids[1:]
    out["loss_mask_t"][:n] = flags[1:]
    out["segment_ids_t"][:n] = 1
    out["positions_t"][:n] = np.arange(n)
    return out


def _encode(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    source: str,
    index: int,
    overlong: str,
) -> tuple[dict[str, np.ndarray] | None, bool]:
    ids, flags = render_sft(record, tokenizer, source=source, index=index)
    fitted = _fit(ids, flags, max_len, overlong, source=source, index=index)
    if fitted is None:
        return None, False
    return shift_and_pad(*fitted, max_len, tokenizer.pad_id), len(fitted[0]) < len(ids)


def _check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")


def encode_sft(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    source: str,
    index: int,
    overlong: str = "error",
) -> dict[str, np.ndarray] | None:
    """Validates, renders, shifts and pads one SFT record.

    Args:
      record: ``{"prompt": str, "response": str}``.
      tokenizer: the tokenizer.
      max_len: the length of every output array.
      source: the record's source, for error messages.
      index: the record's index in its source, for error messages.
      overlong: what to do with more than ``max_len + 1`` ids: ``"error"`` raises,
        ``"skip"`` returns None, ``"truncate"`` cuts the right end (or returns None if
        no response token would remain).

    Returns:
      ``inputs_t``, ``targets_t``, ``loss_mask_t``, ``segment_ids_t``, ``positions_t``
      (see ``shift_and_pad``), or None if the record is skipped.

    Raises:
      RecordError: for an invalid record, or an overlong one under ``"error"``.
    """
    _check_overlong(overlong)
    example, _ = _encode(record, tokenizer, max_len, source=source, index=index, overlong=overlong)
    return example


class SFTBatches:
    """Deterministic, process-sharded, fixed-shape SFT batches over a list of records.

    All records are encoded once up front. Batch ``i`` is a pure function of
    ``(seed, i)``, so resuming at step ``i`` needs only ``i``: the data-iterator state is
    the step counter. Epochs follow one another without a gap (a global batch may span
    two), each in a different shuffled order.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        max_len: int,
        global_batch_size: int,
        seed: int,
        shuffle: bool = True,
        source: str = "",
        overlong: str = "error",
        process_index: int = 0,
        process_count: int = 1,
    ):
        """Encodes the records.

        Args:
          records: SFT records (``{"prompt": str, "response": str}``).
          tokenizer: the tokenizer.
          max_len: sequence length of every batch.
          global_batch_size: rows per batch summed over all processes.
          seed: shuffling seed (a non-negative int).
          shuffle: False keeps the record order in every epoch.
          source: the records' source string, for messages.
          overlong: ``"error"``, ``"skip"`` or ``"truncate"`` (see ``encode_sft``).
          process_index: this process's index.
          process_count: the number of processes sharing each global batch.

        Raises:
          ValueError: for inconsistent arguments, or if no record is left to batch.
          RecordError: for an invalid record, or an overlong one under ``"error"``.
        """
        _check_overlong(overlong)
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size {global_batch_size} is not divisible by process_count "
                f"{process_count}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.source = source
        self.max_len = max_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.seed = seed
        self.shuffle = shuffle

        examples, kept, truncated = [], [], 0
        for index, record in enumerate(records):
            example, was_truncated = _encode(
                record, tokenizer, max_len, source=source, index=index, overlong=overlong
            )
            if example is not None:
                examples.append(example)
                kept.append(index)
                truncated += was_truncated
        self.num_skipped = len(records) - len(examples)
        self.num_truncated = truncated
        where = source or "<records>"
        if self.num_skipped:
            logging.warning(
                "%s: skipped %d of %d records longer than max_len=%d (overlong=%r)",
                where,
                self.num_skipped,
                len(records),
                max_len,
                overlong,
            )
        if truncated:
            logging.warning(
                "%s: truncated %d of %d records to max_len=%d",
                where,
                truncated,
                len(records),
                max_len,
            )
        if not examples:
            raise ValueError(f"{where}: no records left to batch ({self.num_skipped} skipped)")
        # One trailing all-padding row, gathered for the padding rows of eval batches.
        pad_row = padding_example(max_len, tokenizer.pad_id)
        self._arrays = {
            name: np.stack([e[f"{name}_t"] for e in [*examples, pad_row]]) for name in FIELDS
        }
        # Position of each example in `records`, to map batches back to their records.
        self.record_indices = np.asarray(kept, dtype=np.int64)

        order = grain.MapDataset.range(len(examples))
        if shuffle:
            # grain reseeds epoch e with seed + e, so neighbouring user seeds would share
            # permutations one epoch apart; a hashed seed keeps seeds independent.
            order = order.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
        self._order = order.repeat()

    @property
    def num_examples(self) -> int:
        """The number of encoded (non-skipped) examples in one epoch."""
        return len(self.record_indices)

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches per epoch (the remainder spills into the next epoch)."""
        return self.num_examples // self.global_batch_size

    @property
    def num_eval_batches(self) -> int:
        """The number of batches ``eval_batches`` yields (the last one padded)."""
        return -(-self.num_examples // self.global_batch_size)

    def _local_rows(self, i: int) -> range:
        start = i * self.global_batch_size + self.process_index * self.local_batch_size
        return range(start, start + self.local_batch_size)

    def batch_indices(self, i: int) -> np.ndarray:
        """Returns the example indices of this process's rows of global batch ``i``.

        Indices count encoded examples (``record_indices`` maps them to records).
        """
        if i < 0:
            raise ValueError(f"batch index must be non-negative, got {i}")
        return np.asarray([self._order[k] for k in self._local_rows(i)], dtype=np.int64)

    def _gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {f"{name}_bt": self._arrays[name][idx] for name in FIELDS}

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """Returns this process's rows of global training batch ``i`` (0-based).

        Args:
          i: the global batch number; epochs roll over seamlessly.

        Returns:
          ``inputs_bt``, ``targets_bt``, ``loss_mask_bt``, ``segment_ids_bt`` and
          ``positions_bt``, each ``[global_batch_size // process_count, max_len]``.
        """
        return self._gather(self.batch_indices(i))

    def iterate(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields ``batch(start)``, ``batch(start + 1)``, ... without end."""
        i = start
        while True:
            yield self.batch(i)
            i += 1

    def eval_batch_indices(self, j: int) -> np.ndarray:
        """Returns example indices of this process's rows of eval batch ``j``; -1 = padding."""
        idx = np.asarray(self._local_rows(j), dtype=np.int64)
        return np.where(idx < self.num_examples, idx, -1)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields every example once, in order, in batches of the training shape.

        Rows past the last example are padding (loss mask 0, segment 0), so shapes stay
        static and no example is dropped.
        """
        for j in range(self.num_eval_batches):
            idx = self.eval_batch_indices(j)
            # -1 selects the trailing padding row of the stacked arrays.
            yield self._gather(idx)
