"""One tokenizer interface for the data pipeline, with a SentencePiece backend.

``load_tokenizer`` resolves a spec string: ``builtin:<name>`` for a model shipped in
this package's ``assets/`` folder, or a filesystem path to a SentencePiece ``.model``.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

_BUILTIN_SCHEME = "builtin:"


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer; ids are plain Python ints."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` without bos/eos."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of ``ids``; special ids (pad, bos, eos) decode to nothing."""
        ...


class SentencePieceTokenizer:
    """A ``Tokenizer`` over a SentencePiece model."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        model_proto: bytes = b"",
        name: str | None = None,
    ):
        """Loads a SentencePiece model.

        Args:
          path: a ``.model`` file.
          model_proto: the serialized model instead of ``path`` (e.g. a packaged resource
            that may live inside a zip and so has no real file path).
          name: how messages refer to this tokenizer; defaults to ``path``.

        Raises:
          FileNotFoundError: if ``path`` does not exist.
          ValueError: if the model has no bos or eos piece.
        """
        import sentencepiece as spm

        if (path is None) == (not model_proto):
            raise ValueError("pass exactly one of path or model_proto")
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"SentencePiece model not found: {os.fspath(path)}")
            model_proto = Path(path).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.name = name or (os.fspath(path) if path is not None else "<serialized model>")
        # A missing special id is reported as -1, which would silently index the last
        # embedding row; refuse it here rather than corrupt batches later.
        for kind, value in (("bos", self._sp.bos_id()), ("eos", self._sp.eos_id())):
            if value < 0:
                raise ValueError(f"tokenizer {self.name} has no {kind} id")
        # Many released models (e.g. Llama's) define no pad piece; padding is always
        # masked out, so any valid id will do and eos is the usual choice.
        pad = self._sp.pad_id()
        self._pad_id = int(pad if pad >= 0 else self._sp.eos_id())

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """Returns the ids of ``text`` without bos/eos."""
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Returns the text of ``ids``; special ids decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """Returns the piece string of one id (for inspection and debugging)."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def _load_builtin(name: str) -> Tokenizer:
    # Read through importlib.resources so it works from an installed wheel or a zip and
    # does not depend on the current working directory.
    resource = importlib.resources.files("jaxalign.data").joinpath("assets", f"{name}.model")
    if not resource.is_file():
        raise FileNotFoundError(f"no shipped tokenizer for builtin:{name} (looked for {resource})")
    return SentencePieceTokenizer(model_proto=resource.read_bytes(), name=f"builtin:{name}")


# File suffix -> loader; a HF tokenizer.json loader plugs in here.
_FILE_LOADERS: dict[str, Callable[[str], Tokenizer]] = {".model": SentencePieceTokenizer}


def load_tokenizer(spec: str) -> Tokenizer:
    """Loads a tokenizer from a spec string.

    Args:
      spec: ``"builtin:<name>"`` for a model shipped with jaxalign (e.g.
        ``"builtin:tasks"``), or a path to a SentencePiece ``.model`` file.

    Returns:
      The tokenizer.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if the file type is not supported.
    """
    if spec.startswith(_BUILTIN_SCHEME):
        return _load_builtin(spec[len(_BUILTIN_SCHEME) :])
    if not Path(spec).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {spec}")
    loader = _FILE_LOADERS.get(Path(spec).suffix)
    if loader is None:
        raise ValueError(
            f"unsupported tokenizer file {spec!r}; supported suffixes: {sorted(_FILE_LOADERS)} "
            "(or use 'builtin:<name>')"
        )
    return loader(spec)


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
            f"tokenizer vocab_size {tokenizer.vocab_size} exceeds the model vocab_size "
            f"{model_vocab_size}: ids up to {tokenizer.vocab_size - 1} would index past the "
            "embedding"
        )
