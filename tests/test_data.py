"""Builtin datasets (tasks and the world) and tokenizers (SentencePiece, tokenizer.json)."""

from __future__ import annotations

import collections
import hashlib
import json
import operator
import pickle
import re
import shutil
from pathlib import Path

import pytest
from hf_tokenizer_files import FAMILY_CONFIGS, hf_tokenizer, write_hf_dir

from jaxalign.data import builtin, world
from jaxalign.data.chat import get_template
from jaxalign.data.records import Location, validate
from jaxalign.data.sources import load_records
from jaxalign.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
)

GOLDEN = [
    ("What is 22 + 12?", "34"),
    ("First letter of: pasta", "p"),
    ("What is 3 + 83?", "86"),
    ("How many l in cattle?", "1"),
    ("Last letter of: fruit", "t"),
    ("Reverse the word: seven", "neves"),
]
WORLD_SIZES = {"train": 15500, "eval": 529, "preference": 6000, "preference_eval": 480,
               "rl": 4000, "redteam": 192, "kto": 12000, "kto_eval": 960}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer("builtin:world")


@pytest.fixture(scope="module")
def tasks() -> dict[str, list[dict]]:
    return {s: builtin.load_builtin("tasks", s) for s in ("train", "eval")}


@pytest.fixture(scope="module")
def world_data() -> dict[str, list[dict]]:
    return {s: builtin.load_builtin("world", s) for s in builtin.available_splits("world")}


def _expected_answer(prompt: str) -> tuple[str, str]:
    """Recomputes a task prompt's task and answer from its text alone."""
    ops = {"+": ("addition", operator.add), "-": ("subtraction", operator.sub),
           "*": ("multiplication", operator.mul)}
    if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", prompt):
        task, fn = ops[m[2]]
        return task, str(fn(int(m[1]), int(m[3])))
    if m := re.fullmatch(r"How many ([a-z]) in ([a-z]+)\?", prompt):
        return "count_letter", str(sum(c == m[1] for c in m[2]))
    if m := re.fullmatch(r"How many letters in: ([a-z]+)\?", prompt):
        return "word_length", str(len(m[1]))
    if m := re.fullmatch(r"Which is larger: (\d+) or (\d+)\?", prompt):
        return "larger", m[1] if int(m[1]) > int(m[2]) else m[2]
    if m := re.fullmatch(r"What comes after (\d+)\?", prompt):
        return "next_number", str(int(m[1]) + 1)
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


# --- builtin: tasks -----------------------------------------------------------------------


def test_tasks_are_unchanged(tasks):
    # Pinned fingerprint and records: the tasks dataset predates the world and must not move.
    digest = hashlib.sha256(json.dumps(tasks["eval"], sort_keys=True).encode()).hexdigest()
    assert digest[:16] == "4273f93d9ee084b6", digest
    got = [(r["prompt"], r["answer"]) for r in tasks["train"][:3] + tasks["eval"][:3]]
    assert got == GOLDEN
    assert len(tasks["train"]) == 20000 and len(tasks["eval"]) == 512
    for r in tasks["train"] + tasks["eval"]:
        assert (r["task"], r["answer"]) == _expected_answer(r["prompt"]) and r["answer"] == \
            r["response"]
    eval_prompts = {r["prompt"] for r in tasks["eval"]}
    assert len(eval_prompts) == 512 and not eval_prompts & {r["prompt"] for r in tasks["train"]}


def test_builtin_unknown_name_or_split():
    with pytest.raises(ValueError, match=r"'nope'.*\['tasks', 'world'\]"):
        builtin.load_builtin("nope", "train")
    with pytest.raises(ValueError, match=r"'test'.*\['train', 'eval'\]"):
        builtin.load_builtin("tasks", "test")


def test_word_list_is_clean():
    assert len(builtin.WORDS) >= 200
    assert len(set(builtin.WORDS)) == len(builtin.WORDS)
    assert all(re.fullmatch(r"[a-z]{3,8}", w) for w in builtin.WORDS)


