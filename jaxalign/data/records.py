"""Record formats per stage, validated into one normal form before anything is tokenized.

* ``sft`` -> ``Conversation``: ``{"messages": [...]}``, or ``{"prompt": str | messages,
  "response": str}`` (``"completion"`` is accepted for ``"response"``);
* ``preference`` -> ``PreferencePair``: ``{"prompt": ..., "chosen": ..., "rejected": ...}``;
* ``unpaired`` -> ``UnpairedExample``: ``{"prompt": ..., "completion": str, "label": bool}``;
* ``prompt`` -> ``PromptExample``: ``{"prompt": ..., **extra fields}``, or an SFT
  ``{"messages": [...]}`` chat: the turns before its last assistant turn are the prompt,
  that turn's text is carried as ``response``.

A completion may also be given as a one-message list ``[{"role": "assistant",
"content": str}]`` (the conversational form TRL writes). Every problem raises a
``RecordError`` naming the source, the record's line or index, and the field, e.g.
``jsonl:data.jsonl, line 7, field 'messages[2].role': unknown role 'tool'``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("sft", "preference", "unpaired", "prompt")
Message = dict[str, str]


class RecordError(ValueError):
    """A record that cannot be used, located by source, line or index, and field."""

    def __init__(self, source: str, index: int, field: str, detail: str, unit: str = "record"):
        self.source = source
        self.index = index
        self.field = field
        self.detail = detail
        self.unit = unit
        super().__init__(
            f"{source or '<records>'}, {unit} {index}, field {field!r}: {detail}")

    def __reduce__(self):
        # Keeps the error picklable (e.g. across data-loader worker processes) despite
        # the custom constructor.
        return type(self), (self.source, self.index, self.field, self.detail, self.unit)

    @property
    def reason(self) -> str:
        """The location-free part, used to group skipped records by cause."""
        return f"field {self.field!r}: {self.detail}"


class OverlongError(RecordError):
    """A valid record longer than the configured length (``data.overlong="error"``)."""


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a record lives, for error messages: ``<source>, <unit> <index>``.

    ``aliases`` (stage field -> source column, from a field mapping) makes errors name
    the column as the source spells it.
    """

    source: str
    index: int
    unit: str = "record"
    aliases: Mapping[str, str] | None = None

    def error(self, field: str, detail: str,
              cls: type[RecordError] = RecordError) -> RecordError:
        """The ``RecordError`` (or subclass ``cls``) for ``field`` of this record."""
        root = re.match(r"[^\[.]*", field).group()
        if self.aliases and root in self.aliases:
            field = self.aliases[root] + field[len(root):]
            detail += f" (the source column mapped to {root!r} by data.fields)"
        return cls(self.source, self.index, field, detail, self.unit)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """SFT: messages with at least one non-empty assistant turn.

    ``field`` is the record field holding the trained text, for messages.
    """

    messages: tuple[Message, ...]
    field: str = "messages"


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """Prompt messages (ending with a user turn) and two completions."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """Prompt messages, one completion and whether it is desirable."""

    prompt: tuple[Message, ...]
    completion: str
    label: bool


@dataclasses.dataclass(frozen=True)
class PromptExample:
    """Prompt messages plus every other field of the record (e.g. a reference answer)."""

    prompt: tuple[Message, ...]
    extras: dict[str, Any]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _unicode(value: str, field: str, loc: Location) -> str:
    # A JSON "\ud800" escape decodes to a lone surrogate, which is no Unicode text:
    # tokenizers fail on it with messages that name neither the record nor the field.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise loc.error(field, f"holds a lone surrogate ({value[e.start]!r} at character "
                            f"{e.start + 1}), which is not valid Unicode text") from None
    return value


def _messages(value: Any, field: str, loc: Location) -> tuple[Message, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise loc.error(field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise loc.error(field, "is an empty list")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise loc.error(where, f"expected a message object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise loc.error(f"{where}.{key}", "missing")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise loc.error(f"{where}.role", f"unknown role {role!r} (expected one of {ROLES})")
        if not isinstance(content, str):
            raise loc.error(f"{where}.content", f"expected str, got {_type_name(content)}")
        _unicode(content, f"{where}.content", loc)
        if role == "system" and i:
            raise loc.error(f"{where}.role", "only the first message may be a system message")
        out.append({"role": role, "content": content})
    return tuple(out)


def _text(record: Mapping[str, Any], field: str, loc: Location, *, allow_empty: bool) -> str:
    if field not in record:
        raise loc.error(field, f"missing (record has {sorted(record)})")
    value = record[field]
    if not isinstance(value, str):
        raise loc.error(field, f"expected str, got {_type_name(value)}")
    _unicode(value, field, loc)
    if not allow_empty and not value.strip():
        raise loc.error(field, "is empty (an empty completion teaches nothing)")
    return value


def _prompt(record: Mapping[str, Any], loc: Location) -> tuple[Message, ...]:
    if "prompt" not in record:
        raise loc.error("prompt", f"missing (record has {sorted(record)})")
    value = record["prompt"]
    if isinstance(value, str):
        return ({"role": "user", "content": _unicode(value, "prompt", loc)},)
    messages = _messages(value, "prompt", loc)
    if messages[-1]["role"] != "user":
        raise loc.error(f"prompt[{len(messages) - 1}].role",
                        f"a prompt must end with a user message, got {messages[-1]['role']!r}")
    return messages


def _completion(record: Mapping[str, Any], field: str, loc: Location) -> str:
    value = record.get(field)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        messages = _messages(value, field, loc)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise loc.error(field, "a completion list must hold exactly one assistant message")
        value = messages[0]["content"]
        if not value.strip():
            raise loc.error(f"{field}[0].content", "is empty (an empty completion teaches "
                            "nothing)")
        return value
    return _text(record, field, loc, allow_empty=False)


def _check_object(record: Any, loc: Location) -> None:
    if not isinstance(record, Mapping):
        raise loc.error("<record>", f"expected an object, got {_type_name(record)}")


def validate_sft(record: Any, loc: Location) -> Conversation:
    """Validates an SFT record (``messages``, or ``prompt`` + ``response``/``completion``)."""
    _check_object(record, loc)
    if "messages" in record:
        if "prompt" in record:
            raise loc.error("prompt", "a record has either 'messages' or 'prompt', not both")
        messages = _messages(record["messages"], "messages", loc)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise loc.error("messages", "no assistant turn (nothing to train on)")
        for i in turns:
            if not messages[i]["content"].strip():
                raise loc.error(f"messages[{i}].content",
                                "is empty (an empty completion teaches nothing)")
        return Conversation(messages)
    if "prompt" not in record:
        raise loc.error("messages", f"missing: an SFT record needs 'messages' or 'prompt' + "
                        f"'response' (record has {sorted(record)})")
    field = "completion" if "completion" in record and "response" not in record else "response"
    prompt = _prompt(record, loc)
    return Conversation(prompt + ({"role": "assistant",
                                   "content": _completion(record, field, loc)},), field)


def validate_preference(record: Any, loc: Location) -> PreferencePair:
    """Validates a preference record (``prompt``, ``chosen``, ``rejected``)."""
    _check_object(record, loc)
    prompt = _prompt(record, loc)
    chosen = _completion(record, "chosen", loc)
    rejected = _completion(record, "rejected", loc)
    if chosen == rejected:
        raise loc.error("rejected", "is identical to 'chosen' (the pair carries no preference)")
    return PreferencePair(prompt, chosen, rejected)


def validate_unpaired(record: Any, loc: Location) -> UnpairedExample:
    """Validates an unpaired (KTO-style) record (``prompt``, ``completion``, ``label``)."""
    _check_object(record, loc)
    prompt = _prompt(record, loc)
    completion = _completion(record, "completion", loc)
    if "label" not in record:
        raise loc.error("label", f"missing (record has {sorted(record)})")
    label = record["label"]
    if not isinstance(label, bool):
        raise loc.error("label", f"expected true or false, got {_type_name(label)}")
    return UnpairedExample(prompt, completion, label)


def validate_prompt(record: Any, loc: Location) -> PromptExample:
    """Validates a prompt-only record; every field but ``prompt`` is carried along.

    An SFT chat (``messages``) is a prompt too: everything before its last assistant turn,
    with that turn's text as the ``response`` extra (on-policy distillation samples the
    student on the prompts of SFT data).
    """
    _check_object(record, loc)
    if "messages" in record and "prompt" not in record:
        messages = validate_sft(record, loc).messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0 or messages[last - 1]["role"] != "user":
            raise loc.error(f"messages[{last}]", "the last assistant turn must follow a user "
                            "turn to give a prompt")
        extras = {k: v for k, v in record.items() if k != "messages"}
        return PromptExample(tuple(messages[:last]),
                             {**extras, "response": messages[last]["content"]})
    prompt = _prompt(record, loc)
    return PromptExample(prompt, {k: v for k, v in record.items() if k != "prompt"})


VALIDATORS = {
    "sft": validate_sft,
    "preference": validate_preference,
    "unpaired": validate_unpaired,
    "prompt": validate_prompt,
}


def validate(record: Any, fmt: str, loc: Location):
    """Validates ``record`` as format ``fmt``; returns its normal form.

    Raises:
      ValueError: for an unknown format.
      RecordError: naming ``loc`` and the offending field.
    """
    if fmt not in VALIDATORS:
        raise ValueError(f"unknown record format {fmt!r}; known: {FORMATS}")
    return VALIDATORS[fmt](record, loc)
