"""Parquet and save_to_disk (Arrow) sources: the same records as JSONL give the same
batches; bad rows are named by file and row; resume is exact."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxalign.data.columnar import ParquetSource, SavedDatasetSource
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.records import RecordError, validate
from jaxalign.data.sources import open_source
from jaxalign.data.tokenizer import load_tokenizer


def _msgs(*turns):
    return [{"role": role, "content": text} for role, text in turns]


# Each dataset is two shards (files); every column keeps one type within a shard.
SFT = [
    [{"messages": _msgs(("system", "Be brief."), ("user", "Ünïcødé ✓?"),
                        ("assistant", "Yes \"quoted\"\ttab"))},
     {"prompt": "What is 2 + 3?", "response": "5"},
     {"messages": _msgs(("user", "hi"), ("assistant", "hello"), ("user", "again"),
                        ("assistant", "hello again"))}],
    [{"prompt": "Name a colour.", "response": "blue"},
     {"prompt": "Say yes.", "completion": "yes"},
     {"prompt": "Count to 3.", "response": "1 2 3"},
     {"prompt": "Spell cat.", "response": "c a t"}],
]
PREFERENCE = [
    [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
     {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"},
     {"prompt": "Opposite of hot?", "chosen": "cold", "rejected": "warm"}],
    [{"prompt": _msgs(("system", "Answer."), ("user", "Sky colour?")),
      "chosen": _msgs(("assistant", "blue")), "rejected": _msgs(("assistant", "green"))},
     {"prompt": _msgs(("user", "Largest planet?")),
      "chosen": _msgs(("assistant", "Jupiter")), "rejected": _msgs(("assistant", "Mars"))}],
]
PROMPTS = [
    [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i),
      "meta": {"id": i, "tags": ["add", f"t{i}"], "weight": 0.5 * i}} for i in range(4)],
    [{"prompt": _msgs(("user", "What is 3 x 3?")), "answer": "9"},
     {"prompt": _msgs(("system", "Be exact."), ("user", "What is 10 - 4?")), "answer": "6"}],
]
UNPAIRED = [
    [{"prompt": "Greet me.", "completion": "Hello!", "label": True},
     {"prompt": "Greet me.", "completion": "Go away.", "label": False}],
    [{"prompt": _msgs(("user", "Thank me.")), "completion": "Thanks!", "label": True}],
]
DATASETS = {"sft": SFT, "preference": PREFERENCE, "prompt": PROMPTS, "unpaired": UNPAIRED}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:world")


def _write_jsonl(path, shards):
    path.write_text("".join(json.dumps(r) + "\n" for shard in shards for r in shard),
                    encoding="utf-8")
    return f"jsonl:{path}"


def _table(records):
    # from_pylist takes the columns of the first record only; pa.array unites them all.
    return pa.Table.from_struct_array(pa.array(records))


def _write_parquet(directory, shards, row_group_size=2):
    """One Parquet file per shard, in several row groups."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        pq.write_table(_table(shard), directory / f"part-{i}.parquet",
                       row_group_size=row_group_size)
    return f"parquet:{directory}/part-*.parquet"


