"""Ship a SentencePiece BPE model as a Hugging Face ``tokenizer.json``.

transformers turns a bare ``tokenizer.model`` into a fast tokenizer with its
own assumptions (and, in transformers 5, may even pick the tokenizer class
from ``config.json``'s model type), which can split text differently from
SentencePiece: digits, for one, when the model was trained with
``split_digits``. A ``tokenizer.json`` that spells out SentencePiece's own
normalisation, pre-splitting and merge order encodes exactly like
``SentencePieceProcessor.encode`` whichever class loads it.
"""

from __future__ import annotations

import re
from typing import Any

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6


def _model_proto(proto: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    return model


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merge rules implied by a SentencePiece BPE vocabulary.

    SentencePiece merges the adjacent pair whose union is the highest-scoring
    piece; a BPE merge list ranked by that score (ties by id) reproduces it.

    Args:
      pieces: ``(piece, score, type)`` in id order.
    """
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def tokenizer_json(proto: bytes) -> str:
    """The ``tokenizer.json`` equivalent of a serialized SentencePiece BPE model.

    Raises:
      ValueError: the model is not BPE (unigram models need another converter).
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    model = _model_proto(proto)
    if model.trainer_spec.model_type != 2:  # BPE
        raise ValueError("only SentencePiece BPE models can be written as tokenizer.json here")
    pieces = [(p.piece, p.score, p.type) for p in model.pieces]
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    spec = model.normalizer_spec
    unk = model.trainer_spec.unk_piece or "<unk>"
    user = [p for p, _, kind in pieces if kind == _USER_DEFINED]
    # User-defined pieces are emitted whole and never built by merges: isolate them in
    # pre-splitting and let BPE take any in-vocabulary chunk as is.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(pieces), unk_token=unk,
                               fuse_unk=True, byte_fallback=model.trainer_spec.byte_fallback,
                               ignore_merges=bool(user)))
    norm = []
    if spec.precompiled_charsmap:
        norm.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                 normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        norm.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    splits = []
    if user:
        pattern = "|".join(re.escape(p) for p in sorted(user, key=len, reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if model.trainer_spec.split_digits:
        splits.append(pre_tokenizers.Split(Regex("[0-9]"), behavior="isolated"))
    if splits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    dec = [decoders.Replace("▁", " ")]
    if model.trainer_spec.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    bos = model.trainer_spec.bos_id
    if 0 <= bos < len(pieces):
        # Like transformers' Llama tokenizers (add_bos_token): encode() starts with bos.
        tok.post_processor = processors.TemplateProcessing(
            single=f"{pieces[bos][0]} $A", pair=f"{pieces[bos][0]} $A $B",
            special_tokens=[(pieces[bos][0], bos)])
    specials = [p for p, _, kind in pieces if kind in (_CONTROL, _UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    return tok.to_str(pretty=True)
