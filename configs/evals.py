"""Evaluation suites for ``python -m launch.eval`` (see ``jaxalign.evals.suite``).

Presets: ``default`` (the builtin world: held-out loss, task pass@1 / pass@4 / maj@4,
preference accuracy, refusal and over-refusal incl. the red-team split, KL to the
reference, reward-model reward and win rate when an RM is given, with gates) and
``test`` (a few records per eval, seconds).

    python -m launch.eval --workdir=runs/dpo-demo --baseline=runs/sft-demo \\
        --rm=runs/rm-demo --config=configs/evals.py:default

Each entry of ``evals`` is named (its metrics are ``<name>/<metric>``) and has a
``kind`` (a registered eval), a ``source``/``split``, a ``limit`` (0 = every record,
else a seeded subset) and the kind's options. Gates compare the candidate with
the baseline: ``direction`` says which way is better and ``tolerance`` how far
(absolute) the candidate may fall behind before the run fails.
"""

import ml_collections

from configs.common import eval_suite


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    """The eval suite ``arg`` (``default``, ``test``) over the library defaults."""
    return eval_suite(arg)
