"""The data loader: source -> validate -> shuffle -> encode -> pad or pack -> batch.

``Loader`` opens a source, validates every record once (so a bad record is reported, or
counted and skipped, before training starts) and then serves

* ``iterator()``: an endless, checkpointable ``DataIterator`` of training batches built
  on grain — a seeded shuffle that changes every epoch, epochs back to back, each
  process reading only its share of every global batch, optional worker processes —
  whose ``get_state()`` is small JSON that the trainer stores in every checkpoint, so a
  resumed run sees exactly the batches an uninterrupted run would have seen;
* ``eval_batches()``: every record once, in order, in batches of a fixed row count, with
  the same number of batches (and the same width per batch) on every process.

Packing (SFT and KTO sequences; preference pairs on both sides at once, see
``packing.pack_rows``) is best-fit decreasing over windows of ``pack_window``
consecutive examples, whose rows are then shuffled (seeded). The stream repeats before
it is windowed, so a window runs on into the next epoch instead of ending with the
epoch's leftovers. A batch can span windows; the
iterator state is the grain state at the start of the oldest window not yet fully
emitted plus how many of its rows were emitted, and restoring replays that window
(packing and the row shuffle are pure functions of the window).

Batches are cut to the smallest length bucket that holds their longest row
(``data.buckets``; see ``buckets``; packed rows mostly fill ``max_len`` and keep it),
so a step compiles once per bucket. With several
processes, ``DataIterator`` widens each batch to the widest bucket of any process (one
small collective per step, in the main process); eval batches need none, since every
process measures every process's eval rows. The running data counters (records read,
dropped, real tokens, ...) are summed over the processes at every batch (another small
collective), so each process logs and checkpoints the totals of the whole stream.
``data.group_by_length`` sorts windows of that many batches by length and shuffles the
batch order, seeded by the window's start like the packing shuffle, so a restore
replays it exactly.

Batches are dicts of numpy arrays (see ``packing``); prompt batches also carry
``extras`` (a list of dicts) for reward functions, which stays on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from jaxalign import multihost
from jaxalign.data import buckets, holdout, packing
from jaxalign.data.encode import BAD_RECORD_POLICIES, Encoder, Example
from jaxalign.data.records import FORMATS, Location, RecordError, validate
from jaxalign.data.sources import ListSource, RecordSource, open_source
from jaxalign.data.tokenizer import Tokenizer

STATS_KEY = "_stats"


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """Everything the loader reads from ``config.data`` (plus the batch size).

    Attributes:
      source: the source string (``builtin:``, ``jsonl:``, ``parquet:``, ``arrow:``, ``tfds:``).
      split: the split to read.
      fmt: the record format (``sft``, ``preference``, ``unpaired``, ``prompt``).
      batch_size: rows per global batch (all processes together).
      max_len: positions per sequence row.
      max_prompt_len: ids per prompt row (0 = ``max_len``).
      data_dir: where JSONL conversions and TFDS datasets live.
      fields: stage field -> source column renames.
      chat_template: template name or path (see ``chat.get_template``).
      overlong: ``error``, ``truncate_left``, ``truncate_right`` or ``drop``.
      on_bad_record: ``error`` or ``skip``.
      pack: pack several examples (SFT, unpaired) or pairs (preference) per row.
      pack_window: examples per best-fit-decreasing window.
      seed: shuffling seed.
      shuffle: False keeps the source order (every epoch).
      num_workers: grain worker processes (0 = in the calling process).
      buckets: row widths a batch may be cut to (``buckets.parse_buckets``).
      group_by_length: batches per length-sorted window (0 = no grouping).
      loss_index: training batches carry the loss-bearing positions of each row
        (``packing.with_loss_index``; SFT and preference formats), for stages that take
        log-probs only there.
      holdout: ``train`` or ``eval``: read that side of a held-out split of the source
        (``holdout.split``); ``""`` = every record.
      eval_fraction, eval_max_records: the size of the held-out slice.
    """

    source: str
    split: str
    fmt: str
    batch_size: int
    max_len: int
    max_prompt_len: int = 0
    data_dir: str = ""
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    chat_template: str = "auto"
    overlong: str = "error"
    on_bad_record: str = "error"
    pack: bool = False
    pack_window: int = 512
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    buckets: str = "pow2"
    group_by_length: int = 0
    loss_index: bool = False
    holdout: str = ""
    eval_fraction: float = 0.0
    eval_max_records: int = 0
    tasks: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, data: Any, split: str, fmt: str, batch_size: int) -> DataSettings:
        """Reads ``config.data`` for the ``train`` or ``eval`` side."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        train = split == "train"
        source, src_split, side = data.train, data.train_split, ""
        if holdout.uses_holdout(data):
            side = split
        elif not train:
            auto = data.eval == holdout.AUTO
            source, src_split = (data.train if auto else data.eval), data.eval_split
        return cls(
            source=source, split=src_split, holdout=side,
            eval_fraction=data.eval_fraction, eval_max_records=data.eval_max_records,
            tasks=holdout.task_names(data.tasks) if train else (),
            fmt=fmt, batch_size=batch_size, max_len=data.max_len,
            max_prompt_len=data.max_prompt_len, data_dir=data.dir,
            fields={k: v for k, v in dict(data.fields).items() if v},
            chat_template=data.chat_template, overlong=data.overlong,
            on_bad_record=data.on_bad_record,
            pack=bool(data.pack) and fmt in packing.PACKABLE, pack_window=data.pack_window,
            seed=data.seed, shuffle=train and data.shuffle, num_workers=data.num_workers,
            buckets=data.buckets, group_by_length=data.group_by_length)


