"""Train any stage: ``python -m launch.train --config=configs/<stage>.py[:preset] --workdir=DIR``.

Override any config value with ``--config.<key>=<value>``; unknown keys are errors.
"""

from absl import flags

from jaxalign.jobs import run_stage
from launch import config_flag, run, start

_CONFIG = config_flag("Stage config file[:preset].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    start(argv)
    # A training stage goes to jaxalign.train.train; a job (rejection rounds) runs itself.
    summary = run_stage(_CONFIG.value, _WORKDIR.value)
    if summary["preempted"]:
        print(f"stopped by SIGTERM after a checkpoint in {_WORKDIR.value}")
        return
    fmt = lambda m: ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items()))  # noqa: E731
    print(f"done in {summary['wall_s']:.0f}s. final train: {fmt(summary['train'])}")
    if summary["eval"]:
        print(f"final eval: {fmt(summary['eval'])}")


def run_main():
    """Console-script entry point (``jaxalign-train``)."""
    run(main)


if __name__ == "__main__":
    run_main()
