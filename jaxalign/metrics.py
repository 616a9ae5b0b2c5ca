"""Metric sinks (JSONL, TensorBoard, W&B, sample text, console progress) and throughput/MFU."""

from __future__ import annotations

import html
import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import storage


def to_python(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Fetches device scalars into plain floats (one host transfer for the dict)."""
    host = jax.device_get(dict(metrics))
    return {k: float(np.asarray(v)) for k, v in host.items()}


class JsonlWriter:
    """Appends one JSON object per logged step to ``WORKDIR/metrics.jsonl``.

    Only process 0 writes; non-finite numbers are written as strings
    ("nan", "inf") so every line stays valid JSON. On an object store every
    line rewrites the object (``storage.open_append``).
    """

    def __init__(self, workdir: str, truncate_after: int | None = None,
                 filename: str = "metrics.jsonl"):
        self.path = storage.join(workdir, filename)
        self._file: Any = None
        if jax.process_index() != 0:
            return
        if truncate_after is not None and storage.exists(self.path):
            lines = storage.read_text(self.path).splitlines(keepends=True)
            # A torn last line (killed mid-write) is dropped with the rows past the step.
            keep = [ln for ln in lines if ln.endswith("\n") and _row_step(ln) <= truncate_after]
            if len(keep) != len(lines):
                storage.write_text(self.path, "".join(keep))
        self._file = storage.open_append(self.path)

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        row: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in metrics.items():
            row[k] = v if math.isfinite(v) else str(v)
        self.append(row)

    def append(self, row: Mapping[str, Any]) -> None:
        """Writes one JSON object as a line (``row`` must carry ``step``)."""
        if self._file is None:
            return
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
    """Reads a metrics file back (used by tests, plots and reports); ``path`` may be a URL."""
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


# -- TensorBoard event files ------------------------------------------------------
# The format is TFRecord framing around ``tensorflow.Event`` protocol buffers. The few
# messages needed are encoded by hand: the writer then needs neither TensorFlow nor a
# TensorBoard package (tensorboardX would import torch whenever it is installed). The
# tests read the files back with TensorBoard's own EventAccumulator.


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, sub-messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary_value: bytes = b"", file_version: str = "",
           session_start: bool = False) -> bytes:
    """``Event{wall_time=1, step=2, file_version=3, summary=5, session_log=7}``."""
    # int64 step as protobuf encodes it (two's complement for a negative one).
    out = (_varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3)
           + _varint(step & 0xFFFFFFFFFFFFFFFF))
    if file_version:
        out += _field(3, file_version.encode())
    if summary_value:
        out += _field(5, _field(1, summary_value))  # Summary{repeated Value value=1}
    if session_start:
        out += _field(7, _varint(1 << 3) + _varint(1))  # SessionLog{status=START}
    return out


def _scalar_value(tag: str, value: float) -> bytes:
    """``Summary.Value{tag=1, simple_value=2}``."""
    return _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)


def _text_value(tag: str, text: str) -> bytes:
    """``Summary.Value{tag=1, tensor=8, metadata=9}``: a DT_STRING tensor for the text plugin."""
    # TensorProto{dtype=1: DT_STRING (7), tensor_shape=2: [1], string_val=8}
    tensor = (_varint(1 << 3) + _varint(7) + _field(2, _field(2, _varint(1 << 3) + _varint(1)))
              + _field(8, text.encode()))
    metadata = _field(1, _field(1, b"text"))  # SummaryMetadata{plugin_data{plugin_name}}
    return _field(1, f"{tag}/text_summary".encode()) + _field(8, tensor) + _field(9, metadata)


class TensorBoardWriter:
    """Scalars and text as TensorBoard event files under ``WORKDIR/tb/`` (no TensorFlow).

    Only process 0 writes. ``purge_step`` makes TensorBoard drop the points at or
    past that step written by an earlier, interrupted run of the same workdir, so
    a resumed run's recomputed steps replace them instead of doubling the curve.
    """

    def __init__(self, workdir: str, purge_step: int | None = None):
        self.logdir = storage.join(workdir, "tb")
        self._file = None
        if jax.process_index() != 0:
            return
        storage.makedirs(self.logdir)
        # TensorBoard reads a directory's files in name order. Whole seconds alone would
        # let a run resumed within the same second reuse the name; microseconds keep
        # the names distinct and in creation order.
        now = time.time_ns() // 1000
        name = (f"events.out.tfevents.{now // 10**6:010d}.{socket.gethostname()}."
                f"{now % 10**6:06d}.{os.getpid()}")
        self._file = storage.open_append(storage.join(self.logdir, name), binary=True)
        self._write(_event(0, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(_event(purge_step, session_start=True))
        self.flush()

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc32c(header)) + record
                         + struct.pack("<I", _masked_crc32c(record)))

    def scalars(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """Writes ``metrics`` as ``<split>/<name>`` scalars at ``step``."""
        if self._file is None:
            return
        for k, v in metrics.items():
            self._write(_event(int(step), summary_value=_scalar_value(f"{split}/{k}", float(v))))

    def text(self, step: int, name: str, text: str) -> None:
        """Writes ``text`` under ``<name>/text_summary`` (TensorBoard's Text tab)."""
        if self._file is not None:
            self._write(_event(int(step), summary_value=_text_value(name, text)))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(
            "config.metrics.wandb_project is set but the wandb package is not installed: "
            "`pip install wandb`, or leave --config.metrics.wandb_project empty") from e
    return wandb


class WandbWriter:
    """Weights & Biases logging, on when ``metrics.wandb_project`` is set (process 0 only).

    The run id is kept in ``WORKDIR/wandb_run_id``, so a resumed workdir continues
    the same W&B run rather than starting a new one.
    """

    def __init__(self, workdir: str, settings: Mapping[str, Any],
                 run_config: Mapping[str, Any] | None = None):
        self._run = None
        self._wandb = None
        if not settings.get("wandb_project") or jax.process_index() != 0:
            return
        wandb = self._wandb = _import_wandb()
        id_path = storage.join(workdir, "wandb_run_id")
        if storage.exists(id_path):
            run_id = storage.read_text(id_path).strip()
        else:
            run_id = wandb.util.generate_id()
            storage.write_text(id_path, run_id + "\n")
        self._run = wandb.init(
            project=settings["wandb_project"], entity=settings.get("wandb_entity") or None,
            name=settings.get("wandb_name") or storage.basename(workdir),
            mode=settings.get("wandb_mode") or None, id=run_id, resume="allow",
            # W&B keeps its own files on a local disk.
            dir=None if storage.is_url(workdir) else workdir,
            config=dict(run_config or {}))

    def scalars(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=int(step))

    def text(self, step: int, name: str, text: str) -> None:
        if self._run is not None:
            self._run.log({name: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")},
                          step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MetricsWriter:
    """Every sink of a run: ``metrics.jsonl``, TensorBoard, W&B and ``samples.jsonl``.

    Train and eval rows go to all metric sinks under the same names (TensorBoard
    and W&B prefix them with the split: ``train/loss``, ``eval/loss``). Only
    process 0 writes anything.

    Args:
      workdir: the run directory.
      settings: the config's ``metrics`` section (``tensorboard``, ``wandb_*``).
      resume_step: the step a (resumed) run starts at: rows logged past it by an
        interrupted run are dropped, as they will be logged again. ``None`` (e.g.
        an evaluation appending to a finished run) keeps everything.
      run_config: the resolved config, recorded by W&B.
    """

    def __init__(self, workdir: str, settings: Mapping[str, Any] | None = None, *,
                 resume_step: int | None = None, run_config: Mapping[str, Any] | None = None):
        settings = dict(settings or {})
        if jax.process_index() == 0:
            storage.makedirs(workdir)
        self.jsonl = JsonlWriter(workdir, truncate_after=resume_step)
        self.samples = JsonlWriter(workdir, truncate_after=resume_step, filename="samples.jsonl")
        self.tb = (TensorBoardWriter(workdir, None if resume_step is None else resume_step + 1)
                   if settings.get("tensorboard", True) else None)
        self.wandb = WandbWriter(workdir, settings, run_config)

    @staticmethod
    def check_sinks(settings: Mapping[str, Any]) -> None:
        """Fails before any compute when a requested sink's package is missing."""
        if settings.get("wandb_project"):
            _import_wandb()

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        """Logs one row of ``split`` (``train``/``eval``/...) metrics at ``step``."""
        self.jsonl.write(step, split, metrics)
        if self.tb is not None:
            self.tb.scalars(step, split, metrics)
            self.tb.flush()
        self.wandb.scalars(step, split, metrics)

    def log_text(self, step: int, name: str, text: str) -> None:
        """Records a sample generation (TensorBoard text, W&B and ``samples.jsonl``)."""
        self.samples.append({"step": int(step), "name": name, "text": text})
        if self.tb is not None:
            self.tb.text(step, name, text)
            self.tb.flush()
        self.wandb.text(step, name, text)

    def close(self) -> None:
        self.jsonl.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()
        self.wandb.close()


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
                         ("accuracy", ".3f"), ("reward", ".3f"), ("kl", ".4f"),
                         ("learning_rate", ".2e"), ("tokens_per_s", ",.0f"), ("mfu", ".3f")):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:{fmt}}")
        parts.append(f"eta {_fmt_duration(eta_s)}")
        print(" | ".join(parts), file=self.stream, flush=True)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


def peak_flops_probe(n: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` f32 ``n``³ matmul FLOP/s on one device (the MFU denominator on
    CPU; a smaller product underestimates the peak)."""
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
    """Tokens/s, padded positions/s and MFU between two logged steps (host wall time).

    ``tokens_per_s`` counts the non-padding tokens of the batches (prompt and
    completion, every packed segment); ``positions_per_s`` counts every position the
    model processed, padding included; ``mfu`` is the model FLOPs of the non-padding
    tokens (``flops_per_token(width)`` each, the batch's padded width as the attention
    length) per second over ``peak_flops``. A batch that runs the unembedding only at
    its loss positions (``add(..., unembedded=n)``) is booked ``unembed_flops`` (6·V·D)
    for those ``n`` tokens only, not for every token.
    """

    def __init__(self, flops_per_token: Any, peak_flops: float, unembed_flops: float = 0.0):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.unembed_flops = unembed_flops
        self._t = time.perf_counter()
        self._tokens = self._positions = self._flops = 0.0

    def add(self, tokens: float, positions: float, width: int,
            unembedded: float | None = None) -> None:
        """Books one batch: its non-padding tokens, all its positions, its row width and,
        when it unembeds only some tokens, how many."""
        self._tokens += tokens
        self._positions += positions
        self._flops += tokens * self.flops_per_token(width)
        if unembedded is not None:
            self._flops -= max(tokens - unembedded, 0.0) * self.unembed_flops

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._tokens = self._positions = self._flops = 0.0

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` (a compilation) out of the current window."""
        self._t += seconds

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "positions_per_s": self._positions / dt}
        if self.peak_flops > 0:
            out["mfu"] = self._flops / dt / self.peak_flops
        self._t = now
        self._tokens = self._positions = self._flops = 0.0
        return out


class StepLog:
    """The loop's log: train rows read one step late, eval rows, progress and throughput.

    A logged step's metrics are fetched only after the next step is queued, so logging
    never leaves the device idle; ``flush`` writes the held row at once (before an
    eval or a checkpoint, whose rows come after it). ``check(row, step)`` runs on
    every train row before it is written (the non-finite guard).
    """

    def __init__(self, writer: MetricsWriter, progress: Progress, throughput: Throughput,
                 *, start: int, total: int, check: Any = None):
        self.writer, self.progress, self.throughput = writer, progress, throughput
        self.start, self.total = start, total
        self.check = check or (lambda row, step: None)
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._pending: list[tuple[int, Any, dict[str, float], dict[str, float]]] = []
        self._t0 = time.perf_counter()

    def hold(self, step: int, metrics: Any, host_metrics: Mapping[str, float],
             data_metrics: Mapping[str, float]) -> None:
        """Keeps ``step``'s row (device metrics unread) until the next ``flush``."""
        self._pending.append((step, metrics, dict(host_metrics), dict(data_metrics)))

    def flush(self) -> None:
        """Writes the held train row, if any."""
        while self._pending:
            done, step_metrics, host_metrics, data_metrics = self._pending.pop()
            row = to_python({**step_metrics, **host_metrics})
            row.update(self.throughput.read())
            row.update(data_metrics)
            self.last_train = row
            self.check(row, done)
            self.writer.write(done, "train", row)
            rate = (time.perf_counter() - self._t0) / max(done - self.start, 1)
            self.progress.update(done, row, rate * (self.total - done))

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes an eval row and restarts the throughput window (evals are not steps)."""
        self.last_eval = dict(metrics)
        self.writer.write(step, "eval", self.last_eval)
        self.progress.line(f"eval @ {step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in sorted(self.last_eval.items())))
        self.throughput.reset()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._t0

    def close(self, *, failed: bool) -> None:
        """Writes what is held and closes the sinks; after an error, never masks it."""
        if not failed:
            self.flush()
        else:
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the error in flight is the one to report
                pass
        self.writer.close()
