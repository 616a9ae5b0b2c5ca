"""PNG curves from one or more runs' ``metrics.jsonl``, overlaid for comparison.

Metrics are grouped by what they measure (loss, rewards/accuracy, KL, learning
rate, throughput, ...); each group becomes one figure with a panel per metric,
each run one colour, train rows solid and eval rows dashed.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from jaxalign import storage
from jaxalign.metrics import read_jsonl

# (group, test on the metric name); the first match wins, the rest go to "other".
_GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("kl", lambda k: re.search(r"(^|[/_])kl($|[/_])", k) is not None),
    ("loss", lambda k: k.endswith("loss") or "nll" in k or "perplexity" in k),
    ("reward_accuracy", lambda k: any(w in k for w in ("reward", "accuracy", "margin", "pass",
                                                       "score", "win_rate"))),
    ("logprobs", lambda k: "logp" in k or "logit" in k),
    ("learning_rate", lambda k: k == "learning_rate"),
    ("throughput", lambda k: k in ("tokens_per_s", "positions_per_s", "mfu")
     or k.startswith("time")),
    ("optimization", lambda k: k.endswith("_norm") or k.startswith("nonfinite")),
    ("data", lambda k: k.startswith("data_")),
)
_TITLES = {"reward_accuracy": "reward / accuracy", "learning_rate": "learning rate"}


def metric_group(name: str) -> str:
    """The figure a metric is drawn in (``loss``, ``kl``, ..., ``other``)."""
    for group, test in _GROUPS:
        if test(name):
            return group
    return "other"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return None
    try:
        return float(v)  # non-finite numbers are stored as "nan"/"inf" strings
    except ValueError:
        return None


def load_series(workdir: str) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """``{(split, metric): (steps, values)}`` from ``workdir/metrics.jsonl``.

    Raises:
      FileNotFoundError: the workdir has no ``metrics.jsonl``.
    """
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a jaxalign run directory?")
    out: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for row in read_jsonl(path):
        step, split = row.get("step"), row.get("split", "train")
        for k, v in row.items():
            x = _number(v)
            if k in ("step", "split") or x is None:
                continue
            steps, values = out.setdefault((split, k), ([], []))
            steps.append(int(step))
            values.append(x)
    return out


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Workdir basenames, or the paths as given where basenames collide."""
    names = [storage.basename(w) for w in workdirs]
    if len(set(names)) == len(names):
        return names
    return [w.rstrip("/") if storage.is_url(w) else os.path.normpath(w) for w in workdirs]


def plot_runs(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None,
              dpi: int = 100) -> list[str]:
    """Writes ``out/<group>.png`` for every metric group present in any run.

    Args:
      workdirs: run directories holding ``metrics.jsonl``.
      out: output directory (created), local or a URL.
      labels: legend names, one per workdir; default :func:`run_labels`.
      dpi: resolution of the PNGs.

    Returns:
      The written paths, in group order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(labels) if labels is not None else run_labels(workdirs)
    runs = [load_series(w) for w in workdirs]
    metrics_by_group: dict[str, list[str]] = {}
    for series in runs:
        for _, key in series:
            keys = metrics_by_group.setdefault(metric_group(key), [])
            if key not in keys:
                keys.append(key)
    order = [g for g, _ in _GROUPS] + ["other"]
    storage.makedirs(out)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    paths = []
    for group in sorted(metrics_by_group, key=order.index):
        keys = sorted(metrics_by_group[group])
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, key in zip(axes, keys, strict=False):
            for series, label, color in zip(runs, labels, colors, strict=True):
                for (split, k), (steps, values) in sorted(
                        series.items(), key=lambda item: (item[0][0] != "train", item[0])):
                    if k != key:
                        continue
                    # Train curves are dense lines; eval points are sparse, so mark them.
                    style = (dict(linestyle="-") if split == "train"
                             else dict(linestyle="--", marker="o", markersize=3))
                    ax.plot(steps, values, color=color, label=f"{label} {split}", **style)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        if len(keys) > 1:
            fig.suptitle(_TITLES.get(group, group))
        path = storage.join(out, f"{group}.png")
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=dpi)
        storage.write_bytes(path, png.getvalue())
        paths.append(path)
    return paths


def default_out(workdirs: Sequence[str]) -> str:
    """``DIR/plots`` for one run; ``<common parent>/plots`` for several."""
    if len(workdirs) == 1:
        return storage.join(workdirs[0], "plots")
    if any(storage.is_url(w) for w in workdirs):
        # The longest common prefix of whole components (posixpath keeps "gs://" intact).
        parts = [w.rstrip("/").split("/") for w in workdirs]
        common = []
        for p in zip(*parts, strict=False):
            if len(set(p)) != 1:
                break
            common.append(p[0])
        if len(common) < 3:  # not even one bucket in common
            raise ValueError(f"runs {list(workdirs)} share no directory to write plots to: "
                             "name an output directory")
        return "/".join([*common, "plots"])
    parent = os.path.commonpath([os.path.abspath(w) for w in workdirs])
    return os.path.join(parent, "plots")
