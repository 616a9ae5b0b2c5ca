"""B4 (DPO cost per token vs SFT) and B5 (in-step vs precomputed reference), one process.

Three jitted steps on the same model, lengths and optimizer, interleaved per
repetition: SFT on 2N sequences, DPO on N pairs with precomputed reference
log-probs, DPO on N pairs with the frozen reference run inside the step.

    python -m benchmarks.dpo_step            # the 27M shape of BENCHMARKS.md, 8 pairs x 256
    python -m benchmarks.dpo_step --quick
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks import report
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


STEPS = ("sft", "dpo_pre", "dpo_in_step")


@dataclasses.dataclass
class DpoBench:
    """jaxalign's SFT and DPO steps on one model shape, each with its state and fixed batch.

    Attributes:
      steps: name -> jitted ``(state, batch, frozen) -> (state, metrics)``; names from
        ``STEPS``: ``sft`` (2N sequences), ``dpo_pre`` (N pairs, precomputed reference
        log-probs), ``dpo_in_step`` (N pairs, the frozen reference run inside the step).
      states, batches, frozen: per step name.
      model_cfg: the model's config.
      optim: the ``config.optim`` mapping the steps' AdamW was built from.
      n_params: parameter count of the policy.
    """

    steps: dict[str, Callable[..., Any]]
    states: dict[str, Any]
    batches: dict[str, Any]
    frozen: dict[str, Any]
    model_cfg: TransformerConfig
    optim: Any
    n_params: int

    def run(self, name: str) -> float:
        """One call of step ``name`` on its fixed batch; returns seconds."""
        t0 = time.perf_counter()
        self.states[name], m = self.steps[name](self.states[name], self.batches[name],
                                                self.frozen[name])
        jax.block_until_ready((self.states[name], m))
        return time.perf_counter() - t0


@dataclasses.dataclass
class Trainer:
    """A one-device mesh, the train state's layout and a step compiler for ``config``.

    ``compile_step(loss_fn, weights, frozen_defs=None)`` is the jitted, donating
    ``make_train_step`` every benchmark of this kind times.
    """

    mesh: Any
    rules: Any
    model_def: Any
    abstract: Any
    shardings: Any
    init_fn: Callable[[], Any]
    compile_step: Callable[..., Any]


def single_device_trainer(config: ml_collections.ConfigDict,
                          model_cfg: TransformerConfig) -> Trainer:
    """The real trainer's step for ``config``/``model_cfg`` on the first device."""
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = shd.rules_from_config(config.sharding.rules)
    tx, schedule = make_optimizer(config.optim, 1000)
    model_def, abstract, shardings, init_fn = state_layout(config, model_cfg, tx, mesh, rules)

    def compile_step(loss_fn, weights, frozen_defs=None):
        return jax.jit(step_lib.make_train_step(
            loss_fn, weights, model_def=model_def, tx=tx, schedule=schedule, num_micro=1,
            mesh=mesh, rules=rules, frozen_defs=frozen_defs), donate_argnums=0)

    return Trainer(mesh, rules, model_def, abstract, shardings, init_fn, compile_step)


def time_interleaved(run: Callable[[str], float], names: Any, reps: int
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(first-call seconds, per-repetition seconds)`` per step name: one call each to
    compile, one to settle any recompile on committed outputs, then ``reps`` rounds."""
    compile_s = {name: run(name) for name in names}
    for name in names:
        run(name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name in names:
            times[name].append(run(name))
    return compile_s, times


def print_times(compile_s: dict[str, float], times: dict[str, list[float]]) -> None:
    """Prints first-call and median step seconds per step name."""
    print("first call (compile + run): " + ", ".join(
        f"{k} {v:.1f}s" for k, v in compile_s.items()))
    print("median step: " + ", ".join(
        f"{k} {statistics.median(v):.3f}s" for k, v in times.items()))


def build_dpo(shape: dict[str, Any], names: tuple[str, ...] = STEPS) -> DpoBench:
    """Steps ``names`` for ``shape`` (``batch`` pairs x ``seq`` tokens a side; sigmoid DPO).

    Each sequence is half prompt, half completion; the loss covers the completion.
    """
    pairs, t = shape["batch"], shape["seq"]
    config = base_config("dpo")
    config.model.update(shape["model"])
    config.data.pack = False  # one pair a row, as the fixed batches below are laid out
    config.dpo = ml_collections.ConfigDict(dict(
        loss_type="sigmoid", beta=0.1, label_smoothing=0.0, discopop_tau=0.05, simpo_gamma=0.5,
        rpo_alpha=0.0, reference="in_step"))
    model_cfg = TransformerConfig.from_mapping(config.model)
    one = single_device_trainer(config, model_cfg)
    model_def, abstract, shardings, init_fn, compile_step = (
        one.model_def, one.abstract, one.shardings, one.init_fn, one.compile_step)
    mesh = one.mesh
    dpo_loss, dpo_weights = dpo.make_loss(config)

    makers = {
        "sft": lambda: compile_step(sft.loss_fn, sft.loss_weights),
        "dpo_pre": lambda: compile_step(dpo_loss, dpo_weights),
        "dpo_in_step": lambda: compile_step(dpo_loss, dpo_weights, {"reference": model_def}),
    }
    steps = {k: makers[k]() for k in names}
    states = {k: jax.jit(init_fn, out_shardings=shardings)() for k in steps}
    reference = (jax.jit(init_fn, out_shardings=shardings)()["params"]
                 if "dpo_in_step" in steps else None)

    rng = np.random.default_rng(0)
    v = model_cfg.vocab_size
    pair_batch = {**_sequences(rng, pairs, t, v, "chosen_"),
                  **_sequences(rng, pairs, t, v, "rejected_")}
    batches = {
        "sft": lambda: _sequences(rng, 2 * pairs, t, v),
        "dpo_pre": lambda: {**pair_batch,
                            "ref_chosen_logps_b": rng.normal(size=pairs) - 300,
                            "ref_rejected_logps_b": rng.normal(size=pairs) - 300},
        "dpo_in_step": lambda: pair_batch,
    }
    frozen = {"sft": None, "dpo_pre": None, "dpo_in_step": {"reference": reference}}
    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    return DpoBench(steps, states, {k: shd.global_batch(batches[k](), mesh) for k in steps},
                    {k: frozen[k] for k in steps}, model_cfg, config.optim, n_params)


def main() -> None:
    args = report.parser(__doc__).parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    pairs, t = shape["batch"], shape["seq"]
    bench = build_dpo(shape)
    steps, run = bench.steps, bench.run

    compile_s, times = time_interleaved(run, steps, args.reps)
    b4 = [d / s for d, s in zip(times["dpo_pre"], times["sft"], strict=True)]
    b5 = [i / p for i, p in zip(times["dpo_in_step"], times["dpo_pre"], strict=True)]

    device = report.device_label()
    print(f"device: {device}; model {shape['model']}; {pairs} pairs x {t} tokens a side "
          f"(SFT: {2 * pairs} x {t}); {args.reps} interleaved repetitions")
    print_times(compile_s, times)
    conf = f"{pairs} pairs x {t} tokens a side, {args.reps} reps"
    report.emit([
        report.row("B4", "DPO step (precomputed ref) / SFT step on 2N sequences", b4,
                   "<= 1.05", conf),
        report.row("B5", "DPO in-step reference / precomputed reference", b5, "<= 1.40", conf),
    ], args.json)


if __name__ == "__main__":
    main()
