"""The accelerator set of BENCHMARKS.md on one card: B1 (SFT MFU, bf16 compute, ~1B params)
with the attention backends and memory switches side by side, then B7/B8 (decode bandwidth
and sampler overhead) at batch 1.

B1 here: model FLOPs per step / step time / a same-repetition bf16 8192^3 ``jnp.dot``
probe on random data, for the ``llama3.2-1b`` architecture (1.24B params, tied
embeddings, vocab 128256) at batch 8 x 2048, f32 master weights and AdamW state, bf16
compute. Each contender is built, compiled, timed against the probe and freed before the
next, so only one 1B state is on the card at a time; its first-step loss must match the
first contender's (same weights, same batch) within bf16 tolerance. A contender that does
not fit or does not compile is reported as such and the run goes on. MFU is also given
against the card's datasheet peak where the card is known.

    python -m benchmarks.gpu                 # on a GPU: the 1B shape
    python -m benchmarks.gpu --quick         # a small shape; runs anywhere, the CPU too
    python -m benchmarks.gpu --only b7       # decode only
"""

from __future__ import annotations

import gc
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from benchmarks.sampler import decode_rows
from benchmarks.sft_step import build_sft, peak_probe
from jaxalign import sharding as shd
from jaxalign.config import model_config

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), for context only:
# the B1 figure itself divides by the same-repetition probe.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}

CONTENDERS: dict[str, dict[str, Any]] = {
    "attention=cudnn": dict(attention="cudnn"),
    "attention=cudnn, logits_chunk=1024": dict(attention="cudnn", logits_chunk=1024),
    "attention=xla": dict(attention="xla"),
    "attention=cudnn, scan+remat=dots": dict(attention="cudnn", scan_layers=True,
                                             remat="dots"),
    "attention=cudnn, scan+remat=full": dict(attention="cudnn", scan_layers=True,
                                             remat="full"),
}