def _hashed_seed(seed: int) -> int:
    # grain reseeds epoch e with seed + e, so neighbouring user seeds would share
    # permutations one epoch apart; a hashed seed keeps seeds independent.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


class _EncodeIndex:
    """grain map: a record index -> its example (picklable for worker processes)."""

    def __init__(self, source: RecordSource, encoder: Encoder):
        self.source = source
        self.encoder = encoder

    def __call__(self, index: Any) -> Example:
        index = int(index)
        try:
            return self.encoder(self.source[index], Location(self.source.name, index))
        except RecordError as e:
            # Validators only know the index; the source knows the file and line.
            raise self.source.locate(index).error(e.field, e.detail, type(e)) from None


class _ProcessShard(grain.MapDataset):
    """This process's share of a record stream, in blocks of ``block`` records.

    Process p takes records ``[i*B + p*block, i*B + (p+1)*block)`` of every stretch of
    ``B = block * count`` records: with padding, the global batch is then the same on
    any number of processes (the rows a single process would have put there).
    """

    def __init__(self, parent: grain.MapDataset, index: int, count: int, block: int):
        super().__init__(parent)
        self._index, self._count, self._block = index, count, block

    def __len__(self) -> int:
        return len(self._parent) // self._count

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        block, offset = divmod(j, self._block)
        return self._parent[(block * self._count + self._index) * self._block + offset]

    def __str__(self) -> str:
        return f"_ProcessShard({self._index}/{self._count}, block={self._block})"


class _BatchDataset(grain.IterDataset):
    """Examples -> batches of ``rows`` rows (padded or packed), with per-batch counts."""

    def __init__(self, parent: grain.IterDataset, **kw: Any):
        """``kw``: the keyword arguments of ``_BatchIterator`` (one per iterator made)."""
        super().__init__(parent)
        self.kw = kw

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), **self.kw)

    def __str__(self) -> str:
        return f"_BatchDataset({self.kw})"


