"""Stage registry: ``config.stage`` -> the stage module.

A stage module provides ``loss_fn(model, batch) -> LossOut``,
``build_data(config, tokenizer, split, *, process_index, process_count)`` and
``tokens_per_batch(batch)``. Adding a stage is a module plus a line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "sft": "jaxalign.algos.sft",
}


def get_stage(name: str) -> ModuleType:
    """Imports the module implementing ``name``; unknown names list the known ones."""
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is not a known stage; known: {sorted(STAGES)}")
    return importlib.import_module(STAGES[name])
