"""Tokenizers from GGUF metadata (``tokenizer.ggml.*``, ``tokenizer.chat_template``).

* ``tokenizer.ggml.model=gpt2`` (byte-level BPE: tokens, merges, token types) becomes
  the ``tokenizer.json`` a Hugging Face checkpoint of the model ships: ByteLevel
  pre-tokenizer and decoder after llama.cpp's split regexes for
  ``tokenizer.ggml.pre``, BPE with the file's merges, control tokens as special
  added tokens. It loads as an :class:`jaxalign.data.tokenizer.HFTokenizer`.
* ``tokenizer.ggml.model=llama`` (SentencePiece BPE: tokens, scores, token types)
  becomes a SentencePiece model, encoded by SentencePiece itself.

Any other vocabulary type is refused with a ValueError naming the file. The chat
template is exposed like a tokenizer directory's, and renders only in the sandboxed
Jinja of :mod:`jaxalign.data.chat`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from absl import logging

from jaxalign.models import gguf
from jaxalign.models.gguf import GGUFFile

if TYPE_CHECKING:
    from jaxalign.data.tokenizer import Tokenizer

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, in order (a llama3-style
# vocabulary also takes a whole pre-token that is in the vocabulary without merging).
_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"),
                    (_GPT2_SPLIT,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "pixtral",
                     "dbrx"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), (_QWEN2_SPLIT,)),
}
_IGNORE_MERGES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "pixtral", "dbrx")


@dataclasses.dataclass(frozen=True)
class _Vocab:
    tokens: list[str]
    types: list[int]
    specials: dict[str, int | None]  # bos/eos/pad/unk -> id
    template: str | None


def _vocab(g: GGUFFile) -> _Vocab:
    tokens = gguf.meta(g, "tokenizer.ggml.tokens", list)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise g.error("tokenizer.ggml.tokens is not a non-empty list of strings")
    types = gguf.meta(g, "tokenizer.ggml.token_type", list, [_NORMAL] * len(tokens))
    if len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise g.error(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                      "tokens")
    specials = {}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("pad", "padding_token_id"), ("unk", "unknown_token_id")):
        i = gguf.meta(g, f"tokenizer.ggml.{key}", int, -1)
        if i >= len(tokens):
            raise g.error(f"tokenizer.ggml.{key}={i} is past the {len(tokens)} tokens")
        specials[name] = i if i >= 0 else None
    template = gguf.meta(g, "tokenizer.chat_template", str, "") or None
    return _Vocab(tokens, types, specials, template)


def tokenizer_vocab_size(path: str) -> int:
    """The number of token ids the file's tokenizer defines."""
    return len(gguf.meta(gguf.read_file(path), "tokenizer.ggml.tokens", list))


def _special_config(v: _Vocab) -> dict[str, Any]:
    return {f"{k}_token": v.tokens[i] for k, i in v.specials.items() if i is not None}


