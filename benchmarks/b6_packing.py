"""B6: packing gain on length-skewed data (non-pad tokens/s, packed ÷ padded).

The data are the builtin world's SFT demonstrations, whose lengths are skewed (median
~19 ids, 99th percentile ~90, longest ~160: task answers next to multi-turn chats).
Both contenders run the same jitted SFT train step on batches of the same shape
(``batch`` rows x ``max_len`` positions); the padded loader puts one record per row,
the packed one fills rows by best-fit decreasing. A timed step is the whole loop body
of the trainer: next batch from the loader (encode, pad or pack), transfer, update.

Per BENCHMARKS.md the contenders alternate within each repetition (after a warm-up),
and the report gives the median of the per-repetition ratios with min and max, the
compile times apart, and the device.

    python -m benchmarks.b6_packing            # small model, ~1 minute on a 2-core CPU
    python -m benchmarks.b6_packing --model=medium --reps=9
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks import report
from jaxalign import sharding as shd
from jaxalign import step as step_lib
from jaxalign.algos import sft
from jaxalign.config import base_config, model_config
from jaxalign.data.builtin import load_builtin
from jaxalign.data.loader import DataSettings, Loader
from jaxalign.data.tokenizer import load_tokenizer
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import TransformerConfig
from jaxalign.optim import make_optimizer
from jaxalign.train import state_layout

MODELS = {
    "small": {},  # the CPU demo's shape (~1.7M matmul parameters)
    "medium": dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=64,
                   mlp_dim=1536),
}


def _build(config, mesh):
    model_cfg = TransformerConfig.from_mapping(config.model)
    rules = shd.rules_from_config(config.sharding.rules)
    tx, schedule = make_optimizer(config.optim, 10_000)
    model_def, _, shardings, init_fn = state_layout(config, model_cfg, tx, mesh, rules)
    step = jax.jit(step_lib.make_train_step(
        sft.loss_fn, sft.loss_weights, model_def=model_def, tx=tx, schedule=schedule,
        num_micro=1, mesh=mesh, rules=rules),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    return model_cfg, step, jax.jit(init_fn, out_shardings=shardings)()


class Contender:
    """One loader + one train state, stepped and timed."""

    def __init__(self, name, loader, step, state, mesh):
        self.name, self.step, self.state, self.mesh = name, step, state, mesh
        self.it = loader.iterator()
        self.compile_s = 0.0
        self.rates: list[float] = []

    def run(self, steps: int) -> tuple[float, int]:
        """Runs ``steps`` steps; returns (seconds, non-pad positions processed)."""
        real = 0
        t0 = time.perf_counter()
        for _ in range(steps):
            host = next(self.it)
            real += int(np.count_nonzero(host["segment_ids_bt"]))
            self.state, metrics = self.step(self.state, shd.global_batch(host, self.mesh))
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per contender per rep")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pack_window", type=int, default=512)
    report.add_args(parser)
    args = parser.parse_args()

    platform = jax.devices()[0].platform
    dtype = "float32" if platform == "cpu" else "bfloat16"
    config = base_config("sft")
    config.model = model_config("small")
    config.model.update(MODELS[args.model])
    config.model.dtype = dtype
    config.train.batch_size = args.batch
    config.data.max_len = args.max_len
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    tok = load_tokenizer("builtin:world")
    records = load_builtin("world", "train")

    contenders = []
    for name, pack in (("padded", False), ("packed", True)):
        settings = DataSettings(source="builtin:world", split="train", fmt="sft",
                                batch_size=args.batch, max_len=args.max_len, pack=pack,
                                pack_window=args.pack_window, overlong="truncate_left", seed=0,
                                # B6 compares with rows padded to max_len (one shape).
                                buckets="max_len")
        loader = Loader(settings, tok, records=records)
        model_cfg, step, state = _build(config, mesh)
        c = Contender(name, loader, step, state, mesh)
        t0 = time.perf_counter()
        c.run(1)  # compiles
        c.compile_s = time.perf_counter() - t0
        c.run(args.steps)  # warm-up
        contenders.append(c)

    ratios = []
    for _ in range(args.reps):
        rates = {}
        for c in contenders:
            seconds, real = c.run(args.steps)
            rates[c.name] = real / seconds
            c.rates.append(real / seconds)
        ratios.append(rates["packed"] / rates["padded"])

    effs = {c.name: c.it.metrics()["data_packing_efficiency"] for c in contenders}
    device = f"{jax.devices()[0].device_kind} ({platform}, {dtype})"
    print(f"device: {device}; model {args.model} ({model_cfg.matmul_params():,} matmul params); "
          f"batch {args.batch} x {args.max_len}; data builtin:world train (length-skewed); "
          f"{args.reps} interleaved repetitions of {args.steps} steps each")
    print("compile (first step incl. data): " + ", ".join(
        f"{c.name} {c.compile_s:.1f}s" for c in contenders))
    print("non-pad tokens/s (median): " + ", ".join(
        f"{c.name} {statistics.median(c.rates):,.0f}" for c in contenders))
    conf = (f"{args.model} model, batch {args.batch} x {args.max_len}, builtin:world SFT, "
            f"{args.reps} reps x {args.steps} steps")
    report.emit([
        report.row("B6", "non-pad tokens/s packed / padded", ratios, "> 1.3", conf,
                   device=device, digits=2),
        report.row("B6", "packing efficiency", None, ">= 0.9", conf, device=device,
                   figure=f"packing efficiency: packed {effs['packed']:.3f}, padded "
                          f"{effs['padded']:.3f}", median=effs["packed"]),
    ], args.json)
    truncated = sum(c.it.metrics()["data_truncated"] for c in contenders)
    print(f"records truncated (truncate_left) in both runs together: {truncated:.0f}")


if __name__ == "__main__":
    main()
