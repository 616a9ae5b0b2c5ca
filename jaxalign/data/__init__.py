"""The data layer: record sources, tokenizers and batch pipelines.

Names are re-exported lazily so that ``python -m jaxalign.data.builtin`` does not
import its own module twice through this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_DATASETS": "builtin",
    "load_builtin": "builtin",
    "train_builtin_tokenizer": "builtin",
    "open_source": "sources",
    "load_records": "sources",
    "Tokenizer": "tokenizer",
    "SentencePieceTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "check_vocab": "tokenizer",
    "get_template": "chat",
    "RecordError": "records",
    "validate": "records",
    "Encoder": "encode",
    "DataSettings": "loader",
    "Loader": "loader",
    "DataIterator": "loader",
    "build_loader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
