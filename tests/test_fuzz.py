"""Property-based tests (hypothesis): hostile JSONL, configs and vocabularies.

Every generated case must either work (valid batches) or stop with the project's
own error naming the file, the line and the field (for data) or the key (for
configs) — never a deep traceback from a library, never a silent drop: with
``data.on_bad_record=skip`` the skip count equals the number of bad records.

Bad records are made by construction: a valid record plus one known mutation, so
the test knows which line is bad and which field its error must name.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from presets import preset

from jaxalign.config import MODEL_PRESETS
from jaxalign.data.loader import DataSettings, Loader, _EncodeIndex
from jaxalign.data.packing import batch_spec, batch_width, repad
from jaxalign.data.records import OverlongError, RecordError
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.train import Trainer

FUZZ = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: collections.Counter = collections.Counter()
TOK = load_tokenizer("builtin:world")
BATCH, MAX_LEN, MAX_PROMPT = 4, 32, 16


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print("\nfuzz cases tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items())))


# -- hostile text ----------------------------------------------------------------------

_ODD = ["", " ", "\x00", "\u2028\u2029", "\ufeff", "\x1b[31m", "<|im_end|>", "</s>", "<s>",
        "{{ 7 * 7 }}", "{% raw %}", "\r\n\t", "\u202e", "e\u0301", "🙂" * 3, "\U0010ffff"]
TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(_ODD),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=12),
    # Far longer than data.max_len: truncated, dropped or an overlong error.
    st.builds(lambda s, n: (s or "x") * n, st.text(min_size=1, max_size=3),
              st.integers(200, 3000)),
)
# A completion must hold something besides whitespace.
NONBLANK = st.builds(lambda t, c: t + c, TEXT, st.sampled_from("ab7✓中."))
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8)


def _msg(role, content):
    return {"role": role, "content": content}


@st.composite
def prompt_value(draw):
    """A prompt: a string or messages ending with a user turn."""
    if draw(st.booleans()):
        return draw(TEXT)
    turns = [_msg("system", draw(TEXT))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 2))):
        turns += [_msg("user", draw(TEXT)), _msg("assistant", draw(TEXT))]
    return turns + [_msg("user", draw(TEXT))]


@st.composite
def valid_record(draw, fmt):
    extra = {"meta": draw(JSON_VALUE)} if draw(st.booleans()) else {}
    if fmt == "sft" and draw(st.booleans()):
        turns = [_msg("system", draw(TEXT))] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 3))):
            turns += [_msg("user", draw(TEXT)), _msg("assistant", draw(NONBLANK))]
        return {"messages": turns, **extra}
    if fmt == "sft":
        key = draw(st.sampled_from(["response", "completion"]))
        return {"prompt": draw(prompt_value()), key: draw(NONBLANK), **extra}
    if fmt == "preference":
        chosen, rejected = draw(NONBLANK), draw(NONBLANK)
        return {"prompt": draw(prompt_value()), "chosen": chosen,
                "rejected": rejected if rejected != chosen else rejected + "!", **extra}
    return {"prompt": draw(prompt_value()), **draw(st.dictionaries(
        st.sampled_from(["answer", "kind", "id", "meta"]), JSON_VALUE, max_size=3))}


def _required(record, fmt):
    """The record's required fields (the ones a mutation may break)."""
    if "messages" in record:
        return ["messages"]
    if fmt == "sft":
        return ["prompt", "completion" if "completion" in record else "response"]
    return ["prompt", "chosen", "rejected"] if fmt == "preference" else ["prompt"]


