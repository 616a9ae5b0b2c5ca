"""One tokenizer interface over SentencePiece ``.model`` files and HF ``tokenizer.json``.

``load_tokenizer`` resolves a spec string:

* ``builtin:<name>`` — a model shipped in this package's ``assets/`` folder;
* ``gguf:<file>`` — the vocabulary and chat template inside a GGUF checkpoint
  (:mod:`jaxalign.models.gguf_tokenizer`);
* a directory in the Hugging Face layout — ``tokenizer.json`` (preferred) or
  ``tokenizer.model``, plus ``tokenizer_config.json`` for the bos/eos/pad tokens and the
  ``chat_template`` (also read from ``chat_template.jinja`` / ``chat_template.json``);
* a file — ``*.json`` is a ``tokenizer.json``, anything else must be a SentencePiece model
  (``tokenizer.model``, ``*.model.v3``, ...); a ``tokenizer_config.json`` next to it is used.

``encode`` treats its text literally: a special token's string inside user content is
encoded as ordinary text, never as the special id (so data cannot forge turn markers);
chat templates (``jaxalign.data.chat``) insert special ids where they mean them.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from jaxalign import storage

_BUILTIN_SCHEME = "builtin:"
_GGUF_SCHEME = "gguf:"
# Builtin tokenizer name -> asset file; every builtin dataset shares the world model.
BUILTIN_TOKENIZERS = {"world": "world.model", "tasks": "world.model"}
CONFIG_FILE = "tokenizer_config.json"
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer; ids are plain Python ints."""

    name: str

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce (embedding rows needed)."""
        ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text of every special (control / added) token -> its id."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template shipped with the tokenizer, if any."""
        ...

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` taken literally, without bos/eos."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Returns the text of ``ids``; special ids decode to nothing unless asked."""
        ...


def special_token_pattern(tokenizer: Tokenizer) -> re.Pattern[str] | None:
    """A regex matching any special-token string (longest first); None if there are none."""
    cached = getattr(tokenizer, "_special_re", None)
    if cached is not None:
        return cached or None
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    try:
        tokenizer._special_re = pattern or False  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return pattern


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _template_from(config: Mapping[str, Any], directory: Path | None) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # the older list-of-named-templates form
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and directory is not None:
        jinja, as_json = (directory / name for name in _TEMPLATE_FILES)
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif as_json.is_file():
            data = json.loads(as_json.read_text(encoding="utf-8"))
            template = data.get("chat_template")
    return template if isinstance(template, str) and template else None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON in tokenizer config: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


class _SpecialIds:
    """The id and template accessors both tokenizer classes share."""

    _pad: int
    _bos: int | None
    _eos: int
    _specials: Mapping[str, int]
    _chat_template: str | None

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def special_tokens(self) -> Mapping[str, int]:
        return self._specials

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


class SentencePieceTokenizer(_SpecialIds):
    """A ``Tokenizer`` over a SentencePiece model."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        model_proto: bytes = b"",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        """Loads a SentencePiece model.

        Args:
          path: a model file (``.model``, ``.model.v3``, ...).
          model_proto: the serialized model instead of ``path`` (e.g. a packaged resource
            that may live inside a zip and so has no real file path).
          name: how messages refer to this tokenizer; defaults to ``path``.
          config: a parsed ``tokenizer_config.json``; its ``bos_token``/``eos_token``/
            ``pad_token`` override the model's own special pieces.
          chat_template: the Jinja chat template to expose (overrides ``config``'s).

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: if the file is not a SentencePiece model, or it has no eos piece.
        """
        import sentencepiece as spm

        if (path is None) == (not model_proto):
            raise ValueError("pass exactly one of path or model_proto")
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"SentencePiece model not found: {os.fspath(path)}")
            model_proto = Path(path).read_bytes()
        self.name = name or (os.fspath(path) if path is not None else "<serialized model>")
        self._proto = model_proto
        self._config = dict(config or {})
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"{self.name} is not a SentencePiece model ({e})") from e
        self._chat_template = chat_template or _template_from(self._config, None)
        self._specials = self._read_specials()

        def special(key: str, default: int) -> int | None:
            text = _token_text(self._config.get(key))
            if text is None:
                return default if default >= 0 else None
            if text not in self._specials:
                raise ValueError(f"{self.name}: {key} {text!r} is not a special piece")
            return self._specials[text]

        self._bos = special("bos_token", self._sp.bos_id())
        eos = special("eos_token", self._sp.eos_id())
        # A missing eos would leave turns without an end marker and generation without a
        # stop id; refuse it here rather than corrupt batches later.
        if eos is None:
            raise ValueError(f"tokenizer {self.name} has no eos id")
        self._eos = eos
        # Many released models (e.g. Llama's) define no pad piece; padding is always
        # masked out, so any valid id will do and eos is the usual choice.
        pad = special("pad_token", self._sp.pad_id())
        self._pad = eos if pad is None else pad

    def _read_specials(self) -> dict[str, int]:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(self._proto)
        kinds = (model.SentencePiece.CONTROL, model.SentencePiece.USER_DEFINED)
        return {p.piece: i for i, p in enumerate(model.pieces) if p.type in kinds}

    def __getstate__(self) -> dict[str, Any]:
        # The SWIG processor does not pickle; data-loader workers rebuild it from bytes.
        return {"proto": self._proto, "name": self.name, "config": self._config,
                "chat_template": self._chat_template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(model_proto=state["proto"], name=state["name"], config=state["config"],
                      chat_template=state["chat_template"])

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` without bos/eos."""
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Returns the text of ``ids``; special ids decode to nothing unless asked."""
        ids = [int(i) for i in ids]
        if skip_special:
            return self._sp.decode(ids)
        # SentencePiece drops control pieces when decoding; splice their text back in.
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                out.append(self._sp.decode(run))
                out.append(self._sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        """Returns the piece string of one id (for inspection and debugging)."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer(_SpecialIds):
    """A ``Tokenizer`` over a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        json_str: str = "",
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ):
        """Loads a ``tokenizer.json``.

        Args:
          path: the ``tokenizer.json`` file.
          json_str: its contents instead of ``path``.
          name: how messages refer to this tokenizer; defaults to ``path``.
          config: a parsed ``tokenizer_config.json`` (bos/eos/pad tokens, chat template).
          chat_template: the Jinja chat template to expose (overrides ``config``'s).

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: if the file is not a tokenizer.json, or no eos token is known.
        """
        from tokenizers import Tokenizer as _Tokenizer

        if (path is None) == (not json_str):
            raise ValueError("pass exactly one of path or json_str")
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"tokenizer.json not found: {os.fspath(path)}")
            json_str = Path(path).read_text(encoding="utf-8")
        self.name = name or (os.fspath(path) if path is not None else "<tokenizer.json>")
        self._json = json_str
        self._config = dict(config or {})
        try:
            self._tok = _Tokenizer.from_str(json_str)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{self.name} is not a valid tokenizer.json ({e})") from e
        self._chat_template = chat_template or _template_from(self._config, None)
        self._specials = {t.content: int(i)
                          for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

        def special(key: str) -> int | None:
            text = _token_text(self._config.get(key))
            if text is None:
                return None
            token_id = self._tok.token_to_id(text)
            if token_id is None:
                raise ValueError(f"{self.name}: {key} {text!r} is not in the vocabulary")
            return int(token_id)

        self._bos = special("bos_token")
        eos = special("eos_token")
        if eos is None:
            raise ValueError(
                f"tokenizer {self.name} has no eos token: put 'eos_token' in a "
                f"{CONFIG_FILE} next to tokenizer.json")
        self._eos = eos
        pad = special("pad_token")
        self._pad = eos if pad is None else pad

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._json, "name": self.name, "config": self._config,
                "chat_template": self._chat_template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(json_str=state["json"], name=state["name"], config=state["config"],
                      chat_template=state["chat_template"])

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` taken literally, without bos/eos."""
        # Added tokens inside the text are matched by default; turning that off makes
        # "<|im_end|>" typed by a user encode as ordinary text.
        self._tok.encode_special_tokens = True
        try:
            return list(self._tok.encode(text, add_special_tokens=False).ids)
        finally:
            self._tok.encode_special_tokens = False

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Returns the text of ``ids``; special ids decode to nothing unless asked."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def id_to_piece(self, token_id: int) -> str:
        """Returns the token string of one id (for inspection and debugging)."""
        return self._tok.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _load_builtin(name: str) -> Tokenizer:
    # Read through importlib.resources so it works from an installed wheel or a zip and
    # does not depend on the current working directory.
    filename = BUILTIN_TOKENIZERS.get(name, f"{name}.model")
    resource = importlib.resources.files("jaxalign.data").joinpath("assets", filename)
    if not resource.is_file():
        raise FileNotFoundError(
            f"no shipped tokenizer for builtin:{name} (looked for {resource}); known: "
            f"{sorted(BUILTIN_TOKENIZERS)}")
    return SentencePieceTokenizer(model_proto=resource.read_bytes(), name=f"builtin:{name}")


def _load_sentencepiece(path: Path, config: dict[str, Any], template: str | None) -> Tokenizer:
    return SentencePieceTokenizer(path, config=config, chat_template=template)


def _load_hf(path: Path, config: dict[str, Any], template: str | None) -> Tokenizer:
    return HFTokenizer(path, config=config, chat_template=template)


def _load_directory(directory: Path) -> Tokenizer:
    config_path = directory / CONFIG_FILE
    config = _read_config(config_path) if config_path.is_file() else {}
    template = _template_from(config, directory)
    for name, loader in (("tokenizer.json", _load_hf), ("tokenizer.model", _load_sentencepiece)):
        if (directory / name).is_file():
            try:
                return loader(directory / name, config, template)
            except ValueError as e:  # e.g. a binary file where JSON belongs
                raise ValueError(f"unsupported tokenizer file {str(directory / name)!r}: "
                                 f"{e}") from e
    raise FileNotFoundError(
        f"tokenizer directory {directory} holds neither tokenizer.json nor tokenizer.model")


# File suffix -> loader; anything else is tried as a SentencePiece model.
_FILE_LOADERS: dict[str, Callable[[Path, dict[str, Any], str | None], Tokenizer]] = {
    ".json": _load_hf,
}


def load_tokenizer(spec: str) -> Tokenizer:
    """Loads a tokenizer from a spec string.

    Args:
      spec: ``"builtin:<name>"`` for a model shipped with jaxalign (e.g.
        ``"builtin:world"``), ``"gguf:<file>"`` for the vocabulary of a GGUF checkpoint,
        a Hugging Face tokenizer directory, a ``tokenizer.json``, or a SentencePiece
        model file.

    Returns:
      The tokenizer; ``chat_template`` is set when the directory (or the
      ``tokenizer_config.json`` beside the file) provides one.

    Raises:
      FileNotFoundError: if the file or directory does not exist.
      ValueError: if the file is neither a tokenizer.json nor a SentencePiece model.
    """
    if spec.startswith(_BUILTIN_SCHEME):
        return _load_builtin(spec[len(_BUILTIN_SCHEME) :])
    if spec.startswith(_GGUF_SCHEME):
        # Imported on use: a GGUF vocabulary is read from a model checkpoint.
        from jaxalign.models import gguf_tokenizer

        return gguf_tokenizer.load_tokenizer(
            os.path.expanduser(local_spec(spec)[len(_GGUF_SCHEME) :]))
    if spec == "auto":
        raise ValueError("tokenizer 'auto' means the model source's tokenizer; resolve it from "
                         "the run config first (jaxalign.models.lineage.resolve_tokenizer)")
    path = Path(local_spec(spec))
    if path.is_dir():
        return _load_directory(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {spec}")
    config_path = path.parent / CONFIG_FILE
    config = _read_config(config_path) if config_path.is_file() else {}
    template = _template_from(config, path.parent)
    loader = _FILE_LOADERS.get(path.suffix, _load_sentencepiece)
    try:
        return loader(path, config, template)
    except ValueError as e:
        raise ValueError(
            f"unsupported tokenizer file {spec!r}: {e}. Expected a tokenizer.json, a "
            "SentencePiece model, a Hugging Face tokenizer directory or 'builtin:<name>'"
        ) from e


def local_spec(spec: str) -> str:
    """``spec`` with a URL (``gs://...``, also after ``gguf:``) replaced by a local copy.

    Tokenizer libraries read local files: the copy of a file comes with the
    ``tokenizer_config.json`` and chat template beside it.
    """
    prefix = _GGUF_SCHEME if spec.startswith(_GGUF_SCHEME) else ""
    path = spec[len(prefix):]
    if not storage.is_url(path):
        return spec
    try:
        return prefix + storage.local_copy(path, siblings=(CONFIG_FILE, *_TEMPLATE_FILES))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"tokenizer {spec}: {e}") from None


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Checks that every id the tokenizer can produce has a row in the model's embedding.

    Args:
      tokenizer: the tokenizer feeding the model.
      model_vocab_size: the model's vocabulary size (embedding rows).

    Raises:
      ValueError: if the tokenizer's vocabulary is larger than the model's.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} has vocab_size {tokenizer.vocab_size}, more than the "
            f"model vocab_size {model_vocab_size}: ids up to {tokenizer.vocab_size - 1} would "
            "index past the embedding"
        )
