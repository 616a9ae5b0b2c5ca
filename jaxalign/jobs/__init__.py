"""Orchestrators that call ``jaxalign.train.train`` from above: the multi-stage
pipeline, sweeps and rejection-sampling rounds. Nothing in ``train.py`` or
``algos/`` imports this package.

:func:`run_stage` is what ``launch.train``, the pipeline and sweeps call for one
config: a training stage goes to ``train()``; a job that drives training itself
(``config.stage = "rejection"``) runs its own ``run``.
"""

from __future__ import annotations

import importlib
from typing import Any

import ml_collections
from jax.sharding import Mesh

from jaxalign import train as train_lib
from jaxalign.config import JOBS


def run_stage(config: ml_collections.ConfigDict, workdir: str,
              mesh: Mesh | None = None) -> dict[str, Any]:
    """Runs one config in ``workdir``: ``train()`` for a stage, the job's ``run`` else."""
    if config.stage in JOBS:
        # A job module provides default_config() and run(config, workdir, mesh=None).
        return importlib.import_module(JOBS[config.stage][0]).run(config, workdir, mesh=mesh)
    return train_lib.train(config, workdir, mesh=mesh)
