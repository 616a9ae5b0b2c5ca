"""B4 (DPO cost per token vs SFT) and B5 (in-step vs precomputed reference), one process.

Three jitted steps on the same model, lengths and optimizer, interleaved per
repetition: SFT on 2N sequences, DPO on N pairs with precomputed reference
log-probs, DPO on N pairs with the frozen reference run inside the step.

    python -m benchmarks.dpo_step            # the 27M shape of BENCHMARKS.md, 8 pairs x 256
    python -m benchmarks.dpo_step --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import ml_collections
import numpy as np

from benchmarks.sft_step import SHAPES
from jaxalign import sharding as shd
from jaxalign import step as step_lib
from jaxalign.algos import dpo, sft
from jaxalign.config import base_config
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import TransformerConfig
from jaxalign.optim import make_optimizer
from jaxalign.train import state_layout


def _sequences(rng, rows, t, vocab, prefix=""):
    half = t // 2  # prompt half, completion half: the loss covers the completion
    mask = np.zeros((rows, t), np.float32)
    mask[:, half:] = 1
    return {f"{prefix}inputs_bt": rng.integers(0, vocab, (rows, t)).astype(np.int32),
            f"{prefix}targets_bt": rng.integers(0, vocab, (rows, t)).astype(np.int32),
            f"{prefix}loss_mask_bt": mask,
            f"{prefix}segment_ids_bt": np.ones((rows, t), np.int32),
            f"{prefix}positions_bt": np.tile(np.arange(t, dtype=np.int32), (rows, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    pairs, t = shape["batch"], shape["seq"]

    config = base_config("dpo")
    config.model.update(shape["model"])
    config.dpo = ml_collections.ConfigDict(dict(
        loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05, simpo_gamma=0.5,
        rpo_alpha=0.0, reference="in_step"))
    model_cfg = TransformerConfig.from_mapping(config.model)
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = shd.rules_from_config(config.sharding.rules)
    tx, schedule = make_optimizer(config.optim, 1000)
    model_def, _, shardings, init_fn = state_layout(config, model_cfg, tx, mesh, rules)
    dpo_loss, dpo_weights = dpo.make_loss(config)

    def compile_step(loss_fn, weights, frozen_defs=None):
        return jax.jit(step_lib.make_train_step(
            loss_fn, weights, model_def=model_def, tx=tx, schedule=schedule, num_micro=1,
            mesh=mesh, rules=rules, frozen_defs=frozen_defs), donate_argnums=0)

    steps = {
        "sft": compile_step(sft.loss_fn, sft.loss_weights),
        "dpo_pre": compile_step(dpo_loss, dpo_weights),
        "dpo_in_step": compile_step(dpo_loss, dpo_weights, {"reference": model_def}),
    }
    states = {k: jax.jit(init_fn, out_shardings=shardings)() for k in steps}
    reference = jax.jit(init_fn, out_shardings=shardings)()["params"]

    rng = np.random.default_rng(0)
    v = model_cfg.vocab_size
    pair_batch = {**_sequences(rng, pairs, t, v, "chosen_"),
                  **_sequences(rng, pairs, t, v, "rejected_")}
    batches = {
        "sft": shd.global_batch(_sequences(rng, 2 * pairs, t, v), mesh),
        "dpo_pre": shd.global_batch({**pair_batch,
                                     "ref_chosen_logps_b": rng.normal(size=pairs) - 300,
                                     "ref_rejected_logps_b": rng.normal(size=pairs) - 300},
                                    mesh),
        "dpo_in_step": shd.global_batch(pair_batch, mesh),
    }
    frozen = {"sft": None, "dpo_pre": None, "dpo_in_step": {"reference": reference}}

    def run(name):
        t0 = time.perf_counter()
        states[name], m = steps[name](states[name], batches[name], frozen[name])
        jax.block_until_ready((states[name], m))
        return time.perf_counter() - t0

    compile_s = {name: run(name) for name in steps}
    for name in steps:  # outputs are committed after the first call: settle any recompile
        run(name)
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name in steps:
            times[name].append(run(name))
    b4 = [d / s for d, s in zip(times["dpo_pre"], times["sft"], strict=True)]
    b5 = [i / p for i, p in zip(times["dpo_in_step"], times["dpo_pre"], strict=True)]

    def fmt(xs):
        return f"{statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"

    device = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform}, f32)"
    print(f"device: {device}; model {shape['model']}; {pairs} pairs x {t} tokens a side "
          f"(SFT: {2 * pairs} x {t}); {args.reps} interleaved repetitions")
    print("first call (compile + run): " + ", ".join(
        f"{k} {v:.1f}s" for k, v in compile_s.items()))
    print("median step: " + ", ".join(
        f"{k} {statistics.median(v):.3f}s" for k, v in times.items()))
    print("| id | figure | target |")
    print("|---|---|---|")
    print(f"| B4 | DPO step (precomputed ref) / SFT step on 2N sequences: {fmt(b4)} | <= 1.05 |")
    print(f"| B5 | DPO in-step reference / precomputed reference: {fmt(b5)} | <= 1.40 |")


if __name__ == "__main__":
    main()
