"""B9: where an online RL step spends its time (GRPO, one process).

Runs the GRPO stage on a small Llama-shaped model from scratch (a learnable
token-level reward, so every group has signal) and reports, per step, the
fractions of wall time in rollout (the KV-cache sampler), reward scoring,
log-prob passes (the frozen reference's, for the KL term), the update, and the
weight hand-off to the sampler — which is nothing to do here: the sampler reads
the trainer's sharded params in place. Medians and min/max over the measured
steps (the first rollout and update, which compile, are excluded).

    python -m benchmarks.rl_step            # 'small' demo shape, 128 rows x (32 + 16)
    python -m benchmarks.rl_step --quick    # tiny shape, seconds
"""

from __future__ import annotations

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


def _config(quick: bool, steps: int):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from configs.grpo import get_config

    config = get_config("test")
    config.unlock()
    if not quick:
        config.model = model_config("small")
        config.data.max_len = config.data.max_prompt_len = 32
        config.rl.num_samples, config.rl.max_new_tokens = 8, 16
        config.train.batch_size = 128
    config.model.init_from = "scratch"
    config.rl.rewards = "bench_even_ids"
    config.rl.kl_coef = 0.04
    config.data.eval = ""
    config.train.steps = steps
    config.train.log_every = 1
    config.checkpoint.save_every = 10_000
    config.metrics.peak_flops = 1e11
    config.lock()
    return config


def main() -> None:
    parser = report.parser(__doc__, reps=None)
    parser.add_argument("--steps", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 12)
    from jaxalign.train import train

    with tempfile.TemporaryDirectory() as workdir:
        train(_config(args.quick, steps), workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r["split"] == "train"][1:]
    print(f"B9 RL step split (GRPO, {'quick' if args.quick else 'small'} shape, "
          f"{len(rows)} measured steps, CPU f32)")
    print(f"{'part':<10} {'median':>8} {'min':>8} {'max':>8} {'median s':>9}")
    for part in PARTS:
        fr = [r[f"time_frac/{part}"] for r in rows]
        secs = [r[f"time/{part}_s"] for r in rows]
        print(f"{part:<10} {statistics.median(fr):8.3f} {min(fr):8.3f} {max(fr):8.3f} "
              f"{statistics.median(secs):9.3f}")
    print(f"tokens/s median {statistics.median(r['tokens_per_s'] for r in rows):,.0f}")
    fracs = {p: [r[f"time_frac/{p}"] for r in rows] for p in PARTS}
    split = " / ".join(f"{p} {statistics.median(fracs[p]):.3f}" for p in PARTS)
    conf = (f"GRPO, {'quick' if args.quick else 'small'} shape, {len(rows)} measured steps")
    report.emit([report.row("B9", "hand-off fraction", fracs["handoff"],
                            "hand-off <= 5% (CPU); rollout <= 60% (GPU)", conf,
                            figure=f"median fractions: {split}",
                            fractions={p: statistics.median(fracs[p]) for p in PARTS})],
                args.json)


if __name__ == "__main__":
    main()
