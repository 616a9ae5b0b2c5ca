"""What a run inherits from the source of its weights: the tokenizer.

``config.tokenizer="auto"`` (the default) means the tokenizer the weights were trained
with: an ``hf:<dir>`` checkpoint's own tokenizer files, a ``gguf:<file>``'s embedded
vocabulary, the resolved tokenizer of an earlier run for ``workdir:<dir>`` (so an
SFT -> DPO -> GRPO chain names it once), and the builtin world's tokenizer for a model
trained from scratch. The resolved spec is what the run's ``config.json`` records.

A tokenizer named explicitly for a ``workdir:`` source must be the one that run trained
with (the same pieces for the same ids); any other is refused before any compute, naming
both: a model fed another tokenizer's ids trains on noise and samples ids its decoder
cannot read.
"""

from __future__ import annotations

import hashlib
import os

import ml_collections
from absl import logging

from jaxalign.data.tokenizer import Tokenizer, load_tokenizer
from jaxalign.models import hf, init_from

AUTO = "auto"
SCRATCH_TOKENIZER = "builtin:world"


def source_tokenizer(spec: str) -> str | None:
    """The tokenizer spec the weights of ``init_from=spec`` were trained with.

    ``None`` for a model trained from scratch (no source). Raises ValueError when an
    ``hf:`` directory ships no tokenizer (the run must then name one).
    """
    kind, path = init_from.parse(spec)
    if kind == "scratch":
        return None
    if kind == "hf":
        if hf.tokenizer_vocab_size(path) is None:
            raise ValueError(f"model.init_from={spec} ships no tokenizer (no tokenizer.json or "
                             "tokenizer.model): set config.tokenizer")
        return path
    if kind == "workdir":
        return str(init_from.read_run_config(path).get("tokenizer", SCRATCH_TOKENIZER))
    return f"{kind}:{path}"  # a single-file source carrying its own vocabulary (gguf:)


def fingerprint(tokenizer: Tokenizer) -> str:
    """A digest of the piece every id decodes to (and the vocabulary size)."""
    digest = hashlib.sha256(str(tokenizer.vocab_size).encode())
    for i in range(tokenizer.vocab_size):
        digest.update(tokenizer.decode([i], skip_special=False).encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()


def _same_spec(a: str, b: str) -> bool:
    norm = lambda s: s if ":" in s.split(os.sep)[0] else os.path.abspath(s)  # noqa: E731
    return norm(a) == norm(b)


def check_same(source: str, ours: str, theirs: str) -> None:
    """Refuses ``ours`` unless it tokenizes like ``theirs`` (the source run's tokenizer).

    Raises:
      ValueError: naming both specs and the source.
    """
    if _same_spec(ours, theirs):
        return
    a, b = load_tokenizer(ours), load_tokenizer(theirs)
    if a.vocab_size != b.vocab_size or fingerprint(a) != fingerprint(b):
        raise ValueError(
            f"config.tokenizer={ours!r} (vocab {a.vocab_size}) is not the tokenizer "
            f"model.init_from={source} trained with ({theirs!r}, vocab {b.vocab_size}); "
            f"leave config.tokenizer=auto to use the source's, or start from a run that "
            "trained with this tokenizer")


def resolve_tokenizer(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``tokenizer`` is concrete (``auto`` resolved, see above).

    Raises:
      ValueError: an explicit tokenizer differs from a ``workdir:`` source's, or an
        ``hf:`` source without tokenizer files under ``auto``.
    """
    spec = config.model.init_from
    if config.tokenizer == AUTO:
        source = source_tokenizer(spec)
        resolved = source or SCRATCH_TOKENIZER
        if source:
            logging.info("config.tokenizer=auto: %s (from model.init_from=%s)", resolved, spec)
    else:
        resolved = config.tokenizer
        if init_from.parse(spec)[0] == "workdir":
            check_same(spec, resolved, source_tokenizer(spec))
    if resolved == config.tokenizer:
        return config
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.tokenizer = resolved
    out.lock()
    return out
