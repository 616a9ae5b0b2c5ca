"""The loader: padded and packed SFT batches, preference/unpaired/prompt batches,
process shards, epochs, eval batches, truncation policies and exact resume."""

from __future__ import annotations

import collections
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_tokenizer_files import hf_tokenizer
from test_chat import HF_GEMMA

from jaxalign import losses
from jaxalign.config import model_config
from jaxalign.data.builtin import load_builtin
from jaxalign.data.chat import get_template
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.packing import best_fit_decreasing, make_rows
from jaxalign.data.records import OverlongError, RecordError
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.models.transformer import Transformer, TransformerConfig

SEQ_KEYS = ("inputs_bt", "targets_bt", "loss_mask_bt", "segment_ids_bt", "positions_bt")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:world")


@pytest.fixture(scope="module")
def world_train():
    return load_builtin("world", "train")


def _make(tok, records, process_index=0, process_count=1, **kw):
    settings = DataSettings(**{"source": "test", "split": "train", "fmt": "sft",
                               "batch_size": 4, "max_len": 24, "shuffle": False, **kw})
    return Loader(settings, tok, records=records, process_index=process_index,
                  process_count=process_count)


def _small(n):
    # Same-length records with distinct, decodable responses.
    return [{"prompt": f"Say {i:02d}", "response": f"n{i:02d}"} for i in range(n)]


def _segments(tok, batch):
    """Decoded trained text of every segment of a sequence batch, row by row."""
    out = []
    for r in range(batch["segment_ids_bt"].shape[0]):
        seg = batch["segment_ids_bt"][r]
        for s in range(1, seg.max() + 1):
            sel = (seg == s) & (batch["loss_mask_bt"][r] == 1)
            out.append(tok.decode(batch["targets_bt"][r][sel]))
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k


# --- padded rows ----------------------------------------------------------------------


def test_padded_rows_are_shifted_records(tok):
    records = [{"prompt": "What is 2 + 3?", "response": "5"},
               {"messages": [{"role": "system", "content": "Answer briefly."},
                             {"role": "user", "content": "Uppercase: cat"},
                             {"role": "assistant", "content": "CAT"},
                             {"role": "user", "content": "Reverse the word: cat"},
                             {"role": "assistant", "content": "tac"}]}]
    batch = next(_make(tok, records, batch_size=2, max_len=56).iterator())
    template = get_template("plain", tok)
    for r, record in enumerate(records):
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant",
                                               "content": record["response"]}]
        ids, mask = template.encode_conversation(messages)
        n = len(ids) - 1
        np.testing.assert_array_equal(batch["inputs_bt"][r, :n], ids[:-1])
        np.testing.assert_array_equal(batch["targets_bt"][r, :n], ids[1:])
        np.testing.assert_array_equal(batch["loss_mask_bt"][r, :n], mask[1:])
        np.testing.assert_array_equal(batch["segment_ids_bt"][r], [1] * n + [0] * (56 - n))
        np.testing.assert_array_equal(batch["positions_bt"][r], [*range(n)] + [0] * (56 - n))
        assert (batch["inputs_bt"][r, n:] == tok.pad_id).all()
        assert (batch["loss_mask_bt"][r, n:] == 0).all()
    assert _segments(tok, batch) == ["5", "CATtac"]
    assert batch["loss_mask_bt"].dtype == np.float32 and batch["inputs_bt"].dtype == np.int32


# --- packing --------------------------------------------------------------------------


def test_best_fit_decreasing_golden_and_properties():
    # Worked by hand: 6, 5, 4 open rows; 3 fits the 5's row exactly, the next 3 the 4's
    # row, 2 the 6's row, 1 the 4's row.
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1, 6], 8) == [[6, 4], [0, 2], [1, 3, 5]]
    rng = random.Random(0)
    for _ in range(20):
        lengths = [min(int(rng.paretovariate(1.2) * 8), 128) for _ in range(300)]
        rows = best_fit_decreasing(lengths, 128)
        assert sorted(i for row in rows for i in row) == list(range(300))
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
        # Never more rows than first-fit decreasing's 11/9 OPT + 6/9 bound allows.
        assert len(rows) <= 11 / 9 * (sum(lengths) / 128) + 1 + 6 / 9
    with pytest.raises(ValueError, match="item 1 has length 9"):
        best_fit_decreasing([3, 9], 8)


