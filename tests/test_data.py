"""Tests of the data layer: builtin datasets, tokenizer, sources and SFT batching."""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from jaxalign.data import builtin
from jaxalign.data.pipeline import (
    ASSISTANT_PREFIX,
    USER_PREFIX,
    RecordError,
    SFTBatches,
    encode_sft,
)
from jaxalign.data.sources import load_records
from jaxalign.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
)

SOURCE = "builtin:tasks"
GOLDEN = [
    ("What is 22 + 12?", "34"),
    ("First letter of: pasta", "p"),
    ("What is 3 + 83?", "86"),
    ("How many l in cattle?", "1"),
    ("Last letter of: fruit", "t"),
    ("Reverse the word: seven", "neves"),
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(SOURCE)


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return builtin.load_builtin("tasks", "train")


@pytest.fixture(scope="module")
def evals() -> list[dict]:
    return builtin.load_builtin("tasks", "eval")


def _small(n: int) -> list[dict]:
    # Distinct responses make every example identifiable from its arrays.
    return [{"prompt": f"Say {i}", "response": f"n{i}"} for i in range(n)]


# --- builtin datasets -------------------------------------------------------------------


def _expected_answer(prompt: str) -> tuple[str, str]:
    """Recomputes a prompt's task and answer from its text alone."""
    ops = {"+": ("addition", operator.add), "-": ("subtraction", operator.sub)}
    ops["*"] = ("multiplication", operator.mul)
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
        task, fn = ops[m[2]]
        return task, str(fn(int(m[1]), int(m[3])))
    if m := re.fullmatch(r"How many ([a-z]) in ([a-z]+)\?", prompt):
        return "count_letter", str(sum(c == m[1] for c in m[2]))
    word_tasks = {
        "Reverse the word": ("reverse", lambda w: "".join(reversed(w))),
        "Uppercase": ("uppercase", lambda w: "".join(chr(ord(c) - 32) for c in w)),
        "Sort the letters": ("sort_letters", lambda w: "".join(sorted(w))),
        "First letter of": ("first_letter", lambda w: w[:1]),
        "Last letter of": ("last_letter", lambda w: w[-1:]),
    }
    m = re.fullmatch(r"([A-Za-z ]+): ([a-z]+)", prompt)
    assert m and m[1] in word_tasks, prompt
    task, fn = word_tasks[m[1]]
    return task, fn(m[2])


def test_builtin_is_deterministic(train, evals):
    assert builtin.load_builtin("tasks", "train") == train
    assert builtin.load_builtin("tasks", "eval") == evals
    # Pinned fingerprint: any change to the generator changes the data (and then the
    # shipped tokenizer must be regenerated too).
    digest = hashlib.sha256(json.dumps(evals, sort_keys=True).encode()).hexdigest()
    assert digest[:16] == "4273f93d9ee084b6", digest


def test_builtin_golden_records(train, evals):
    # Pinned records catch generators that differ between machines or Python versions.
    got = [(r["prompt"], r["answer"]) for r in train[:3] + evals[:3]]
    assert got == GOLDEN


@pytest.mark.parametrize("split", ["train", "eval"])
def test_builtin_answers_are_correct(split, train, evals):
    records = train if split == "train" else evals
    for r in records:
        assert set(r) == {"prompt", "response", "answer", "task"}
        assert r["answer"] == r["response"]
        assert (r["task"], r["answer"]) == _expected_answer(r["prompt"]), r
        assert len(r["prompt"]) <= 40
    tasks = {r["task"] for r in records}
    assert tasks == set(builtin.TASKS)


def test_builtin_splits_sizes_and_disjoint(train, evals):
    assert len(train) == 20000
    assert len(evals) == 512
    eval_prompts = [r["prompt"] for r in evals]
    assert len(set(eval_prompts)) == len(eval_prompts)
    assert not set(eval_prompts) & {r["prompt"] for r in train}


def test_builtin_unknown_name_or_split():
    with pytest.raises(ValueError, match=r"'nope'.*\['tasks'\]"):
        builtin.load_builtin("nope", "train")
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'eval'\]"):
        builtin.load_builtin("tasks", "test")


def test_word_list_is_clean():
    assert len(builtin.WORDS) >= 200
    assert len(set(builtin.WORDS)) == len(builtin.WORDS)
    assert all(re.fullmatch(r"[a-z]{3,8}", w) for w in builtin.WORDS)