def tokenizer_json(path: str) -> str:
    """The ``tokenizer.json`` of a byte-level BPE (``tokenizer.ggml.model=gpt2``) vocabulary."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    g = gguf.read_file(path)
    v = _vocab(g)
    merges = gguf.meta(g, "tokenizer.ggml.merges", list)
    pairs = [m.split(" ") if isinstance(m, str) else () for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise g.error("tokenizer.ggml.merges holds an entry that is not two tokens")
    vocab: dict[str, int] = {}
    for i, t in enumerate(v.tokens):
        vocab.setdefault(t, i)
    if len(vocab) < len(v.tokens):
        logging.warning("%s: %d duplicate token(s) in tokenizer.ggml.tokens keep their first id",
                        path, len(v.tokens) - len(vocab))
    pre = gguf.meta(g, "tokenizer.ggml.pre", str, "default")
    if pre not in _PRE_SPLITS:
        logging.warning("%s: pre-tokenizer %r is unknown; splitting text like GPT-2", path, pre)
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(p) for p in pairs],
                                   ignore_merges=pre in _IGNORE_MERGES))
    except Exception as e:  # the Rust side raises a bare Exception
        raise g.error(f"the BPE vocabulary and merges do not fit together ({e})") from None
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated")
              for r in _PRE_SPLITS.get(pre, (_GPT2_SPLIT,))]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    bos = v.specials["bos"]
    if bos is not None and gguf.meta(g, "tokenizer.ggml.add_bos_token", bool, False):
        tok.post_processor = processors.TemplateProcessing(
            single=f"{v.tokens[bos]} $A", pair=f"{v.tokens[bos]} $A $B",
            special_tokens=[(v.tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # llama.cpp matches control and user-defined tokens whole; only control ones are special.
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(v.tokens, v.types, strict=True) if k == _USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(v.tokens, v.types, strict=True)
                            if k in (_CONTROL, _UNKNOWN)])
    return tok.to_str()


def sentencepiece_proto(path: str) -> bytes:
    """A serialized SentencePiece BPE model of a ``tokenizer.ggml.model=llama`` vocabulary.

    llama.cpp tokenizes these like SentencePiece without normalisation: spaces become
    "▁", a space is prepended unless ``tokenizer.ggml.add_space_prefix`` is false, and
    pieces merge by score.
    """
    from sentencepiece import sentencepiece_model_pb2

    g = gguf.read_file(path)
    v = _vocab(g)
    scores = gguf.meta(g, "tokenizer.ggml.scores", list, [0.0] * len(v.tokens))
    if len(scores) != len(v.tokens):
        raise g.error(f"tokenizer.ggml.scores has {len(scores)} entries for {len(v.tokens)} "
                      "tokens")
    tokens = list(v.tokens)
    if gguf.architecture(g).startswith("gemma"):
        # Gemma files spell runs of spaces as spaces; SentencePiece looks them up as "▁".
        seen = set(tokens)
        tokens = [("▁" * len(t) if t and not t.strip(" ") and "▁" * len(t) not in seen else t)
                  for t in tokens]
    model = sentencepiece_model_pb2.ModelProto()
    for t, score, kind in zip(tokens, scores, v.types, strict=True):
        model.pieces.add(piece=t, score=float(score),
                         type=kind if kind in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED,
                                               _UNUSED, _BYTE) else _NORMAL)
    spec = model.trainer_spec
    spec.model_type = 2  # BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = _BYTE in v.types
    for name in ("unk", "bos", "eos", "pad"):
        i = v.specials[name]
        setattr(spec, f"{name}_id", -1 if i is None else i)
        if i is not None:
            setattr(spec, f"{name}_piece", tokens[i])
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = gguf.meta(g, "tokenizer.ggml.add_space_prefix", bool, True)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


def tokenizer_kind(path: str) -> str:
    """``tokenizer.ggml.model``, checked to be one jaxalign rebuilds (gpt2 or llama)."""
    g = gguf.read_file(path)
    kind = gguf.meta(g, "tokenizer.ggml.model", str)
    if kind not in ("gpt2", "llama"):
        raise g.error(f"tokenizer.ggml.model={kind!r} is not supported: jaxalign rebuilds "
                      "'gpt2' (byte-level BPE) and 'llama' (SentencePiece BPE) vocabularies")
    return kind


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer (and chat template) a GGUF file carries.

    Raises:
      ValueError: no or an unsupported tokenizer in the file; the message names it.
    """
    from jaxalign.data.tokenizer import HFTokenizer, SentencePieceTokenizer

    kind = tokenizer_kind(path)
    g = gguf.read_file(path)
    v = _vocab(g)
    if v.specials["eos"] is None:
        raise g.error("tokenizer.ggml.eos_token_id is missing: without an end-of-sequence "
                      "token turns cannot end; name a tokenizer with config.tokenizer")
    name = f"gguf:{path}"
    if kind == "gpt2":
        return HFTokenizer(json_str=tokenizer_json(path), name=name, config=_special_config(v),
                           chat_template=v.template)
    return SentencePieceTokenizer(model_proto=sentencepiece_proto(path), name=name,
                                  chat_template=v.template)


def write_hf_tokenizer(path: str, out: str, carried: dict[str, Any]) -> list[str] | None:
    """Writes a byte-level GGUF vocabulary as ``tokenizer.json`` + ``tokenizer_config.json``.

    Returns None for a SentencePiece vocabulary (written from :func:`sentencepiece_proto`
    like any SentencePiece model). The file's token ids are added to ``carried``.
    """
    if tokenizer_kind(path) != "gpt2":
        return None
    g = gguf.read_file(path)
    v = _vocab(g)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer_json(path))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", **_special_config(v),
        "add_bos_token": gguf.meta(g, "tokenizer.ggml.add_bos_token", bool, False),
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000}
    if v.template:
        config["chat_template"] = v.template
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    eos = v.specials["eos"]
    pad = v.specials["pad"] if v.specials["pad"] is not None else eos
    carried.update({k: i for k, i in (("bos_token_id", v.specials["bos"]),
                                      ("eos_token_id", eos), ("pad_token_id", pad))
                    if i is not None})
    return ["tokenizer.json", "tokenizer_config.json"]

