"""Chat templates: messages -> token ids plus a loss mask over exactly the assistant turns.

A template renders a conversation as a list of ``Piece`` s — template text, message
content, or literal ids (bos/eos) — each flagged as trained (assistant content and its
end-of-turn token) or not. ``encode_conversation`` and ``encode_prompt`` turn the same
pieces into ids in the same way, and a prompt's pieces are by construction a prefix of
the conversation's pieces. Hence the ids the model is trained on before an assistant
turn equal, id for id, what ``encode_prompt`` gives the sampler for that turn: the mask
cannot drift from the generation-time tokenization.

Pieces are encoded in runs: consecutive pieces with the same trained flag are joined
and encoded together (so "User: " + content tokenizes as one string, as at generation),
and runs are split only at trained/untrained boundaries and literal ids. Special-token
strings are turned into their ids only where the template wrote them: a user typing
"<|im_end|>" gets ordinary text ids, never the turn marker.

Built-in templates: ``plain`` (``User:``/``Assistant:`` lines with bos/eos; what the
builtin tokenizer is trained on), ``chatml`` (Qwen), ``llama3``, ``gemma``, ``mistral``.
``tokenizer`` uses the Jinja ``chat_template`` from a Hugging Face
``tokenizer_config.json``, rendered in a sandboxed Jinja environment; its mask is
derived by rendering growing prefixes of the conversation, and a template whose
renderings are not prefixes of one another (e.g. one that rewrites earlier turns) is
refused rather than given a wrong mask.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxalign.data.tokenizer import CONFIG_FILE, Tokenizer, special_token_pattern

Messages = Sequence[Mapping[str, str]]

# End-of-turn tokens of common model families; the first one found after the assistant
# content ends the trained span of a Jinja-rendered turn.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
                      "<|endoftext|>", "</s>")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One rendered piece: ``text`` (template text or, if ``literal``, message content)
    or fixed ``ids``; ``trained`` marks assistant content and its end-of-turn token."""

    text: str = ""
    trained: bool = False
    literal: bool = False
    ids: tuple[int, ...] = ()


class ChatTemplate(abc.ABC):
    """Base class: subclasses implement ``pieces``; encoding is shared."""

    name: str = ""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @abc.abstractmethod
    def pieces(self, messages: Messages, add_generation_prompt: bool) -> list[Piece]:
        """Renders ``messages`` (optionally followed by the generation prompt)."""

    def render(self, messages: Messages, add_generation_prompt: bool = False) -> str:
        """The conversation as text, special tokens written out (for display and export)."""
        out = []
        for p in self.pieces(messages, add_generation_prompt):
            out.append(self.tokenizer.decode(p.ids, skip_special=False) if p.ids else p.text)
        return "".join(out)

    def encode_conversation(self, messages: Messages) -> tuple[list[int], list[int]]:
        """Returns ``(ids, mask)``: mask is 1 exactly on assistant content and end-of-turn ids.

        Pieces after the last assistant turn carry no loss and are left out.
        """
        pieces = self.pieces(messages, add_generation_prompt=False)
        last = max((i for i, p in enumerate(pieces) if p.trained), default=-1)
        return encode_pieces(self.tokenizer, pieces[: last + 1])

    def encode_prompt(self, messages: Messages) -> list[int]:
        """Returns the ids the sampler starts from: ``messages`` plus the generation prompt."""
        return encode_pieces(self.tokenizer, self.pieces(messages, add_generation_prompt=True))[0]

    def encode_completion(self, prompt: Messages, completion: str,
                          prompt_ids: Sequence[int] | None = None) -> list[int]:
        """Returns the ids of one assistant reply to ``prompt`` (content + end of turn).

        ``prompt_ids + encode_completion(...)`` equals ``encode_conversation`` of the
        prompt followed by the reply.
        """
        if prompt_ids is None:
            prompt_ids = self.encode_prompt(prompt)
        ids, mask = self.encode_conversation(
            [*prompt, {"role": "assistant", "content": completion}])
        n = len(prompt_ids)
        if ids[:n] != list(prompt_ids) or not all(mask[n:]):
            raise ValueError(
                f"chat template {self.name!r}: the prompt's rendering is not a prefix of the "
                "conversation's, so prompt tokens cannot be shared with the completion")
        return ids[n:]