@dataclasses.dataclass
class _Window:
    anchor: dict[str, Any]  # parent state before the window's first example
    rows: list[list[Example]]
    counts: collections.Counter  # emptied once reported with a batch


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, *, fmt: str, rows: int, max_len: int,
                 max_prompt_len: int, pad_id: int, pack: bool, window: int, seed: int,
                 name: str = "", barren_limit: int = 0, widths: tuple[int, ...] = (),
                 group: int = 0):
        super().__init__(parent)
        # The stream repeats forever: if every record is dropped (all overlong, say),
        # reading would never end. After this many records without an example, stop.
        self._name, self._barren_limit = name, barren_limit
        self._barren: collections.Counter = collections.Counter()
        self._fmt, self._rows, self._max_len = fmt, rows, max_len
        self._max_prompt_len, self._pad_id, self._pack = max_prompt_len, pad_id, pack
        self._seed = seed
        # The bucket widths (the last one is the full width; empty: no bucketing).
        self._widths = widths or ((max_prompt_len if fmt == "prompt" else max_len),)
        # Grouping sorts windows of ``group`` batches; grouped windows hold whole batches.
        self._group = group
        # Padding keeps the example order, so any window size gives the same batches;
        # one batch's worth keeps the replay after a restore short.
        self._window = window if pack else rows * max(group, 1)
        self._windows: collections.deque[_Window] = collections.deque()
        self._offset = 0
        self._restore_offset = 0
        self._exhausted = False

    def _pending(self) -> int:
        return sum(len(w.rows) for w in self._windows) - self._offset

    def _read_window(self) -> None:
        anchor = self._parent.get_state()
        examples, counts = [], collections.Counter()
        while counts["records"] < self._window or self._short(len(examples), counts):
            try:
                e = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            counts["records"] += 1
            if "dropped" in e:
                counts["invalid" if e["bad"] else "dropped"] += 1
                counts[f"reason:{e['dropped']}"] += 1
                continue
            counts["truncated"] += int(e["truncated"])
            examples.append(e)
        if not counts:
            return
        self._barren = collections.Counter() if examples else self._barren + counts
        if self._barren_limit and self._barren["records"] >= self._barren_limit:
            reasons = "; ".join(f"{n} x {k[len('reason:'):]}" for k, n in
                                self._barren.most_common() if k.startswith("reason:"))
            raise ValueError(
                f"{self._name}: none of the last {self._barren['records']} records read yields "
                f"an example, so no batch can be made ({reasons}). Raise data.max_len / "
                "data.max_prompt_len or change data.overlong.")
        rows = packing.pack_rows(self._fmt, examples, self._max_len, self._pack)
        if self._pack:
            # Best-fit decreasing opens rows longest first; unshuffled, a window's first
            # batches would hold only its longest records. The order is seeded by the
            # window's start, so a replay after a restore shuffles the same way.
            key = zlib.crc32(json.dumps(anchor, sort_keys=True).encode())
            order = np.random.default_rng([self._seed, key]).permutation(len(rows))
            rows = [rows[i] for i in order]
        if self._group:
            # Rows of similar length share a batch; the batch order is shuffled, seeded by
            # the window's start as above, so a replay groups the same way.
            key = zlib.crc32(json.dumps(anchor, sort_keys=True).encode())
            rows = buckets.group_rows(rows, self._rows,
                                      np.random.default_rng([self._seed, key]))
        if self._restore_offset:
            # Replaying after a restore: the first rows (and the counts) were already
            # emitted. The window keeps them, so the offset a later save records counts
            # from the window's start again and a second restore lands in the same place.
            self._offset = self._restore_offset
            counts = collections.Counter()
            self._restore_offset = 0
        self._windows.append(_Window(anchor, rows, counts))

    def __next__(self) -> dict[str, Any]:
        while self._pending() < self._rows and not self._exhausted:
            self._read_window()
        if self._pending() <= 0:
            raise StopIteration
        rows: list[list[Example]] = []
        stats: collections.Counter = collections.Counter()
        while len(rows) < self._rows and self._windows:
            w = self._windows[0]
            stats.update(w.counts)
            w.counts = collections.Counter()
            take = w.rows[self._offset:self._offset + self._rows - len(rows)]
            rows.extend(take)
            self._offset += len(take)
            if self._offset >= len(w.rows):
                self._windows.popleft()
                self._offset = 0
        rows.extend([[]] * (self._rows - len(rows)))  # only at the end of a finite stream
        batch = packing.collate(self._fmt, rows, self._max_len, self._max_prompt_len,
                                self._pad_id, pack=self._pack)
        batch = buckets.fit(batch, self._fmt, self._widths, self._pad_id)
        batch[STATS_KEY] = dict(stats)
        return batch

    def _short(self, n_examples: int, counts: collections.Counter) -> bool:
        # A grouped window reads on past dropped records until it holds whole batches
        # (else every later batch would straddle two length groups); a stream that
        # drops nearly everything stops at the barren limit.
        return (bool(self._group) and n_examples < self._window
                and counts["records"] < self._window + self._barren_limit)

    def get_state(self) -> dict[str, Any]:
        if self._windows:
            return {"parent": self._windows[0].anchor, "offset": self._offset}
        return {"parent": self._parent.get_state(), "offset": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._windows.clear()
        self._offset = 0
        self._restore_offset = int(state["offset"])
        self._exhausted = False


class DataIterator:
    """Training batches without end; ``get_state``/``set_state`` make it resumable.

    It also keeps running totals (records read, dropped, truncated, real vs row
    tokens) that ``metrics()`` reports and the state carries across restarts.

    With several processes and several bucket widths, each batch is widened to the
    widest bucket of any process (``buckets.agree``): every process must then
    draw its batches in step, as the training loop does.

    With ``loss_index`` (a positive ``max_len``) each batch also carries the positions
    where a loss is taken (``packing.with_loss_index``), as many per row as the
    smallest of ``buckets.loss_index_sizes`` that holds the busiest row's (agreed across
    processes like the width): the stage runs its unembedding only there.
    """

    def __init__(self, dataset: grain.IterDataset, name: str, *, fmt: str = "sft",
                 pad_id: int = 0, process_count: int = 1, widths: tuple[int, ...] = (),
                 loss_index: int = 0):
        self.name = name
        self._it = iter(dataset)
        self._counts: collections.Counter = collections.Counter()
        self._fmt, self._pad_id = fmt, pad_id
        self._index_widths = buckets.loss_index_sizes(loss_index) if loss_index else ()
        self._agree = process_count > 1 and (len(widths) > 1 or bool(loss_index))
        self._process_count = process_count

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._it)
        stats = batch.pop(STATS_KEY)
        width = packing.batch_width(batch)
        k = (buckets.pick_width(packing.loss_positions(batch, self._fmt), self._index_widths)
             if self._index_widths else 0)
        if self._agree:
            # The global batch is assembled from every process's piece: one shape for all.
            width, k = buckets.agree((width, k), self._process_count)
            batch = packing.repad(batch, width, self._fmt, self._pad_id)
        if k:
            batch = packing.with_loss_index(batch, self._fmt, min(k, width))
        real, total = packing.real_tokens(batch)
        stats = collections.Counter(stats)
        stats.update(real_tokens=real, row_tokens=total)
        if self._process_count > 1:
            # Totals over every process, the same on each: so they are one process's over
            # the whole stream, and the checkpoint (written by process 0) restores all.
            stats = sum((collections.Counter(d) for d in multihost.gather_objects([dict(stats)])),
                        collections.Counter())
        # Warn once per cause; the running totals go to the metrics log.
        for key in stats:
            if key.startswith("reason:") and key not in self._counts:
                logging.warning("%s: dropping records: %s (counted in data_dropped / "
                                "data_invalid_skipped)", self.name, key[len("reason:"):])
        if stats.get("truncated") and not self._counts["truncated"]:
            logging.warning("%s: truncating records longer than data.max_len (data.overlong); "
                            "counted in data_truncated", self.name)
        self._counts.update(stats)
        return batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position (and running totals) of the iterator."""
        return {"grain": self._it.get_state(), "counts": dict(self._counts)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores a position saved by ``get_state``.

        Raises:
          ValueError: for a state this loader did not write.
        """
        if not isinstance(state, Mapping) or "grain" not in state:
            raise ValueError(
                f"{self.name}: checkpointed data state {sorted(state)!r} was not written by "
                "this data pipeline; resume from a new workdir")
        self._it.set_state(state["grain"])
        self._counts = collections.Counter(state.get("counts", {}))

    def metrics(self) -> dict[str, float]:
        """Running data totals for the metrics log (over every process)."""
        c = self._counts
        return {
            "data_records": float(c["records"]),
            "data_truncated": float(c["truncated"]),
            "data_dropped": float(c["dropped"]),
            "data_invalid_skipped": float(c["invalid"]),
            "data_packing_efficiency": c["real_tokens"] / max(c["row_tokens"], 1),
        }

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def validate_source(source: RecordSource, fmt: str,
                    on_bad_record: str) -> tuple[np.ndarray, collections.Counter]:
    """Validates every record of ``source``; returns the valid indices and skip reasons.

    Raises:
      RecordError: under ``on_bad_record="error"``, for the first invalid record.
    """
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, got "
                         f"{on_bad_record!r}")
    kept, reasons = [], collections.Counter()
    for i in range(len(source)):
        try:
            validate(source[i], fmt, Location(source.name, i))
        except RecordError as e:
            if on_bad_record == "error":
                raise source.locate(i).error(e.field, e.detail) from None
            reasons[e.reason] += 1
            continue
        kept.append(i)
    return np.asarray(kept, dtype=np.int64), reasons


