"""B3 (remat) and the effect of every compute switch on the SFT step, in one process.

Contenders are the same jaxalign SFT step (same params, same batch) built with one
switch changed: ``scan_layers``, remat policies (under scan), ``attention=dot_product``,
``logits_chunk`` and bf16 compute. Each repetition runs every contender once, in turn;
the report gives, per switch, the median per-repetition step-time ratio to the plain
step (with min/max), the compiled step's temporary bytes (``memory_analysis``) and its
compile time. It ends with what fits in a given memory: the largest batch of the
benchmark model, and the largest released preset at a batch, both from ahead-of-time
compilation on abstract shapes (nothing is allocated).

    python -m benchmarks.techniques            # the 27M shape of BENCHMARKS.md
    python -m benchmarks.techniques --quick    # a small shape, about a minute
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import report
from benchmarks.sft_step import SHAPES, build_sft, sft_step_layout
from jaxalign.algos import sft
from jaxalign.config import model_config
from jaxalign.models.transformer import Transformer, TransformerConfig

SWITCHES: dict[str, dict[str, Any]] = {
    "plain": {},
    "scan_layers": dict(scan_layers=True),
    "scan+remat=full": dict(scan_layers=True, remat="full"),
    "scan+remat=dots": dict(scan_layers=True, remat="dots"),
    "scan+remat=qkv_proj": dict(scan_layers=True, remat="qkv_proj"),
    "remat=full (unrolled)": dict(remat="full"),
    "attention=dot_product": dict(attention="dot_product"),
    "logits_chunk=64": dict(logits_chunk=64),
    "dtype=bfloat16": dict(dtype="bfloat16"),
}


@dataclasses.dataclass
class Contender:
    name: str
    bench: Any
    compile_s: float
    temp_bytes: int
    times: list[float] = dataclasses.field(default_factory=list)


def _contender(name: str, shape: dict[str, Any], params: Any) -> Contender:
    bench = build_sft(dict(shape, model=dict(shape["model"], **SWITCHES[name])))
    if params is not None:  # every contender starts from the same weights
        bench.state["params"] = jax.tree.map(lambda x: x.copy(), params)
    compile_s, mem = bench.compile()
    bench.run()
    return Contender(name, bench, compile_s, mem.temp_size_in_bytes)


def grad_temp_bytes(model_cfg: TransformerConfig, batch: Any) -> int:
    """Temporary bytes of the SFT loss's forward + backward alone (no optimizer update):
    the activation memory remat trades for recomputation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg,
                                                                   rngs=nnx.Rngs(0))))

    def loss(state):
        return sum(sft.loss_fn(nnx.merge(graphdef, state), batch).terms.values())

    return jax.jit(jax.grad(loss)).lower(state).compile().memory_analysis().temp_size_in_bytes


def compiled_bytes(model: dict[str, Any], batch: int, seq: int) -> dict[str, int]:
    """Per-device argument and temporary bytes of the SFT step, from shapes alone."""
    *_, abstract, _, _, step = sft_step_layout(model, batch, seq)
    spec = jax.ShapeDtypeStruct
    batch_spec = {k: spec((batch, seq), np.float32 if k == "loss_mask_bt" else np.int32)
                  for k in sft.BATCH_KEYS}
    mem = step.lower(abstract, batch_spec).compile().memory_analysis()
    return dict(arguments=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                params=sum(x.size for x in jax.tree.leaves(abstract["params"])))