def _runs(pieces: Sequence[Piece]) -> list[Piece | list[Piece]]:
    """Groups pieces into what is encoded at once: id pieces, and runs of text pieces
    with one trained flag."""
    out: list[Piece | list[Piece]] = []
    run: list[Piece] = []
    for p in pieces:
        if p.ids:
            if run:
                out.append(run)
                run = []
            out.append(p)
        elif p.text:
            if run and run[0].trained != p.trained:
                out.append(run)
                run = []
            run.append(p)
    if run:
        out.append(run)
    return out


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> tuple[list[int], list[int]]:
    """Encodes pieces run by run; returns ``(ids, mask)``."""
    ids: list[int] = []
    mask: list[int] = []
    for run in _runs(pieces):
        if isinstance(run, Piece):
            new, trained = list(run.ids), run.trained
        else:
            new, trained = _encode_run(tokenizer, run), run[0].trained
        ids.extend(new)
        mask.extend([int(trained)] * len(new))
    return ids, mask


def _encode_run(tokenizer: Tokenizer, run: Sequence[Piece]) -> list[int]:
    text = "".join(p.text for p in run)
    pattern = special_token_pattern(tokenizer)
    if pattern is None:
        return tokenizer.encode(text)
    # Special-token matches count only inside template text, never inside content.
    template_spans, pos = [], 0
    for p in run:
        if not p.literal:
            template_spans.append((pos, pos + len(p.text)))
        pos += len(p.text)
    cuts = []
    for start, end in template_spans:
        for m in pattern.finditer(text, start, end):
            cuts.append((m.start(), m.end(), tokenizer.special_tokens[m.group()]))
    out, pos = [], 0
    for start, end, special_id in sorted(cuts):
        if start > pos:
            out.extend(tokenizer.encode(text[pos:start]))
        out.append(special_id)
        pos = end
    if pos < len(text):
        out.extend(tokenizer.encode(text[pos:]))
    return out


@dataclasses.dataclass(frozen=True)
class TemplateSpec:
    """A built-in template. ``{content}`` marks where a message's text goes.

    Attributes:
      name: the template's name.
      system: format of a system message; None merges it into the first user message
        with ``merge_system``.
      user: format of a user message.
      assistant_prefix: what opens an assistant turn (the generation prompt).
      assistant_end: the trained end-of-turn marker; ``"{eos}"`` is the eos id.
      assistant_after: untrained text after the marker.
      bos: whether the conversation starts with the tokenizer's bos id (when it has one).
      specials: special tokens the template writes; the tokenizer must know them all.
      merge_system: how a system message joins the first user message.
    """

    name: str
    system: str | None
    user: str
    assistant_prefix: str
    assistant_end: str
    assistant_after: str
    bos: bool
    specials: tuple[str, ...] = ()
    merge_system: str = "{system}\n\n{content}"


TEMPLATES: dict[str, TemplateSpec] = {
    "plain": TemplateSpec("plain", system="System: {content}\n", user="User: {content}\n",
                          assistant_prefix="Assistant: ", assistant_end="{eos}",
                          assistant_after="\n", bos=True),
    "chatml": TemplateSpec(
        "chatml", system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_end="<|im_end|>",
        assistant_after="\n", bos=False, specials=("<|im_start|>", "<|im_end|>")),
    "llama3": TemplateSpec(
        "llama3", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_end="<|eot_id|>", assistant_after="", bos=True,
        specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": TemplateSpec(
        "gemma", system=None, user="<start_of_turn>user\n{content}<end_of_turn>\n",
        assistant_prefix="<start_of_turn>model\n", assistant_end="<end_of_turn>",
        assistant_after="\n", bos=True, specials=("<start_of_turn>", "<end_of_turn>")),
    "mistral": TemplateSpec("mistral", system=None, user="[INST] {content} [/INST]",
                            assistant_prefix="", assistant_end="{eos}", assistant_after="",
                            bos=True),
}


