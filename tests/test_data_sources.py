"""Record sources: JSONL -> array_record -> records, TFDS with field mapping, validation."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.records import RecordError
from jaxalign.data.sources import JsonlSource, open_source
from jaxalign.data.tokenizer import load_tokenizer

RECORDS = [
    {"prompt": "What is 2 + 3?", "response": "5"},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Ünïcødé ✓?"},
                  {"role": "assistant", "content": "Yes \"quoted\"\ttab"}]},
    {"prompt": "x", "response": "y", "answer": 3, "tags": ["a", None], "score": 0.5},
]


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:world")


def test_jsonl_round_trip_through_array_record(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [RECORDS[0], "", RECORDS[1], "  ", RECORDS[2]])
    data_dir = tmp_path / "cache"
    source = open_source(f"jsonl:{path}", "train", data_dir=str(data_dir))
    assert len(source) == 3  # blank lines are not records
    assert [source[i] for i in range(3)] == RECORDS
    # Lines are numbered as in the file, blank lines included.
    assert [(loc.source, loc.unit, loc.index) for loc in map(source.locate, range(3))] == [
        (f"jsonl:{path}", "line", 1), (f"jsonl:{path}", "line", 3),
        (f"jsonl:{path}", "line", 5)]
    shards = list(data_dir.glob("jsonl_*/1.1.0/*.array_record-*"))
    assert len(shards) == 1 and source.directory == shards[0].parent
    # A second open reuses the conversion; a changed file is converted again.
    again = JsonlSource(str(path), str(data_dir))
    assert again.directory == source.directory
    stamp = os.stat(shards[0]).st_mtime_ns
    _write_jsonl(path, [RECORDS[2], RECORDS[0]])
    changed = JsonlSource(str(path), str(data_dir))
    assert changed.directory != source.directory and len(changed) == 2
    assert changed[0] == RECORDS[2]
    assert not source.directory.exists()  # the stale conversion is removed
    assert os.stat(next(changed.directory.glob("*.array_record-*"))).st_mtime_ns >= stamp


def test_jsonl_glob_reads_files_in_order(tmp_path):
    _write_jsonl(tmp_path / "b.jsonl", [RECORDS[1]])
    _write_jsonl(tmp_path / "a.jsonl", [RECORDS[0], RECORDS[2]])
    source = open_source(f"jsonl:{tmp_path}/*.jsonl", "train", data_dir=str(tmp_path / "c"))
    assert [source[i] for i in range(3)] == [RECORDS[0], RECORDS[2], RECORDS[1]]
    assert source.locate(2).source == f"jsonl:{tmp_path / 'b.jsonl'}"
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_source(f"jsonl:{tmp_path}/*.json", "train", data_dir=str(tmp_path / "c"))


# Every kind of broken line, with the field its error must name.
BROKEN = [
    ('{"prompt": "ok", "response": "fine"}', None),
    ('{"prompt": "a", "response": "b"', ("<json>", "malformed JSON")),
    ('["not", "an", "object"]', ("<record>", "expected an object, got list")),
    ('{"response": "b"}', ("messages", "missing: an SFT record needs")),
    ('{"prompt": 7, "response": "b"}', ("prompt", "expected a list of messages, got int")),
    ('{"prompt": "a", "response": "  "}', ("response", "is empty")),
    ('{"prompt": "a", "response": null}', ("response", "expected str, got null")),
    ('{"messages": [{"role": "tool", "content": "x"}]}',
     ("messages[0].role", "unknown role 'tool'")),
    ('{"messages": [{"role": "user", "content": "only a question"}]}',
     ("messages", "no assistant turn")),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}',
     ("messages[0].content", "missing")),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     ("messages[1].content", "is empty")),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},'
     ' {"role": "assistant", "content": "a"}]}',
     ("messages[1].role", "only the first message may be a system message")),
    ('{"prompt": "fine again", "completion": "ok"}', None),
]


def _settings(source, **kw):
    return DataSettings(**{"source": source, "split": "train", "fmt": "sft", "batch_size": 2,
                           "max_len": 32, **kw})


def test_broken_lines_name_file_line_and_field(tmp_path, tok):
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(line for line, _ in BROKEN) + "\n", encoding="utf-8")
    cache = str(tmp_path / "cache")
    source = open_source(f"jsonl:{path}", "train", data_dir=cache)
    from jaxalign.data.loader import validate_source

    for i, (_, expected) in enumerate(BROKEN):
        if expected is None:
            continue
        with pytest.raises(RecordError) as err:
            validate_source(_Only(source, i), "sft", "error")
        field, detail = expected
        assert (err.value.source, err.value.unit, err.value.index, err.value.field) == (
            f"jsonl:{path}", "line", i + 1, field)
        assert str(err.value).startswith(f"jsonl:{path}, line {i + 1}, field {field!r}: ")
        assert detail in str(err.value)
    # "error" stops at the first bad line; "skip" keeps the good ones and counts the rest.
    with pytest.raises(RecordError, match=r"broken.jsonl, line 2, field '<json>'"):
        Loader(_settings(f"jsonl:{path}", data_dir=cache), tok)
    loader = Loader(_settings(f"jsonl:{path}", data_dir=cache, on_bad_record="skip"), tok)
    assert loader.indices.tolist() == [0, 12] and loader.num_invalid == 11
    assert loader.invalid["field 'messages': no assistant turn (nothing to train on)"] == 1
    assert sum(loader.invalid.values()) == 11 and len(loader.invalid) == 11


def test_skip_is_logged_with_counts(tmp_path, tok, caplog):
    path = _write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], '{"prompt": 1}', "{oops",
                                               '{"prompt": 2}', RECORDS[2]])
    with caplog.at_level(logging.WARNING):
        loader = Loader(_settings(f"jsonl:{path}", data_dir=str(tmp_path / "c"),
                                  on_bad_record="skip"), tok)
    assert loader.num_records == 2
    assert re.search(r"skipped 3 of 5 records \(data.on_bad_record='skip'\): 2 x field "
                     r"'prompt': expected a list of messages, got int; 1 x field '<json>'",
                     caplog.text), caplog.text


class _Only:
    """One record of a source, keeping its location (to test each broken line alone)."""

    def __init__(self, source, index):
        self.source, self.i, self.name = source, index, source.name

    def __len__(self):
        return 1

    def __getitem__(self, _):
        return self.source[self.i]

    def locate(self, _):
        return self.source.locate(self.i)


# --- tfds ---------------------------------------------------------------------------------


def _prepare_tfds(data_dir):
    """A TFDS dataset with its own column names, prepared as array_record."""
    import tensorflow_datasets as tfds

    class QaPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.2.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "question": tfds.features.Text(), "answer": tfds.features.Text(),
                "meta": {"id": np.int64},
                "chat": tfds.features.Sequence({"role": tfds.features.Text(),
                                                "content": tfds.features.Text()}),
            }), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(4), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"question": f"What is {i} + 1?", "answer": str(i + 1),
                          "meta": {"id": 100 + i},
                          "chat": [{"role": "user", "content": f"hi {i}"},
                                   {"role": "assistant", "content": f"hello {i}"}]}

    builder = QaPairs(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder.name


def test_tfds_source_with_field_mapping(tmp_path, tok):
    name = _prepare_tfds(tmp_path)
    source = open_source(f"tfds:{name}:1.2.0", "test", data_dir=str(tmp_path),
                         fields={"prompt": "question", "response": "answer"})
    assert len(source) == 2
    assert source[1] == {"prompt": "What is 1 + 1?", "response": "2", "meta": {"id": 101},
                         "chat": [{"role": "user", "content": "hi 1"},
                                  {"role": "assistant", "content": "hello 1"}]}
    assert source.locate(1).source == f"tfds:{name}:1.2.0[test]"
    # Sequence-of-dict columns map straight onto messages.
    loader = Loader(_settings(f"tfds:{name}", data_dir=str(tmp_path), split="train[:3]",
                              fields={"messages": "chat"}), tok)
    assert loader.num_records == 3
    batch = next(iter(loader.eval_batches()))
    assert tok.decode(batch["targets_bt"][1][batch["loss_mask_bt"][1] == 1]) == "hello 1"
    # A bad mapping names the source column.
    with pytest.raises(RecordError, match=r"record 0, field 'query': missing \(the source "
                                          r"column mapped to 'prompt' by data.fields"):
        Loader(_settings(f"tfds:{name}", data_dir=str(tmp_path),
                         fields={"prompt": "query", "response": "answer"}), tok)


def test_tfds_errors(tmp_path):
    name = _prepare_tfds(tmp_path)
    with pytest.raises(ValueError, match=r"no split 'validation'; available: \['test', "
                                         r"'train'\]"):
        open_source(f"tfds:{name}", "validation", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="tfds:no_such_dataset_xyz: no such TFDS dataset"):
        open_source("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))
