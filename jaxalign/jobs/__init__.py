"""Orchestrators that call ``jaxalign.train.train`` from above: the multi-stage
pipeline, sweeps and rejection-sampling rounds. Nothing in ``train.py`` or
``algos/`` imports this package."""
