"""Executes the notebooks (``make notebooks``) and prints each one's wall time.

    python notebooks/run_all.py                      # every notebooks/*.ipynb, in name order
    python notebooks/run_all.py notebooks/01_quickstart.ipynb --timeout=300
    python notebooks/run_all.py --out=/tmp/executed  # also keep the executed copies
    python notebooks/run_all.py --strip              # remove outputs in place (before a commit)

The notebooks run in a kernel of *this* Python (a kernelspec written to a temporary
``JUPYTER_PATH``), so a fresh ``.venv`` needs nothing registered. The files in the repo are
never modified, except by ``--strip``. A failing notebook is reported with the index and the
first line of the failing cell and the error; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_NAME = "jaxalign-notebooks"


def install_kernelspec(root: str) -> str:
    """Writes a kernelspec for this Python under ``root/kernels``; puts ``root`` on JUPYTER_PATH."""
    spec_dir = os.path.join(root, "kernels", KERNEL_NAME)
    os.makedirs(spec_dir, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    with open(os.path.join(spec_dir, "kernel.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        [root] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p])
    return KERNEL_NAME


def strip(path: Path) -> bool:
    """Removes outputs and execution counts in place; returns whether the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            cell.outputs, cell.execution_count = [], None
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def _failed_cell(nb) -> tuple[int, str, str]:
    """(index, first source line, error) of the first code cell with an error output."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                first = next((ln for ln in cell.source.splitlines() if ln.strip()), "")
                return i, first, f"{out.get('ename')}: {out.get('evalue')}"
    return -1, "", ""


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(path: Path, kernel: str, timeout: int,
        out_dir: str | None) -> tuple[bool, float, float, str]:
    """Executes one notebook; returns (ok, wall seconds, kernel CPU seconds, message).

    The CPU time is the kernel process's (user + system, all its threads), which stays
    meaningful when other jobs share the machine and stretch the wall time.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    deadline = t0 + timeout
    started: list[int] = []

    def cell_timeout(cell) -> int:
        # Each cell may use what is left of the notebook's budget.
        started.append(next((i for i, c in enumerate(nb.cells) if c is cell), -1))
        return max(1, int(deadline - time.perf_counter()))

    client = NotebookClient(nb, kernel_name=kernel, timeout_func=cell_timeout,
                            resources={"metadata": {"path": str(path.parent)}})
    ok, message = True, "ok"
    try:
        client.execute()
    except CellTimeoutError:
        ok = False
        index = started[-1] if started else -1
        first = nb.cells[index].source.splitlines()[0] if index >= 0 else ""
        message = f"cell {index} ({first.strip()!r}): the notebook ran past its {timeout}s limit"
    except CellExecutionError:
        ok = False
        index, first, error = _failed_cell(nb)
        message = f"cell {index} ({first.strip()!r}): {error}"
    wall = time.perf_counter() - t0
    cpu = _children_cpu_s() - cpu0  # the kernel has exited (and been reaped) by now
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        nbformat.write(nb, os.path.join(out_dir, path.name))
    return ok, wall, cpu, message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every notebooks/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=600,
                        help="seconds each notebook may run in all (default 600)")
    parser.add_argument("--out", default=None, help="write the executed notebooks here")
    parser.add_argument("--strip", action="store_true",
                        help="remove outputs and execution counts in place; run nothing")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    if not paths:
        print(f"no notebooks in {HERE}", file=sys.stderr)
        return 1
    if args.strip:
        for p in paths:
            print(f"{p}: {'stripped' if strip(p) else 'already clean'}")
        return 0

    kernels = tempfile.mkdtemp(prefix="jaxalign-kernels-")
    kernel = install_kernelspec(kernels)
    # The kernel's debugger otherwise warns about frozen modules in every notebook.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    results = []
    try:
        for p in paths:
            print(f"running {p.name} ...", flush=True)
            ok, wall, cpu, message = run(p, kernel, args.timeout, args.out)
            results.append((p.name, ok, wall, cpu, message))
            print(f"  {'ok    ' if ok else 'FAILED'} {wall:6.1f}s wall, {cpu:6.1f}s CPU  "
                  f"{p.name}" + ("" if ok else f"\n  {message}"), flush=True)
    finally:
        shutil.rmtree(kernels, ignore_errors=True)
    print("\nnotebook times (wall; CPU of the kernel):")
    for name, ok, wall, cpu, message in results:
        print(f"  {name:<36} {wall:6.1f}s {cpu:6.1f}s  {'ok' if ok else 'FAILED: ' + message}")
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
