"""Rejection sampling: selection, pair mining, the written datasets, rounds and resume."""

import json
import os

import numpy as np
import pytest
from presets import preset

from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.jobs import rejection as rj
from jaxalign.jobs import rejection_data as rd
from jaxalign.jobs import run_stage as train
from jaxalign.jobs.rejection_data import Completion, Selection


def _group(*items):
    """Completions from ``(text, score)`` pairs, in sample order."""
    return [Completion(text, float(score), {"r": float(score)}) for text, score in items]


# Scores with a tie at the top (b, d), a repeated text (e), an empty sample scoring
# highest of all, and values exactly at and just below the threshold.
GROUP = _group(("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.9), ("e", 0.5), ("e", 0.5),
               (" ", 5.0), ("f", 0.4999))


@pytest.mark.parametrize("sel,expected", [
    (Selection(), ["b"]),                                    # the earlier of a tie
    (Selection(keep=2), ["b", "d"]),
    (Selection(keep=4), ["b", "d", "c", "e"]),               # e once, then the cap
    (Selection(keep=10), ["b", "d", "c", "e", "f", "a"]),    # never the empty one
    (Selection(keep=3, threshold=0.9), ["b", "d"]),          # a floor under best
    (Selection(select="threshold", threshold=0.5), ["b", "d", "c", "e"]),  # 0.5 is in
    (Selection(select="threshold", threshold=0.4999), ["b", "d", "c", "e", "f"]),
    (Selection(select="threshold", threshold=0.9000001), []),
])
def test_selection_keeps_exactly_the_best_scored(sel, expected):
    kept, reason = rd.select_completions(GROUP, sel)
    assert [GROUP[i].text for i in kept] == expected
    assert reason == (None if expected else "below threshold")
    assert rd.select_completions(_group((" ", 1.0), ("", 2.0)), sel) == ([],
                                                                         "empty completions")


def test_selection_against_brute_force():
    """Random groups: best keeps the top-k distinct texts; threshold keeps every one above."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        # Few distinct scores and texts, so ties and repeats are common.
        group = _group(*[(f"t{rng.integers(0, 5)}", rng.integers(0, 4) / 2) for _ in range(n)])
        keep = int(rng.integers(1, 4))
        kept, _ = rd.select_completions(group, Selection(keep=keep))
        scores = sorted((group[i].score for i in kept), reverse=True)
        assert scores == [group[i].score for i in kept]
        assert len(kept) == min(keep, len({c.text for c in group}))
        assert max(c.score for c in group) == group[kept[0]].score
        thr = float(rng.integers(0, 4) / 2)
        kept, _ = rd.select_completions(group, Selection(select="threshold", threshold=thr))
        assert {group[i].text for i in kept} == {c.text for c in group if c.score >= thr}
        assert all(group[i].score >= thr for i in kept)


def test_dpo_pairs_best_vs_worst_and_ties_skipped(tmp_path):
    groups = [
        _group(("x", 0.5), ("y", 1.0), ("z", 0.0), ("w", 0.0)),  # y vs z (earlier of a tie)
        _group(("p", 1.0), ("q", 1.0)),                          # tie: no preference
        _group(("same", 1.0)),                                   # one sample: a tie
        _group(("m", 0.3), ("n", 0.2)),                          # margin 0.1
        _group(("", 3.0), ("u", 0.1), ("v", 0.0)),               # the empty one never counts
    ]
    records = [{"prompt": f"p{i}", "answer": str(i)} for i in range(len(groups))]
    out, stats = rd.build_records(records, groups, Selection(mode="dpo"))
    pairs = [(r["prompt"], r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"])
             for r in out]
    assert pairs == [("p0", "y", "z", 1.0, 0.0), ("p3", "m", "n", 0.3, 0.2),
                     ("p4", "u", "v", 0.1, 0.0)]
    assert stats["skipped"] == {"best and worst tie": 2}
    assert stats["records"] == stats["prompts_kept"] == 3 and stats["prompts"] == 5
    _, stats = rd.build_records(records, groups, Selection(mode="dpo", min_margin=0.1))
    assert stats["skipped"] == {"best and worst tie": 2, "margin not above min_margin": 2}
    _, stats = rd.build_records(records, groups, Selection(mode="dpo", threshold=0.5))
    assert stats["skipped"] == {"best and worst tie": 2, "below threshold": 2}


def _loader(path, fmt, cache):
    settings = DataSettings(source=f"jsonl:{path}", split="train", fmt=fmt, batch_size=4,
                            max_len=32, data_dir=str(cache), shuffle=False)
    return Loader(settings, load_tokenizer("builtin:world"))


def test_written_files_have_scores_and_train_as_jsonl(tmp_path):
    records = [{"prompt": "What is 2 + 2?", "answer": "4", "response": "4"},
               {"prompt": [{"role": "user", "content": "Reverse: abc"}], "answer": "cba"},
               {"prompt": "Say hi", "answer": "hi"}]
    groups = [_group((" 5", 0.0), (" 4", 1.0), ("4", 1.0)),
              _group(("cba", 1.0), ("abc", 0.0)),
              _group(("no", 0.0), ("nope", 0.0))]
    sft = rd.write_dataset(records, groups, Selection(threshold=1.0), str(tmp_path / "sft"),
                           extra_stats={"round": 0})
    with open(tmp_path / "sft" / rd.DATA_FILE) as f:
        rows = [json.loads(line) for line in f]
    assert [(r["response"], r["score"], r["scores"], r["rank"]) for r in rows] == [
        (" 4", 1.0, {"r": 1.0}, 0), ("cba", 1.0, {"r": 1.0}, 0)]
    # Fields the reward read travel along; a reference response is kept under a new name.
    assert rows[0]["answer"] == "4" and rows[0]["source_response"] == "4"
    assert rows[1]["prompt"] == records[1]["prompt"]
    with open(tmp_path / "sft" / rd.STATS_FILE) as f:
        stats = json.load(f)
    assert stats == sft and stats["round"] == 0 and stats["records"] == 2
    assert stats["skipped"] == {"below threshold": 1}
    assert stats["score"]["best_of_n_mean"] == pytest.approx(2 / 3)
    with open(tmp_path / "sft" / rd.COMPLETIONS_FILE) as f:
        every = [json.loads(line) for line in f]
    assert [[c["score"] for c in e["completions"]] for e in every] == [[0, 1, 1], [1, 0], [0, 0]]

    dpo = rd.write_dataset(records, groups, Selection(mode="dpo"), str(tmp_path / "dpo"))
    assert dpo["records"] == 2 and dpo["skipped"] == {"best and worst tie": 1}

    sft_loader = _loader(tmp_path / "sft" / rd.DATA_FILE, "sft", tmp_path / "cache")
    assert sft_loader.num_records == 2 and sft_loader.num_invalid == 0
    batch = next(iter(sft_loader.eval_batches()))
    assert batch["loss_mask_bt"][:2].sum() > 0
    dpo_loader = _loader(tmp_path / "dpo" / rd.DATA_FILE, "preference", tmp_path / "cache")
    assert dpo_loader.num_records == 2 and dpo_loader.num_invalid == 0
    next(iter(dpo_loader.eval_batches()))


class StubGenerator:
    """Stands in for the sampler and scorer: known completions and scores per prompt."""

    def __init__(self, records):
        self.records = records
        self.loaded = []

    def prompts(self, source, split, fields=None):
        return list(self.records), [[1, 2, 3]] * len(self.records), {}

    def load(self, spec):
        self.loaded.append(spec)
        return {}

    def sampling_config(self, greedy=False):
        return None

    def complete(self, params, records, prompt_ids, cfg, rng):
        # Score k of prompt i is (k * 7 + i) % 5: the best sample moves with the prompt.
        return [_group(*[(f"{r['answer']}-{k}", (k * 7 + i) % 5) for k in range(4)])
                for i, r in enumerate(records)]


def test_generate_dataset_with_a_stub_sampler(tmp_path):
    records = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(10)]
    config = preset("rejection", **{"rejection.prompts_per_round": 6,
                                    "rejection.select": "threshold",
                                    "rejection.threshold": 3.0})
    stub = StubGenerator(records)
    stats = rj.generate_dataset(config, "workdir:somewhere", str(tmp_path), round_index=1,
                                generator=stub)
    assert stub.loaded == ["workdir:somewhere"] and stats["policy"] == "workdir:somewhere"
    with open(tmp_path / rd.DATA_FILE) as f:
        rows = [json.loads(line) for line in f]
    with open(tmp_path / rd.COMPLETIONS_FILE) as f:
        every = [json.loads(line) for line in f]
    assert stats["prompts"] == len(every) == 6  # a seeded subset of the 10 prompts
    expected = [(e["prompt"], c["text"]) for e in every
                for c in sorted(e["completions"], key=lambda c: -c["score"]) if c["score"] >= 3]
    assert [(r["prompt"], r["response"]) for r in rows] == expected
    again = rj.generate_dataset(config, "scratch", str(tmp_path / "again"), round_index=2,
                                generator=StubGenerator(records))
    assert again["prompts"] == 6  # another round, another subset (seeded by the round)


def test_config_errors():
    for key, value, match in [("rejection.mode", "ppo", "rejection.mode"),
                              ("rejection.select", "top", "rejection.select"),
                              ("rejection.select", "threshold", "needs rejection.threshold"),
                              ("rejection.rewards", "nope", "unknown reward 'nope' in "
                                                            "rejection.rewards"),
                              ("rejection.rounds", 0, "rejection.rounds")]:
        with pytest.raises(ValueError, match=match):
            rj.check_config(preset("rejection", **{key: value}))


def test_round_config_trains_the_generated_file():
    config = preset("rejection", **{"rejection.epochs": 2.0, "data.fields.prompt": "question"})
    inner = rj.round_config(config, "/x/round_1/data.jsonl", "workdir:/x/round_0", 20)
    assert inner.stage == "sft" and "rejection" not in inner and "dpo" not in inner
    assert inner.data.train == "jsonl:/x/round_1/data.jsonl"
    assert inner.model.init_from == "workdir:/x/round_0"
    assert inner.data.fields.prompt == ""  # generated records use the stage's own names
    assert inner.train.steps == 5  # ceil(2 epochs * 20 records / batch 8)
    config = preset("rejection", **{"rejection.mode": "dpo"})
    inner = rj.round_config(config, "/x/d.jsonl", "scratch", 3)
    assert inner.stage == "dpo" and inner.dpo.beta == 0.1
    assert inner.train.steps == config.train.steps


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_round_end_to_end_and_resume(tmp_path):
    """A tiny round samples, keeps the best, trains; a rerun redoes nothing finished."""
    workdir = tmp_path / "run"
    overrides = {"rejection.rounds": 1, "rejection.eval_limit": 8, "train.steps": 2,
                 "data.dir": str(tmp_path / "cache")}
    out = train(preset("rejection", **overrides), str(workdir))
    r0 = workdir / "round_0"
    assert {"data.jsonl", "stats.json", "completions.jsonl", "done.json", "checkpoints"} <= set(
        os.listdir(r0))
    # Every kept response is the best-scored non-empty sample of its prompt.
    kept = {json.dumps(r["prompt"]): r for r in _rows(r0 / "data.jsonl")}
    for e in _rows(r0 / "completions.jsonl"):
        live = [c for c in e["completions"] if c["text"].strip()]
        if live:
            best = max(live, key=lambda c: c["score"])
            assert kept[json.dumps(e["prompt"])]["score"] == best["score"]
            assert kept[json.dumps(e["prompt"])]["response"] == best["text"]
    stats = json.loads((r0 / "stats.json").read_text())
    assert stats["prompts"] == 16 and stats["samples"] == 64 and stats["policy"] == "scratch"
    rows = _rows(workdir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in rows] == [(0, "eval"), (1, "train"), (1, "eval")]
    assert rows[1]["records"] == stats["records"] and "loss" in rows[1]
    assert "reward/mean" in out["eval"] and not out["preempted"]

    before = {p: os.path.getmtime(r0 / p) for p in ("data.jsonl", "done.json", "stats.json")}
    steps = sorted(os.listdir(r0 / "checkpoints"))
    # The same command again: nothing to do, nothing rewritten.
    again = train(preset("rejection", **overrides), str(workdir))
    assert again["train"] == out["train"] and again["eval"] == out["eval"]
    assert before == {p: os.path.getmtime(r0 / p) for p in before}
    assert sorted(os.listdir(r0 / "checkpoints")) == steps
    assert len(_rows(workdir / "metrics.jsonl")) == 3

    # One more round that keeps nothing: it samples from round 0's checkpoint, trains
    # nothing, and leaves round 0 alone.
    more = train(preset("rejection", **{**overrides, "rejection.rounds": 2,
                                        "rejection.select": "threshold",
                                        "rejection.threshold": 1.0}), str(workdir))
    stats = json.loads((workdir / "round_1" / "stats.json").read_text())
    assert stats["policy"] == f"workdir:{r0}" and stats["records"] == 0
    assert stats["skipped"] == {"below threshold": 16}
    assert not json.loads((workdir / "round_1" / "done.json").read_text())["trained"]
    assert before == {p: os.path.getmtime(r0 / p) for p in before}
    assert [(r["step"], r["split"]) for r in _rows(workdir / "metrics.jsonl")] == [
        (0, "eval"), (1, "train"), (1, "eval"), (2, "train"), (2, "eval")]
    assert more["train"]["records"] == 0
