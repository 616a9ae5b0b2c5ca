"""Honest throughput: tokens/s counts non-padding tokens, positions/s every position, MFU the
non-padding tokens' FLOPs at each batch's width."""

import itertools

import numpy as np
import pytest
from presets import preset

from jaxalign import metrics
from jaxalign.algos import get_stage
from jaxalign.data import packing
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.metrics import Throughput, read_jsonl
from jaxalign.models import lineage
from jaxalign.train import Trainer


def test_throughput_counts_tokens_positions_and_flops(monkeypatch):
    clock = iter([10.0, 12.0])  # window start, read: two seconds
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    flops = {64: 100.0, 128: 300.0}
    t = Throughput(flops.__getitem__, peak_flops=1000.0)
    # Two batches: 3 rows x 64 positions with 70 real tokens, 2 rows x 128 with 200.
    t.add(70, 3 * 64, 64)
    t.add(200, 2 * 128, 128)
    got = t.read()
    assert got["tokens_per_s"] == pytest.approx(270 / 2)
    assert got["positions_per_s"] == pytest.approx((192 + 256) / 2)
    assert got["mfu"] == pytest.approx((70 * 100 + 200 * 300) / 2 / 1000)


def test_unembedding_booked_only_where_the_batch_gathers_loss_positions(monkeypatch):
    """A batch that unembeds only its loss positions is booked 6·V·D for those alone."""
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    t = Throughput(lambda width: 100.0, peak_flops=1.0, unembed_flops=40.0)
    t.add(10, 16, 8, unembedded=4)   # 10 tokens at 100, minus 6 not unembedded at 40
    t.add(5, 8, 8)                   # every token unembedded
    assert t.read()["mfu"] == pytest.approx(10 * 100 - 6 * 40 + 5 * 100)
    mask_bt = np.array([[0, 1, 1, 0], [1, 0, 0, 0]], np.float32)
    batch = {"chosen_loss_mask_bt": mask_bt, "rejected_loss_mask_bt": mask_bt[:, ::-1],
             "chosen_loss_index_bk": np.zeros((2, 2), np.int32),
             "rejected_loss_index_bk": np.zeros((2, 2), np.int32)}
    assert packing.unembedded_tokens(batch) == 6
    assert packing.unembedded_tokens({"loss_mask_bt": mask_bt}) is None


def test_real_tokens_hand_count():
    seg_bt = np.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]], np.int32)
    prompt_mask_bt = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    assert packing.real_tokens({"segment_ids_bt": seg_bt}) == (8, 10)
    assert packing.real_tokens({"chosen_segment_ids_bt": seg_bt,
                                "rejected_segment_ids_bt": seg_bt[:, :3]}) == (8 + 6, 16)
    assert packing.real_tokens({"prompt_mask_bt": prompt_mask_bt}) == (5, 6)


def test_logged_tokens_per_position_is_the_batches_hand_count(tmp_path):
    """Each logged row's tokens_per_s / positions_per_s is its batch's real fraction."""
    steps = 4
    config = preset("sft", **{"train.steps": steps, "train.log_every": 1,
                              "train.eval_every": 100, "data.eval": ""})
    trainer = Trainer(config, str(tmp_path))
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    # The same batches again, from a fresh loader of the same config.
    tok = load_tokenizer(lineage.resolve_tokenizer(config).tokenizer)
    loader = get_stage("sft").build_data(config, tok, "train", process_index=0,
                                         process_count=1)
    it = loader.iterator()
    for row, host in zip(rows, itertools.islice(it, steps), strict=True):
        real, positions = packing.real_tokens(host)
        assert 0 < real < positions  # the test data is padded
        assert row["tokens_per_s"] / row["positions_per_s"] == pytest.approx(real / positions)
    it.close()