WRONG = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def bad_record(draw, fmt):
    """A valid record with one mutation; returns ``(record, field its error must name)``."""
    record = draw(valid_record(fmt))
    fields = _required(record, fmt)
    field = draw(st.sampled_from(fields))
    kind = draw(st.sampled_from(["not_object", "missing", "wrong_type", "message", "blank",
                                 "surrogate", "special"]))
    if kind == "not_object":
        return draw(st.one_of(st.lists(JSON_VALUE, max_size=3), st.integers(), TEXT,
                              st.none())), "<record>"
    if kind == "missing":
        del record[field]
        # Without messages or prompt, an SFT record is reported as missing its messages;
        # without either completion key, as missing its response.
        if fmt == "sft" and field != "messages":
            return record, {"prompt": "messages"}.get(field, "response")
        return record, field
    if kind == "wrong_type":
        record[field] = draw(WRONG)
        return record, field
    value = record[field]
    if kind == "message" and isinstance(value, list):
        i = draw(st.integers(0, len(value) - 1))
        value[i] = draw(st.one_of(
            st.builds(lambda c: _msg("tool", c), TEXT),
            st.builds(lambda c: _msg(value[i]["role"], c), WRONG),
            st.just({"role": value[i]["role"]}), st.integers(), TEXT))
        return record, field
    if kind == "blank" and field not in ("prompt", "messages"):
        record[field] = draw(st.sampled_from(["", " ", "\n\t ", "\u3000"]))
        return record, field
    if kind == "surrogate":
        # A JSON "\ud800" escape decodes to a lone surrogate: no Unicode text at all.
        if isinstance(value, list):
            value[-1]["content"] += "\ud800"
        else:
            record[field] = value + "\udfff"
        return record, field
    # What is left is format-specific: an empty list, no assistant turn, no preference.
    if field in ("messages", "prompt") and draw(st.booleans()):
        record[field] = []
        return record, field
    if field == "messages":
        record[field] = [_msg("user", draw(TEXT))]
        return record, field
    if fmt == "preference":
        record["rejected"] = record["chosen"]
        return record, "rejected"
    record[field] = draw(WRONG)
    return record, field


# Lines that are no record at all, with the pseudo-field their error names.
BROKEN_LINES = st.one_of(
    st.tuples(st.sampled_from([b"\xff", b"\xc3(", b"\x80", b"\xed\xa0\x80", b"\xf8\x88\x80"]),
              st.just("<utf-8>")),
    st.tuples(st.sampled_from([b'{"prompt": "a', b"{'prompt': 'single'}", b"NaN?", b"[1, 2",
                               b'{"prompt": "raw\x01control"}', b'{"prompt": "x"} trailing',
                               b'{"prompt": "tab\tinside"}']), st.just("<json>")),
)


@st.composite
def jsonl_file(draw, fmt):
    """Lines of a JSONL file: ``[(bytes, field or None)]``; blank lines are no records."""
    lines = []
    for _ in range(draw(st.integers(1, 10))):
        choice = draw(st.sampled_from(["good", "good", "good", "bad", "broken", "blank"]))
        if choice == "blank":
            lines.append((draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])), None))
            continue
        if choice == "broken":
            raw, field = draw(BROKEN_LINES)
            lines.append((b'{"prompt": "' + raw + b'"}' if field == "<utf-8>" else raw, field))
            continue
        record, field = (draw(valid_record(fmt)), None) if choice == "good" else draw(
            bad_record(fmt))
        text = json.dumps(record, ensure_ascii=draw(st.booleans()))
        raw = text.encode("utf-8", "surrogatepass")
        # Written unescaped, a lone surrogate makes the line itself invalid UTF-8.
        lines.append((raw, "<utf-8>" if raw != text.encode("utf-8", "replace") else field))
    return lines


def _is_record(raw):
    return bool(raw.strip())


def _check_error(err, path, line, field):
    assert isinstance(err, RecordError), repr(err)
    assert (err.source, err.unit, err.index) == (f"jsonl:{path}", "line", line), str(err)
    assert str(err).startswith(f"jsonl:{path}, line {line}, field {err.field!r}: "), str(err)
    if field is not None:
        assert re.match(r"[^\[.]*", err.field).group() == field, (str(err), field)