class Loader:
    """Batches of one split of one source for one process (see the module docstring)."""

    def __init__(self, settings: DataSettings, tokenizer: Tokenizer, *, process_index: int = 0,
                 process_count: int = 1, records: Sequence[Any] | None = None):
        """Opens and validates the source.

        Args:
          settings: what to read and how to batch it.
          tokenizer: the tokenizer.
          process_index: this process's index.
          process_count: the number of processes sharing each global batch.
          records: in-memory records to use instead of opening ``settings.source``
            (which then only names them in messages).

        Raises:
          ValueError: for inconsistent settings, or if no valid record is left.
          RecordError: for an invalid record under ``on_bad_record="error"``.
        """
        s = settings
        if s.fmt not in FORMATS:
            raise ValueError(f"unknown record format {s.fmt!r}; known: {FORMATS}")
        if s.pack and s.fmt not in packing.PACKABLE:
            raise ValueError(f"data.pack does not apply to {s.fmt!r} batches: prompt rows are "
                             "generation inputs, one prompt per row; set data.pack=False")
        if s.batch_size < 1 or s.batch_size % process_count:
            raise ValueError(f"batch size {s.batch_size} must be a positive multiple of the "
                             f"process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if s.loss_index and s.fmt not in packing.LOSS_SIDES:
            raise ValueError(f"loss_index applies to {sorted(packing.LOSS_SIDES)} batches, "
                             f"not {s.fmt!r}")
        if s.seed < 0 or s.pack_window < 1 or s.num_workers < 0:
            raise ValueError("data.seed and data.num_workers must be >= 0 and data.pack_window "
                             f">= 1, got {s.seed}, {s.num_workers}, {s.pack_window}")
        if s.group_by_length < 0 or (s.group_by_length and s.pack):
            raise ValueError(f"data.group_by_length={s.group_by_length} must be >= 0, and 0 "
                             "with data.pack (packing already fills rows; set data.pack=False "
                             "to group records by length instead)")
        # Bucket widths: over prompt ids for prompt rows, over positions otherwise.
        self.widths = buckets.parse_buckets(
            s.buckets, (s.max_prompt_len or s.max_len) if s.fmt == "prompt" else s.max_len)
        self.settings = s
        self.tokenizer = tokenizer
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = s.batch_size // process_count
        self.source = (ListSource(records, s.source) if records is not None
                       else open_source(s.source, s.split, data_dir=s.data_dir, fields=s.fields))
        if s.holdout:
            self.source = holdout.split(self.source, s.holdout, s.eval_fraction,
                                        s.eval_max_records, s.seed)
        if s.tasks:
            self.source = holdout.of_tasks(self.source, s.tasks)
        self.encoder = Encoder(s.fmt, tokenizer, template=s.chat_template, max_len=s.max_len,
                               max_prompt_len=s.max_prompt_len, overlong=s.overlong,
                               on_bad_record=s.on_bad_record)
        self.indices, self.invalid = validate_source(self.source, s.fmt, s.on_bad_record)
        where = f"{self.source.name} [{s.split}]"
        if self.invalid:
            logging.warning("%s: skipped %d of %d records (data.on_bad_record='skip'): %s", where,
                            sum(self.invalid.values()), len(self.source),
                            "; ".join(f"{n} x {r}" for r, n in self.invalid.most_common()))
        if not len(self.indices):
            raise ValueError(f"{where}: no valid records ({sum(self.invalid.values())} skipped)")
        self._eval_cache: tuple[list[list[list[Example]]], int] | None = None
        self._eval_widths: list[int] = []

    @property
    def num_records(self) -> int:
        """Valid records in the split (all processes)."""
        return len(self.indices)

    @property
    def num_invalid(self) -> int:
        """Records skipped by validation."""
        return sum(self.invalid.values())

    def batch_spec(self, width: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shapes and dtypes of this process's batch arrays, ``width`` positions per row
        (default: the widest bucket, ``max_len``; prompt rows ``max_prompt_len``).

        Raises:
          ValueError: if ``width`` is not one of ``batch_widths()``.
        """
        s = self.settings
        if width is not None and width not in self.widths:
            raise ValueError(f"width {width} is not a bucket of this loader: {self.widths}")
        return packing.batch_spec(s.fmt, self.local_batch_size, width or s.max_len,
                                  width or s.max_prompt_len or s.max_len, pack=s.pack)

    def batch_widths(self) -> tuple[int, ...]:
        """Every row width a batch may have (``data.buckets``), increasing; the last is
        the full width that ``batch_spec()`` describes."""
        return self.widths

    def dataset(self) -> grain.IterDataset:
        """The grain pipeline of training batches for this process."""
        s = self.settings
        ds = grain.MapDataset.source(self.indices)
        if s.shuffle:
            ds = ds.shuffle(seed=_hashed_seed(s.seed))
        ds = ds.repeat()
        if self.process_count > 1:
            ds = _ProcessShard(ds, self.process_index, self.process_count,
                               self.local_batch_size)
        ds = ds.map(_EncodeIndex(self.source, self.encoder))
        window = max(s.pack_window, self.local_batch_size)
        # In-memory records encode faster than threads hand them over; a file-backed
        # source overlaps reads in a few threads (a deep buffer costs time per element).
        threads = 0 if isinstance(self.source, ListSource) else 2
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                  prefetch_buffer_size=64))
        it = _BatchDataset(it, fmt=s.fmt, rows=self.local_batch_size, max_len=s.max_len,
                           max_prompt_len=s.max_prompt_len or s.max_len,
                           pad_id=self.tokenizer.pad_id, pack=s.pack, window=window,
                           seed=s.seed, name=f"{self.source.name} [{s.split}]",
                           # Two epochs' worth: every process has seen all of its share.
                           barren_limit=2 * len(self.indices) + window,
                           widths=self.widths, group=s.group_by_length)
        if s.num_workers:
            # grain's workers read absl flags; a library caller may never have parsed any.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=s.num_workers, per_worker_buffer_size=2))
        return it

    def iterator(self) -> DataIterator:
        """A fresh training iterator at the start of the stream."""
        s = self.settings
        return DataIterator(self.dataset(), f"{self.source.name} [{s.split}]", fmt=s.fmt,
                            pad_id=self.tokenizer.pad_id, process_count=self.process_count,
                            widths=self.widths,
                            loss_index=s.max_len if s.loss_index else 0)

    def _eval_rows(self) -> tuple[list[list[list[Example]]], int]:
        """Every process's eval rows (process q's at index q) and the batch count."""
        if self._eval_cache is None:
            s = self.settings
            encode = _EncodeIndex(self.source, self.encoder)
            examples, counts = [], collections.Counter()
            for i in self.indices:
                e = encode(i)
                if "dropped" in e:
                    counts[e["dropped"]] += 1
                else:
                    examples.append(e)
            if counts:
                logging.warning("%s [%s]: %d eval records dropped: %s", self.source.name, s.split,
                                sum(counts.values()), dict(counts))
            b, n_proc = self.local_batch_size, self.process_count
            # Shares in blocks of b, as in training: padded eval batches are then the same
            # on any number of processes.
            shares = [[e for k, e in enumerate(examples) if (k // b) % n_proc == q]
                      for q in range(n_proc)]
            if s.pack:
                # Every process packs every share so that all agree on the batch count.
                rows = [packing.pack_rows(s.fmt, share, s.max_len, True) for share in shares]
                n = max(math.ceil(len(r) / b) for r in rows)
            else:
                rows = [[[e] for e in share] for share in shares]
                n = math.ceil(len(examples) / (b * n_proc))
            self._eval_cache = (rows, n)
        return self._eval_cache

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """Yields every valid record once, in order, in batches of the training shape.

        Rows past the last record are padding (no loss, segment 0), so nothing is dropped,
        and every process yields the same number of batches. Batch j is cut to the bucket
        of its longest row on any process: every process measures every process's rows
        (once; no collective), so all agree on each batch's width.
        """
        s = self.settings
        rows, n = self._eval_rows()
        pad_id = self.tokenizer.pad_id
        for j in range(n):
            batch = self._eval_collate(rows[self.process_index], j)
            if j == len(self._eval_widths):  # first pass over batch j
                used = max(packing.used_width(batch if q == self.process_index else
                                              self._eval_collate(r, j), s.fmt, pad_id)
                           for q, r in enumerate(rows)) if len(self.widths) > 1 else 0
                self._eval_widths.append(buckets.pick_width(used, self.widths))
            yield packing.crop(batch, self._eval_widths[j], s.fmt)

    def _eval_collate(self, rows: list[list[Example]], j: int) -> dict[str, Any]:
        """Eval batch ``j`` of one process's ``rows`` at full width."""
        s, b = self.settings, self.local_batch_size
        chunk = rows[j * b:(j + 1) * b]
        chunk = chunk + [[]] * (b - len(chunk))
        return packing.collate(s.fmt, chunk, s.max_len, s.max_prompt_len or s.max_len,
                               self.tokenizer.pad_id, pack=s.pack)


def build_loader(config: Any, tokenizer: Tokenizer, split: str, fmt: str, *,
                 process_index: int = 0, process_count: int = 1,
                 loss_index: bool = False) -> Loader:
    """The loader of ``config.data``'s ``train`` or ``eval`` side for record format ``fmt``.

    The batch size is ``config.train.batch_size`` for training and
    ``config.data.eval_batch_size`` for evaluation; ``loss_index`` (see ``DataSettings``)
    is for a stage whose loss reads log-probs at loss-bearing positions only.
    """
    batch = config.train.batch_size if split == "train" else config.data.eval_batch_size
    settings = dataclasses.replace(DataSettings.from_config(config.data, split, fmt, batch),
                                   loss_index=loss_index)
    return Loader(settings, tokenizer, process_index=process_index, process_count=process_count)