def _tiny_model():
    cfg = TransformerConfig.from_mapping(model_config("tiny"))
    return Transformer(cfg, rngs=nnx.Rngs(params=0))


def test_packed_loss_equals_padded_loss(tok, world_train):
    """Same records, packed vs one per row: equal loss, token accuracy and per-token log-probs."""
    unique = list({json.dumps(r, sort_keys=True): r for r in world_train}.values())
    records = [r for r in unique if r["kind"] == "multi_turn"][:6] + unique[:18]
    padded_loader = _make(tok, records, batch_size=24, max_len=96)
    # The same batch shape both ways, so the model compiles once.
    packed_loader = _make(tok, records, batch_size=24, max_len=96, pack=True, pack_window=24)
    padded = next(iter(padded_loader.eval_batches()))
    packed = next(iter(packed_loader.eval_batches()))
    assert (packed["segment_ids_bt"].max(axis=1) > 1).sum() >= 4  # really packed
    assert sorted(_segments(tok, packed)) == sorted(_segments(tok, padded))
    model = _tiny_model()
    forward = jax.jit(lambda *args: model(*args))

    def logits_of(batch):
        return forward(*(jnp.asarray(batch[k]) for k in ("inputs_bt", "positions_bt",
                                                        "segment_ids_bt")))

    def loss(batch):
        logits = logits_of(batch)
        targets, mask = jnp.asarray(batch["targets_bt"]), jnp.asarray(batch["loss_mask_bt"])
        stats = losses.token_stats(logits, targets, with_hits=True)
        count = jnp.sum(mask)
        nll = -jnp.sum(stats["logps_bt"] * mask)
        return float(nll / count), float(count), float(jnp.sum(stats["hits_bt"] * mask))

    (pad_loss, pad_count, pad_hits), (pack_loss, pack_count, pack_hits) = loss(padded), loss(
        packed)
    assert pack_count == pad_count == padded["loss_mask_bt"].sum()
    np.testing.assert_allclose(pack_loss, pad_loss, rtol=0, atol=1e-5)
    assert pack_hits == pad_hits

    # Per token: each segment's log-probs equal those of its record alone.
    def logps(batch):
        return np.asarray(losses.token_logps(logits_of(batch), jnp.asarray(batch["targets_bt"])))

    def by_segment(batch, lp):
        out = []
        for r in range(len(lp)):
            for s in range(1, batch["segment_ids_bt"][r].max() + 1):
                sel = batch["segment_ids_bt"][r] == s
                out.append((batch["targets_bt"][r][sel].tolist(), lp[r][sel]))
        return sorted(out, key=lambda x: x[0])

    pad_lp, pack_lp = by_segment(padded, logps(padded)), by_segment(packed, logps(packed))
    assert len(pad_lp) == len(pack_lp) == 24
    for (pad_key, pad), (pack_key, pack) in zip(pad_lp, pack_lp, strict=True):
        assert pad_key == pack_key
        np.testing.assert_allclose(pack, pad, rtol=0, atol=1e-5)


def test_packing_efficiency_on_skewed_data(tok, world_train):
    encoder = _make(tok, world_train[:2000], max_len=160).encoder
    lengths = [len(encoder(r, _loc(i))["ids"]) - 1 for i, r in enumerate(world_train[:2000])]
    assert np.percentile(lengths, 99) > 4 * np.median(lengths)  # length-skewed
    effs = {}
    for pack in (False, True):
        it = _make(tok, world_train, batch_size=16, max_len=160, pack=pack, shuffle=True,
                   pack_window=512, buckets="max_len").iterator()
        for _ in range(40):
            next(it)
        effs[pack] = it.metrics()["data_packing_efficiency"]
    assert effs[False] < 0.2 and effs[True] >= 0.9, effs


def _loc(i):
    from jaxalign.data.records import Location

    return Location("t", i)


