"""Metric sinks (JSONL, console progress) and throughput/MFU accounting."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Fetches device scalars into plain floats (one host transfer for the dict)."""
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


class JsonlWriter:
    """Appends one JSON object per logged step to ``WORKDIR/metrics.jsonl``.

    Only process 0 writes; non-finite numbers are written as strings
    ("nan", "inf") so every line stays valid JSON.
    """

    def __init__(self, workdir: str, truncate_after: int | None = None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file: TextIO | None = None
        if jax.process_index() != 0:
            return
        if truncate_after is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
            # A torn last line (killed mid-write) is dropped with the rows past the step.
            keep = [ln for ln in lines if ln.endswith("\n") and _row_step(ln) <= truncate_after]
            if len(keep) != len(lines):
                tmp = self.path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(keep)
                os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            return
        row: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in metrics.items():
            row[k] = v if math.isfinite(v) else str(v)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Reads a metrics file back (used by tests, plots and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt_duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """One console line per logged step: step, loss, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, stream: TextIO | None = None):
        self.total = total_steps
        self.stream = stream or sys.stdout
        self.enabled = jax.process_index() == 0

    def update(self, step: int, metrics: Mapping[str, float], eta_s: float) -> None:
        if not self.enabled:
            return
        width = len(str(self.total))
        parts = [f"step {step:>{width}}/{self.total}"]
        for key, fmt in (("loss", ".4f"), ("token_accuracy", ".3f"), ("grad_norm", ".3f"),
                         ("learning_rate", ".2e"), ("tokens_per_s", ",.0f"), ("mfu", ".3f")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        parts.append(f"eta {_fmt_duration(eta_s)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


def peak_flops_probe(n: int = 1024, repeats: int = 3) -> float:
    """Best-of-``repeats`` f32 matmul FLOP/s on one device (the MFU denominator on CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


class Throughput:
    """Tokens/s and MFU between two logged steps (host wall time)."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self._t = time.perf_counter()
        self._tokens = 0.0

    def add_tokens(self, n: float) -> None:
        self._tokens += n

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0.0

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        tps = self._tokens / dt
        out = {"tokens_per_s": tps}
        if self.peak_flops > 0:
            out["mfu"] = tps * self.flops_per_token / self.peak_flops
        self._t, self._tokens = now, 0.0
        return out