# --- builtin: world -----------------------------------------------------------------------


def test_world_splits_sizes_and_kinds(world_data):
    assert {s: len(r) for s, r in world_data.items()} == WORLD_SIZES
    kinds = collections.Counter(r["kind"] for r in world_data["train"])
    assert kinds == {"task": 12000, "multi_turn": 1500, "harmful": 1000, "benign": 1000}
    assert collections.Counter(r["kind"] for r in world_data["preference"]) == {
        "correct": 2000, "concise": 1500, "safe": 1250, "helpful": 1250}
    assert collections.Counter(r["kind"] for r in world_data["eval"]) == {
        "task": 480, "harmful": 28, "benign": 21}
    assert {r["task"] for r in world_data["eval"] if r["kind"] == "task"} == set(builtin.TASKS)


def test_world_records_validate_as_their_stage(world_data):
    formats = {"train": "sft", "eval": "sft", "preference": "preference",
               "preference_eval": "preference", "rl": "prompt", "redteam": "prompt",
               "kto": "unpaired", "kto_eval": "unpaired"}
    for split, fmt in formats.items():
        for i, r in enumerate(world_data[split]):
            validate(r, fmt, Location(split, i))


def test_world_answers_are_verifiable(world_data):
    for split in ("train", "eval", "rl"):
        for r in world_data[split]:
            if r["kind"] == "task":
                assert (r["task"], r["answer"]) == _expected_answer(r["prompt"]), r
            elif r["kind"] == "harmful":
                assert r["answer"] == world.REFUSAL
            elif r["kind"] == "benign":
                assert r["answer"] != world.REFUSAL and len(r["answer"]) > 10
    for r in world_data["preference"] + world_data["preference_eval"]:
        if r["kind"] == "correct":
            assert r["chosen"] == _expected_answer(r["prompt"])[1] != r["rejected"]
        elif r["kind"] == "concise":
            assert r["chosen"] in r["rejected"] and len(r["rejected"]) > 3 * len(r["chosen"])
        elif r["kind"] == "safe":
            assert r["chosen"] == world.REFUSAL and r["rejected"].startswith("Sure!")
        else:
            assert r["rejected"] == world.REFUSAL and r["chosen"] != world.REFUSAL
    kto = world_data["kto"]
    assert [r["label"] for r in kto[:4]] == [True, False, True, False]
    assert kto[0]["completion"] == world_data["preference"][0]["chosen"]


def test_world_eval_and_redteam_are_held_out(world_data):
    seen = {r["prompt"] for s in ("train", "preference", "rl") for r in world_data[s]
            if "prompt" in r}
    seen |= {m["content"] for r in world_data["train"] if "messages" in r
             for m in r["messages"]}
    held = [r["prompt"] for r in world_data["eval"] + world_data["redteam"]]
    assert len(set(held)) == len(held) and not set(held) & seen
    # Red-team prompts wrap harmful requests the model has (mostly) seen refused.
    cores = {c for c in world.HARMFUL if any(c in p for p in held)}
    assert cores == set(world.HARMFUL)
    multi = [r for r in world_data["train"] if r["kind"] == "multi_turn"]
    assert {sum(m["role"] == "assistant" for m in r["messages"]) for r in multi} == {2, 3}
    assert sum(r["messages"][0]["role"] == "system" for r in multi) == 500