def _check_batch(batch, fmt, widths):
    """A batch is cut to one of the loader's bucket widths and, widened to the full width,
    has exactly the full batch's shapes, dtypes and value ranges."""
    assert batch_width(batch) in widths, (batch_width(batch), widths)
    batch = repad(batch, widths[-1], fmt, TOK.pad_id)
    spec = batch_spec(fmt, BATCH, MAX_LEN, MAX_PROMPT)
    for key, (shape, dtype) in spec.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
        if key.endswith(("inputs_bt", "targets_bt", "tokens_bt")):
            assert ((batch[key] >= 0) & (batch[key] < TOK.vocab_size)).all(), key
        if key.endswith(("loss_mask_bt", "prompt_mask_bt")):
            assert np.isin(batch[key], (0, 1)).all(), key


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["sft", "preference", "prompt"])
@FUZZ
@given(data=st.data())
def test_hostile_jsonl_yields_batches_or_names_file_line_and_field(fmt, data):
    lines = data.draw(jsonl_file(fmt))
    policy = data.draw(st.sampled_from(["error", "skip"]))
    overlong = data.draw(st.sampled_from(
        ["error", "drop", "truncate_left"] + (["truncate_right"] if fmt != "prompt" else [])))
    TRIED[f"jsonl/{fmt}"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hostile.jsonl"
        path.write_bytes(b"".join(raw + b"\n" for raw, _ in lines))
        numbered = [(n, raw, field) for n, (raw, field) in enumerate(lines, 1) if _is_record(raw)]
        bad = [(n, field) for n, _, field in numbered if field is not None]
        TRIED["jsonl lines"] += len(numbered)
        TRIED["jsonl bad lines"] += len(bad)
        settings_ = DataSettings(source=f"jsonl:{path}", split="train", fmt=fmt,
                                 batch_size=BATCH, max_len=MAX_LEN, max_prompt_len=MAX_PROMPT,
                                 data_dir=str(Path(tmp) / "cache"), overlong=overlong,
                                 on_bad_record=policy)
        try:
            loader = Loader(settings_, TOK)
        except RecordError as e:
            assert policy == "error" and bad, str(e)
            _check_error(e, path, *bad[0])  # the first bad line, in file order
            TRIED["jsonl rejected naming the line"] += 1
            return
        except ValueError as e:
            if not numbered:
                assert str(e) == f"jsonl:{path}: no records: every line of {path} is blank"
                return
            assert policy == "skip" and len(bad) == len(numbered), str(e)
            assert f"no valid records ({len(bad)} skipped)" in str(e)
            return
        assert policy == "skip" or not bad
        TRIED["jsonl loaded, bad lines counted"] += bool(bad)
        # Nothing silent: every bad line is counted, every good one is kept.
        assert loader.num_invalid == len(bad) and loader.num_records == len(numbered) - len(bad)
        encode = _EncodeIndex(loader.source, loader.encoder)
        good_lines = [n for n, _, field in numbered if field is None]
        kept = 0
        for i, line in zip(loader.indices, good_lines, strict=True):
            try:
                example = encode(i)
            except OverlongError as e:
                assert overlong == "error"
                _check_error(e, path, line, None)
                continue
            assert not example.get("bad"), example  # validation and encoding agree
            kept += "dropped" not in example
        _check_batches(loader, fmt, kept, lambda e: str(e).startswith(f"jsonl:{path}, line "))


def _check_batches(loader, fmt, kept, overlong_ok):
    """Two batches are valid, or the loader says why there can be none."""
    it = loader.iterator()
    try:
        for _ in range(2):
            _check_batch(next(it), fmt, loader.batch_widths())
    except OverlongError as e:
        assert loader.settings.overlong == "error" and overlong_ok(e), str(e)
    except ValueError as e:
        assert kept == 0 and "no batch can be made" in str(e), str(e)
    finally:
        it.close()


@pytest.mark.parametrize("fmt", ["sft", "preference", "prompt"])
@FUZZ
@given(records=st.lists(st.one_of(
    JSON_VALUE, st.dictionaries(st.sampled_from(
        ["messages", "prompt", "response", "completion", "chosen", "rejected", "role",
         "content"]), JSON_VALUE, max_size=4)), min_size=1, max_size=8))
def test_random_json_values_are_records_or_record_errors(fmt, records):
    """Arbitrary JSON values: each is valid or a RecordError; skip counts them all."""
    TRIED[f"random-json/{fmt}"] += 1
    settings_ = DataSettings(source="fuzz", split="train", fmt=fmt, batch_size=BATCH,
                             max_len=MAX_LEN, max_prompt_len=MAX_PROMPT, overlong="drop",
                             on_bad_record="skip")
    try:
        loader = Loader(settings_, TOK, records=records)
    except ValueError as e:
        assert f"no valid records ({len(records)} skipped)" in str(e)
        return
    assert loader.num_records + loader.num_invalid == len(records)
    encode = _EncodeIndex(loader.source, loader.encoder)
    examples = [encode(i) for i in loader.indices]
    assert not any(e.get("bad") for e in examples)
    _check_batches(loader, fmt, sum("dropped" not in e for e in examples), lambda e: False)


# -- configs ---------------------------------------------------------------------------

class _ComputeStarted(Exception):
    """Raised where a run would start loading the tokenizer: the config passed all checks."""


INT_KEYS = ["train.steps", "train.batch_size", "train.micro_batches", "train.log_every",
            "train.eval_every", "data.max_len", "data.eval_batch_size", "data.pack_window",
            "checkpoint.save_every", "model.d_model", "model.n_layers", "model.n_heads",
            "model.vocab_size", "model.mlp_dim", "model.head_dim"]
MAYBE_ZERO = ["train.eval_batches", "data.max_prompt_len", "data.num_workers", "data.seed",
              "checkpoint.keep", "optim.warmup_steps"]
FLOAT_KEYS = ["optim.learning_rate", "optim.weight_decay", "optim.grad_clip_norm", "optim.eps"]


@st.composite
def bad_override(draw):
    """``(key, value)`` that no run can use: a wrong type, a negative size, a typo'd key."""
    kind = draw(st.sampled_from(["int", "zero", "float", "type", "unknown"]))
    if kind == "int":
        return draw(st.sampled_from(INT_KEYS)), draw(st.integers(max_value=0))
    if kind == "zero":
        return draw(st.sampled_from(MAYBE_ZERO)), draw(st.integers(max_value=-1))
    if kind == "float":
        return draw(st.sampled_from(FLOAT_KEYS)), draw(
            st.floats(max_value=-1e-12) | st.just(math.nan))
    if kind == "type":
        return draw(st.sampled_from(INT_KEYS + FLOAT_KEYS)), draw(
            st.none() | st.booleans() | st.text(max_size=5) | st.lists(st.integers(), max_size=2))
    section = draw(st.sampled_from(["train", "data", "optim", "checkpoint", "metrics"]))
    key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
    assume(key not in preset("sft")[section])
    return f"{section}.{key}", draw(st.integers() | st.text(max_size=4))


@FUZZ
@given(override=bad_override())
def test_bad_configs_fail_clearly_before_any_compute(override):
    key, value = override
    TRIED["config"] += 1
    section, leaf = key.split(".")
    unknown = leaf not in preset("sft")[section]
    try:
        config = preset("sft", **{key: value})
    except (TypeError, ValueError) as e:
        # ml_collections refuses a value of another type, naming the field.
        assert repr(leaf) in str(e), str(e)
        return
    with tempfile.TemporaryDirectory() as tmp, mock.patch(
            "jaxalign.train.load_tokenizer", side_effect=_ComputeStarted):
        with pytest.raises((ValueError, TypeError)) as err:
            Trainer(config, tmp)
    message = str(err.value)
    if unknown:
        assert f"unknown key {key}" in message, message
    else:
        assert key in message, message
    assert len(message) < 600, message


def test_unknown_key_in_a_config_file_suggests_the_right_one():
    config = preset("sft", **{"train.stpes": 5, "data.max_lne": 7})
    with pytest.raises(ValueError, match=r"invalid config: unknown key data.max_lne \(did you "
                                         r"mean data.max_len\?\); unknown key train.stpes "
                                         r"\(did you mean train.steps\?\)"):
        Trainer(config, "unused")


# -- vocabularies ----------------------------------------------------------------------

@FUZZ
@given(vocab=st.integers(1, 2 * TOK.vocab_size))
def test_tokenizer_larger_than_model_vocab_fails_before_any_compute(vocab):
    TRIED["vocab"] += 1
    config = preset("sft", **{"model.vocab_size": vocab, "data.eval": ""})
    started = contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as tmp, mock.patch(
            "jaxalign.train.init_from.check_hf_tokenizer", side_effect=_ComputeStarted):
        if vocab < TOK.vocab_size:
            started = pytest.raises(ValueError, match=(
                rf"tokenizer builtin:world has vocab_size {TOK.vocab_size}, more than the model "
                rf"vocab_size {vocab}: ids up to {TOK.vocab_size - 1} would index past the "
                "embedding"))
        else:
            started = pytest.raises(_ComputeStarted)
        with started:
            Trainer(config, tmp)


def test_model_presets_cover_the_tokenizer():
    assert MODEL_PRESETS["tiny"]["vocab_size"] >= TOK.vocab_size
