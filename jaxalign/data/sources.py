"""Where records come from: a source string ``<scheme>:<rest>`` selects a reader.

* ``builtin:<name>`` — the embedded datasets (``jaxalign.data.builtin``).
* ``jsonl:<path>`` — a JSONL file or a glob of files, local or a URL (``gs://b/d/*.jsonl``,
  read through ``jaxalign.storage``). On first use it is converted
  once into a TFDS dataset (array_record) under the data directory, keyed by a digest of
  the files' contents, and then read through ``tfds`` data sources with random access; a
  changed file gets a new digest and is converted again (the stale copy is removed).
  Each stored row keeps the raw line and its file and line number, so a malformed line
  is reported (or skipped) at validation time with its exact location.
* ``tfds:<name>[/<config>][:<version>]`` — a TFDS dataset prepared (as array_record)
  in the data directory, or buildable there without downloads.
* ``parquet:<path, glob or directory>`` and ``arrow:<dir>`` (a ``datasets``
  ``save_to_disk`` directory) — columnar sources (``jaxalign.data.columnar``), read as
  memory-mapped Arrow with random access; Parquet is converted once, like JSONL.

No reader needs TensorFlow: TFDS's array_record path (building, ``builder``,
``as_data_source``) works without it. A field mapping (``config.data.fields``, e.g.
``{"prompt": "question", "response": "answer"}``) renames a source's columns to the
names a stage expects; error messages then name the source column.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from absl import logging

from jaxalign import storage
from jaxalign.data.builtin import load_builtin
from jaxalign.data.records import Location

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "jaxalign", "datasets")
# 1.1.0: lines are read as bytes, and invalid UTF-8 is reported instead of replaced.
_JSONL_VERSION = "1.1.0"


class RecordSource(Protocol):
    """Random access to the raw records of one split, and where each one lives."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any:
        """The raw record (a dict for well-formed data); may raise ``RecordError``."""
        ...

    def locate(self, index: int) -> Location:
        """The record's source, unit (``line`` or ``record``) and number, for messages."""
        ...


class ListSource:
    """Records held in memory (the builtin datasets, or records passed in directly)."""

    def __init__(self, records: Sequence[Any], name: str):
        self.records = records
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        return self.records[index]

    def locate(self, index: int) -> Location:
        return Location(self.name, index)


class MappedSource:
    """Renames columns of another source: ``fields`` maps stage names to source names."""

    def __init__(self, source: RecordSource, fields: Mapping[str, str]):
        self.source = source
        self.fields = dict(fields)
        self.name = source.name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        record = self.source[index]
        if not isinstance(record, Mapping):
            return record
        out = {k: v for k, v in record.items() if k not in self.fields.values()}
        for name, column in self.fields.items():
            value = _lookup(record, column)
            if value is _MISSING:
                raise self.source.locate(index).error(
                    column, f"missing (the source column mapped to {name!r} by data.fields; "
                    f"record has {sorted(record)})")
            out[name] = value
        return out

    def locate(self, index: int) -> Location:
        return dataclasses.replace(self.source.locate(index), aliases=self.fields)


_MISSING = object()


def _lookup(record: Mapping[str, Any], column: str) -> Any:
    # "a.b" reaches into nested features (e.g. a TFDS FeaturesDict).
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def to_python(value: Any) -> Any:
    """Decodes TFDS values into JSON-like Python: bytes -> str, numpy -> numbers, lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value] if value.ndim else to_python(value.item())
    if isinstance(value, np.generic):
        return to_python(value.item())
    if isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_python(v) for v in value]
    return value


def _decode_example(example: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in example.items():
        value = to_python(value)
        if isinstance(value, dict):
            lengths = {len(v) if isinstance(v, list) else -1 for v in value.values()}
            # A nested dict of equal-length lists is how TFDS returns a Sequence of dicts.
            if value and len(lengths) == 1 and -1 not in lengths:
                n = lengths.pop()
                value = [{k: value[k][i] for k in value} for i in range(n)]
        out[key] = value
    return out


# --- jsonl ------------------------------------------------------------------------------


def _jsonl_files(pattern: str) -> list[str]:
    if storage.is_url(pattern):
        expanded, files = pattern, storage.glob(pattern)
    else:
        expanded = os.path.expanduser(pattern)
        files = sorted(str(Path(p).resolve()) for p in glob.glob(expanded) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"jsonl:{pattern}: no file matches {expanded!r}")
    return files


def cache_root(data_dir: str | None, source: str) -> Path:
    """The local directory that conversions of ``source`` are cached in (``data.dir``).

    Raises:
      ValueError: ``data_dir`` is a URL: converted files are memory-mapped, so the cache
        is local (the source's own files may be URLs).
    """
    if data_dir and storage.is_url(data_dir):
        raise ValueError(f"data.dir={data_dir}: {source} is converted into a local cache "
                         "directory that is memory-mapped, so data.dir must be a local path "
                         "(the data files themselves may be URLs)")
    return Path(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


def _digest(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(str(path).encode() + b"\0")
        with storage.open_read(path) as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    # TFDS prints a banner to stdout and draws progress bars while preparing; keep the
    # console for the trainer's own lines.
    from tensorflow_datasets.core.utils import tqdm_utils

    active = tqdm_utils._active
    tqdm_utils._active = False
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tqdm_utils._active = active


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path``: serialises conversions between processes
    sharing a data directory."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _has_record(path: str) -> bool:
    with storage.open_read(path) as f:
        return any(line.strip() for line in f)


def _decode_line(raw: bytes) -> tuple[str, str]:
    """A JSONL line's text, or ``("", why)`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return "", (f"not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1} of the "
                    f"line: {e.reason})")


