"""KV-cache sampler: cache decode vs the full forward, greedy, log-probs, filters, meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign import sharding as shd
from jaxalign.mesh import make_mesh
from jaxalign.models.transformer import Transformer, TransformerConfig
from jaxalign.sampling import (
    SamplingConfig,
    completion_batch,
    filter_logits,
    generate,
    left_pad,
    make_sampler,
    sample,
    trim,
)
from jaxalign.step import ModelDef

LLAMA = TransformerConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=8, mlp_dim=48)
# Gemma 2/3 features at once: sliding windows (shorter than prompt and completion),
# local RoPE, soft-capping, qk-norm, (1 + w) norms, post-norms, tied, scaled embeddings.
GEMMAISH = TransformerConfig(
    family="gemma3", vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=8, mlp_dim=48, norm_plus_one=True, scale_embeddings=True, post_norms=True,
    qk_norm=True, tie_embeddings=True, mlp_activation="gelu_tanh", attn_softcap=20.0,
    final_softcap=10.0, query_pre_attn_scalar=12.0, layer_types=("sliding", "full"),
    sliding_window=3, rope_theta=1e6, local_rope_theta=1e4)
QWENISH = dataclasses.replace(LLAMA, family="qwen2", qkv_bias=True, qk_norm=True, n_kv_heads=1)

PROMPTS = [[1, 5, 9, 11, 3], [2], [7, 30, 31], [4, 4, 8, 15]]
GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


def _model(cfg, seed=0):
    model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
    # Random biases so the qkv-bias path is exercised (they initialise to zero).
    for path, var in nnx.iter_graph(model):
        if path and str(path[-1]).endswith("_bias"):
            var[...] = jax.random.normal(jax.random.key(len(path)), var.shape) * 0.5
    return model


@pytest.mark.parametrize("cfg", [LLAMA, GEMMAISH, QWENISH], ids=["llama", "gemma", "qwen"])
def test_cache_decode_matches_full_forward(cfg):
    model = _model(cfg)
    graphdef, state = nnx.split(model)
    n = 5
    tokens_bt, mask_bt = left_pad(PROMPTS)
    cont_bn = np.random.default_rng(0).integers(1, cfg.vocab_size, (len(PROMPTS), n))

    @jax.jit
    def run(state, tokens_bt, mask_bt, cont_bn):
        m = nnx.merge(graphdef, state)
        b, t = tokens_bt.shape
        plen_b = jnp.sum(mask_bt, axis=1)
        pos_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=1) - 1, 0)
        valid_bs = jnp.concatenate([mask_bt.astype(bool), jnp.ones((b, n), bool)], axis=1)
        cache = m.init_cache(b, t + n)
        first_btv, cache = m.decode(tokens_bt, pos_bt, cache, 0, valid_bs)

        def step(cache, i):
            tok_b1 = jax.lax.dynamic_slice_in_dim(cont_bn, i, 1, axis=1)
            logits_b1v, cache = m.decode(tok_b1, (plen_b + i)[:, None], cache, t + i, valid_bs)
            return cache, logits_b1v[:, 0]

        _, steps_nbv = jax.lax.scan(step, cache, jnp.arange(n))
        full_tokens = jnp.concatenate([tokens_bt, cont_bn], axis=1)
        full_pos = jnp.concatenate([pos_bt, plen_b[:, None] + jnp.arange(n)], axis=1)
        seg = jnp.concatenate([mask_bt, jnp.ones((b, n), jnp.int32)], axis=1)
        return first_btv, jnp.swapaxes(steps_nbv, 0, 1), m(full_tokens, full_pos, seg)

    first_btv, steps_bnv, full_btv = run(state, tokens_bt, mask_bt, cont_bn)
    t = tokens_bt.shape[1]
    real = mask_bt.astype(bool)
    np.testing.assert_allclose(np.asarray(first_btv)[real], np.asarray(full_btv[:, :t])[real],
                               atol=2e-5)
    np.testing.assert_allclose(steps_bnv, full_btv[:, t:], atol=2e-5)


def _reference_greedy(model, prompts, n):
    """Argmax step by step through the full forward of right-padded rows (one compile)."""
    graphdef, state = nnx.split(model)
    width = max(map(len, prompts)) + n
    forward = jax.jit(lambda st, tok, seg: nnx.merge(graphdef, st)(tok, None, seg))
    outs = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            tok = np.zeros((1, width), np.int32)
            tok[0, :len(ids)] = ids
            seg = (np.arange(width) < len(ids)).astype(np.int32)[None]
            ids.append(int(jnp.argmax(forward(state, tok, seg)[0, len(ids) - 1])))
        outs.append(ids[len(prompt):])
    return outs


@pytest.mark.slow
def test_greedy_matches_stepwise_argmax_of_full_forward():
    model = _model(GEMMAISH, seed=1)
    tokens_bt, mask_bt = left_pad(PROMPTS)
    out = sample(model, tokens_bt, mask_bt, jax.random.key(0),
                 SamplingConfig(max_new_tokens=7, temperature=0.0))
    assert trim(out) == _reference_greedy(model, PROMPTS, 7)
    assert np.all(np.asarray(out.lengths_b) == 7) and not np.any(out.stopped_b)
    # top_k=1 at any temperature picks the argmax too.
    top1 = sample(model, tokens_bt, mask_bt, jax.random.key(5),
                  SamplingConfig(max_new_tokens=7, temperature=1.3, top_k=1))
    np.testing.assert_array_equal(top1.tokens_bn, out.tokens_bn)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [LLAMA, GEMMAISH], ids=["llama", "gemma"])
def test_sampler_logps_equal_trainer_recompute(cfg):
    model = _model(cfg, seed=2)
    prompts = PROMPTS + [[]]  # an empty row, as a padded prompt batch holds
    tokens_bt, mask_bt = left_pad(prompts)
    scfg = SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=20, top_p=0.9,
                          stop_tokens=(3, 17), num_samples=2)
    out = sample(model, tokens_bt, mask_bt, jax.random.key(1), scfg)
    batch = completion_batch(tokens_bt, mask_bt, out, scfg.num_samples)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, *args: nnx.merge(graphdef, st)(*args))
    logits_btv = forward(state, batch["tokens_bt"], batch["positions_bt"],
                         batch["segment_ids_bt"])
    logps_bt = losses.token_logps(logits_btv / scfg.temperature, batch["targets_bt"])
    mask = np.asarray(batch["completion_mask_bt"])
    np.testing.assert_allclose(np.asarray(logps_bt) * mask, batch["sample_logps_bt"], atol=1e-5)
    assert mask.sum() == int(np.sum(out.lengths_b))
    # Layout: rows are prompt-major and carry their prompt, completion and positions.
    t = tokens_bt.shape[1]
    for r, completion in enumerate(trim(out)):
        prompt = prompts[r // 2]
        row = np.asarray(batch["tokens_bt"][r])
        seg = np.asarray(batch["segment_ids_bt"][r])
        assert list(row[seg == 1]) == prompt + completion
        np.testing.assert_array_equal(np.asarray(batch["positions_bt"][r])[seg == 1],
                                      np.arange(len(prompt) + len(completion)))
        assert list(np.asarray(batch["targets_bt"][r])[mask[r] == 1]) == completion
        assert np.all(row[t + len(completion):] == scfg.pad_id)


@pytest.mark.slow
def test_stop_tokens_end_rows_and_pad_after():
    model = _model(LLAMA, seed=3)
    tokens_bt, mask_bt = left_pad(PROMPTS)
    free = sample(model, tokens_bt, mask_bt, jax.random.key(0), GREEDY)
    stop = int(free.tokens_bn[0, 2])
    scfg = dataclasses.replace(GREEDY, stop_tokens=(stop,), pad_id=47)
    out = sample(model, tokens_bt, mask_bt, jax.random.key(0), scfg)
    for r, ids in enumerate(np.asarray(free.tokens_bn).tolist()):
        n = ids.index(stop) + 1 if stop in ids else 6
        assert int(out.lengths_b[r]) == n
        assert bool(out.stopped_b[r]) == (stop in ids)
        assert list(np.asarray(out.tokens_bn[r])) == ids[:n] + [47] * (6 - n)
        assert list(np.asarray(out.mask_bn[r])) == [1] * n + [0] * (6 - n)
        assert np.all(np.asarray(out.logps_bn[r, n:]) == 0) and np.all(out.logps_bn[r, :n] < 0)
    assert int(out.lengths_b[0]) == 3 and bool(out.stopped_b[0])
    # Every row stops at once: the loop exits after the first token.
    every = dataclasses.replace(scfg, stop_tokens=tuple(range(LLAMA.vocab_size)))
    out = sample(model, tokens_bt, mask_bt, jax.random.key(0), every)
    assert np.all(np.asarray(out.lengths_b) == 1) and np.all(out.stopped_b)


def test_filter_logits_top_k_and_top_p():
    probs = np.array([[0.05, 0.5, 0.1, 0.3, 0.05]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True, False]
    # Nucleus: 0.5 < 0.7 so 0.3 joins; 0.8 >= 0.7 stops before 0.1.
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True, False]
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.3)) == [False, True, False, False, False]
    # top-p acts on the renormalised top-k distribution.
    assert kept(filter_logits(logits, top_k=3, top_p=0.85)) == [False, True, False, True, False]
    np.testing.assert_array_equal(filter_logits(logits), logits)


@pytest.mark.slow
def test_groups_prefill_once_and_are_prompt_major():
    calls = []

    class Recording(Transformer):
        def hidden_cached(self, tokens_bt, *args):
            calls.append(tokens_bt.shape)
            return super().hidden_cached(tokens_bt, *args)

    tokens_bt, mask_bt = left_pad(PROMPTS)
    b, t = tokens_bt.shape
    recording = Recording(LLAMA, rngs=nnx.Rngs(params=3))
    jax.eval_shape(lambda: generate(recording, tokens_bt, mask_bt, jax.random.key(0),
                                    SamplingConfig(max_new_tokens=6, num_samples=3)))
    assert calls[0] == (b, t) and set(calls[1:]) == {(b * 3, 1)}

    model = _model(LLAMA, seed=3)
    scfg = SamplingConfig(max_new_tokens=6, num_samples=3)
    a = sample(model, tokens_bt, mask_bt, jax.random.key(7), scfg)
    again = sample(model, tokens_bt, mask_bt, jax.random.key(7), scfg)
    other = sample(model, tokens_bt, mask_bt, jax.random.key(8), scfg)
    for x, y in zip(a, again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.tokens_bn, other.tokens_bn)
    groups = np.asarray(a.tokens_bn).reshape(b, 3, -1)
    assert all(len({tuple(row) for row in g}) > 1 for g in groups)
    # Greedy groups: the G rows of prompt p are identical and equal the G = 1 result.
    one = sample(model, tokens_bt, mask_bt, jax.random.key(0), GREEDY)
    three = sample(model, tokens_bt, mask_bt, jax.random.key(0),
                   dataclasses.replace(GREEDY, num_samples=3))
    np.testing.assert_array_equal(three.tokens_bn, np.repeat(one.tokens_bn, 3, axis=0))


@pytest.mark.slow
def test_same_results_on_one_device_and_on_meshes():
    model = _model(GEMMAISH, seed=5)
    graphdef, state = nnx.split(model, nnx.Param)
    model_def = ModelDef(graphdef, state)
    params = nnx.to_pure_dict(state)
    axes = shd.logical_axes_tree(state)
    rules = dict(shd.DEFAULT_RULES)
    tokens_bt, mask_bt = left_pad(PROMPTS)
    scfg = SamplingConfig(max_new_tokens=6, temperature=0.9, top_k=30, top_p=0.95,
                          stop_tokens=(3,), num_samples=2)
    outs = []
    for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((8, 1, 1), None),
                           ((2, 2, 2), None)):
        mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), devices)
        sharded = jax.device_put(params, shd.param_shardings(params, axes, mesh, rules))
        sampler = make_sampler(model_def, scfg, mesh=mesh, rules=rules)
        outs.append(sampler(sharded, tokens_bt, mask_bt, jax.random.key(3)))
    for out in outs[1:]:
        np.testing.assert_array_equal(out.tokens_bn, outs[0].tokens_bn)
        np.testing.assert_array_equal(out.lengths_b, outs[0].lengths_b)
        np.testing.assert_allclose(out.logps_bn, outs[0].logps_bn, atol=1e-5)