def largest_batch(model: dict[str, Any], seq: int, budget: float) -> tuple[int, dict]:
    """The largest batch whose state + temporaries fit ``budget`` bytes.

    Temporaries grow affinely with the batch once past a floor (the update's own
    buffers), so the line through batches 32 and 128 predicts the answer, and one more
    compilation at the predicted batch checks it.
    """
    lo, hi = compiled_bytes(model, 32, seq), compiled_bytes(model, 128, seq)
    total = lambda m: m["temp"] + m["arguments"]  # noqa: E731
    per_row = (total(hi) - total(lo)) / 96
    fixed = total(lo) - 32 * per_row
    guess = max(1, int((budget - fixed) // per_row))
    check = total(compiled_bytes(model, guess, seq))
    return guess, dict(fixed=fixed, per_row=per_row, checked_bytes=check)


def main() -> None:
    parser = report.parser(__doc__, reps=0)
    parser.add_argument("--memory_gb", type=float, default=80.0,
                        help="memory budget for the what-fits lines (default: an H100)")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    shape = SHAPES["quick" if args.quick else "full"]
    b, t = shape["batch"], shape["seq"]

    contenders: list[Contender] = []
    for name in SWITCHES:
        contenders.append(_contender(
            name, shape, contenders[0].bench.state["params"] if contenders else None))
    for _ in range(reps):
        for c in contenders:
            c.times.append(c.bench.run()[0])
    plain = contenders[0]

    device = report.device_label()
    conf = f"{plain.bench.n_params / 1e6:.1f}M params, batch {b} x {t}, AdamW, {reps} reps"
    print(f"device: {device}; model {shape['model']}; {conf}")
    print(f"{'switch':<24} {'time ratio (median, min-max)':>32} {'temp MB':>9} "
          f"{'compile s':>9}")
    ratios = {}
    for c in contenders:
        ratios[c.name] = [x / p for x, p in zip(c.times, plain.times, strict=True)]
        r = ratios[c.name]
        print(f"{c.name:<24} {statistics.median(r):>12.3f} ({min(r):.3f}-{max(r):.3f})"
              f"{'':>10} {c.temp_bytes / 1e6:9.1f} {c.compile_s:9.1f}")

    by = {c.name: c for c in contenders}
    scan, remat = by["scan_layers"], by["scan+remat=full"]
    b3_mem = scan.temp_bytes / max(remat.temp_bytes, 1)
    act = {c.name: grad_temp_bytes(c.bench.model_cfg, c.bench.batch) for c in (scan, remat)}
    b3_act = act[scan.name] / max(act[remat.name], 1)
    b3_time = [r / s for r, s in zip(remat.times, scan.times, strict=True)]
    chunk_mem = plain.temp_bytes / max(by["logits_chunk=64"].temp_bytes, 1)
    rows = [
        report.row("B3", "remat=full / none (both scan_layers): step time", b3_time,
                   "report; >= 3x less temp memory", conf,
                   figure=f"time {report.fmt(b3_time)}; temp memory of forward+backward "
                          f"{b3_act:.2f}x less ({act[scan.name] / 1e6:.1f} -> "
                          f"{act[remat.name] / 1e6:.1f} MB), of the whole step with the "
                          f"AdamW update {b3_mem:.2f}x less ({scan.temp_bytes / 1e6:.1f} -> "
                          f"{remat.temp_bytes / 1e6:.1f} MB)",
                   temp_ratio=b3_act, step_temp_ratio=b3_mem),
        report.row("switch", "logits_chunk=64 / full logits: step time", ratios["logits_chunk=64"],
                   "report", conf,
                   figure=f"time {report.fmt(ratios['logits_chunk=64'])}; temp memory "
                          f"{chunk_mem:.2f}x less", temp_ratio=chunk_mem),
    ]
    for name in ("scan_layers", "attention=dot_product", "dtype=bfloat16"):
        rows.append(report.row("switch", f"{name} / plain: step time", ratios[name], "report",
                               conf))

    budget = args.memory_gb * 1e9
    fits, fit_cfg = largest_batch(dict(shape["model"], scan_layers=True, remat="full"), t,
                                  budget)
    line = (f"{args.memory_gb:g} GB holds batch {fits} x {t} of this model with scan+remat=full "
            f"(fixed {fit_cfg['fixed'] / 1e9:.2f} GB + {fit_cfg['per_row'] / 1e6:.2f} MB/row; "
            f"compiled at that batch: {fit_cfg['checked_bytes'] / 1e9:.1f} GB)")
    if not args.quick:
        preset = "llama3.2-1b"
        t0 = time.perf_counter()
        m = dict(model_config(preset), scan_layers=True, remat="full", logits_chunk=256)
        m.pop("lora", None)
        m.pop("init_from", None)
        big = compiled_bytes(m, 8, 2048)
        total = big["arguments"] + big["temp"]
        line += (f"; {preset} ({big['params'] / 1e9:.2f}B params, f32 AdamW, scan+remat=full, "
                 f"logits_chunk=256) at batch 8 x 2048 needs {total / 1e9:.1f} GB per device "
                 f"on one device ({'fits' if total <= budget else 'does not fit'}; "
                 f"analysed in {time.perf_counter() - t0:.0f}s)")
    rows.append(report.row("memory", "what fits", None, f"{args.memory_gb:g} GB budget", conf,
                           figure=line, largest_batch=fits))
    report.emit(rows, args.json)


if __name__ == "__main__":
    main()