class BuiltinTemplate(ChatTemplate):
    """A ``TemplateSpec`` bound to a tokenizer."""

    def __init__(self, spec: TemplateSpec, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.spec = spec
        self.name = spec.name
        missing = [s for s in spec.specials if s not in tokenizer.special_tokens]
        if missing:
            raise ValueError(
                f"chat template {spec.name!r} needs the special tokens {missing}, which "
                f"tokenizer {tokenizer.name} lacks; pick the template of the tokenizer's model "
                f"family (built-in: {sorted(TEMPLATES)}, or 'tokenizer' for its own)")

    def _formatted(self, fmt: str, content: str, trained: bool = False) -> list[Piece]:
        head, _, tail = fmt.partition("{content}")
        return [Piece(head, trained), Piece(content, trained, literal=True), Piece(tail, trained)]

    def _marker(self, text: str, trained: bool) -> Piece:
        if text == "{eos}":
            return Piece(ids=(self.tokenizer.eos_id,), trained=trained)
        return Piece(text, trained)

    def pieces(self, messages: Messages, add_generation_prompt: bool) -> list[Piece]:
        spec = self.spec
        out: list[Piece] = []
        if spec.bos and self.tokenizer.bos_id is not None:
            out.append(Piece(ids=(self.tokenizer.bos_id,)))
        system = None
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role == "system":
                if spec.system is None:
                    system = content
                else:
                    out += self._formatted(spec.system, content)
            elif role == "user":
                if system is not None:
                    content = spec.merge_system.format(system=system, content=content)
                    system = None
                out += self._formatted(spec.user, content)
            elif role == "assistant":
                out.append(Piece(spec.assistant_prefix))
                out.append(Piece(content, trained=True, literal=True))
                out.append(self._marker(spec.assistant_end, trained=True))
                out.append(Piece(spec.assistant_after))
            else:
                raise ValueError(f"message {i}: unknown role {role!r}")
        if add_generation_prompt:
            out.append(Piece(spec.assistant_prefix))
        return out


class _GenerationTag:
    """Factory for a Jinja extension that renders ``{% generation %}`` blocks as-is.

    Hugging Face templates mark assistant text with this tag for their own masking;
    the mask here is derived from prefix renderings, so the tag only needs to parse.
    """

    @staticmethod
    def make():
        from jinja2 import nodes
        from jinja2.ext import Extension

        class GenerationTag(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                call = self.call_method("_render", [])
                return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        return GenerationTag


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    # Fixed, so that rendering (and hence the data) does not depend on the wall clock.
    import datetime

    return datetime.datetime(2026, 1, 1).strftime(fmt)


class JinjaTemplate(ChatTemplate):
    """A Hugging Face Jinja ``chat_template`` bound to a tokenizer."""

    def __init__(self, source: str, tokenizer: Tokenizer, name: str = "tokenizer"):
        from jinja2 import ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        super().__init__(tokenizer)
        self.name = name
        self.source = source
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True,
            extensions=[ext.loopcontrols, _GenerationTag.make()])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        by_id = {i: t for t, i in tokenizer.special_tokens.items()}
        self._bos = by_id.get(tokenizer.bos_id, "") if tokenizer.bos_id is not None else ""
        self._eos = by_id.get(tokenizer.eos_id, "")
        ends = [self._eos] if self._eos else []
        ends += [t for t in END_OF_TURN_TOKENS if t in tokenizer.special_tokens]
        self._ends = tuple(dict.fromkeys(ends))

    def _render(self, messages: Messages, add_generation_prompt: bool) -> str:
        return self._template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            bos_token=self._bos, eos_token=self._eos, tools=None)

    def _unstable(self, i: int) -> ValueError:
        return ValueError(
            f"chat template {self.name!r} is not prefix-stable at message {i}: rendering the "
            "conversation up to there is not a prefix of rendering it further (the template "
            "rewrites earlier turns), so no exact assistant mask exists; use a built-in "
            f"template ({sorted(TEMPLATES)}) or a template without that rewriting")

    def _trained_span(self, span: str, content: str) -> tuple[int, int]:
        # The trained span runs from the assistant content to the first end-of-turn token
        # after it; text the template puts around it (headers, newlines) stays untrained.
        start = span.find(content) if content else -1
        body_end = start + len(content)
        if start < 0:  # the template may strip the content
            stripped = content.strip()
            start = span.find(stripped) if stripped else -1
            body_end = start + len(stripped)
        if start < 0:
            start = body_end = 0
        cut = len(span)
        for marker in self._ends:
            pos = span.find(marker, body_end)
            if pos >= 0:
                cut = min(cut, pos + len(marker))
        return start, cut

    def pieces(self, messages: Messages, add_generation_prompt: bool) -> list[Piece]:
        out: list[Piece] = []
        done = ""
        for a, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:a], add_generation_prompt=True)
            through = self._render(messages[: a + 1], add_generation_prompt=False)
            if not before.startswith(done) or not through.startswith(before):
                raise self._unstable(a)
            span = through[len(before):]
            start, cut = self._trained_span(span, m["content"])
            out += [Piece(before[len(done):]), Piece(span[:start]),
                    Piece(span[start:cut], trained=True), Piece(span[cut:])]
            done = through
        final = self._render(messages, add_generation_prompt)
        if not final.startswith(done):
            raise self._unstable(len(messages))
        out.append(Piece(final[len(done):]))
        return out


def load_template_source(spec: str) -> str:
    """Reads a Jinja template from a ``.jinja`` file or a ``tokenizer_config.json``."""
    path = Path(spec)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"chat template file not found: {spec}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        template = data.get("chat_template") if isinstance(data, dict) else None
        if not isinstance(template, str):
            raise ValueError(f"{path} has no 'chat_template' string")
        return template
    return path.read_text(encoding="utf-8")