# --- sources ----------------------------------------------------------------------------


def test_load_records_builtin(evals):
    assert load_records(SOURCE, "eval") == evals


@pytest.mark.parametrize("source", ["jsonl:/tmp/x.jsonl", "tasks", "builtin:", "hf:foo"])
def test_load_records_unsupported(source):
    with pytest.raises(ValueError) as err:
        load_records(source, "train")
    assert repr(source) in str(err.value)
    assert "'builtin:'" in str(err.value)


# --- tokenizer --------------------------------------------------------------------------


def test_shipped_tokenizer_special_ids(tok):
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size == 384
    asset = Path(builtin.__file__).parent / "assets" / "tasks.model"
    assert asset.stat().st_size < 300_000
    # Loading by path gives the same tokenizer as the builtin spec.
    by_path = load_tokenizer(str(asset))
    assert by_path.vocab_size == tok.vocab_size
    assert by_path.encode("What is 1 + 2?") == tok.encode("What is 1 + 2?")


def test_tokenizer_round_trip(tok, train, evals):
    for r in train[:3000] + evals:
        prompt = USER_PREFIX + r["prompt"] + ASSISTANT_PREFIX
        assert tok.decode(tok.encode(prompt)) == prompt
        assert tok.decode(tok.encode(r["response"])) == r["response"]
    # Unseen characters go through byte fallback instead of <unk>.
    text = "Ünïcødé ✓ {tabs}\t"
    assert tok.decode(tok.encode(text)) == text
    assert 1 not in tok.encode(text)


def test_tokenizer_splits_digits(tok):
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.decode([i]) for i in ids] == list("12345")


def test_shipped_tokenizer_is_reproducible(tmp_path):
    out = tmp_path / "tasks.model"
    builtin.train_builtin_tokenizer(str(out), "tasks")
    shipped = Path(builtin.__file__).parent / "assets" / "tasks.model"
    assert out.read_bytes() == shipped.read_bytes(), "run: python -m jaxalign.data.builtin"


