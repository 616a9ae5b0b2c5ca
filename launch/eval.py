"""Evaluate a checkpoint, optionally against a baseline, with regression gates.

    python -m launch.eval --workdir=DIR [--hf=DIR] [--config=configs/evals.py:<preset>]
        [--baseline=<workdir or hf:DIR>] [--reference=<checkpoint>] [--rm=<RM workdir>]
        [--out=DIR] [--gate=metric:direction:tolerance ...] [--config.<key>=<value> ...]

Runs the evals the config lists (default ``configs/evals.py:default``) and writes
``report.json``, ``report.md`` and ``samples/<candidate|baseline>/<eval>.jsonl`` to
``--out`` (default ``DIR/eval``). With ``--baseline`` both checkpoints are evaluated
and shown side by side; a gate that the candidate fails is printed and the command
exits with status 1.
"""

import os
import sys

from absl import app, flags

from jaxalign.evals import report as eval_report
from launch import config_flag, run, start

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "evals.py") + ":default"
_CONFIG = config_flag("Evals config file[:preset].", default=_DEFAULT_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate (its latest "
                               "checkpoint).")
_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory to evaluate instead.")
_BASELINE = flags.DEFINE_string("baseline", "", "Checkpoint to compare with: a workdir, "
                                "workdir:DIR or hf:DIR.")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference checkpoint for KL and implicit "
                                 "rewards (overrides config.reference; '' = none; "
                                 "'teacher' = a distillation run's teacher).")
_RM = flags.DEFINE_string("rm", "", "Reward-model workdir for reward evals and win rates "
                          "(overrides config.rewards).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <checkpoint>/eval).")
_GATE = flags.DEFINE_multi_string("gate", [], "Extra gate metric:direction[:tolerance"
                                  "[:threshold]], added to the config's.")


def main(argv):
    start(argv)
    if (_WORKDIR.value is None) == (_HF.value is None):
        raise app.UsageError("give exactly one of --workdir and --hf")
    candidate = _WORKDIR.value or f"hf:{_HF.value}"
    out = _OUT.value or os.path.join(_WORKDIR.value or _HF.value, "eval")
    report = eval_report.evaluate(_CONFIG.value.to_dict(), candidate, baseline=_BASELINE.value,
                                  reference=_REFERENCE.value, rm=_RM.value, out_dir=out,
                                  extra_gates=_GATE.value)
    print(eval_report.render_markdown(report))
    print(f"wrote {os.path.join(out, 'report.json')} and report.md")
    failed = [g for g in report["gates"] if g["status"] == "fail"]
    for g in failed:
        print(f"GATE FAILED: {g['metric']} ({g['direction']} is better, tolerance "
              f"{g['tolerance']:g}): {g['reason']}", file=sys.stderr)
    for h in report["reward_hacking"]:
        if h["flagged"]:
            print(f"REWARD HACKING: {h['learned']} rose by {h['learned_delta']:.4g} while "
                  f"{h['verifiable']} fell by {-h['verifiable_delta']:.4g}", file=sys.stderr)
    if not report["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