def _jsonl_builder_class():
    import tensorflow_datasets as tfds

    class JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """One split ("train") of raw JSONL lines with their file and line numbers."""

        VERSION = tfds.core.Version(_JSONL_VERSION)

        def __init__(self, *, name: str, files: Sequence[str], **kwargs):
            self.name = name
            self._files = list(files)
            self.blank_lines = 0
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="JSONL lines converted by jaxalign: "
                + json.dumps([str(f) for f in self._files]),
                features=tfds.features.FeaturesDict({
                    "text": tfds.features.Text(),
                    "error": tfds.features.Text(),  # why the line is unreadable, or ""
                    "file": tfds.features.Scalar(np.int32),
                    "line": tfds.features.Scalar(np.int64),
                }),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for file_index, path in enumerate(self._files):
                # Bytes split at b"\n" only: line numbers match an editor's (a lone "\r"
                # is no line break), and a line that is not UTF-8 is reported as such
                # instead of being silently decoded with replacement characters.
                with storage.open_read(path) as f:
                    for line_no, raw in enumerate(f, start=1):
                        if not raw.strip():
                            self.blank_lines += 1
                            continue
                        if line_no == 1:
                            raw = raw.removeprefix(codecs.BOM_UTF8)
                        text, error = _decode_line(raw.rstrip(b"\r\n"))
                        key = f"{file_index}:{line_no}"
                        yield key, {"text": text, "error": error, "file": file_index,
                                    "line": line_no}

    return JsonlBuilder