def test_load_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer("builtin:nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        SentencePieceTokenizer(missing)
    other = tmp_path / "tok.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_tokenizer(str(other))


def test_check_vocab(tok):
    check_vocab(tok, 384)
    check_vocab(tok, 512)
    with pytest.raises(ValueError, match=r"384.*383|383.*384"):
        check_vocab(tok, 383)


# --- encoding one record ----------------------------------------------------------------


def test_encode_sft_masks_exactly_the_response(tok, evals):
    for index, r in enumerate(evals[:64]):
        ex = encode_sft(r, tok, 48, source=SOURCE, index=index)
        assert set(ex) == {"inputs_t", "targets_t", "loss_mask_t", "segment_ids_t", "positions_t"}
        assert all(v.shape == (48,) for v in ex.values())
        assert ex["loss_mask_t"].dtype == np.float32
        assert all(ex[k].dtype == np.int32 for k in ex if k != "loss_mask_t")
        prompt_ids = tok.encode(USER_PREFIX + r["prompt"] + ASSISTANT_PREFIX)
        response_ids = tok.encode(r["response"])
        n = 1 + len(prompt_ids) + len(response_ids)  # ids minus the one lost to shifting
        full = [tok.bos_id, *prompt_ids, *response_ids, tok.eos_id]
        np.testing.assert_array_equal(ex["inputs_t"][:n], full[:-1])
        np.testing.assert_array_equal(ex["targets_t"][:n], full[1:])
        masked = ex["targets_t"][ex["loss_mask_t"] == 1].tolist()
        assert masked == response_ids + [tok.eos_id]
        assert tok.decode(masked) == r["response"]
        assert ex["loss_mask_t"][: len(prompt_ids)].sum() == 0
        # Padding: pad ids, no loss, segment 0, position 0.
        for key in ("inputs_t", "targets_t"):
            assert (ex[key][n:] == tok.pad_id).all()
        assert (ex["loss_mask_t"][n:] == 0).all()
        np.testing.assert_array_equal(ex["segment_ids_t"], [1] * n + [0] * (48 - n))
        np.testing.assert_array_equal(ex["positions_t"], list(range(n)) + [0] * (48 - n))


def test_train_split_fits_in_48_tokens(tok, train):
    data = SFTBatches(train, tok, max_len=47, global_batch_size=8, seed=0, source=SOURCE)
    assert data.num_skipped == 0
    assert data.num_examples == len(train)


@pytest.mark.parametrize(
    "record, field",
    [
        ({"response": "x"}, "prompt"),
        ({"prompt": "x"}, "response"),
        ({"prompt": 3, "response": "x"}, "prompt"),
        ({"prompt": "x", "response": None}, "response"),
        ({"prompt": "x", "response": ""}, "response"),
        ({"prompt": "x", "response": "  "}, "response"),
        (["prompt", "response"], "<record>"),
    ],
)
def test_record_error_names_source_index_field(tok, record, field):
    with pytest.raises(RecordError) as err:
        encode_sft(record, tok, 32, source="jsonl:data.jsonl", index=17)
    msg = str(err.value)
    assert "jsonl:data.jsonl" in msg and "17" in msg and repr(field) in msg
    assert (err.value.source, err.value.index, err.value.field) == ("jsonl:data.jsonl", 17, field)
    assert isinstance(err.value, ValueError)
    assert str(pickle.loads(pickle.dumps(err.value))) == msg


def test_record_error_from_batches_names_the_index(tok):
    records = _small(5)
    del records[3]["response"]
    with pytest.raises(RecordError, match=r"src, record 3, field 'response'"):
        SFTBatches(records, tok, max_len=16, global_batch_size=2, seed=0, source="src")


def test_overlong_policies(tok):
    record = {"prompt": "p", "response": "the quick brown fox jumps over the lazy dog"}
    prompt_ids = tok.encode(USER_PREFIX + "p" + ASSISTANT_PREFIX)
    n_ids = 2 + len(prompt_ids) + len(tok.encode(record["response"]))  # with bos and eos
    max_len = n_ids - 3
    with pytest.raises(RecordError) as err:
        encode_sft(record, tok, max_len, source="s", index=4)
    msg = str(err.value)
    assert "field 'response'" in msg and str(n_ids) in msg and f"max_len={max_len}" in msg
    assert encode_sft(record, tok, max_len, source="s", index=4, overlong="skip") is None
    # Exactly max_len + 1 ids fit without truncation.
    assert encode_sft(record, tok, n_ids - 1, source="s", index=4) is not None

    ex = encode_sft(record, tok, max_len, source="s", index=4, overlong="truncate")
    full = encode_sft(record, tok, 200, source="s", index=4)
    for key in ex:
        np.testing.assert_array_equal(ex[key], full[key][:max_len])
    assert ex["segment_ids_t"].all() and ex["loss_mask_t"].sum() > 0
    # Truncation that would leave no response token is a skip.
    long_prompt = {"prompt": "word " * 40, "response": "x"}
    assert encode_sft(long_prompt, tok, 20, source="s", index=0, overlong="truncate") is None
    with pytest.raises(ValueError, match="overlong"):
        encode_sft(record, tok, max_len, source="s", index=0, overlong="drop")


@pytest.mark.parametrize("overlong, kept", [("skip", [0, 1, 2, 3]), ("truncate", [0, 1, 2, 3, 4])])
def test_batches_count_and_log_skips(tok, caplog, overlong, kept):
    records = _small(4) + [
        {"prompt": "p", "response": "a long response " * 10},
        {"prompt": "a long prompt " * 10, "response": "y"},  # too long even to truncate
    ]
    with caplog.at_level(logging.WARNING):
        data = SFTBatches(
            records, tok, max_len=16, global_batch_size=2, seed=0, source="mysrc", overlong=overlong
        )
    np.testing.assert_array_equal(data.record_indices, kept)
    assert data.num_examples == len(kept)
    assert data.num_skipped == 6 - len(kept)
    assert f"mysrc: skipped {6 - len(kept)} of 6" in caplog.text
    assert data.num_truncated == (overlong == "truncate")
    if overlong == "truncate":
        assert "mysrc: truncated 1 of 6" in caplog.text


# --- batching ---------------------------------------------------------------------------


def _batches(tok, records, **kw) -> SFTBatches:
    kw = {"max_len": 16, "global_batch_size": 8, "seed": 0, "source": "t", **kw}
    return SFTBatches(records, tok, **kw)


def _assert_rows_match_records(tok, data, records, batch, idx):
    for row, i in enumerate(idx):
        ex = encode_sft(records[i], tok, data.max_len, source="t", index=int(i))
        for key, value in ex.items():
            np.testing.assert_array_equal(batch[key[:-2] + "_bt"][row], value)


def test_batch_is_a_pure_function_of_seed_and_index(tok):
    records = _small(37)
    a, b = _batches(tok, records), _batches(tok, records)
    later = [a.batch(i) for i in (9, 3, 0)]
    for got, i in zip(later, (9, 3, 0), strict=True):
        want = b.batch(i)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) for k in got)
    assert all(v.shape == (8, 16) for v in later[0].values())
    c = _batches(tok, records, seed=1)
    assert not np.array_equal(a.batch_indices(0), c.batch_indices(0))
    # Resuming at step 5 sees what an uninterrupted run sees at step 5.
    resumed = next(a.iterate(start=5))
    assert all(np.array_equal(resumed[k], b.batch(5)[k]) for k in resumed)
    _assert_rows_match_records(tok, a, records, a.batch(4), a.batch_indices(4))


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_global_batch(tok, process_count):
    records = _small(29)
    whole = _batches(tok, records)
    parts = [
        _batches(tok, records, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    for i in (0, 3, 7):
        want = whole.batch(i)
        got = [p.batch(i) for p in parts]
        assert all(g["inputs_bt"].shape == (8 // process_count, 16) for g in got)
        for key in want:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
    evals = list(zip(*(p.eval_batches() for p in parts), strict=True))
    assert len(evals) == whole.num_eval_batches == 4
    for got_eval, want_eval in zip(evals, whole.eval_batches(), strict=True):
        for key in want_eval:
            cat = np.concatenate([g[key] for g in got_eval])
            np.testing.assert_array_equal(cat, want_eval[key])


def test_batch_size_must_divide_among_processes(tok):
    with pytest.raises(ValueError, match=r"10.*3"):
        _batches(tok, _small(4), global_batch_size=10, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        _batches(tok, _small(4), process_index=2, process_count=2)


@pytest.mark.parametrize("n", [40, 43])
def test_epochs_cover_every_example_once(tok, n):
    records = _small(n)
    data = _batches(tok, records)
    assert data.num_examples == n
    assert data.batches_per_epoch == n // 8
    n_batches = 4 * n // 8 + 1
    stream = np.concatenate([data.batch_indices(i) for i in range(n_batches)])
    epochs = [stream[e * n : (e + 1) * n] for e in range(4)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert not all(np.array_equal(epochs[0], other) for other in epochs[1:])
    assert not np.array_equal(epochs[0], np.arange(n))
    # Content follows the indices, including across the epoch boundary of n = 43.
    i = n // 8
    _assert_rows_match_records(tok, data, records, data.batch(i), data.batch_indices(i))


def test_no_shuffle_keeps_record_order(tok):
    data = _batches(tok, _small(12), shuffle=False)
    np.testing.assert_array_equal(data.batch_indices(0), range(8))
    np.testing.assert_array_equal(data.batch_indices(1), [8, 9, 10, 11, 0, 1, 2, 3])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(tok, process_count):
    records = _small(21)
    parts = [
        _batches(tok, records, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    order = []
    for j, batches in enumerate(zip(*(p.eval_batches() for p in parts), strict=True)):
        for data, batch in zip(parts, batches, strict=True):
            assert all(v.shape == (8 // process_count, 16) for v in batch.values())
            idx = data.eval_batch_indices(j)
            real = idx >= 0
            np.testing.assert_array_equal(batch["segment_ids_bt"].any(axis=1), real)
            rows = {k: v[real] for k, v in batch.items()}
            _assert_rows_match_records(tok, data, records, rows, idx[real])
            # Padding rows carry no loss and no tokens.
            assert (batch["loss_mask_bt"][~real] == 0).all()
            assert (batch["segment_ids_bt"][~real] == 0).all()
            assert (batch["inputs_bt"][~real] == tok.pad_id).all()
            assert (batch["targets_bt"][~real] == tok.pad_id).all()
            order.extend(idx.tolist())
    assert parts[0].num_eval_batches == 3
    # Every example once, in record order, then padding up to the static shape.
    assert order == list(range(21)) + [-1] * 3
