"""B7 (sampler bandwidth) and B8 (sampler overhead) in one process.

B7: bytes a decode step must read (weights + the filled KV cache) / decode step
time / a ``jnp.sum`` bandwidth probe, at batch 1. The decode step time is
``(t(N new tokens) - t(1 new token)) / (N - 1)`` of the jaxalign sampler, so
the prefill cancels out.

B8: jaxalign generate (``jaxalign.sampling.make_sampler``, greedy, no stop
tokens so both run every step) / ``reference_generate`` below: the same model
decoded by a plain single-jit prefill + ``fori_loop``, written directly against
the params dict. Repetitions interleave the probe and every contender.

    python -m benchmarks.sampler            # the 27M-parameter shape of BENCHMARKS.md
    python -m benchmarks.sampler --quick    # a small shape, well under a minute
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
from flax import nnx

from benchmarks import report
from benchmarks.sft_step import _rms, _rope
from jaxalign import sampling
from jaxalign import sharding as shd
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.step import ModelDef

SHAPES = {
    "full": dict(model=dict(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4,
                            head_dim=64, mlp_dim=1536), prompt=32, new=128),
    "quick": dict(model=dict(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                             head_dim=64, mlp_dim=768), prompt=16, new=32),
}


def reference_generate(p, cfg: TransformerConfig, prompt_bt, new_tokens: int):
    """Greedy Llama decoding with a KV cache: one prefill, then a fori_loop of steps."""
    b, t = prompt_bt.shape
    s = t + new_tokens
    g = cfg.n_heads // cfg.n_kv_heads
    layers = list(p["layers"].values())

    def forward(tok_bt, start, cache):
        n_new = tok_bt.shape[1]
        pos_bt = jnp.broadcast_to(start + jnp.arange(n_new), (b, n_new))
        seen_ts = jnp.arange(s)[None, :] <= (start + jnp.arange(n_new))[:, None]
        x = p["embed"][tok_bt]
        new_cache = []
        for lp, (k_c, v_c) in zip(layers, cache, strict=True):
            a = lp["attn"]
            h = _rms(x, lp["attn_norm"]["scale"], cfg.norm_eps)
            q = _rope(jnp.einsum("btd,dnh->btnh", h, a["q_proj"]), pos_bt, cfg.rope_theta)
            k = _rope(jnp.einsum("btd,dkh->btkh", h, a["k_proj"]), pos_bt, cfg.rope_theta)
            v = jnp.einsum("btd,dkh->btkh", h, a["v_proj"])
            k_c = jax.lax.dynamic_update_slice_in_dim(k_c, k.astype(k_c.dtype), start, 1)
            v_c = jax.lax.dynamic_update_slice_in_dim(v_c, v.astype(v_c.dtype), start, 1)
            new_cache.append((k_c, v_c))
            q = q.reshape(b, n_new, cfg.n_kv_heads, g, cfg.head_dim)
            sc = jnp.einsum("btkgh,bskh->bkgts", q, k_c) * cfg.head_dim ** -0.5
            sc = jnp.where(seen_ts, sc, -1e30)
            o = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(sc, -1), v_c)
            x = x + jnp.einsum("btnh,nhd->btd", o.reshape(b, n_new, -1, cfg.head_dim),
                               a["o_proj"])
            m = lp["mlp"]
            h = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps)
            x = x + (jax.nn.silu(h @ m["gate_proj"]) * (h @ m["up_proj"])) @ m["down_proj"]
        unembed = p["embed"].T if cfg.tie_embeddings else p["unembed"]
        logits = _rms(x[:, -1], p["final_norm"]["scale"], cfg.norm_eps) @ unembed
        return jnp.argmax(logits, -1).astype(jnp.int32), new_cache

    zeros = jnp.zeros((b, s, cfg.n_kv_heads, cfg.head_dim), p["embed"].dtype)
    tok_b, cache = forward(prompt_bt, 0, [(zeros, zeros)] * cfg.n_layers)
    out_bn = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(tok_b)

    def step(i, carry):
        tok_b, cache, out_bn = carry
        tok_b, cache = forward(tok_b[:, None], t + i - 1, cache)
        return tok_b, cache, out_bn.at[:, i].set(tok_b)

    return jax.lax.fori_loop(1, new_tokens, step, (tok_b, cache, out_bn))[2]


def bandwidth_probe(x) -> float:
    """Bytes/s of a jnp.sum over ``x`` (>= 128 MB), best of 3."""
    f = jax.jit(jnp.sum)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.size * x.dtype.itemsize / best


def _timed(fn, *args, best_of: int = 1):
    """Seconds of one call (the best of ``best_of`` back-to-back calls)."""
    best = float("inf")
    for _ in range(best_of):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


@dataclasses.dataclass
class GenerateBench:
    """jaxalign's greedy sampler on a freshly initialised model, with fixed prompts.

    Attributes:
      generate: jitted ``(params, prompt_bt, mask_bt, key) -> SampleOut`` for ``new`` tokens.
      params: the model's pure param dict.
      prompt_bt, mask_bt: ``batch x prompt`` random ids (no padding) and their mask.
      key: the sampling key (unused by greedy decoding).
      cfg: the model's config.
      model_def: rebuilds the model from ``params``.
      mesh, rules: the one-device mesh and the default logical axis rules.
    """

    generate: Callable[..., Any]
    params: Any
    prompt_bt: jax.Array
    mask_bt: jax.Array
    key: jax.Array
    cfg: TransformerConfig
    model_def: ModelDef
    mesh: Any
    rules: dict[str, Any]

    def run(self) -> float:
        """One generate call; returns seconds."""
        return _timed(self.generate, self.params, self.prompt_bt, self.mask_bt, self.key)


def build_generate(shape: dict[str, Any], batch: int) -> GenerateBench:
    """Greedy, no stop tokens (every row decodes ``shape["new"]`` tokens), one device."""
    cfg = TransformerConfig.from_mapping(shape["model"])
    b, t, n = batch, shape["prompt"], shape["new"]
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    rules = dict(shd.DEFAULT_RULES)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    model_def = ModelDef(graphdef, state)
    params = jax.device_put(nnx.to_pure_dict(state), jax.devices()[0])
    prompt_bt = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, (b, t)),
                            jnp.int32)
    greedy = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0)
    ours = sampling.make_sampler(model_def, greedy, mesh=mesh, rules=rules)
    return GenerateBench(ours, params, prompt_bt, jnp.ones((b, t), jnp.int32),
                         jax.random.PRNGKey(0), cfg, model_def, mesh, rules)


def decode_rows(shape: dict[str, Any], batch: int, reps: int, best_of: int,
                probe_bytes: int = 192 * 2**20, min_agreement: float | None = 0.9,
                ) -> list[dict[str, Any]]:
    """B7 and B8 for one model shape (its ``model`` dict may set ``dtype``/``param_dtype``).

    ``min_agreement``: the fraction of greedy tokens the sampler and the reference
    must share (None: report it only, as bf16 near-ties on random weights flip many).
    """
    b, t, n = batch, shape["prompt"], shape["new"]
    bench = build_generate(shape, b)
    cfg, params, prompt_bt, mask_bt, key = (bench.cfg, bench.params, bench.prompt_bt,
                                            bench.mask_bt, bench.key)
    mesh, rules, model_def, ours = bench.mesh, bench.rules, bench.model_def, bench.generate

    ours_one = sampling.make_sampler(model_def, sampling.SamplingConfig(
        max_new_tokens=1, temperature=0.0), mesh=mesh, rules=rules)
    ref = jax.jit(reference_generate, static_argnums=(1, 3))
    probe_x = jnp.ones((probe_bytes // 4,), jnp.float32)

    compile_s = {
        "jaxalign": _timed(ours, params, prompt_bt, mask_bt, key),
        "jaxalign_1": _timed(ours_one, params, prompt_bt, mask_bt, key),
        "reference": _timed(ref, params, cfg, prompt_bt, n),
    }
    got = ours(params, prompt_bt, mask_bt, key).tokens_bn
    want = ref(params, cfg, prompt_bt, n)
    agree = float(jnp.mean(got == want))
    if min_agreement is not None and agree < min_agreement:
        # f32 near-ties may flip a late token; more means a real mismatch
        raise AssertionError(f"sampler and reference disagree on {1 - agree:.0%} of tokens")

    step_bytes, weight_bytes, kv_bytes = decode_step_bytes(cfg, params, b, t, n)
    b7, b8, bw, ours_s, one_s, ref_s = [], [], [], [], [], []
    for _ in range(reps):
        bw.append(bandwidth_probe(probe_x))
        k = best_of
        ours_s.append(_timed(ours, params, prompt_bt, mask_bt, key, best_of=k))
        one_s.append(_timed(ours_one, params, prompt_bt, mask_bt, key, best_of=k))
        ref_s.append(_timed(ref, params, cfg, prompt_bt, n, best_of=k))
        step = max(ours_s[-1] - one_s[-1], 1e-9) / (n - 1)
        b7.append(step_bytes / step / bw[-1])
        b8.append(ours_s[-1] / ref_s[-1])

    n_params = sum(x.size for x in jax.tree.leaves(params))
    step_ms = [1e3 * (o - s1) / (n - 1) for o, s1 in zip(ours_s, one_s, strict=True)]
    dt = {"float32": "f32", "bfloat16": "bf16"}.get(cfg.dtype, cfg.dtype)
    device = report.device_label(dt)
    print(f"device: {device}; model {shape['model']}; params {n_params:,}; batch {b}; "
          f"prompt {t}; new tokens {n}; greedy; {reps} interleaved repetitions, "
          f"each time the best of {best_of} calls")
    print(f"bytes per decode step: weights {weight_bytes / 1e6:.2f} MB (the embedding table "
          f"counted only where it is also the unembedding) + KV {kv_bytes / 1e6:.3f} MB "
          f"(2*L*b*(T+N/2)*k*h*itemsize)")
    print("per-repetition seconds: jaxalign " + " ".join(f"{x:.3f}" for x in ours_s)
          + "; jaxalign 1 token " + " ".join(f"{x:.3f}" for x in one_s)
          + "; reference " + " ".join(f"{x:.3f}" for x in ref_s))
    print(f"compile: jaxalign {compile_s['jaxalign']:.1f}s (1-token variant "
          f"{compile_s['jaxalign_1']:.1f}s), reference {compile_s['reference']:.1f}s; "
          f"decode step {report.fmt(step_ms, 2)} ms; probe bandwidth "
          f"{statistics.median(bw) / 1e9:.1f} GB/s; greedy token agreement {agree:.2f}",
          flush=True)
    conf = (f"{n_params / 1e6:.1f}M params, batch {b}, prompt {t}, {n} new tokens, greedy, "
            f"{reps} reps (best of {best_of}); decode step {report.fmt(step_ms, 2)} ms, "
            f"probe {statistics.median(bw) / 1e9:.0f} GB/s")
    return [
        report.row("B7", f"decode-step bytes / step time / jnp.sum probe (batch {b})", b7,
                   "report (CPU); >= 0.6 (GPU)", conf, device=device),
        report.row("B8", "jaxalign generate / single-jit fori_loop decode", b8, "<= 1.10", conf,
                   device=device, token_agreement=agree),
    ]


def decode_step_bytes(cfg: TransformerConfig, params: Any, b: int, t: int,
                      n: int) -> tuple[float, float, float]:
    """(total, weights, KV) bytes one decode step must read, averaged over ``n`` steps.

    Weights: every parameter but the embedding table, of which a step reads one row,
    unless the table is also the unembedding. KV: the filled part of the cache, on
    average prompt + half the completion, in the compute dtype.
    """
    weight_bytes = sum(x.size * x.dtype.itemsize for path, x in
                       jax.tree_util.tree_flatten_with_path(params)[0]
                       if cfg.tie_embeddings or "embed" != getattr(path[0], "key", None))
    if not cfg.tie_embeddings:
        weight_bytes += cfg.d_model * jnp.dtype(cfg.param_dtype).itemsize
    itemsize = jnp.dtype(cfg.dtype).itemsize
    kv_bytes = 2 * cfg.n_layers * b * (t + n / 2) * cfg.n_kv_heads * cfg.head_dim * itemsize
    return weight_bytes + kv_bytes, weight_bytes, kv_bytes


def main() -> None:
    parser = report.parser(__doc__)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--best-of", type=int, default=3,
                        help="each contender's time in a repetition is its best of this many")
    args = parser.parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    report.emit(decode_rows(shape, args.batch, args.reps, args.best_of), args.json)


if __name__ == "__main__":
    main()
