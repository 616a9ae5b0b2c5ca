"""B1 (SFT MFU), B2 (framework overhead) and B11 (state bytes) in one process.

B2 compares jaxalign's jitted SFT step with a minimal pure-JAX step of the same
math (``reference_step`` below: same parameters, same AdamW, same masked
cross-entropy), interleaved per repetition as BENCHMARKS.md asks.

    python -m benchmarks.sft_step            # the 27M-parameter shape of BENCHMARKS.md
    python -m benchmarks.sft_step --quick    # a small shape, well under a minute
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import report
from jaxalign import sharding as shd
from jaxalign import step as step_lib
from jaxalign.algos import sft
from jaxalign.config import base_config
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import TransformerConfig
from jaxalign.optim import make_optimizer
from jaxalign.train import state_layout

SHAPES = {
    "full": dict(model=dict(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4,
                            head_dim=64, mlp_dim=1536), batch=8, seq=256),
    "quick": dict(model=dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=64, mlp_dim=768), batch=8, seq=128),
}


def _rms(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x_btnh, pos_bt, theta):
    h = x_btnh.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    ang = pos_bt[..., None].astype(jnp.float32) * inv
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
    a, b = jnp.split(x_btnh, 2, -1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def reference_loss(p, cfg: TransformerConfig, batch):
    """Llama forward + masked mean NLL, written directly against the params dict."""
    tok, tgt = batch["inputs_bt"], batch["targets_bt"]
    mask, pos, seg = batch["loss_mask_bt"], batch["positions_bt"], batch["segment_ids_bt"]
    t = tok.shape[1]
    allowed = (jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))
    x = p["embed"][tok]
    g = cfg.n_heads // cfg.n_kv_heads
    for lp in p["layers"].values():
        a = lp["attn"]
        h = _rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
        q = _rope(jnp.einsum("btd,dnh->btnh", h, a["q_proj"]), pos, cfg.rope_theta)
        k = _rope(jnp.einsum("btd,dkh->btkh", h, a["k_proj"]), pos, cfg.rope_theta)
        v = jnp.einsum("btd,dkh->btkh", h, a["v_proj"])
        q = q.reshape(*q.shape[:2], cfg.n_kv_heads, g, cfg.head_dim)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k) * cfg.head_dim ** -0.5
        s = jnp.where(allowed[:, None, None], s, -1e30)
        o = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v)
        x = x + jnp.einsum("btnh,nhd->btd", o.reshape(*o.shape[:2], -1, cfg.head_dim),
                           a["o_proj"])
        m = lp["mlp"]
        h = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
        x = x + (jax.nn.silu(h @ m["gate_proj"]) * (h @ m["up_proj"])) @ m["down_proj"]
    logits = _rms(x, p["final_norm"]["scale"], cfg.norm_eps) @ p["unembed"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
    return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@jax.jit
def _square(x):
    return x @ x


def peak_probe(n: int = 2048, dtype: Any = jnp.float32) -> float:
    """FLOP/s of the best of 3 ``n``-cubed ``jnp.dot`` in ``dtype`` (f32 2048 on the CPU,
    bf16 8192 on a GPU, as BENCHMARKS.md asks)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)  # random: zeros run faster
    f = _square
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@dataclasses.dataclass
class SftBench:
    """A compiled-on-first-call jaxalign SFT step with its state and one fixed batch.

    Attributes:
      train_step: jitted ``(state, batch) -> (state, metrics)``, state donated.
      state: the train state (params + optimizer state), replaced by :meth:`run`.
      batch: one global batch of random tokens, ``batch x seq``.
      model_cfg: the model's config.
      tx: the optax optimizer (AdamW with clipping and the schedule of ``config.optim``).
      optim: the ``config.optim`` mapping ``tx`` was built from.
      n_params: parameter count.
      mesh: the one-device mesh.
    """

    train_step: Callable[..., Any]
    state: Any
    batch: Any
    model_cfg: TransformerConfig
    tx: optax.GradientTransformation
    optim: Any
    n_params: int
    mesh: Any

    def compile(self) -> tuple[float, Any]:
        """Compiles the step ahead of time and keeps the executable for :meth:`run`.

        Returns ``(seconds, memory_analysis)``.
        """
        t0 = time.perf_counter()
        self.train_step = self.train_step.lower(self.state, self.batch).compile()
        return time.perf_counter() - t0, self.train_step.memory_analysis()

    def run(self) -> tuple[float, Any]:
        """One step on the fixed batch; returns ``(seconds, metrics)``."""
        t0 = time.perf_counter()
        self.state, m = self.train_step(self.state, self.batch)
        jax.block_until_ready((self.state, m))
        return time.perf_counter() - t0, m


def sft_step_layout(model: dict[str, Any], batch: int, seq: int):
    """jaxalign's jitted SFT step on one device for a model shape (AdamW, f32 unless the
    shape says otherwise), without any state allocated.

    Returns ``(config, model_cfg, mesh, tx, abstract_state, shardings, init_fn, step)``.
    """
    config = base_config("sft")
    config.model.update(model)
    config.train.batch_size, config.data.max_len = batch, seq
    model_cfg = TransformerConfig.from_mapping(config.model)
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = shd.rules_from_config(config.sharding.rules)
    tx, schedule = make_optimizer(config.optim, 1000)
    model_def, abstract, shardings, init_fn = state_layout(config, model_cfg, tx, mesh, rules)
    train_step = jax.jit(step_lib.make_train_step(
        sft.loss_fn, sft.loss_weights, model_def=model_def, tx=tx, schedule=schedule,
        num_micro=1, mesh=mesh, rules=rules),
        in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)
    return config, model_cfg, mesh, tx, abstract, shardings, init_fn, train_step


