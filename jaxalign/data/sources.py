"""Where records come from: a source string ``<scheme>:<rest>`` selects a loader.

Only ``builtin:<name>`` exists so far; ``jsonl:<path>`` and ``tfds:<name>`` register in
``_LOADERS`` the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxalign.data.builtin import load_builtin

# scheme -> loader(rest_of_source, split) -> records.
_LOADERS: dict[str, Callable[[str, str], list[dict]]] = {
    "builtin": load_builtin,
}


def supported_schemes() -> list[str]:
    """Returns the source schemes ``load_records`` understands, e.g. ``["builtin"]``."""
    return sorted(_LOADERS)


def load_records(source: str, split: str) -> list[dict]:
    """Loads all records of one split of a source.

    Args:
      source: e.g. ``"builtin:tasks"``.
      split: the split name, e.g. ``"train"`` or ``"eval"``.

    Returns:
      The records, as dicts in the source's order.

    Raises:
      ValueError: if the scheme is unknown or the source is malformed (naming the
        source and the supported schemes), or if the loader rejects the name or split.
    """
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in _LOADERS or not rest:
        schemes = ", ".join(f"'{s}:'" for s in supported_schemes())
        raise ValueError(f"unsupported data source {source!r}; supported schemes: {schemes}")
    return _LOADERS[scheme](rest, split)
