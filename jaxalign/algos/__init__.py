"""Stage registry: ``config.stage`` -> the :class:`~jaxalign.algos.base.Stage` of a module.

Each module here implements one training stage and exposes it as ``STAGE`` (every
hook, its signature and default are in ``jaxalign.algos.base``). Adding a stage is a
module plus a line here. Jobs that drive several stages (rejection-sampling rounds,
the pipeline) are not stages: they live in ``jaxalign.jobs`` and call
``jaxalign.train.train`` from above.
"""

from __future__ import annotations

import importlib

from jaxalign.algos.base import RunContext, Stage

__all__ = ["STAGES", "RunContext", "Stage", "get_stage"]

STAGES = {
    "sft": "jaxalign.algos.sft",
    "rm": "jaxalign.algos.rm",
    "dpo": "jaxalign.algos.dpo",
    "kto": "jaxalign.algos.kto",
    "grpo": "jaxalign.algos.grpo",
    "ppo": "jaxalign.algos.ppo",
    "distill": "jaxalign.algos.distill",
}


def get_stage(name: str) -> Stage:
    """The stage registered as ``name``; unknown names list the known ones."""
    if name not in STAGES:
        raise ValueError(
            f"config.stage={name!r} is not a training stage; known: {sorted(STAGES)} "
            "(jobs such as 'rejection' run through launch.train or jaxalign.jobs.run_stage)")
    return importlib.import_module(STAGES[name]).STAGE
