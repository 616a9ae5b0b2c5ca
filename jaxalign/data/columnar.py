"""Columnar sources: Parquet files and ``datasets`` ``save_to_disk`` directories.

* ``parquet:<path, glob or directory>`` — Parquet files (a directory means its
  ``*.parquet``), or a ``<scheme>://`` URL read through ``jaxalign.storage`` (``gs://``,
  ``file://``, ``s3://`` with s3fs installed). On first use each
  file is converted once, streaming, into an uncompressed Arrow IPC stream under the
  data directory, keyed by a digest of the files' contents as ``jsonl:`` conversions
  are: a changed file is converted again and the stale copy removed.
* ``arrow:<dir>`` — a directory written by ``datasets``' ``Dataset.save_to_disk``:
  ``state.json`` lists its ``data-XXXXX-of-NNNNN.arrow`` files (Arrow IPC streams), read
  in place. A ``DatasetDict`` directory (``dataset_dict.json``) is read one split at a
  time, from the subdirectory named by the split.

Both end up as memory-mapped Arrow IPC files read by ``ArrowSource``: row ``i`` is found
by a binary search over the first rows of the record batches and converted alone into
Python (lists stay lists, structs become dicts, as ``datasets`` returns them), so a read
costs the same anywhere in the data and pages are shared by loader worker processes.

A null in a top-level column is an absent field: a column that only some records have
is null in the others, so Parquet written from mixed JSONL records reads back as those
records. Locations name the file and the row within that file, counted from 0.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from pyarrow import fs as pafs

from jaxalign import storage
from jaxalign.data.records import Location
from jaxalign.data.sources import cache_root, file_lock

ROW_UNIT = "0-based row"
_PARQUET_VERSION = "1.0.0"
# Rows per record batch of a conversion: the unit a Parquet file is decoded in.
_BATCH_ROWS = 1024
_IPC_FILE_MAGIC = b"ARROW1"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _read_batches(path: Path) -> list[pa.RecordBatch]:
    """The non-empty record batches of an Arrow IPC file (stream or file format), mapped."""
    try:
        mapped = pa.memory_map(str(path))
        if mapped.read(len(_IPC_FILE_MAGIC)) == _IPC_FILE_MAGIC:
            reader = pa.ipc.open_file(mapped)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        else:
            mapped.seek(0)
            batches = list(pa.ipc.open_stream(mapped))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Arrow IPC file ({e})") from None
    return [b for b in batches if b.num_rows]


class ArrowSource:
    """Rows of Arrow IPC files, memory-mapped; ``labels[f]`` names file ``f`` in messages.

    Pickling (for loader worker processes) leaves the mapped batches behind; they are
    mapped again on first use.
    """

    def __init__(self, name: str, files: Sequence[Path], labels: Sequence[str]):
        self.name = name
        self.files = [Path(f) for f in files]
        self.labels = list(labels)
        self._file_starts: np.ndarray | None = None
        self._open()

    def _open(self) -> list[pa.RecordBatch]:
        batches, file_rows = [], []
        for path in self.files:
            found = _read_batches(path)
            batches += found
            file_rows.append(sum(b.num_rows for b in found))
        file_starts = np.cumsum([0, *file_rows], dtype=np.int64)
        if self._file_starts is not None and not np.array_equal(file_starts, self._file_starts):
            raise ValueError(f"{self.name}: the files changed while they were being read "
                             f"({', '.join(map(str, self.files))})")
        self._file_starts = file_starts
        # The global row of each batch's first row: row i lives in the last batch <= i.
        self._starts = np.cumsum([0] + [b.num_rows for b in batches[:-1]], dtype=np.int64)
        self._batches = batches
        return batches

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_batches"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._batches = None

    def __len__(self) -> int:
        return int(self._file_starts[-1])

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: row {index} out of range [0, {len(self)})")
        return index

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check(index)
        batches = self._batches if self._batches is not None else self._open()
        b = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = batches[b].slice(index - int(self._starts[b]), 1).to_pylist()[0]
        return {k: v for k, v in row.items() if v is not None}

    def locate(self, index: int) -> Location:
        index = self._check(index)
        f = int(np.searchsorted(self._file_starts, index, side="right")) - 1
        return Location(self.labels[f], index - int(self._file_starts[f]), ROW_UNIT)


# --- parquet ----------------------------------------------------------------------------


def _parquet_files(pattern: str) -> tuple[list[str], list[str]]:
    """The paths and labels (``parquet:<file>``) of the files matched."""
    if _URL.match(pattern):
        return _remote_parquet_files(pattern)
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        expanded = os.path.join(expanded, "*.parquet")
    files = sorted(str(Path(p).resolve()) for p in glob.glob(expanded) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"parquet:{pattern}: no file matches {expanded!r}")
    return files, [f"parquet:{f}" for f in files]


def _remote_parquet_files(url: str) -> tuple[list[str], list[str]]:
    try:
        if storage.isdir(url):
            url = storage.join(url, "*.parquet")
        scheme, path = url.split("://", 1)
        if re.search(r"[*?\[]", posixpath.dirname(path)):
            raise ValueError("a glob may only be in the last path component")
        paths = storage.glob(url)
    except (OSError, ValueError) as e:
        raise ValueError(f"parquet:{url}: cannot list the files ({e})") from None
    if not paths:
        raise FileNotFoundError(f"parquet:{url}: no file matches")
    return paths, [f"parquet:{p}" for p in paths]


def _open(path: str) -> Any:
    """A seekable binary file: local files through pyarrow, URLs through ``storage``."""
    if _URL.match(path):
        return storage.open_read(path)
    return pafs.LocalFileSystem().open_input_file(path)


def _digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.encode() + b"\0")
        with _open(path) as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_file(index: int) -> str:
    return f"data-{index:05d}.arrow"


def _convert(paths: Sequence[str], labels: Sequence[str], target: Path) -> list[int]:
    """Writes file ``i`` as the IPC stream ``target/data-0000i.arrow``; returns row counts.

    A Parquet row group is compressed and encoded as a whole, so reading one row of it
    decodes the group: shuffled reads straight from Parquet would cost a row group per
    record. The uncompressed copy costs one slice per record instead.
    """
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rows = []
    for i, (path, label) in enumerate(zip(paths, labels, strict=True)):
        try:
            with _open(path) as f:
                parquet = pq.ParquetFile(f)
                with (pa.OSFile(str(partial / _cache_file(i)), "wb") as sink,
                      pa.ipc.new_stream(sink, parquet.schema_arrow) as writer):
                    for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
                        writer.write_batch(batch)
                rows.append(parquet.metadata.num_rows)
        except (pa.ArrowException, OSError) as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise ValueError(f"{label}: not a readable Parquet file ({e})") from None
    (partial / "sources.json").write_text(json.dumps({"files": list(labels), "rows": rows}))
    os.replace(partial, target)  # a crash mid-conversion leaves no half-written cache
    return rows


class ParquetSource(ArrowSource):
    """Records of Parquet files, read from their Arrow IPC conversion (``directory``)."""

    def __init__(self, pattern: str, data_dir: str):
        paths, labels = _parquet_files(pattern)
        digest = _digest(paths)
        key = hashlib.sha1("\n".join(labels).encode()).hexdigest()[:12]
        name = f"parquet_{key}_{digest}"
        root = cache_root(data_dir, f"parquet:{pattern}")
        self.directory = root / name / _PARQUET_VERSION
        with file_lock(root / f"parquet_{key}.lock"):
            if not self.directory.is_dir():
                rows = _convert(paths, labels, self.directory)
                logging.info("parquet:%s: converted %d file(s), %d rows, to Arrow IPC in %s",
                             pattern, len(paths), sum(rows), self.directory)
                # Conversions of older contents of the same files are stale now.
                for other in root.glob(f"parquet_{key}_*"):
                    if other.is_dir() and other.name != name:
                        shutil.rmtree(other, ignore_errors=True)
        files = [self.directory / _cache_file(i) for i in range(len(paths))]
        super().__init__(f"parquet:{pattern}", files, labels)


# --- datasets save_to_disk --------------------------------------------------------------


def _load_json(path: Path, name: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot read {path} ({e})") from None


def _saved_files(directory: Path, name: str) -> list[Path]:
    """The data files that ``state.json`` of a ``save_to_disk`` directory lists."""
    state_path = directory / "state.json"
    if not state_path.is_file():
        raise ValueError(f"{name}: {directory} has no state.json; expected a directory "
                         "written by datasets' save_to_disk")
    state = _load_json(state_path, name)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("filename"), str) for e in entries):
        raise ValueError(f"{name}: {state_path} has no '_data_files' list of "
                         "{'filename': ...} entries")
    if state.get("_indices_data_files"):
        raise ValueError(f"{name}: {state_path} has an indices mapping (an old datasets "
                         "version saved a selection); save it again after "
                         "dataset.flatten_indices()")
    files = [directory / e["filename"] for e in entries]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{name}: {state_path} lists {path.name}, which is "
                                    f"missing from {directory}")
    return files


class SavedDatasetSource(ArrowSource):
    """One split of a ``datasets`` ``save_to_disk`` directory, read in place (a URL's
    directory from a local copy made once per process: the files are memory-mapped)."""

    def __init__(self, path: str, split: str):
        name = f"arrow:{path}"
        local = path
        if _URL.match(path):
            try:
                local = storage.local_copy(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{name}: no directory {path!r}") from None
        directory = Path(os.path.expanduser(local)).resolve()
        if not directory.is_dir():
            raise FileNotFoundError(f"{name}: no directory {str(directory)!r}")
        if (directory / "dataset_dict.json").is_file():
            splits = _load_json(directory / "dataset_dict.json", name)
            splits = splits.get("splits") if isinstance(splits, dict) else None
            if not isinstance(splits, list):
                raise ValueError(f"{name}: dataset_dict.json has no 'splits' list")
            if split not in splits:
                raise ValueError(f"{name}: no split {split!r}; available: {sorted(splits)}")
            directory, name = directory / split, f"{name}[{split}]"
        files = _saved_files(directory, name)
        root = Path(os.path.expanduser(local)).resolve()
        # Messages name the files where the user put them (the URL, not the copy).
        labels = [f"arrow:{storage.join(path, f.relative_to(root).as_posix())}"
                  if local != path else f"arrow:{f}" for f in files]
        super().__init__(name, files, labels)
