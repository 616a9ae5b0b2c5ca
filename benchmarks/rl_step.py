"""B9: where an online RL step spends its time (GRPO), and what a sampler of its own buys.

Runs the GRPO stage on a small Llama-shaped model from scratch (a learnable
token-level reward, so every group has signal) in three layouts:

* ``shared``: the sampler reads the trainer's sharded params in place on every device
  (no hand-off);
* ``split``: the sampler on half the devices of its own (``rl.rollout_devices``), the
  weights handed off before each rollout, synchronous;
* ``async``: the same split, the sampler one rollout ahead (``rl.async_steps=1``):
  the next rollout is sampled while the trainer updates, from one-update-old weights.

Per layout: the fractions of the host's time in rollout (the part of sampling the host
waited for), reward scoring, log-prob passes, the update and the hand-off; the
sampler's own seconds, the share of them hidden behind the update (overlap), the
hand-off's bytes and seconds, the policy lag of the batches trained on, and the
seconds per step (timed over the measured steps; the first steps, which compile, are
excluded). On a CPU the "devices" share the host's cores, so overlap cannot make a step
faster there: the split layouts show the bookkeeping and the hand-off's cost, not the
gain (which needs devices that really run side by side).

    python -m benchmarks.rl_step            # 'small' demo shape, 128 rows x (32 + 16)
    python -m benchmarks.rl_step --quick    # tiny shape, seconds
    python -m benchmarks.rl_step --model=llama3.2-1b --dtype=bfloat16 --batch=64 \
        --prompt-len=128 --new-tokens=256 --layouts=shared     # one GPU, 1B, synchronous
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import numpy as np

from benchmarks import report
from jaxalign import rewards
from jaxalign.config import model_config

PARTS = ("rollout", "reward", "logprobs", "update", "handoff")


@rewards.register("bench_even_ids")
def _even_ids(completions, records, ctx):
    return [float(np.mean([i % 2 == 0 for i in ids])) if ids else 0.0
            for ids in ctx.completion_ids]


def _config(args: argparse.Namespace, steps: int, layout: str, devices: int):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs.grpo import get_config

    config = get_config("test")
    config.unlock()
    if not args.quick or args.model:
        config.model = model_config(args.model or "small")
        config.data.max_len = config.data.max_prompt_len = args.prompt_len
        config.rl.num_samples, config.rl.max_new_tokens = 8, args.new_tokens
        config.train.batch_size = args.batch
    if args.dtype:
        config.model.dtype = args.dtype
    config.model.init_from = "scratch"
    config.rl.rewards = "bench_even_ids"
    config.rl.kl_coef = 0.04
    config.data.eval = ""
    config.train.steps = steps
    config.train.log_every = 1
    config.checkpoint.save_every = 10_000
    config.metrics.peak_flops = 1e11
    if layout != "shared":
        config.rl.rollout_devices = devices // 2
    if layout == "async":
        config.rl.async_steps = 1
    config.lock()
    return config


def run_layout(args: argparse.Namespace, steps: int, layout: str, devices: int
               ) -> tuple[list[dict], float]:
    """The measured steps' logged rows and their median seconds per step (the host's
    time from one step's batch to the next's)."""
    from jaxalign.train import train

    warm = 2  # the first rollouts, passes and updates compile
    with tempfile.TemporaryDirectory() as workdir:
        train(_config(args, steps, layout, devices), workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["split"] == "train"][warm:]
    return rows, _median(rows, "time/step_s")


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def main() -> None:
    parser = report.parser(__doc__, reps=None)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--model", default="",
                        help="model preset, e.g. llama3.2-1b (random weights); default small")
    parser.add_argument("--batch", type=int, default=128, help="rows (completions) per step")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="", help="compute dtype, e.g. bfloat16 on a GPU")
    parser.add_argument("--layouts", default="shared,split,async",
                        help="comma-separated: shared, split, async (split layouts need "
                             "2+ devices; on CPU 8 fake devices are made)")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 12)
    layouts = [x for x in args.layouts.split(",") if x]
    import jax

    if jax.default_backend() == "cpu" and jax.device_count() == 1 and layouts != ["shared"]:
        print("(split layouts need several devices: run with JAX_NUM_CPU_DEVICES=8)")
        layouts = ["shared"]
    devices = jax.device_count()
    shape = args.model or ("quick" if args.quick else "small")
    results = {layout: run_layout(args, steps, layout, devices) for layout in layouts}
    print(f"B9 RL step split (GRPO, {shape} shape, {steps - 2} measured steps, "
          f"{devices} {jax.default_backend()} devices, f32)")
    print(f"{'layout':<7} " + " ".join(f"{p:>9}" for p in PARTS)
          + f" {'sampler s':>9} {'overlap':>7} {'handoff MB':>10} {'lag':>4} {'s/step':>7}")
    for layout, (rows, per_step) in results.items():
        print(f"{layout:<7} " + " ".join(f"{_median(rows, f'time_frac/{p}'):9.3f}"
                                         for p in PARTS)
              + f" {_median(rows, 'time/rollout_s'):9.3f} {_median(rows, 'rollout/overlap'):7.2f}"
              f" {_median(rows, 'handoff/bytes') / 1e6:10.2f}"
              f" {_median(rows, 'rl/policy_lag'):4.0f} {per_step:7.3f}")
    # The paper plan's inputs: completion tokens per second of sampling and of the update.
    for layout, (rows, _) in results.items():
        decode = _median(rows, "count/tokens") / max(_median(rows, "time/rollout_s"), 1e-9)
        update = _median(rows, "count/tokens") / max(_median(rows, "time/update_s"), 1e-9)
        print(f"{layout}: sampler {decode:,.0f} completion tokens/s, update {update:,.0f} "
              f"completion tokens/s (rollout / update time {update / decode:.2f})")
    base_rows, base_step = results[layouts[0]]
    fracs = {p: [r[f"time_frac/{p}"] for r in base_rows] for p in PARTS}
    split = " / ".join(f"{p} {statistics.median(fracs[p]):.3f}" for p in PARTS)
    conf = f"GRPO, {shape} shape, {len(base_rows)} measured steps"
    out = [report.row("B9", "hand-off fraction", fracs["handoff"],
                      "hand-off <= 5% (CPU); rollout <= 60% (GPU)", f"{conf}, {layouts[0]}",
                      figure=f"median fractions: {split}",
                      fractions={p: statistics.median(fracs[p]) for p in PARTS})]
    for layout in layouts[1:]:
        rows, per_step = results[layout]
        out.append(report.row(
            "B9", f"{layout} s/step / {layouts[0]} s/step", [per_step / base_step],
            "informational (CPU devices share cores)", f"{conf}, {layout} vs {layouts[0]}",
            figure=(f"{layout}: step {per_step / base_step:.3f}x {layouts[0]}'s; hand-off "
                    f"{_median(rows, 'handoff/bytes') / 1e6:.2f} MB in "
                    f"{_median(rows, 'time/handoff_s') * 1e3:.1f} ms "
                    f"({_median(rows, 'time_frac/handoff'):.3f} of the step); overlap "
                    f"{_median(rows, 'rollout/overlap'):.2f}; lag "
                    f"{_median(rows, 'rl/policy_lag'):.0f}")))
    report.emit(out, args.json)


if __name__ == "__main__":
    main()
