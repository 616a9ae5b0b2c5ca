"""Plot runs: ``python -m launch.plot --workdir=DIR [--workdir=DIR2 ...] [--out=DIR]``.

Writes one PNG per metric group (loss, rewards/accuracy, KL, learning rate,
throughput, ...) with the runs overlaid, labelled by their workdir basenames.
``--out`` defaults to ``DIR/plots`` for one run and ``<common parent>/plots`` for several.
"""

from absl import flags

from jaxalign.plots import default_out, plot_runs
from launch import run, start

_WORKDIR = flags.DEFINE_multi_string("workdir", None, "Run directory; repeat to compare runs.")
_OUT = flags.DEFINE_string("out", None, "Output directory for the PNGs.")
flags.mark_flag_as_required("workdir")


def main(argv):
    start(argv, quiet=False)
    out = _OUT.value or default_out(_WORKDIR.value)
    for path in plot_runs(_WORKDIR.value, out):
        print(path)


if __name__ == "__main__":
    run(main)
