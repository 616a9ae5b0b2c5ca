"""Chat with a checkpoint: its tokenizer, its chat template, and the one sampler.

* :func:`load_chat_model`: a run's workdir (its latest checkpoint, LoRA merged, with the
  run's tokenizer and ``data.chat_template``) or any ``model.init_from`` source
  (``hf:DIR``, ...) with the tokenizer it ships, as a :class:`ChatModel`.
* :func:`replies`: conversations -> assistant replies, in batches of a fixed row count,
  through :func:`jaxalign.policy.iter_generate` (the KV-cache sampler of every stage).
* :class:`ChatSession`: a multi-turn history; each turn re-encodes the whole
  conversation with the template, so the model sees exactly what training rendered.
* :func:`interact`: the terminal loop (``/reset``, ``/exit``, end of input).
* :func:`reply_jsonl`: JSONL records (``prompt`` or ``messages``) -> the same records
  with a ``reply``, written a batch at a time.

The sampler runs prefill and the whole decode loop in one jitted call; a session with a
``stream`` shows each reply as it is generated through the sampler's ``on_token`` host
callback (:class:`TokenStream`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TextIO

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxalign import policy, sampling, storage
from jaxalign import sharding as shd
from jaxalign.data.chat import END_OF_TURN_TOKENS, ChatTemplate, Messages, get_template
from jaxalign.data.records import Location, RecordError, validate_prompt
from jaxalign.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from jaxalign.models import hf, init_from
from jaxalign.models.transformer import TransformerConfig
from jaxalign.step import ModelDef

COMMANDS = {"/reset": "forget the conversation", "/exit": "quit (also /quit, end of input)",
            "/help": "list the commands"}


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A checkpoint ready to chat: the model, its tokenizer and its chat template."""

    model_def: ModelDef
    params: Any
    config: TransformerConfig
    tokenizer: Tokenizer
    template: ChatTemplate
    name: str

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """eos and every end-of-turn token the tokenizer has (``<|im_end|>``, ...)."""
        specials = self.tokenizer.special_tokens
        ids = [self.tokenizer.eos_id] + [specials[t] for t in END_OF_TURN_TOKENS
                                         if t in specials]
        return tuple(dict.fromkeys(int(i) for i in ids))

    def sampling_config(self, *, max_new_tokens: int, temperature: float = 0.0,
                        top_k: int = 0, top_p: float = 1.0) -> sampling.SamplingConfig:
        """Sampling settings that stop at the end of the assistant's turn."""
        return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_k=top_k, top_p=top_p, stop_tokens=self.stop_ids,
                                       pad_id=self.tokenizer.pad_id or 0)


def _parse_spec(spec: str) -> tuple[str, str]:
    try:
        return init_from.parse(spec)
    except ValueError as e:
        if storage.isdir(os.path.expanduser(spec)):  # a bare directory: a workdir or HF dir
            return policy.parse_checkpoint(spec)
        raise ValueError(f"cannot chat with {spec!r}: {e}") from None


def _load_source(spec: str, cfg: TransformerConfig, mesh: Mesh) -> policy.Loaded:
    """Every param of ``cfg``'s model from an ``init_from`` source (``hf:``, ...)."""
    model_def = policy.abstract_model(cfg)
    abstract = nnx.to_pure_dict(model_def.abstract_state)
    shardings = policy.param_shardings(model_def, mesh, dict(shd.DEFAULT_RULES))
    params = init_from.load_params(spec, cfg, abstract, shardings) or {}
    have, want = len(jax.tree.leaves(params)), len(jax.tree.leaves(abstract))
    if have < want:
        raise ValueError(f"{spec} provides {have} of the model's {want} params")
    return policy.Loaded(model_def, params)


def _source_tokenizer(kind: str, path: str, spec: str, vocab_size: int) -> Tokenizer:
    if kind == "hf":
        return hf.load_tokenizer(path, vocab_size=vocab_size)
    try:  # a tokenizer loader that knows the source's scheme reads it from the file
        return load_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{spec}: no tokenizer could be read from it ({e}); name one with "
                         "--tokenizer") from e


