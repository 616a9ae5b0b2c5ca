"""Validated records -> token examples, one per record, with the overlong policy applied.

An example is a small dict of numpy arrays (cheap to pass between loader processes):

* ``sft`` / ``unpaired``: ``ids`` [n] and ``mask`` [n] (1 = a trained id) for one
  sequence of at most ``max_len + 1`` ids (shifting turns n ids into n - 1 positions);
  ``unpaired`` adds ``label``.
* ``preference``: ``prompt``, ``chosen``, ``rejected`` id arrays; the prompt is
  tokenized once and shared by both completions.
* ``prompt``: ``prompt`` ids (at most ``max_prompt_len``) and the record's ``extras``.

Every example carries ``truncated`` (bool). A record the policy drops, or (under
``on_bad_record="skip"``) one the chat template rejects, becomes ``{"dropped": reason}``
so that the batcher can count it.

Overlong policies: ``error`` raises a ``RecordError``; ``truncate_left`` removes prompt
ids from the left (after bos) until the sequence fits, dropping the record if even the
last assistant turn alone does not fit; ``truncate_right`` cuts completions at the end;
``drop`` drops the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign.data import records as rec
from jaxalign.data.chat import ChatTemplate, get_template
from jaxalign.data.tokenizer import Tokenizer

OVERLONG_POLICIES = ("error", "truncate_left", "truncate_right", "drop")
BAD_RECORD_POLICIES = ("error", "skip")
Example = dict[str, Any]


def _ids(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def dropped(reason: str, bad: bool = False) -> Example:
    """The marker for a record that yields no example."""
    return {"dropped": reason, "bad": bad}


class Encoder:
    """Turns one record of a source into an example (picklable for loader workers)."""

    def __init__(self, fmt: str, tokenizer: Tokenizer, *, template: str, max_len: int,
                 max_prompt_len: int = 0, overlong: str = "error",
                 on_bad_record: str = "error"):
        """Checks the settings and binds the chat template.

        Args:
          fmt: ``sft``, ``preference``, ``unpaired`` or ``prompt``.
          tokenizer: the tokenizer.
          template: a chat template name or path (see ``chat.get_template``).
          max_len: positions per sequence (a sequence holds up to ``max_len + 1`` ids).
          max_prompt_len: ids per prompt-only example (0 = ``max_len``).
          overlong: one of ``OVERLONG_POLICIES``.
          on_bad_record: ``error`` or ``skip``.

        Raises:
          ValueError: for unknown names or a policy that does not apply to ``fmt``.
        """
        if fmt not in rec.FORMATS:
            raise ValueError(f"unknown record format {fmt!r}; known: {rec.FORMATS}")
        if overlong not in OVERLONG_POLICIES:
            raise ValueError(f"data.overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, got "
                             f"{on_bad_record!r}")
        if fmt == "prompt" and overlong == "truncate_right":
            raise ValueError("data.overlong='truncate_right' cuts completions; prompt-only "
                             "batches have none (use truncate_left, drop or error)")
        if max_len < 1:
            raise ValueError(f"data.max_len must be positive, got {max_len}")
        self.fmt = fmt
        self.tokenizer = tokenizer
        self.template_name = template
        self.max_len = max_len
        self.max_prompt_len = max_prompt_len or max_len
        self.overlong = overlong
        self.on_bad_record = on_bad_record
        self._template: ChatTemplate | None = None
        self.template  # noqa: B018 - fail fast on a template the tokenizer cannot render

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = get_template(self.template_name, self.tokenizer)
        return self._template

    def __getstate__(self) -> dict[str, Any]:
        # The Jinja environment does not pickle; workers rebuild the template.
        return {**self.__dict__, "_template": None}

    def __call__(self, record: Any, loc: rec.Location) -> Example:
        """Validates and encodes one record.

        Raises:
          RecordError: for an invalid record (or one the template rejects) under
            ``on_bad_record="error"``, or an overlong one under ``overlong="error"``.
        """
        try:
            normal = rec.validate(record, self.fmt, loc)
            encode = getattr(self, f"_encode_{self.fmt}")
            return encode(normal, loc)
        except rec.OverlongError:
            raise
        except rec.RecordError as e:
            if self.on_bad_record == "skip":
                return dropped(e.reason, bad=True)
            raise

    def _template_error(self, loc: rec.Location, field: str, e: Exception) -> rec.RecordError:
        return loc.error(field, f"chat template {self.template.name!r} failed: "
                         f"{type(e).__name__}: {e}")

    def _nothing_trained(self, loc: rec.Location, field: str) -> rec.RecordError:
        # A template that drops the assistant text (or renders nothing) would otherwise
        # give examples without a single trained id: silently useless data.
        return loc.error(field, f"chat template {self.template.name!r} rendered no trained "
                         "token for it (its output lacks the assistant text)")

    def _overlong(self, loc: rec.Location, field: str, n: int, cap: int) -> rec.RecordError:
        return loc.error(field, f"needs {n} ids but at most {cap} fit (data.max_len="
                         f"{self.max_len}); set data.overlong to truncate_left, "
                         "truncate_right or drop to allow this", rec.OverlongError)

    # -- single sequence -----------------------------------------------------------

    def _fit_sequence(self, ids: list[int], mask: list[int], loc: rec.Location,
                      field: str) -> Example:
        if not any(mask):
            raise self._nothing_trained(loc, field)
        cap = self.max_len + 1
        if len(ids) <= cap:
            return {"ids": _ids(ids), "mask": np.asarray(mask, np.int8), "truncated": False}
        if self.overlong == "error":
            raise self._overlong(loc, field, len(ids), cap)
        if self.overlong == "drop":
            return dropped(f"longer than data.max_len={self.max_len}")
        if self.overlong == "truncate_right":
            if not any(mask[1:cap]):
                return dropped("no completion id left after truncate_right")
            return {"ids": _ids(ids[:cap]), "mask": np.asarray(mask[:cap], np.int8),
                    "truncated": True}
        # truncate_left: keep bos and cut ids after it, never into the last assistant turn.
        keep_bos = int(self.tokenizer.bos_id is not None and ids[0] == self.tokenizer.bos_id)
        final_start = max(i for i, m in enumerate(mask) if m)
        while final_start > 0 and mask[final_start - 1]:
            final_start -= 1
        cut = len(ids) - cap
        if keep_bos + cut >= final_start:  # at least one prompt id must remain
            return dropped("the last assistant turn alone is longer than data.max_len after "
                           "truncate_left")
        new_ids = ids[:keep_bos] + ids[keep_bos + cut:]
        new_mask = mask[:keep_bos] + mask[keep_bos + cut:]
        return {"ids": _ids(new_ids), "mask": np.asarray(new_mask, np.int8), "truncated": True}

    def _encode_sft(self, conv: rec.Conversation, loc: rec.Location) -> Example:
        try:
            ids, mask = self.template.encode_conversation(conv.messages)
        except Exception as e:  # Jinja raise_exception and friends
            raise self._template_error(loc, conv.field, e) from None
        return self._fit_sequence(ids, mask, loc, conv.field)

    def _encode_unpaired(self, ex: rec.UnpairedExample, loc: rec.Location) -> Example:
        try:
            ids, mask = self.template.encode_conversation(
                [*ex.prompt, {"role": "assistant", "content": ex.completion}])
        except Exception as e:
            raise self._template_error(loc, "completion", e) from None
        out = self._fit_sequence(ids, mask, loc, "completion")
        if "dropped" not in out:
            out["label"] = np.float32(ex.label)
        return out

    # -- prompt + completions --------------------------------------------------------

    def _cut_prompt_left(self, prompt: list[int], n_cut: int) -> list[int] | None:
        keep_bos = int(self.tokenizer.bos_id is not None and bool(prompt)
                       and prompt[0] == self.tokenizer.bos_id)
        if len(prompt) - keep_bos - n_cut < 1:
            return None
        return prompt[:keep_bos] + prompt[keep_bos + n_cut:]

    def _encode_preference(self, pair: rec.PreferencePair, loc: rec.Location) -> Example:
        try:
            prompt = self.template.encode_prompt(pair.prompt)
            chosen = self.template.encode_completion(pair.prompt, pair.chosen, prompt)
            rejected = self.template.encode_completion(pair.prompt, pair.rejected, prompt)
        except Exception as e:
            raise self._template_error(loc, "prompt", e) from None
        for field, ids in (("chosen", chosen), ("rejected", rejected)):
            if not ids:
                raise self._nothing_trained(loc, field)
        cap = self.max_len + 1
        n = len(prompt) + max(len(chosen), len(rejected))
        truncated = n > cap
        if truncated:
            field = "chosen" if len(chosen) >= len(rejected) else "rejected"
            if self.overlong == "error":
                raise self._overlong(loc, field, n, cap)
            if self.overlong == "drop":
                return dropped(f"longer than data.max_len={self.max_len}")
            if self.overlong == "truncate_left":
                prompt = self._cut_prompt_left(prompt, n - cap)
                if prompt is None:
                    return dropped("a completion alone is longer than data.max_len after "
                                   "truncate_left")
            else:
                room = cap - len(prompt)
                if room < 1:
                    return dropped("the prompt alone fills data.max_len")
                chosen, rejected = chosen[:room], rejected[:room]
        return {"prompt": _ids(prompt), "chosen": _ids(chosen), "rejected": _ids(rejected),
                "truncated": truncated}

    def _encode_prompt(self, ex: rec.PromptExample, loc: rec.Location) -> Example:
        try:
            prompt = self.template.encode_prompt(ex.prompt)
        except Exception as e:
            raise self._template_error(loc, "prompt", e) from None
        cap = self.max_prompt_len
        truncated = len(prompt) > cap
        if truncated:
            if self.overlong == "error":
                raise loc.error("prompt", f"needs {len(prompt)} ids but at most {cap} fit "
                                f"(data.max_prompt_len); set data.overlong to truncate_left or "
                                "drop to allow this", rec.OverlongError)
            if self.overlong == "drop":
                return dropped(f"prompt longer than data.max_prompt_len={cap}")
            prompt = self._cut_prompt_left(prompt, len(prompt) - cap)
            if prompt is None:
                return dropped("prompt cannot be cut to data.max_prompt_len")
        return {"prompt": _ids(prompt), "extras": ex.extras, "truncated": truncated}