def _shapes(quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training shape, decode shape); both bf16 compute, decode with bf16 weights."""
    if quick:
        model = dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                     head_dim=64, mlp_dim=768, tie_embeddings=True)
        train = dict(model=dict(model, dtype="bfloat16"), batch=4, seq=256)
        decode = dict(model=dict(model, dtype="bfloat16", param_dtype="bfloat16"),
                      prompt=16, new=32)
        return train, decode
    model = {k: v for k, v in model_config("llama3.2-1b").items()
             if k not in ("lora", "init_from")}
    train = dict(model=dict(model, dtype="bfloat16"), batch=8, seq=2048)
    decode = dict(model=dict(model, dtype="bfloat16", param_dtype="bfloat16"),
                  prompt=128, new=256)
    return train, decode


def _datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in DATASHEET_BF16.items() if k in kind), None)


def b1_contender(name: str, shape: dict[str, Any], switches: dict[str, Any], reps: int,
                 probe_n: int, probe_dtype: Any) -> tuple[dict[str, Any], float]:
    """Builds, compiles and times one contender; returns its B1 row and first-step loss."""
    b, t = shape["batch"], shape["seq"]
    bench = build_sft(dict(shape, model=dict(shape["model"], **switches)))
    compile_s, mem = bench.compile()
    _, m = bench.run()
    loss0 = float(m["loss"])
    bench.run()
    flops = bench.model_cfg.flops_per_token(t) * b * t
    mfus, peaks, steps = [], [], []
    for _ in range(reps):
        peaks.append(peak_probe(probe_n, probe_dtype))
        dt, _ = bench.run()
        steps.append(dt)
        mfus.append(flops / dt / peaks[-1])
    n_params = bench.n_params
    del bench
    gc.collect()

    step_s = statistics.median(steps)
    achieved = flops / step_s
    sheet = _datasheet_peak()
    extra = (f"; {achieved / 1e12:.0f} TFLOP/s = {achieved / sheet:.3f} of the datasheet "
             f"{sheet / 1e12:.0f}" if sheet else "")
    conf = (f"{name}; {n_params / 1e9:.3f}B params, batch {b} x {t}, bf16 compute, f32 AdamW, "
            f"{reps} reps; step {step_s * 1e3:.0f} ms, probe "
            f"{statistics.median(peaks) / 1e12:.3g} TFLOP/s{extra}; compile {compile_s:.0f}s, "
            f"temp {mem.temp_size_in_bytes / 1e9:.1f} GB; first loss {loss0:.4f}; FLOPs/token "
            f"= 6*N_matmul + 6*L*T*D = {flops / (b * t):.4g}")
    print(conf, flush=True)
    return report.row("B1", f"SFT MFU vs same-rep {probe_n}^3 dot probe", mfus,
                      ">= 0.45 bf16 at 1B", conf, device=report.device_label("bf16"),
                      compile_s=compile_s, temp_bytes=mem.temp_size_in_bytes,
                      step_s=step_s), loss0


def packed_agreement(attention: str) -> dict[str, Any]:
    """First-step loss and gradient norm of a small bf16 model on a packed batch (two
    segments and padding per row) with ``attention`` vs the einsum path: the masks of
    packing reach the library kernels intact. Returns the row."""
    shape = dict(model=dict(vocab_size=2048, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=64, mlp_dim=768, dtype="bfloat16"), batch=4, seq=256)
    t = shape["seq"]
    seg = np.concatenate([np.full(100, 1), np.full(120, 2), np.zeros(t - 220)]).astype(np.int32)
    pos = np.concatenate([np.arange(100), np.arange(120), np.zeros(t - 220)]).astype(np.int32)
    got = {}
    for impl in ("xla", attention):
        bench = build_sft(dict(shape, model=dict(shape["model"], attention=impl)))
        b = shape["batch"]
        batch = dict(jax.device_get(bench.batch), segment_ids_bt=np.tile(seg, (b, 1)),
                     positions_bt=np.tile(pos, (b, 1)),
                     loss_mask_bt=np.tile((seg > 0).astype(np.float32), (b, 1)))
        bench.batch = shd.global_batch(batch, bench.mesh)
        _, m = bench.run()
        got[impl] = (float(m["loss"]), float(m["grad_norm"]))
    (l0, g0), (l1, g1) = got["xla"], got[attention]
    rel = max(abs(l1 - l0) / abs(l0), abs(g1 - g0) / abs(g0))
    figure = (f"attention={attention} vs xla on a packed bf16 batch: loss {l1:.5f} vs {l0:.5f}, "
              f"grad norm {g1:.5f} vs {g0:.5f} (max rel diff {rel:.2e})")
    print(figure, flush=True)
    return report.row("check", "packed-mask agreement", None, "rel diff <= 2e-2",
                      "2 layers, batch 4 x 256, segments 100+120+56 pad", figure=figure,
                      rel_diff=rel, **({"error": "mismatch"} if rel > 2e-2 else {}))


def main() -> None:
    parser = report.parser(__doc__, reps=0)
    parser.add_argument("--only", default="check,b1,b7",
                        help="any of check (packed-mask agreement), b1, b7; comma-separated")
    parser.add_argument("--contenders", default=";".join(CONTENDERS),
                        help="B1 contenders to run, by name, ';'-separated")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    train, decode = _shapes(args.quick)
    on_gpu = jax.default_backend() == "gpu"
    probe_n, probe_dtype = (8192, jnp.bfloat16) if on_gpu else (1024, jnp.float32)
    print(f"device: {report.device_label('bf16')}; jax {jax.__version__}; "
          f"{len(jax.devices())} devices", flush=True)

    rows: list[dict[str, Any]] = []
    only = {x.strip().lower() for x in args.only.split(",")}
    if "check" in only:
        rows.append(packed_agreement("cudnn" if on_gpu else "dot_product"))
    if "b1" in only:
        first_loss = None
        names = [n.strip() for n in args.contenders.split(";") if n.strip()]
        unknown = [n for n in names if n not in CONTENDERS]
        if unknown:
            parser.error(f"unknown contenders {unknown}; known: {list(CONTENDERS)}")
        for name in names:
            switches = dict(CONTENDERS[name])
            if not on_gpu and switches.get("attention") == "cudnn":
                switches["attention"] = "dot_product"  # what runs off a GPU
            try:
                row, loss0 = b1_contender(name, train, switches, reps, probe_n, probe_dtype)
            except Exception as e:  # noqa: BLE001 - an OOM or a compile failure is a result
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
                print(f"{name}: FAILED {type(e).__name__}: {msg}", flush=True)
                rows.append(report.row("B1", name, None, ">= 0.45 bf16 at 1B", name,
                                       figure=f"{name}: failed ({type(e).__name__}: {msg})",
                                       error=msg))
                gc.collect()
                continue
            if first_loss is None:
                first_loss = loss0
            elif abs(loss0 - first_loss) > 2e-2 * abs(first_loss):
                row["figure"] += f" -- LOSS MISMATCH {loss0:.4f} vs {first_loss:.4f}"
                row["error"] = "first-step loss differs from the first contender's"
            rows.append(row)
    if "b7" in only:
        rows += decode_rows(decode, batch=1, reps=reps, best_of=3,
                            probe_bytes=(2 * 2**30 if on_gpu else 192 * 2**20),
                            min_agreement=None)
    report.emit(rows, args.json)


if __name__ == "__main__":
    main()