def build_sft(shape: dict[str, Any]) -> SftBench:
    """jaxalign's SFT step for ``shape`` (one of ``SHAPES``): f32, AdamW, one device."""
    config, model_cfg, mesh, tx, abstract, shardings, init_fn, train_step = sft_step_layout(
        shape["model"], shape["batch"], shape["seq"])
    state = jax.jit(init_fn, out_shardings=shardings)()

    b, t = shape["batch"], shape["seq"]
    rng = np.random.default_rng(0)
    batch = {
        "inputs_bt": rng.integers(0, model_cfg.vocab_size, (b, t)).astype(np.int32),
        "targets_bt": rng.integers(0, model_cfg.vocab_size, (b, t)).astype(np.int32),
        "loss_mask_bt": np.ones((b, t), np.float32),
        "segment_ids_bt": np.ones((b, t), np.int32),
        "positions_bt": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
    }
    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    return SftBench(train_step, state, shd.global_batch(batch, mesh), model_cfg, tx,
                    config.optim, n_params, mesh)


def main() -> None:
    args = report.parser(__doc__).parse_args()
    shape = SHAPES["quick" if args.quick else "full"]

    bench = build_sft(shape)
    model_cfg, tx, batch = bench.model_cfg, bench.tx, bench.batch

    def ref_update(params, opt_state, batch):
        loss, grads = jax.value_and_grad(reference_loss)(params, model_cfg, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    ref_step = jax.jit(ref_update, donate_argnums=(0, 1))
    ref_params = jax.tree.map(jnp.copy, bench.state["params"])
    ref_opt = tx.init(ref_params)
    b, t = shape["batch"], shape["seq"]

    compile_ours, m = bench.run()
    t0 = time.perf_counter()
    ref_params, ref_opt, loss = ref_step(ref_params, ref_opt, batch)
    jax.block_until_ready(loss)
    compile_ref = time.perf_counter() - t0
    assert abs(float(m["loss"]) - float(loss)) < 1e-4, (float(m["loss"]), float(loss))
    # A second warm-up call: outputs come back with committed shardings, which can
    # trigger one more compilation of the reference step.
    bench.run()
    ref_params, ref_opt, loss = ref_step(ref_params, ref_opt, batch)
    jax.block_until_ready((ref_params, ref_opt, loss))

    flops = model_cfg.flops_per_token(t) * b * t
    mfus, ratios, ours_s, ref_s = [], [], [], []
    for _ in range(args.reps):
        peak = peak_probe()
        dt_ours, _ = bench.run()
        t0 = time.perf_counter()
        ref_params, ref_opt, loss = ref_step(ref_params, ref_opt, batch)
        jax.block_until_ready((ref_params, ref_opt, loss))
        dt_ref = time.perf_counter() - t0
        mfus.append(flops / dt_ours / peak)
        ratios.append(dt_ours / dt_ref)
        ours_s.append(dt_ours)
        ref_s.append(dt_ref)

    n_params = bench.n_params
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bench.state["params"]))
    state_bytes = param_bytes + sum(x.size * x.dtype.itemsize
                                    for x in jax.tree.leaves(bench.state["opt_state"]))
    grad_bytes = param_bytes

    device = report.device_label()
    print(f"device: {device}; model {shape['model']}; batch {b} x {t}; AdamW; "
          f"{args.reps} interleaved repetitions")
    print(f"FLOPs/token = 6*N_matmul + 6*L*T*D = {model_cfg.flops_per_token(t):.4g} "
          f"(N_matmul={model_cfg.matmul_params():,}, L={model_cfg.n_layers}, T={t}, "
          f"D={model_cfg.d_model}); params {n_params:,}")
    print("per-repetition step seconds: jaxalign " + " ".join(f"{x:.3f}" for x in ours_s)
          + "; reference " + " ".join(f"{x:.3f}" for x in ref_s))
    print(f"compile: jaxalign {compile_ours:.1f}s, reference {compile_ref:.1f}s; step time "
          f"jaxalign {statistics.median(ours_s):.3f}s, reference {statistics.median(ref_s):.3f}s")
    conf = (f"{n_params / 1e6:.1f}M params, batch {b} x {t}, AdamW, {args.reps} reps; "
            f"FLOPs/token = 6*N_matmul + 6*L*T*D")
    per_param = (state_bytes + grad_bytes) / n_params
    report.emit([
        report.row("B1", "SFT MFU vs same-rep f32 2048^3 dot probe", mfus, ">= 0.45", conf),
        report.row("B2", "jaxalign step / pure-JAX step", ratios, "<= 1.10", conf),
        report.row("B11", "(params + grads + optimizer) bytes / params", None,
                   "16 (f32 Adam)", conf, figure=f"{per_param:.2f} on 1 device",
                   median=per_param),
    ], args.json)


if __name__ == "__main__":
    main()