def _features(t: pa.DataType):
    """A ``datasets`` feature description of an Arrow type (as dataset_info.json has)."""
    if pa.types.is_struct(t):
        return {t.field(i).name: _features(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t):
        return {"feature": _features(t.value_type), "_type": "List"}
    dtype = {"string": "string", "bool": "bool", "int64": "int64", "double": "float64"}[str(t)]
    return {"dtype": dtype, "_type": "Value"}


def _save_to_disk(directory, shards, batch_rows=2):
    """The layout of ``datasets.Dataset.save_to_disk``: IPC streams, state.json, info."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    features = {}
    for name, shard in zip(names, shards, strict=True):
        table = _table(shard)
        features.update({f.name: _features(f.type) for f in table.schema})
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})})
        with (pa.OSFile(str(directory / name), "wb") as sink,
              pa.ipc.new_stream(sink, table.schema) as writer):
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "3f2a9c1d0b7e6a54",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    info = {"builder_name": None, "citation": "", "config_name": None, "dataset_size": None,
            "description": "", "features": features, "homepage": "", "license": "",
            "splits": None, "version": None}
    (directory / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (directory / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return f"arrow:{directory}"


def _settings(source, fmt, data_dir, **kw):
    return DataSettings(**{"source": source, "split": "train", "fmt": fmt, "batch_size": 2,
                           "max_len": 64, "seed": 1, "data_dir": str(data_dir), **kw})


def _batches(tok, settings, n):
    """``n`` training batches (shuffled, across epochs) and then every eval batch."""
    loader = Loader(settings, tok)
    it = loader.iterator()
    out = [next(it) for _ in range(n)] + list(loader.eval_batches())
    it.close()
    return out


def _same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], np.ndarray):
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("fmt", sorted(DATASETS))
def test_same_batches_as_jsonl(tmp_path, tok, fmt):
    shards = DATASETS[fmt]
    records = [r for shard in shards for r in shard]
    jsonl = _write_jsonl(tmp_path / "data.jsonl", shards)
    parquet = _write_parquet(tmp_path / "pq", shards)
    arrow = _save_to_disk(tmp_path / "saved", shards)
    for source in (parquet, arrow):
        opened = open_source(source, "train", data_dir=str(tmp_path / "cache"))
        assert [opened[i] for i in range(len(opened))] == records
    want = _batches(tok, _settings(jsonl, fmt, tmp_path / "cache"), 6)
    if fmt == "prompt":
        assert [e for b in want[6:] for e in b["extras"]][:2] == [
            {k: v for k, v in r.items() if k != "prompt"} for r in records[:2]]
    for source in (parquet, arrow):
        _same(_batches(tok, _settings(source, fmt, tmp_path / "cache"), 6), want)


def test_locations_count_rows_per_file_from_zero(tmp_path):
    parquet = _write_parquet(tmp_path / "pq", SFT)
    source = open_source(parquet, "train", data_dir=str(tmp_path / "cache"))
    files = sorted((tmp_path / "pq").glob("*.parquet"))
    assert [(loc.source, loc.unit, loc.index) for loc in map(source.locate, (0, 2, 3, 6))] == [
        (f"parquet:{files[0]}", "0-based row", 0), (f"parquet:{files[0]}", "0-based row", 2),
        (f"parquet:{files[1]}", "0-based row", 0), (f"parquet:{files[1]}", "0-based row", 3)]
    # Each Parquet file becomes one IPC stream, in record batches (several row groups here).
    assert pq.ParquetFile(files[1]).num_row_groups == 2
    assert sorted(p.name for p in source.directory.iterdir()) == [
        "data-00000.arrow", "data-00001.arrow", "sources.json"]
    with pytest.raises(IndexError):
        source[len(source)]
    # Loader worker processes get a pickled source, which maps the files again.
    again = pickle.loads(pickle.dumps(source))
    assert [again[i] for i in range(len(again))] == [source[i] for i in range(len(source))]


def test_parquet_conversion_is_cached_and_refreshed(tmp_path):
    cache = tmp_path / "cache"
    path = tmp_path / "one.parquet"
    pq.write_table(_table(SFT[1]), path)
    first = ParquetSource(str(path), str(cache))
    assert ParquetSource(str(path), str(cache)).directory == first.directory
    # A directory means its *.parquet files; a file:// URL goes through pyarrow.fs.
    assert len(open_source(f"parquet:{tmp_path}", "train", data_dir=str(cache))) == 4
    url = open_source(f"parquet:file://{tmp_path}/*.parquet", "train", data_dir=str(cache))
    assert url.locate(1).source == f"parquet:file://{path}" and url[1] == SFT[1][1]
    pq.write_table(_table(SFT[1][:2]), path)
    changed = ParquetSource(str(path), str(cache))
    assert changed.directory != first.directory and len(changed) == 2
    assert not first.directory.exists()  # the stale conversion is removed
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_source(f"parquet:{tmp_path}/*.pq", "train", data_dir=str(cache))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
        open_source(f"parquet:{tmp_path}/bad.parquet", "train", data_dir=str(cache))


BAD = [
    [{"prompt": "fine", "response": "ok"},
     {"prompt": "no response"},  # null in the column: the field is missing
     {"messages": _msgs(("user", "q"), ("tool", "x"))}],
    [{"prompt": "typed", "response": 5}, {"prompt": "also", "response": 6}],
    [{"prompt": "good", "response": "yes"}],
]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_bad_rows_name_file_row_and_field(tmp_path, tok, kind):
    if kind == "parquet":
        source = _write_parquet(tmp_path / "pq", BAD)
        files = [f"parquet:{p}" for p in sorted((tmp_path / "pq").glob("*.parquet"))]
    else:
        source = _save_to_disk(tmp_path / "saved", BAD)
        files = [f"arrow:{p}" for p in sorted((tmp_path / "saved").glob("*.arrow"))]
    cache = tmp_path / "cache"
    with pytest.raises(RecordError) as err:
        Loader(_settings(source, "sft", cache), tok)
    assert str(err.value) == (f"{files[0]}, 0-based row 1, field 'response': missing (record "
                              "has ['prompt'])")
    loader = Loader(_settings(source, "sft", cache, on_bad_record="skip"), tok)
    assert loader.indices.tolist() == [0, 5] and loader.num_invalid == 4
    assert loader.invalid == {
        "field 'response': missing (record has ['prompt'])": 1,
        "field 'messages[1].role': unknown role 'tool' (expected one of ('system', 'user', "
        "'assistant'))": 1,
        "field 'response': expected str, got int": 2}
    # The second shard's rows are counted from 0 again.
    opened = open_source(source, "train", data_dir=str(cache))
    with pytest.raises(RecordError, match=rf"^{files[1]}, 0-based row 1, field 'response': "
                                          "expected str, got int$"):
        validate(opened[4], "sft", opened.locate(4))
    # A field mapping names the source's own column.
    with pytest.raises(RecordError, match=rf"^{files[0]}, 0-based row 0, field 'answer': "
                                          "missing"):
        Loader(_settings(source, "sft", cache, fields={"response": "answer"}), tok)


def test_resume_mid_epoch_is_exact(tmp_path, tok):
    records = [{"prompt": f"Say {i:02d}", "response": f"n{i:02d} " * (1 + i % 3)}
               for i in range(11)]
    source = _write_parquet(tmp_path / "pq", [records[:6], records[6:]], row_group_size=4)
    settings = _settings(source, "sft", tmp_path / "cache", pack=True, pack_window=5)
    full_it = Loader(settings, tok).iterator()
    full = [next(full_it) for _ in range(10)]  # several epochs of 11 records
    full_metrics = full_it.metrics()
    first = Loader(settings, tok).iterator()
    for want in full[:4]:
        _same([next(first)], [want])
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    resumed = Loader(settings, tok).iterator()
    resumed.set_state(state)
    _same([next(resumed) for _ in range(6)], full[4:])
    assert resumed.metrics() == full_metrics


def test_save_to_disk_dataset_dict_and_errors(tmp_path):
    root = tmp_path / "dd"
    _save_to_disk(root / "train", SFT)
    _save_to_disk(root / "test", [SFT[1][:2]])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    test = open_source(f"arrow:{root}", "test")
    assert test.name == f"arrow:{root}[test]" and [test[0], test[1]] == SFT[1][:2]
    assert len(SavedDatasetSource(str(root), "train")) == 7
    with pytest.raises(ValueError, match=r"no split 'eval'; available: \['test', 'train'\]"):
        open_source(f"arrow:{root}", "eval")
    with pytest.raises(ValueError, match="has no state.json; expected a directory written by "
                                         "datasets' save_to_disk"):
        open_source(f"arrow:{tmp_path}", "train")
    with pytest.raises(FileNotFoundError, match="no directory"):
        open_source(f"arrow:{tmp_path}/missing", "train")
    (root / "test" / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(FileNotFoundError, match="lists data-00000-of-00001.arrow, which is "
                                                "missing"):
        open_source(f"arrow:{root}", "test")
