"""data.eval=auto (a held-out slice of user records) and tokenizer=auto (the source's)."""

import json

import numpy as np
import pytest

from jaxalign.data import holdout
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models import lineage
from tests.hf_tokenizer_files import write_hf_dir
from tests.presets import preset


def _records(n):
    return [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}"} for i in range(n)]


def test_held_out_slice_is_seeded_sized_and_disjoint():
    a = holdout.held_out(200, 0.05, 1000, seed=3)
    assert len(a) == 10 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, holdout.held_out(200, 0.05, 1000, seed=3))
    assert not np.array_equal(a, holdout.held_out(200, 0.05, 1000, seed=4))
    assert len(holdout.held_out(7, 0.05, 1000, seed=0)) == 1  # at least one record
    assert len(holdout.held_out(10_000, 0.5, 64, seed=0)) == 64  # capped
    assert len(holdout.held_out(50, 0.0, 1000, seed=0)) == 0
    with pytest.raises(ValueError, match="leaving none to train on"):
        holdout.held_out(1, 0.5, 1000, seed=0)


def _loader_records(data, split):
    settings = DataSettings.from_config(data, split, "sft", 4)
    loader = Loader(settings, load_tokenizer("builtin:world"), records=_records(40))
    return [loader.source[i]["prompt"] for i in range(len(loader.source))], settings


def test_auto_eval_of_user_records_is_a_disjoint_slice_of_the_training_source():
    data = preset("sft", "test", **{"data.train": "jsonl:mine.jsonl"}).data
    assert data.eval == "auto" and holdout.has_eval(data)
    train, st = _loader_records(data, "train")
    evals, se = _loader_records(data, "eval")
    assert (st.source, se.source, st.split, se.split) == ("jsonl:mine.jsonl",) * 2 + ("train",) * 2
    assert len(evals) == 2 and len(train) == 38  # 5% of 40
    assert not set(train) & set(evals) and set(train) | set(evals) == {
        r["prompt"] for r in _records(40)}


def test_data_tasks_keeps_the_named_families_for_training_only():
    data = preset("grpo", "test", **{"data.train": "builtin:world",
                                     "data.tasks": "addition, reverse"}).data
    tok = load_tokenizer("builtin:world")
    train = Loader(DataSettings.from_config(data, "train", "prompt", 4), tok)
    tasks = {train.source[i]["task"] for i in range(len(train.source))}
    assert tasks == {"addition", "reverse"} and "tasks addition,reverse" in train.source.name
    evals = Loader(DataSettings.from_config(data, "eval", "prompt", 4), tok)
    assert len({evals.source[i].get("task") for i in range(len(evals.source))}) > 2
    data.tasks = "adition"
    with pytest.raises(ValueError, match=r"no record has a task in data.tasks=\['adition'\]; "
                       r"its tasks: \['addition'"):
        Loader(DataSettings.from_config(data, "train", "prompt", 4), tok)


def test_auto_eval_of_a_builtin_source_is_its_eval_split_and_fraction_zero_is_off():
    data = preset("sft", "test").data
    se = DataSettings.from_config(data, "eval", "sft", 4)
    assert (se.source, se.split, se.holdout) == (data.train, data.eval_split, "")
    off = preset("sft", "test", **{"data.train": "jsonl:x.jsonl", "data.eval_fraction": 0.0})
    assert not holdout.has_eval(off.data)
    named = preset("sft", "test", **{"data.train": "jsonl:x.jsonl", "data.eval": "jsonl:y.jsonl"})
    se = DataSettings.from_config(named.data, "eval", "sft", 4)
    assert (se.source, se.holdout) == ("jsonl:y.jsonl", "")


def _run_dir(tmp_path, tokenizer):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"tokenizer": tokenizer,
                                                 "model": {"init_from": "scratch"}}))
    return run


def test_tokenizer_auto_follows_the_source(tmp_path):
    assert lineage.resolve_tokenizer(preset("sft", "test")).tokenizer == "builtin:world"
    hf_dir = write_hf_dir(tmp_path / "tok")
    run = _run_dir(tmp_path, str(hf_dir))
    cfg = preset("dpo", "test", **{"model.init_from": f"workdir:{run}"})
    assert cfg.tokenizer == "auto"
    assert lineage.resolve_tokenizer(cfg).tokenizer == str(hf_dir)


def test_a_tokenizer_other_than_the_source_runs_is_refused_naming_both(tmp_path):
    hf_dir = write_hf_dir(tmp_path / "tok")
    run = _run_dir(tmp_path, str(hf_dir))
    cfg = preset("grpo", "test", **{"model.init_from": f"workdir:{run}",
                                    "tokenizer": "builtin:world"})
    with pytest.raises(ValueError, match=rf"builtin:world.*vocab 512.*{hf_dir}"):
        lineage.resolve_tokenizer(cfg)
    # The same tokenizer named another way is accepted.
    same = preset("grpo", "test", **{"model.init_from": f"workdir:{run}",
                                     "tokenizer": str(hf_dir / "tokenizer.json")})
    assert lineage.resolve_tokenizer(same).tokenizer == str(hf_dir / "tokenizer.json")
