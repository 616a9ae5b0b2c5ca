"""Evaluation: the eval registry and its scoring (``suite``), generation metrics for
in-training evals (``generation``), and candidate-vs-baseline reports with regression
gates (``report``)."""