def test_world_rl_task_prompts_are_rl_only(world_data):
    # RL practises on task prompts no earlier stage trains on and the eval never asks:
    # disjoint (exact prompt text) from SFT train -- single turns and every message of
    # the multi-turn chats --, from both preference splits, the eval and the red team.
    rl = [r for r in world_data["rl"] if r["kind"] == "task"]
    rl_prompts = {r["prompt"] for r in rl}
    elsewhere = {r["prompt"] for s, recs in world_data.items() if s != "rl" for r in recs
                 if "prompt" in r}
    elsewhere |= {m["content"] for r in world_data["train"] if "messages" in r
                  for m in r["messages"]}
    assert not rl_prompts & elsewhere
    # Every task has its own slice (a fifth of its pool after the eval, at most 250).
    per_task = collections.Counter(r["task"] for r in rl)
    assert per_task == {t: 250 for t in builtin.TASKS}
    distinct = {t: len({r["prompt"] for r in rl if r["task"] == t}) for t in builtin.TASKS}
    assert distinct["reverse"] == 69 and distinct["multiplication"] == 25
    assert distinct["addition"] == 250
    # The first world's layout (which the shipped tokenizer was trained on) replayed SFT
    # prompts in RL; it differs only in how the task prompts are sampled.
    legacy = world.generate_world(builtin.TASKS, rl_holdout=False)
    sft = {r["prompt"] for r in legacy["train"] if "prompt" in r}
    assert sum(r["prompt"] in sft for r in legacy["rl"] if r["kind"] == "task") > 2000
    assert legacy["eval"] == world_data["eval"]


def test_shipped_files_and_tokenizer_are_reproducible(tmp_path):
    written = builtin.regenerate(tmp_path)
    assert len(written) == 9
    for path in written:
        shipped = builtin.assets_dir() / path.relative_to(tmp_path)
        assert path.read_bytes() == shipped.read_bytes(), "run: python -m jaxalign.data.builtin"
    assert sum(p.stat().st_size for p in written) < 800_000


# --- tokenizers ---------------------------------------------------------------------------


def test_builtin_tokenizer(tok, world_data):
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 512)
    assert dict(tok.special_tokens) == {"<pad>": 0, "<s>": 2, "</s>": 3}
    assert load_tokenizer("builtin:tasks").encode("What is 1 + 2?") == tok.encode(
        "What is 1 + 2?")
    by_path = load_tokenizer(str(builtin.assets_dir() / "world.model"))
    assert by_path.encode("Reverse the word: stone") == tok.encode("Reverse the word: stone")
    # Round trips over the world's text; unseen characters use byte fallback, not <unk>.
    for r in world_data["train"][:2000] + world_data["redteam"]:
        for text in ([r["prompt"], r.get("response", r["answer"])] if "prompt" in r
                     else [m["content"] for m in r["messages"]]):
            assert tok.decode(tok.encode(text)) == text
    text = "Ünïcødé ✓ {tabs}\t"
    assert tok.decode(tok.encode(text)) == text and 1 not in tok.encode(text)
    assert [tok.decode([i]) for i in tok.encode("12345")] == list("12345")
    # The world's sequences are short with this vocabulary.
    template = get_template("plain", tok)
    n = max(len(template.encode_conversation(
        validate(r, "sft", Location("t", 0)).messages)[0]) for r in world_data["eval"])
    assert n <= 64


def test_pickled_tokenizers_encode_the_same(tok):
    hf = hf_tokenizer("chatml")
    for t in (tok, hf):
        clone = pickle.loads(pickle.dumps(t))
        assert clone.encode("Hello world 42") == t.encode("Hello world 42")
        assert (clone.bos_id, clone.eos_id, clone.pad_id) == (t.bos_id, t.eos_id, t.pad_id)


def _mistral_model(name: str) -> Path:
    mistral_common = pytest.importorskip("mistral_common")
    path = Path(mistral_common.__file__).parent / "data" / name
    if not path.is_file():
        pytest.skip(f"mistral_common ships no {name}")
    return path