def load_chat_model(spec: str, *, tokenizer: str | None = None,
                    chat_template: str | None = None, dtype: str | None = None,
                    mesh: Mesh | None = None) -> ChatModel:
    """Loads a checkpoint with the tokenizer and chat template it was trained with.

    Args:
      spec: ``workdir:DIR`` (an earlier run: its latest checkpoint, LoRA merged, with the
        run's ``tokenizer`` and ``data.chat_template``), or any other ``model.init_from``
        source, e.g. ``hf:DIR`` (its own tokenizer and Jinja template). A bare directory
        is a workdir unless it looks like an HF checkpoint.
      tokenizer: a tokenizer spec replacing the checkpoint's.
      chat_template: a template name or file replacing the checkpoint's (default: the
        run's ``data.chat_template``, else ``auto``).
      dtype: params and compute dtype (default: the run's, or float32).
      mesh: where the params live (default: one device).

    Raises:
      ValueError: ``scratch``, a reward-model run, or a tokenizer or checkpoint that does
        not fit the model.
      FileNotFoundError: a missing directory, config or checkpoint.
    """
    kind, path = _parse_spec(spec)
    mesh = hf.default_mesh() if mesh is None else mesh
    numerics = {} if dtype is None else {"param_dtype": dtype, "dtype": dtype}
    if kind == "scratch":
        raise ValueError("a model from scratch has nothing to say: give a workdir or hf:DIR")
    if kind == "workdir":
        run = init_from.read_run_config(path)
        if run.get("stage") == "rm":
            raise ValueError(f"{path} is a reward-model run: it scores replies, it does not "
                             "write them")
        cfg = dataclasses.replace(init_from.run_model_config(run), **numerics)
        tok = load_tokenizer(tokenizer or run.get("tokenizer", "builtin:world"))
        template_name = chat_template or run.get("data", {}).get("chat_template", "auto")
        loaded = policy.load_model(f"workdir:{path}", cfg, mesh=mesh, on_host=True)
        spec = f"workdir:{path}"
    else:
        cfg = TransformerConfig(**init_from.source_architecture(spec), **numerics)
        tok = (load_tokenizer(tokenizer) if tokenizer
               else _source_tokenizer(kind, path, spec, cfg.vocab_size))
        template_name = chat_template or "auto"
        loaded = _load_source(spec, cfg, mesh)
    check_vocab(tok, cfg.vocab_size)
    return ChatModel(loaded.model_def, loaded.params, cfg, tok, get_template(template_name, tok),
                     name=spec)


class Reply(NamedTuple):
    """One assistant reply: its text, the sampled ids (stop token included) and whether
    it ended on a stop token (False: it ran out of ``max_new_tokens``)."""

    text: str
    ids: list[int]
    stopped: bool


def _reply(model: ChatModel, sample: policy.Sample) -> Reply:
    content = sample.ids[:-1] if sample.stopped else sample.ids
    return Reply(model.tokenizer.decode(content), sample.ids, sample.stopped)


def replies(model: ChatModel, conversations: Sequence[Messages], cfg: sampling.SamplingConfig,
            rng: jax.Array, *, batch_size: int = 8) -> Iterator[tuple[int, list[Reply]]]:
    """The assistant's next reply to each conversation, a batch at a time.

    Every batch has ``min(batch_size, len(conversations))`` rows, left-padded to one
    bucketed width (:func:`jaxalign.policy.bucket`), so few shapes are compiled.

    Yields:
      ``(start, replies)``: the index of the batch's first conversation and its replies.
    """
    prompts = [model.template.encode_prompt(c) for c in conversations]
    limit = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) + cfg.max_new_tokens > limit:
            raise ValueError(f"conversation {i} has {len(p)} ids; with max_new_tokens="
                             f"{cfg.max_new_tokens} that exceeds the model's context of "
                             f"{limit} positions")
    width = policy.bucket(max(len(p) for p in prompts))
    for start, groups in policy.iter_generate(
            model.model_def, model.params, prompts, rng, cfg,
            rows=max(1, min(batch_size, len(prompts))), width=width):
        yield start, [_reply(model, g[0]) for g in groups]


class TokenStream:
    """Writes a reply to ``out`` while the sampler generates it (the sampler's ``on_token``).

    Only the first row is shown. Ids are decoded as a whole each step, so a character
    made of several ids appears once complete; the stop id is not shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int], out: TextIO):
        self.tokenizer, self.stop_ids, self.out = tokenizer, set(stop_ids), out
        self.start()

    def start(self) -> None:
        """Forgets the previous reply."""
        self.ids: dict[int, int] = {}
        self.shown = ""

    def _write(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def __call__(self, i: Any, tokens_b: Any, alive_b: Any) -> None:
        if not bool(alive_b[0]):
            return
        self.ids[int(i)] = int(tokens_b[0])
        content = []
        while len(content) in self.ids and self.ids[len(content)] not in self.stop_ids:
            content.append(self.ids[len(content)])
        text = self.tokenizer.decode(content)
        if not text.endswith("\ufffd"):  # not in the middle of a multi-id character
            self._write(text)

    def finish(self, reply: str) -> None:
        """Writes whatever of ``reply`` is not shown yet, then a newline."""
        self._write(reply)
        self.out.write("\n")
        self.out.flush()


class ChatSession:
    """A conversation with a model; each turn samples with ``fold_in(key(seed), turn)``.

    When the conversation outgrows the model's context, the oldest exchanges are left
    out of the prompt (``dropped`` counts them). With ``stream``, each reply is written
    there as it is generated (:class:`TokenStream`) as well as returned.
    """

    def __init__(self, model: ChatModel, cfg: sampling.SamplingConfig, *,
                 system: str | None = None, seed: int = 0, stream: TextIO | None = None):
        self.stream = (None if stream is None
                       else TokenStream(model.tokenizer, model.stop_ids, stream))
        if self.stream is not None:
            cfg = dataclasses.replace(cfg, on_token=self.stream)
        self.model, self.cfg, self.system = model, cfg, system
        self.key = jax.random.PRNGKey(seed)
        self.messages: list[dict[str, str]] = []
        self.turn = 0
        self.dropped = 0

    def reset(self) -> None:
        """Forgets the conversation (the system prompt stays)."""
        self.messages, self.dropped = [], 0

    def conversation(self, user: str) -> list[dict[str, str]]:
        """The messages the next turn's prompt renders: system, history, ``user``."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": user}]

    def _fit(self, user: str) -> None:
        limit = self.model.config.max_position_embeddings - self.cfg.max_new_tokens
        while (self.messages and len(self.model.template.encode_prompt(
                self.conversation(user))) > limit):
            self.messages = self.messages[2:]  # the oldest user/assistant exchange
            self.dropped += 1

    def send(self, user: str) -> Reply:
        """The model's reply to ``user``; both join the history."""
        self._fit(user)
        rng = jax.random.fold_in(self.key, self.turn)
        if self.stream is not None:
            self.stream.start()
        _, (reply,) = next(replies(self.model, [self.conversation(user)], self.cfg, rng,
                                   batch_size=1))
        if self.stream is not None:
            self.stream.finish(reply.text)
        self.messages += [{"role": "user", "content": user},
                          {"role": "assistant", "content": reply.text}]
        self.turn += 1
        return reply


