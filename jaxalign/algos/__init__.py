"""Stage registry: ``config.stage`` -> the stage module.

A stage module provides ``make_loss(config) -> (loss_fn, loss_weights)`` (see
``jaxalign.step``), optionally ``make_model`` (default: the decoder) and
``frozen_models(config)`` (names of frozen models the step needs),
``build_data(config, tokenizer, split, *, process_index, process_count)`` (usually
``jaxalign.data.loader.build_loader`` with the stage's record format: a ``Loader``
with ``iterator()``, ``eval_batches()`` and ``batch_spec()``) and
``tokens_per_batch(batch)``. A stage that drives other stages instead (rejection
sampling's rounds) provides ``run(config, workdir, mesh=None) -> summary``, which
``jaxalign.train.train`` calls in place of the loop. Adding a stage is a module plus a
line here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = {
    "sft": "jaxalign.algos.sft",
    "rm": "jaxalign.algos.rm",
    "dpo": "jaxalign.algos.dpo",
    "kto": "jaxalign.algos.kto",
    "grpo": "jaxalign.algos.grpo",
    "ppo": "jaxalign.algos.ppo",
    "rejection": "jaxalign.jobs.rejection",
}


def get_stage(name: str) -> ModuleType:
    """Imports the module implementing ``name``; unknown names list the known ones."""
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is not a known stage; known: {sorted(STAGES)}")
    return importlib.import_module(STAGES[name])
