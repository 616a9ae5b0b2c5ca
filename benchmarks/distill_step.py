"""B12: the distillation step (teacher forward in the step) ÷ the SFT step, same shapes.

Two jitted steps on one student shape, batch and optimizer, interleaved per repetition:
SFT on the batch's completions, and distillation (GKD's JSD over the full vocabulary)
towards a frozen teacher with twice the student's layers, run inside the step.

    python -m benchmarks.distill_step            # the 27M shape of BENCHMARKS.md
    python -m benchmarks.distill_step --quick
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks import report
from benchmarks.dpo_step import _sequences, print_times, single_device_trainer, time_interleaved
from benchmarks.sft_step import SHAPES
from jaxalign import policy
from jaxalign import sharding as shd
from jaxalign.algos import distill, sft
from jaxalign.config import base_config
from jaxalign.models.transformer import TransformerConfig


def build(shape: dict, teacher_scale: int = 2):
    """``(steps, states, batch, frozen, n_student, n_teacher)`` for ``shape``."""
    config = base_config("distill")
    config.model.update(shape["model"])
    config.distill.teacher = "workdir:unused"  # the teacher below is built, not loaded
    model_cfg = TransformerConfig.from_mapping(config.model)
    teacher_cfg = TransformerConfig.from_mapping(
        {**config.model.to_dict(), "n_layers": shape["model"]["n_layers"] * teacher_scale})
    one = single_device_trainer(config, model_cfg)
    teacher = policy.load_model("scratch", teacher_cfg, mesh=one.mesh, rules=one.rules,
                                init_seed=1)
    d_loss, d_weights = distill.make_loss(config)
    steps = {"sft": one.compile_step(sft.loss_fn, sft.loss_weights),
             "distill": one.compile_step(d_loss, d_weights, {"teacher": teacher.model_def})}
    states = {k: jax.jit(one.init_fn, out_shardings=one.shardings)() for k in steps}
    batch = shd.global_batch(_sequences(np.random.default_rng(0), shape["batch"], shape["seq"],
                                        model_cfg.vocab_size), one.mesh)
    frozen = {"sft": None, "distill": {"teacher": teacher.params}}
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    return steps, states, batch, frozen, count(one.abstract["params"]), count(teacher.params)


def main() -> None:
    args = report.parser(__doc__).parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    steps, states, batch, frozen, n_student, n_teacher = build(shape)

    def run(name: str) -> float:
        t0 = time.perf_counter()
        states[name], m = steps[name](states[name], batch, frozen[name])
        jax.block_until_ready((states[name], m))
        return time.perf_counter() - t0

    compile_s, times = time_interleaved(run, steps, args.reps)
    ratio = [d / s for d, s in zip(times["distill"], times["sft"], strict=True)]
    print(f"device: {report.device_label()}; student {n_student:,} params, teacher "
          f"{n_teacher:,} ({n_teacher / n_student:.2f}x); {shape['batch']} x {shape['seq']} "
          f"tokens; {args.reps} interleaved repetitions")
    print_times(compile_s, times)
    conf = (f"{shape['batch']} x {shape['seq']}, teacher {n_teacher / n_student:.1f}x the "
            f"student, JSD over the full vocabulary, {args.reps} reps")
    report.emit([report.row("B12", "distill step (teacher in the step) / SFT step", ratio,
                            "<= 1.6", conf)], args.json)


if __name__ == "__main__":
    main()