def get_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """Returns a chat template bound to ``tokenizer``.

    Args:
      name: ``"auto"`` (the tokenizer's own Jinja template if it has one, else
        ``plain``), a built-in name (``plain``, ``chatml``, ``llama3``, ``gemma``,
        ``mistral``), ``"tokenizer"`` (the tokenizer's Jinja template, required), or a
        path to a ``.jinja`` file or ``tokenizer_config.json``.
      tokenizer: the tokenizer the template's special tokens must belong to.

    Raises:
      ValueError: for an unknown name, a missing template, or missing special tokens.
    """
    if name == "auto":
        name = "tokenizer" if tokenizer.chat_template else "plain"
    if name in TEMPLATES:
        return BuiltinTemplate(TEMPLATES[name], tokenizer)
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {tokenizer.name} has no chat_template; pick one of "
                             f"{sorted(TEMPLATES)}")
        return JinjaTemplate(tokenizer.chat_template, tokenizer)
    if re.search(r"[\\/]|\.(jinja|j2|json)$", name):
        return JinjaTemplate(load_template_source(name), tokenizer, name=name)
    raise ValueError(f"unknown chat template {name!r}; known: auto, tokenizer, "
                     f"{', '.join(sorted(TEMPLATES))}, or a path to a .jinja file")


def describe_mask(tokenizer: Tokenizer, ids: Sequence[int], mask: Sequence[int]) -> str:
    """Renders ids as text with trained spans in ``[[...]]`` (for tests and debugging)."""
    out, run, flag = [], [], 0
    for i, m in zip(ids, mask, strict=True):
        if m != flag and run:
            text = tokenizer.decode(run, skip_special=False)
            out.append(f"[[{text}]]" if flag else text)
            run = []
        flag = m
        run.append(i)
    if run:
        text = tokenizer.decode(run, skip_special=False)
        out.append(f"[[{text}]]" if flag else text)
    return "".join(out)


def jinja_source(spec: TemplateSpec) -> str:
    """A Hugging Face Jinja ``chat_template`` that renders like the built-in ``spec``.

    For exporting a model trained with a built-in template: ``transformers``'
    ``apply_chat_template`` then produces the text this template renders.
    """
    def lit(text: str) -> str:
        return json.dumps(text)

    def fmt(template: str, content: str) -> str:
        head, _, tail = template.partition("{content}")
        return f"{{{{ {lit(head)} + {content} + {lit(tail)} }}}}"

    end = "eos_token" if spec.assistant_end == "{eos}" else lit(spec.assistant_end)
    parts = ["{%- set ns = namespace(system=none) -%}"]
    if spec.bos:
        parts.append("{{ bos_token }}")
    parts.append("{%- for m in messages -%}{%- if m['role'] == 'system' -%}")
    if spec.system is None:
        parts.append("{%- set ns.system = m['content'] -%}")
    else:
        parts.append(fmt(spec.system, "m['content']"))
    head, _, tail = spec.merge_system.partition("{system}")
    between, _, after = tail.partition("{content}")
    parts.append(
        "{%- elif m['role'] == 'user' -%}{%- if ns.system is not none -%}"
        + fmt(spec.user, f"{lit(head)} + ns.system + {lit(between)} + m['content'] + "
              f"{lit(after)}")
        + "{%- set ns.system = none -%}{%- else -%}" + fmt(spec.user, "m['content']")
        + "{%- endif -%}{%- elif m['role'] == 'assistant' -%}"
        + f"{{{{ {lit(spec.assistant_prefix)} + m['content'] + {end} + "
          f"{lit(spec.assistant_after)} }}}}"
        + "{%- endif -%}{%- endfor -%}"
        + f"{{%- if add_generation_prompt -%}}{{{{ {lit(spec.assistant_prefix)} }}}}"
          "{%- endif -%}")
    return "".join(parts)


class _NoTokenizer:
    """Stands in for a tokenizer when only a built-in template's text is wanted."""

    name = "<none>"
    special_tokens: dict[str, int] = {}
    bos_id = None
    eos_id = -1


def text_runs(spec: TemplateSpec, messages: Messages,
              add_generation_prompt: bool = False) -> list[str]:
    """The strings a built-in template hands the tokenizer for ``messages``, in order.

    This is the training corpus a tokenizer for the template should see (e.g. the
    shipped builtin model), since each string is encoded on its own.
    """
    template = BuiltinTemplate(spec, _NoTokenizer())  # type: ignore[arg-type]
    pieces = template.pieces(messages, add_generation_prompt)
    if not add_generation_prompt:
        last = max((i for i, p in enumerate(pieces) if p.trained), default=-1)
        pieces = pieces[: last + 1]
    return ["".join(p.text for p in run) for run in _runs(pieces) if isinstance(run, list)]
