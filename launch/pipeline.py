"""Run a multi-stage pipeline (SFT -> RM -> DPO -> GRPO), resuming where it stopped.

    python -m launch.pipeline --config=configs/pipeline.py:demo --workdir=runs/pipeline

Prints the final before/after table and writes ``WORKDIR/report.md`` and
``report.json``. Exits non-zero when a stage fails one of its gates.
"""

import os
import sys

from absl import flags

from jaxalign.jobs.pipeline import GateFailed, Pipeline, render_table
from launch import config_flag, run, start

_CONFIG = config_flag("Pipeline config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; stage i runs in "
                               "WORKDIR/<i>-<name>.")
_STOP_AFTER = flags.DEFINE_string("stop_after", "", "Stop once this stage is finished.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    start(argv)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pipeline = Pipeline(_CONFIG.value.to_dict(), _WORKDIR.value, repo_dir=repo)
    try:
        report = pipeline.run(stop_after=_STOP_AFTER.value)
    except GateFailed as e:
        print(f"GATE FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    print(render_table(report))
    secs = {k: round(v) for k, v in report["train_seconds"].items() if v is not None}
    print(f"train seconds per stage: {secs}")
    print(f"wrote {os.path.join(_WORKDIR.value, 'report.md')} and report.json")


def run_main():
    run(main)


if __name__ == "__main__":
    run_main()