@pytest.mark.parametrize("pack", [False, True])
def test_epochs_cover_every_record_once(tok, pack):
    # 48 records of one length, two per packed row: an epoch is exactly 3 batches of 8 rows
    # (packed) or 6 batches of 8 (padded), and each epoch is a new permutation.
    records = _small(48)
    assert len({len(get_template("plain", tok).encode_conversation(
        [{"role": "user", "content": r["prompt"]},
         {"role": "assistant", "content": r["response"]}])[0]) for r in records}) == 1
    n = len(get_template("plain", tok).encode_conversation(
        [{"role": "user", "content": "Say 00"}, {"role": "assistant", "content": "n00"}])[0])
    loader = _make(tok, records, batch_size=8, max_len=2 * (n - 1), pack=pack, shuffle=True,
                   pack_window=48)
    it = loader.iterator()
    per_epoch = 3 if pack else 6
    epochs = [sum((_segments(tok, next(it)) for _ in range(per_epoch)), []) for _ in range(3)]
    want = sorted(r["response"] for r in records)
    for order in epochs:
        assert sorted(order) == want
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != [r["response"] for r in records]


def test_no_shuffle_keeps_record_order_across_epochs(tok):
    it = _make(tok, _small(6), shuffle=False).iterator()
    got = sum((_segments(tok, next(it)) for _ in range(3)), [])
    assert got == [f"n{i:02d}" for i in [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]]


def test_seed_changes_the_order(tok):
    a = _segments(tok, next(_make(tok, _small(40), shuffle=True, seed=0).iterator()))
    b = _segments(tok, next(_make(tok, _small(40), shuffle=True, seed=1).iterator()))
    c = _segments(tok, next(_make(tok, _small(40), shuffle=True, seed=0).iterator()))
    assert a == c and a != b


