"""The CPU benchmark set of BENCHMARKS.md in one command, printed as one table.

Each comparison runs in its own process (interleaved repetitions inside it, as the
protocol asks): B1/B2/B11 (``sft_step``), B3 and the compute switches
(``techniques``), B4/B5 (``dpo_step``), B6 (``b6_packing``), B7/B8 (``sampler``),
B9 (``rl_step``), B12 (``distill_step``), then the peer comparisons P1–P4 (``peers``)
and P5/P6 against TRL on a real checkpoint (``real_model``), which build and use their
own virtual environment (Tunix, TRL, torch, transformers are never dependencies of
jaxalign). The table lists id, figure, target, configuration and device.

    python -m benchmarks.run              # the BENCHMARKS.md shapes
    python -m benchmarks.run --quick      # small shapes, a few minutes
    python -m benchmarks.run --only B1,B4 --no-peers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import report

# (module, ids it reports, extra arguments for --quick, extra environment)
SUITE = (
    ("benchmarks.sft_step", ("B1", "B2", "B11"), ["--quick"], {}),
    ("benchmarks.state_bytes", ("B11",), ["--quick"], {"JAX_NUM_CPU_DEVICES": "8"}),
    ("benchmarks.techniques", ("B3",), ["--quick"], {}),
    ("benchmarks.dpo_step", ("B4", "B5"), ["--quick"], {}),
    ("benchmarks.b6_packing", ("B6",), ["--reps=3"], {}),
    ("benchmarks.sampler", ("B7", "B8"), ["--quick"], {}),
    ("benchmarks.rl_step", ("B9",), ["--quick"], {"JAX_NUM_CPU_DEVICES": "8"}),
    ("benchmarks.distill_step", ("B12",), ["--quick"], {}),
    ("benchmarks.peers", ("P1", "P2", "P3", "P4"), ["--quick"], {}),
    ("benchmarks.real_model", ("P5", "P6"), ["--quick"], {}),
)
PEER_MODULES = ("benchmarks.peers", "benchmarks.real_model")


def run_one(module: str, args: list[str], log_dir: str,
            env: dict[str, str]) -> tuple[list[dict], float, str]:
    """Runs one benchmark process; returns its rows, wall seconds and log path."""
    out = os.path.join(log_dir, module.rsplit(".", 1)[1])
    cmd = [sys.executable, "-m", module, *args, f"--json={out}.json"]
    t0 = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, **env})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(f"{out}.json"):
        with open(f"{out}.log") as f:
            tail = "".join(f.readlines()[-15:])
        return [dict(id=module, figure=f"FAILED (exit {proc.returncode}); see {out}.log",
                     target="", config=" ".join(cmd[2:]), device="", error=tail)], seconds, out
    with open(f"{out}.json") as f:
        return json.load(f), seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a few minutes)")
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. B1,B4,P1")
    parser.add_argument("--no-peers", action="store_true", help="skip P1-P6")
    parser.add_argument("--out", default="", help="directory for logs and results.json")
    args = parser.parse_args()
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    log_dir = args.out or tempfile.mkdtemp(prefix="jaxalign-bench-")
    os.makedirs(log_dir, exist_ok=True)

    rows, failed = [], []
    for module, ids, quick_args, env in SUITE:
        if only and not only & set(ids):
            continue
        if args.no_peers and module in PEER_MODULES:
            continue
        extra = list(quick_args) if args.quick else []
        if module in PEER_MODULES:
            extra.append("--only=" + ",".join(sorted(only & set(ids) if only else ids)))
        print(f"[{time.strftime('%H:%M:%S')}] {module} {' '.join(extra)} ...", flush=True)
        got, seconds, log = run_one(module, extra, log_dir, env)
        print(f"    {seconds:.0f}s, log {log}.log", flush=True)
        rows += got
        failed += [r for r in got if "error" in r]

    print()
    report.emit(rows, os.path.join(log_dir, "results.json"))
    print(f"\nlogs and results.json in {log_dir}")
    for r in failed:
        print(f"\n{r['id']} failed:\n{r['error']}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
