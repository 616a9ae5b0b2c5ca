"""Run a sweep of one stage config, locally or as commands for a cluster scheduler.

    python -m launch.sweep --config=configs/<stage>.py[:preset] --sweep=NAME --workdir=ROOT

The config file's ``get_sweep(NAME, preset)`` lists the runs (override dicts); they
train one after another in ``ROOT/<run-name>/``, then a table of final metrics is
printed and written to ``ROOT/sweep_summary.{json,md}``, and comparison plots go to
``ROOT/plots/``. ``--config.<key>=<value>`` overrides apply to every run. A failed
run is marked failed in the table and makes the exit status non-zero.

``--print`` prints one ``python -m launch.train ...`` command per run instead, for a
cluster scheduler.
"""

import os
import sys

import jax
from absl import flags
from ml_collections import config_flags

from jaxalign import storage
from jaxalign.config import apply_overrides
from jaxalign.jobs import sweep
from launch import config_flag, run, start

_CONFIG = config_flag("Stage config file[:preset].")
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep name passed to the config's get_sweep.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep root; each run trains in ROOT/<run>/.")
_PRINT = flags.DEFINE_bool("print", False, "Print one launch.train command per run and exit.")
_PLOT = flags.DEFINE_bool("plot", True, "Write comparison plots to ROOT/plots/ at the end.")
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv):
    start(argv)
    config_arg = config_flags.get_config_filename(flags.FLAGS["config"])
    base = config_flags.get_override_values(flags.FLAGS["config"])
    runs = sweep.load_sweep(config_arg, _SWEEP.value)
    root = _WORKDIR.value
    if _PRINT.value:
        for r in runs:  # a misspelled key is an error here, not on the cluster
            apply_overrides(_CONFIG.value, r, where="sweep")
        for name, r in zip(sweep.run_names(runs), runs, strict=True):
            print(sweep.launch_command(config_arg, os.path.join(root, name), r, base))
        return
    results = sweep.run_sweep(_CONFIG.value, runs, root)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    if jax.process_index() == 0:
        report(results, root)
    if failed:
        print(f"{len(failed)} of {len(results)} runs failed: {', '.join(failed)}",
              file=sys.stderr)
        sys.exit(1)


def report(results, root: str) -> None:
    """Prints the summary table and writes the comparison plots."""
    print(sweep.summary_table(results))
    print(f"summary: {os.path.join(root, 'sweep_summary.md')} (and .json)")
    done = [r["workdir"] for r in results
            if storage.exists(storage.join(r["workdir"], "metrics.jsonl"))]
    if _PLOT.value and done:
        from jaxalign.plots import plot_runs

        try:
            paths = plot_runs(done, os.path.join(root, "plots"))
            print(f"plots: {os.path.join(root, 'plots')} ({len(paths)} PNGs)")
        except Exception as e:  # noqa: BLE001 -- the table matters more than the plots
            print(f"plotting failed: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    run(main)