# --- processes ------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_global_batch(tok, process_count):
    records = _small(29)
    whole = _make(tok, records, batch_size=8, shuffle=True, buckets="max_len").iterator()
    parts = [_make(tok, records, p, process_count, batch_size=8, shuffle=True,
                   buckets="max_len").iterator() for p in range(process_count)]
    for _ in range(6):  # crosses epoch boundaries (29 records)
        want = next(whole)
        got = [next(p) for p in parts]
        assert all(g["inputs_bt"].shape == (8 // process_count, 24) for g in got)
        for key in SEQ_KEYS:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_packed_processes_read_disjoint_shares(tok):
    records = _small(48)
    n = len(get_template("plain", tok).encode_conversation(
        [{"role": "user", "content": "Say 00"}, {"role": "assistant", "content": "n00"}])[0])
    parts = [_make(tok, records, p, 2, batch_size=8, max_len=2 * (n - 1), pack=True,
                   shuffle=True, pack_window=24).iterator() for p in range(2)]
    seen = [sum((_segments(tok, next(it)) for _ in range(3)), []) for it in parts]
    # One epoch: 24 records per process, 2 per row, 4 rows per local batch -> 3 batches.
    assert len(seen[0]) == len(seen[1]) == 24
    assert sorted(seen[0] + seen[1]) == sorted(r["response"] for r in records)


@pytest.mark.parametrize("process_count, pack", [(1, False), (2, False), (2, True)])
def test_eval_batches_cover_every_record_once(tok, process_count, pack):
    records = _small(21)
    parts = [_make(tok, records, p, process_count, batch_size=8, pack=pack, buckets="max_len")
             for p in range(process_count)]
    batches = [list(p.eval_batches()) for p in parts]
    assert len({len(b) for b in batches}) == 1  # every process runs the same eval steps
    seen = []
    for per_process in zip(*batches, strict=True):
        for b in per_process:
            assert b["inputs_bt"].shape == (8 // process_count, 24)
            empty = b["segment_ids_bt"].max(axis=1) == 0
            assert (b["loss_mask_bt"][empty] == 0).all()
            assert (b["inputs_bt"][empty] == tok.pad_id).all()
            seen += _segments(tok, b)
    want = [r["response"] for r in records]
    assert (sorted(seen) if pack else seen) == (sorted(want) if pack else want)
    if not pack:
        assert len(batches[0]) == 3  # 21 records in batches of 8; the last one padded


# --- exact resume ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact(tok, world_train, workers):
    """Batches after a restore equal those of the uninterrupted run (like with like)."""
    kw = dict(batch_size=8, max_len=64, pack=True, pack_window=40, shuffle=True, seed=3,
              overlong="truncate_left", num_workers=workers)
    records = world_train[:600]
    full_it = _make(tok, records, **kw).iterator()
    full = [next(full_it) for _ in range(12)]
    full_metrics = full_it.metrics()
    full_it.close()

    first = _make(tok, records, **kw).iterator()
    for want in full[:5]:
        _same(next(first), want)
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    assert state["grain"]
    first.close()
    resumed = _make(tok, records, **kw).iterator()
    resumed.set_state(state)
    for want in full[5:]:
        _same(next(resumed), want)
    assert resumed.metrics() == full_metrics
    assert full_metrics["data_truncated"] > 0 and full_metrics["data_records"] >= 12 * 8
    resumed.close()


def test_foreign_data_state_is_refused(tok):
    it = _make(tok, _small(4)).iterator()
    with pytest.raises(ValueError, match=r"\['batch_index'\] was not written by this data "
                                         "pipeline"):
        it.set_state({"batch_index": 3})


# --- truncation and bad records -------------------------------------------------------


def test_overlong_policies(tok):
    long_prompt = {"prompt": "word " * 30, "response": "the end"}
    long_answer = {"prompt": "hi", "response": "word " * 30}
    ok = _small(3)
    with pytest.raises(OverlongError, match=r"test, record 1, field 'response': needs \d+ ids "
                                            r"but at most 25 fit \(data.max_len=24\)"):
        next(_make(tok, [ok[0], long_prompt, *ok[1:]], on_bad_record="skip").iterator())

    # One record per batch: the counts then follow the records exactly.
    records = [long_prompt, long_answer, *ok]
    it = _make(tok, records, batch_size=1, overlong="truncate_left").iterator()
    batch = next(it)
    # The prompt lost ids from the left (after bos); the response is intact.
    assert batch["inputs_bt"][0, 0] == tok.bos_id and batch["segment_ids_bt"][0].all()
    assert _segments(tok, batch) == ["the end"]
    assert _segments(tok, next(it)) == ["n00"]  # the long answer cannot lose its prompt
    m = it.metrics()
    assert (m["data_records"], m["data_truncated"], m["data_dropped"]) == (3, 1, 1)

    it = _make(tok, records, batch_size=1, overlong="truncate_right").iterator()
    segs = _segments(tok, next(it))  # the long prompt leaves no room: dropped
    assert segs[0].startswith("word word") and len(segs[0]) < len(long_answer["response"])
    m = it.metrics()
    assert (m["data_records"], m["data_truncated"], m["data_dropped"]) == (2, 1, 1)

    it = _make(tok, records, batch_size=1, overlong="drop").iterator()
    assert _segments(tok, next(it)) == ["n00"]
    m = it.metrics()
    assert (m["data_records"], m["data_truncated"], m["data_dropped"]) == (3, 0, 2)


def test_template_errors_are_skipped_and_counted():
    tok = hf_tokenizer("gemma", chat_template=HF_GEMMA)
    system = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    records = [{"prompt": "q1", "response": "a1"}, system, {"prompt": "q2", "response": "a2"}]
    with pytest.raises(RecordError, match=r"test, record 1, field 'messages': chat template "
                                          r"'tokenizer' failed: TemplateError: System role"):
        next(_make(tok, records, batch_size=2, max_len=32).iterator())
    it = _make(tok, records, batch_size=2, max_len=32, on_bad_record="skip").iterator()
    assert _segments(tok, next(it)) == ["a1", "a2"]
    assert it.metrics()["data_invalid_skipped"] == 1


def test_settings_errors(tok):
    with pytest.raises(ValueError, match="data.pack does not apply to 'prompt' batches"):
        _make(tok, _small(2), fmt="prompt", pack=True)
    with pytest.raises(ValueError, match="data.overlong must be one of"):
        _make(tok, _small(2), overlong="skip")
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _make(tok, _small(2), 0, 3, batch_size=4)
    with pytest.raises(ValueError, match="no valid records"):
        _make(tok, [{"prompt": 1}], on_bad_record="skip")


# --- other stages ---------------------------------------------------------------------


def test_preference_batches_share_the_prompt(tok):
    pairs = load_builtin("world", "preference")[:4]
    loader = _make(tok, pairs, fmt="preference", batch_size=4, max_len=64)
    batch = next(loader.iterator())
    template = get_template("plain", tok)
    for r, pair in enumerate(pairs):
        prompt = template.encode_prompt([{"role": "user", "content": pair["prompt"]}])
        n = len(prompt) - 1
        for side in ("chosen", "rejected"):
            np.testing.assert_array_equal(batch[f"{side}_inputs_bt"][r, :n + 1], prompt)
            mask = batch[f"{side}_loss_mask_bt"][r]
            assert not mask[:n].any() and mask[n] == 1
            trained = batch[f"{side}_targets_bt"][r][mask == 1]
            assert tok.decode(trained) == pair[side] and trained[-1] == tok.eos_id
    assert set(batch) == {f"{s}_{k}" for s in ("chosen", "rejected") for k in SEQ_KEYS}


def test_unpaired_batches_carry_labels(tok):
    records = load_builtin("world", "kto")[:4]
    batch = next(_make(tok, records, fmt="unpaired", batch_size=4, max_len=64).iterator())
    np.testing.assert_array_equal(batch["label_b"], [1, 0, 1, 0])
    assert [tok.decode(batch["targets_bt"][r][batch["loss_mask_bt"][r] == 1])
            for r in range(4)] == [r["completion"] for r in records]


def test_prompt_batches_are_left_padded_with_extras(tok):
    records = load_builtin("world", "rl")[:3] + [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is 2 + 2?"}], "answer": "4", "id": 7}]
    loader = _make(tok, records, fmt="prompt", batch_size=4, max_len=64, max_prompt_len=40)
    batch = next(loader.iterator())
    template = get_template("plain", tok)
    for r, record in enumerate(records):
        prompt = record["prompt"]
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = template.encode_prompt(messages)
        np.testing.assert_array_equal(batch["prompt_tokens_bt"][r, 40 - len(ids):], ids)
        assert (batch["prompt_tokens_bt"][r, :40 - len(ids)] == tok.pad_id).all()
        np.testing.assert_array_equal(batch["prompt_mask_bt"][r],
                                      [0] * (40 - len(ids)) + [1] * len(ids))
        np.testing.assert_array_equal(batch["prompt_positions_bt"][r, 40 - len(ids):],
                                      np.arange(len(ids)))
        assert batch["extras"][r] == {k: v for k, v in record.items() if k != "prompt"}
    assert batch["extras"][3] == {"answer": "4", "id": 7}
    assert tok.decode(batch["prompt_tokens_bt"][3][batch["prompt_mask_bt"][3] == 1]).endswith(
        "Assistant: ")
    spec = loader.batch_spec()
    assert spec["prompt_tokens_bt"] == ((4, 40), np.dtype(np.int32)) and "extras" not in spec


def test_make_rows_keeps_examples_whole(tok, world_train):
    loader = _make(tok, world_train[:300], max_len=128, overlong="drop")
    examples = [loader.encoder(r, _loc(i)) for i, r in enumerate(world_train[:300])]
    examples = [e for e in examples if "dropped" not in e]
    rows = make_rows(examples, 128, pack=True)
    assert sum(len(r) for r in rows) == len(examples)
    assert all(sum(len(e["ids"]) - 1 for e in row) <= 128 for row in rows)
    counts = collections.Counter(id(e) for row in rows for e in row)
    assert set(counts.values()) == {1}


@pytest.mark.slow
def test_trainer_logs_packing_and_resumes_packed(tmp_path):
    """The trainer checkpoints the iterator state: a packed run resumes exactly."""
    import shutil

    from configs import sft as sft_config
    from jaxalign.metrics import read_jsonl
    from jaxalign.train import Trainer

    config = sft_config.get_config("test")
    config.unlock()
    config.train.steps = 4
    config.train.log_every = 1
    config.checkpoint.save_every = 2
    config.data.eval = ""
    config.data.train = "builtin:world"
    config.data.max_len = 96
    config.data.overlong = "truncate_left"
    config.data.pack = True
    config.data.pack_window = 64
    config.lock()

    def run():
        trainer = Trainer(config, str(tmp_path))
        trainer.fit()
        trainer.close()
        return [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]

    full = run()
    # Lose the last checkpoint: the rerun restores step 2 (params and data position).
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    resumed = run()
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["data_records"] for r in resumed] == [r["data_records"] for r in full]
    assert full[-1]["data_packing_efficiency"] > 0.85
    assert full[-1]["data_records"] >= 4 * 32 and full[-1]["data_dropped"] == 0