def interact(session: ChatSession, inp: TextIO, out: TextIO, notes: TextIO, *,
             prompt: str = "> ") -> int:
    """Reads user turns from ``inp`` until ``/exit`` or its end; replies go to ``out``.

    ``/reset`` forgets the conversation. Notes (history cleared, a turn refused) go to
    ``notes``; the ``prompt`` is shown only when ``inp`` is a terminal.

    Returns:
      The number of replies written.
    """
    shown = 0
    tty = inp.isatty()
    while True:
        if tty:
            out.write(prompt)
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            notes.write("(conversation cleared)\n")
            continue
        if command == "/help":
            notes.write("".join(f"{c}  {h}\n" for c, h in COMMANDS.items()))
            continue
        dropped = session.dropped
        try:
            reply = session.send(text)
        except ValueError as e:  # a turn that cannot fit; the conversation goes on
            notes.write(f"error: {e}\n")
            continue
        if session.dropped > dropped:
            notes.write(f"(the oldest {session.dropped - dropped} exchange(s) no longer fit "
                        "the context and were left out)\n")
        if session.stream is None:  # a streaming session has written it already
            out.write(reply.text + "\n")
            out.flush()
        if not reply.stopped:
            notes.write(f"(reply cut at max_new_tokens={session.cfg.max_new_tokens})\n")
        shown += 1
    return shown


def request_messages(record: Any, where: str, index: int,
                     system: str | None = None) -> list[dict[str, str]]:
    """A JSONL request (``prompt`` string or messages, or ``messages``) as chat messages.

    Raises:
      RecordError: naming ``where``, the line and the field.
    """
    loc = Location(where, index, unit="line")
    if isinstance(record, Mapping) and "prompt" not in record:
        if "messages" not in record:
            raise loc.error("prompt", f"missing: a request needs 'prompt' or 'messages' "
                            f"(record has {sorted(record)})")
        try:
            messages = validate_prompt({"prompt": record["messages"]}, loc).prompt
        except RecordError as e:
            raise loc.error("messages" + e.field[len("prompt"):], e.detail) from None
    else:
        messages = validate_prompt(record, loc).prompt
    out = [dict(m) for m in messages]
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


def read_requests(path: str, system: str | None = None
                  ) -> tuple[list[dict[str, Any]], list[list[dict[str, str]]]]:
    """The records of a JSONL file and their conversations (blank lines skipped)."""
    records, conversations = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e.msg})") from None
            conversations.append(request_messages(record, path, n, system))
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no requests")
    return records, conversations


def reply_jsonl(model: ChatModel, in_path: str, out: TextIO, cfg: sampling.SamplingConfig,
                rng: jax.Array, *, batch_size: int = 8, system: str | None = None) -> int:
    """Answers every request of a JSONL file; writes each record with its ``reply``.

    Records keep their own fields (``prompt`` or ``messages``, ids, ...) and gain
    ``reply``; they are written in input order as each batch finishes.

    Returns:
      The number of records written.
    """
    records, conversations = read_requests(in_path, system)
    for start, batch in replies(model, conversations, cfg, rng, batch_size=batch_size):
        for record, reply in zip(records[start:start + len(batch)], batch, strict=True):
            out.write(json.dumps({**record, "reply": reply.text}, ensure_ascii=False) + "\n")
        out.flush()
    return len(records)