class JsonlSource:
    """Records of JSONL files, read from their array_record conversion."""

    def __init__(self, pattern: str, data_dir: str):
        import tensorflow_datasets as tfds

        self.name = f"jsonl:{pattern}"
        self.files = _jsonl_files(pattern)
        digest = _digest(self.files)
        key = hashlib.sha1("\n".join(map(str, self.files)).encode()).hexdigest()[:12]
        # One dataset per set of files (key) and contents (digest).
        name = f"jsonl_{key}_{digest}"
        root = cache_root(data_dir, self.name)
        self.directory = root / name / _JSONL_VERSION
        with file_lock(root / f"jsonl_{key}.lock"):
            if not (self.directory / "dataset_info.json").is_file():
                if not any(_has_record(path) for path in self.files):
                    # TFDS would fail deep inside its writer ("No examples were yielded").
                    raise ValueError(f"{self.name}: no records: every line of "
                                     f"{', '.join(map(str, self.files))} is blank")
                builder = _jsonl_builder_class()(
                    name=name, files=self.files, data_dir=str(root), file_format="array_record")
                with _quiet_tfds():
                    builder.download_and_prepare(
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
                logging.info("%s: converted %d file(s) to array_record in %s (%d blank lines "
                             "ignored)", self.name, len(self.files), self.directory,
                             builder.blank_lines)
                # Conversions of older contents of the same files are stale now.
                for other in root.glob(f"jsonl_{key}_*"):
                    if other.is_dir() and other.name != name:
                        shutil.rmtree(other, ignore_errors=True)
        builder = tfds.builder_from_directory(str(self.directory))
        self._data = builder.as_data_source(split="train")

    def __len__(self) -> int:
        return len(self._data)

    def _row(self, index: int) -> dict[str, Any]:
        return self._data[index]

    def _location(self, row: Mapping[str, Any]) -> Location:
        return Location(f"jsonl:{self.files[int(row['file'])]}", int(row["line"]), "line")

    def locate(self, index: int) -> Location:
        return self._location(self._row(index))

    def __getitem__(self, index: int) -> Any:
        row = self._row(index)
        text, error = (v.decode("utf-8") if isinstance(v, bytes) else v
                       for v in (row["text"], row["error"]))
        if error:
            raise self._location(row).error("<utf-8>", error)
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self._location(row).error(
                "<json>", f"malformed JSON ({e.msg} at column {e.colno})") from None


# --- tfds -------------------------------------------------------------------------------


class TfdsSource:
    """One split of a TFDS dataset, read through its array_record data source."""

    def __init__(self, spec: str, split: str, data_dir: str):
        import tensorflow_datasets as tfds

        self.name = f"tfds:{spec}"
        kwargs = {"data_dir": os.path.expanduser(data_dir)} if data_dir else {}
        try:
            builder = tfds.builder(spec, **kwargs)
        except Exception as e:  # TFDS raises several types for unknown names
            raise ValueError(f"{self.name}: no such TFDS dataset in "
                             f"{data_dir or 'the default TFDS data dir'} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]})") from None
        if not builder.is_prepared():
            try:
                with _quiet_tfds():
                    builder.download_and_prepare(
                        file_format="array_record",
                        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            except Exception as e:
                raise ValueError(
                    f"{self.name}: not prepared in {builder.data_dir} and it could not be built "
                    f"offline ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                    "Prepare it once with file_format='array_record'.") from None
        if builder.info.file_format is None or builder.info.file_format.value != "array_record":
            raise ValueError(
                f"{self.name}: prepared as {builder.info.file_format}, but random access "
                "without TensorFlow needs array_record; prepare it again with "
                "file_format='array_record'")
        base = split.split("[")[0]
        if base not in builder.info.splits:
            raise ValueError(f"{self.name}: no split {base!r}; available: "
                             f"{sorted(builder.info.splits)}")
        self._data = builder.as_data_source(split=split)
        self.name = f"tfds:{spec}[{split}]"

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> Any:
        return _decode_example(self._data[index])

    def locate(self, index: int) -> Location:
        return Location(self.name, index)


# --- dispatch ---------------------------------------------------------------------------


def _open_builtin(rest: str, split: str, data_dir: str) -> RecordSource:
    del data_dir
    return ListSource(load_builtin(rest, split), f"builtin:{rest}")


def _open_jsonl(rest: str, split: str, data_dir: str) -> RecordSource:
    del split  # a JSONL source is one split: its files
    return JsonlSource(rest, data_dir)


def _open_tfds(rest: str, split: str, data_dir: str) -> RecordSource:
    return TfdsSource(rest, split, data_dir)


def _open_parquet(rest: str, split: str, data_dir: str) -> RecordSource:
    del split  # a Parquet source is one split: its files
    from jaxalign.data.columnar import ParquetSource  # imports pyarrow

    return ParquetSource(rest, data_dir)


def _open_arrow(rest: str, split: str, data_dir: str) -> RecordSource:
    del data_dir  # read in place
    from jaxalign.data.columnar import SavedDatasetSource  # imports pyarrow

    return SavedDatasetSource(rest, split)


# scheme -> opener(rest_of_source, split, data_dir) -> source.
_OPENERS: dict[str, Callable[[str, str, str], RecordSource]] = {
    "builtin": _open_builtin,
    "jsonl": _open_jsonl,
    "tfds": _open_tfds,
    "parquet": _open_parquet,
    "arrow": _open_arrow,
}


def supported_schemes() -> list[str]:
    """Returns the source schemes understood, in the order documented (``builtin`` first)."""
    return list(_OPENERS)


def open_source(source: str, split: str, *, data_dir: str = "",
                fields: Mapping[str, str] | None = None) -> RecordSource:
    """Opens one split of a source for random access.

    Args:
      source: ``builtin:<name>``, ``jsonl:<path or glob>``,
        ``tfds:<name>[/<config>][:<version>]``, ``parquet:<path, glob or directory>``
        or ``arrow:<save_to_disk directory>``.
      split: the split (``train``, ``eval``, ...); JSONL and Parquet sources ignore it
        (their files are their only split), so does an ``arrow:`` directory of one
        ``Dataset`` (a ``DatasetDict`` directory has one per split), and TFDS accepts
        slices such as ``train[:5%]``.
      data_dir: where JSONL and Parquet conversions and TFDS datasets live (default:
        ``~/.cache/jaxalign/datasets`` for conversions, TFDS's own default for ``tfds:``).
      fields: stage field name -> source column (dots reach into nested features).

    Raises:
      ValueError: for an unknown scheme or dataset; FileNotFoundError for missing files.
    """
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in _OPENERS or not rest:
        schemes = ", ".join(f"'{s}:'" for s in supported_schemes())
        raise ValueError(f"unsupported data source {source!r}; supported schemes: {schemes}")
    opened = _OPENERS[scheme](rest, split, data_dir)
    return MappedSource(opened, fields) if fields else opened


def load_records(source: str, split: str, *, data_dir: str = "",
                 fields: Mapping[str, str] | None = None) -> list[Any]:
    """Loads all records of one split of a source into a list (see ``open_source``)."""
    opened = open_source(source, split, data_dir=data_dir, fields=fields)
    return [opened[i] for i in range(len(opened))]