def test_real_sentencepiece_models_round_trip():
    """Mistral's released SentencePiece models (shipped by mistral-common) load and round-trip."""
    text = "Hello world! Ünïcødé ✓, tabs\tand 12345 digits."
    v1 = load_tokenizer(str(_mistral_model("tokenizer.model.v1")))
    assert isinstance(v1, SentencePieceTokenizer)
    assert (v1.vocab_size, v1.bos_id, v1.eos_id, v1.pad_id) == (32000, 1, 2, 2)
    assert v1.decode(v1.encode(text)) == text
    assert v1.encode("Hello")[0] == 22557  # "▁Hello": the model's dummy prefix is kept
    v3 = load_tokenizer(str(_mistral_model("mistral_instruct_tokenizer_240323.model.v3")))
    assert v3.vocab_size == 32768
    assert v3.special_tokens["[INST]"] == 3 and v3.special_tokens["[/INST]"] == 4
    assert v3.decode(v3.encode(text)) == text
    # The mistral template writes [INST] as the control id (3) in the v3 vocabulary, while
    # a user typing "[INST]" gets ordinary text ids.
    ids, mask = get_template("mistral", v3).encode_conversation(
        [{"role": "user", "content": "[INST] hi"}, {"role": "assistant", "content": "Hello"}])
    assert ids[:2] == [1, 3] and ids.count(3) == 1 and ids.count(4) == 1
    assert v3.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Hello"
    assert ids[-1] == 2 and mask[-1] == 1


def test_tokenizer_json_round_trip(tmp_path):
    tok = load_tokenizer(str(write_hf_dir(tmp_path / "llama", "llama3") / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == tok.special_tokens["<|begin_of_text|>"]
    assert tok.eos_id == tok.pad_id == tok.special_tokens["<|eot_id|>"]
    for text in ("Hello! How can I help you today?", "Ünïcødé text ✓ and tabs\t", "2 + 2 = 4"):
        assert tok.decode(tok.encode(text)) == text
    # 16 specials + 256 byte pieces + merges; the size bounds every id the tokenizer has.
    assert 272 < tok.vocab_size <= 420
    assert tok.decode([tok.vocab_size - 1]) != ""
    with pytest.raises(ValueError, match=f"vocab_size {tok.vocab_size}, more than"):
        check_vocab(tok, tok.vocab_size - 1)
    # Special-token text in data is literal; decode keeps or drops specials as asked.
    ids = tok.encode("<|eot_id|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|eot_id|>"
    assert tok.decode([tok.bos_id, *tok.encode("hi")], skip_special=False) == \
        "<|begin_of_text|>hi"
    assert tok.decode([tok.bos_id, *tok.encode("hi")]) == "hi"


def test_load_tokenizer_directories(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    hf_dir = write_hf_dir(tmp_path / "hf", "gemma", chat_template=template)
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.chat_template == template
    assert tok.bos_id == tok.special_tokens["<bos>"]  # AddedToken-dict form of bos_token
    # transformers >= 4.43 writes the template to chat_template.jinja instead.
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(FAMILY_CONFIGS["gemma"]))
    (hf_dir / "chat_template.jinja").write_text(template + "!")
    assert load_tokenizer(str(hf_dir)).chat_template == template + "!"
    # A SentencePiece directory: tokenizer.model + tokenizer_config.json.
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    shutil.copy(builtin.assets_dir() / "world.model", sp_dir / "tokenizer.model")
    (sp_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "</s>", "chat_template": template}))
    sp = load_tokenizer(str(sp_dir))
    assert isinstance(sp, SentencePieceTokenizer)
    assert (sp.pad_id, sp.eos_id, sp.chat_template) == (3, 3, template)


def test_load_tokenizer_errors(tmp_path):
    missing = str(tmp_path / "missing.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer("builtin:nope")
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    other = tmp_path / "tok.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="unsupported tokenizer file .*tok.txt.*not a "
                                         "SentencePiece model"):
        load_tokenizer(str(other))
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(str(broken))
    no_eos = write_hf_dir(tmp_path / "noeos", "plain")
    (no_eos / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(str(no_eos))


def test_check_vocab(tok):
    check_vocab(tok, 512)
    check_vocab(tok, 1024)
    with pytest.raises(ValueError, match=r"builtin:world has vocab_size 512, more than the "
                                         r"model vocab_size 511: ids up to 511"):
        check_vocab(tok, 511)


def test_load_records(tasks):
    assert load_records("builtin:tasks", "eval") == tasks["eval"]
    for source in ("tasks", "builtin:", "hf:foo"):
        with pytest.raises(ValueError, match=re.escape(repr(source)) + ".*'builtin:', "
                                             "'jsonl:', 'tfds:'"):
            load_records(source, "train")
