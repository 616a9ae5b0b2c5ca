"""Distillation losses (GKD's generalised JSD, top-k, chunking) against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses

BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)


def random_logits(seed, shape=(3, 5, 17), scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def np_log_softmax(logits, temperature=1.0):
    x = np.asarray(logits, np.float64) / temperature
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_kl(p, q):
    """KL(p || q) over the last axis, from probabilities (float64)."""
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0),
                  axis=-1)


def np_jsd(s, t, beta):
    """GKD's divergence from probabilities: forward KL at 0, reverse KL at 1."""
    if beta == 0.0:
        return np_kl(t, s)
    if beta == 1.0:
        return np_kl(s, t)
    m = beta * t + (1.0 - beta) * s
    return beta * np_kl(t, m) + (1.0 - beta) * np_kl(s, m)


def np_divergence(student_logits_btv, teacher_logits_btv, beta, temperature=1.0, top_k=0):
    s_logits = np.asarray(student_logits_btv, np.float64)
    t_logits = np.asarray(teacher_logits_btv, np.float64)
    if top_k:
        ids_btk = np.argsort(-t_logits, axis=-1)[..., :top_k]
        s_logits = np.take_along_axis(s_logits, ids_btk, axis=-1)
        t_logits = np.take_along_axis(t_logits, ids_btk, axis=-1)
    s = np.exp(np_log_softmax(s_logits, temperature))
    t = np.exp(np_log_softmax(t_logits, temperature))
    return np_jsd(s, t, beta)


# -- against the float64 reference ----------------------------------------------------

@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("beta", BETAS)
def test_divergence_matches_numpy(beta, temperature):
    student_btv, teacher_btv = random_logits(0), random_logits(1)
    want_bt = np_divergence(student_btv, teacher_btv, beta, temperature)
    got_bt = losses.distill_divergence(jnp.asarray(student_btv), jnp.asarray(teacher_btv),
                                       beta=beta, temperature=temperature)
    assert got_bt.shape == (3, 5) and got_bt.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-5, atol=1e-7)
    assert want_bt.min() > 1e-3  # the inputs are far apart: a zero result would fail
    gjsd_bt = losses.generalized_jsd(
        jax.nn.log_softmax(jnp.asarray(student_btv) / temperature, axis=-1),
        jax.nn.log_softmax(jnp.asarray(teacher_btv) / temperature, axis=-1), beta)
    np.testing.assert_allclose(np.asarray(gjsd_bt), want_bt, rtol=1e-5, atol=1e-7)


def test_divergence_bf16_logits_are_computed_in_f32():
    student_btv, teacher_btv = random_logits(2), random_logits(3)
    s16, t16 = jnp.asarray(student_btv, jnp.bfloat16), jnp.asarray(teacher_btv, jnp.bfloat16)
    want_bt = np_divergence(np.asarray(s16, np.float32), np.asarray(t16, np.float32), 0.5)
    got_bt = losses.distill_divergence(s16, t16, beta=0.5)
    assert got_bt.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-5, atol=1e-7)


# -- named losses and the ends of GKD -------------------------------------------------

def test_distill_beta_names():
    assert set(losses.DISTILL_LOSSES) == {"forward_kl", "reverse_kl", "jsd"}
    assert losses.distill_beta("forward_kl", 0.7) == 0.0
    assert losses.distill_beta("reverse_kl", 0.7) == 1.0
    assert losses.distill_beta("jsd", 0.7) == 0.7
    assert losses.distill_beta("jsd", 0.25) == 0.25
    with pytest.raises(ValueError, match="kl_forward"):
        losses.distill_beta("kl_forward", 0.5)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_beta_ends_are_forward_and_reverse_kl(temperature):
    student_btv, teacher_btv = random_logits(4), random_logits(5)
    s_btv = np.exp(np_log_softmax(student_btv, temperature))
    t_btv = np.exp(np_log_softmax(teacher_btv, temperature))
    forward_bt = np.sum(t_btv * (np.log(t_btv) - np.log(s_btv)), axis=-1)
    reverse_bt = np.sum(s_btv * (np.log(s_btv) - np.log(t_btv)), axis=-1)
    assert np.abs(forward_bt - reverse_bt).min() > 1e-2  # KL is asymmetric here
    for loss, want_bt in (("forward_kl", forward_bt), ("reverse_kl", reverse_bt)):
        got_bt = losses.distill_divergence(
            jnp.asarray(student_btv), jnp.asarray(teacher_btv),
            beta=losses.distill_beta(loss, 0.5), temperature=temperature)
        np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta", (1e-3, 1 - 1e-3))
def test_beta_near_ends_uses_the_mixture(beta):
    """Just inside (0, 1) the mixture form applies (it tends to 0, not to the KLs, at the
    ends: those are GKD's special cases) and stays accurate."""
    student_btv, teacher_btv = random_logits(6), random_logits(7)
    got_bt = losses.distill_divergence(jnp.asarray(student_btv), jnp.asarray(teacher_btv),
                                       beta=beta)
    want_bt = np_divergence(student_btv, teacher_btv, beta)
    np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-3, atol=1e-7)
    ends_bt = np.minimum(np_divergence(student_btv, teacher_btv, 0.0),
                         np_divergence(student_btv, teacher_btv, 1.0))
    assert np.all(want_bt < 0.1 * ends_bt)


# -- top-k ----------------------------------------------------------------------------

@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_topk_full_vocabulary_is_full_divergence(beta):
    student_btv, teacher_btv = random_logits(8), random_logits(9)
    s, t = jnp.asarray(student_btv), jnp.asarray(teacher_btv)
    v = t.shape[-1]
    full_bt = np.asarray(losses.distill_divergence(s, t, beta=beta, temperature=2.0))
    for k in (v, v + 5):
        got_bt = losses.distill_divergence(s, t, beta=beta, temperature=2.0, top_k=k)
        np.testing.assert_allclose(np.asarray(got_bt), full_bt, rtol=1e-6, atol=1e-7)
    # All V ids (in the teacher's order) through the top-k path: a permutation, same value.
    top_btv, ids_btv = jax.lax.top_k(t, v)
    got_bt = losses.topk_distill_divergence(s, ids_btv, top_btv, beta=beta, temperature=2.0)
    np.testing.assert_allclose(np.asarray(got_bt), full_bt, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", (1.0, 2.0))
@pytest.mark.parametrize("beta", BETAS)
def test_topk_matches_numpy(beta, temperature):
    student_btv, teacher_btv = random_logits(10), random_logits(11)
    s, t = jnp.asarray(student_btv), jnp.asarray(teacher_btv)
    k = 4
    want_bt = np_divergence(student_btv, teacher_btv, beta, temperature, top_k=k)
    full_bt = np_divergence(student_btv, teacher_btv, beta, temperature)
    assert np.abs(want_bt - full_bt).max() > 1e-2  # top-k genuinely differs from full
    got_bt = losses.distill_divergence(s, t, beta=beta, temperature=temperature, top_k=k)
    np.testing.assert_allclose(np.asarray(got_bt), want_bt, rtol=1e-5, atol=1e-7)
    top_btk, ids_btk = jax.lax.top_k(t, k)
    pre_bt = losses.topk_distill_divergence(s, ids_btk, top_btk, beta=beta,
                                            temperature=temperature)
    np.testing.assert_allclose(np.asarray(pre_bt), np.asarray(got_bt), rtol=1e-6, atol=1e-7)


def test_topk_student_outside_teacher_topk_is_ignored():
    """Only the student's logits at the teacher's top-k ids matter."""
    student_btv, teacher_btv = random_logits(12), random_logits(13)
    k = 4
    ids_btk = np.argsort(-teacher_btv, axis=-1)[..., :k]
    outside_btv = np.ones_like(student_btv, dtype=bool)
    np.put_along_axis(outside_btv, ids_btk, False, axis=-1)
    moved_btv = np.where(outside_btv, student_btv + 50.0, student_btv)
    a_bt = losses.distill_divergence(jnp.asarray(student_btv), jnp.asarray(teacher_btv),
                                     beta=0.5, top_k=k)
    b_bt = losses.distill_divergence(jnp.asarray(moved_btv), jnp.asarray(teacher_btv),
                                     beta=0.5, top_k=k)
    np.testing.assert_allclose(np.asarray(b_bt), np.asarray(a_bt), rtol=1e-6)
    grad_btv = jax.grad(lambda x: jnp.sum(losses.distill_divergence(
        x, jnp.asarray(teacher_btv), beta=0.5, top_k=k)))(jnp.asarray(student_btv))
    assert np.all(np.asarray(grad_btv)[outside_btv] == 0.0)
    assert np.abs(np.asarray(grad_btv)[~outside_btv]).max() > 1e-3


# -- identical distributions ----------------------------------------------------------

@pytest.mark.parametrize("top_k", (0, 4))
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_student_equal_teacher_is_zero_with_zero_grad(temperature, top_k):
    logits_btv = jnp.asarray(random_logits(14))
    for beta in BETAS:
        def total(x, beta=beta):
            return jnp.sum(losses.distill_divergence(x, logits_btv, beta=beta,
                                                     temperature=temperature, top_k=top_k))

        div_bt = losses.distill_divergence(logits_btv, logits_btv, beta=beta,
                                           temperature=temperature, top_k=top_k)
        assert np.abs(np.asarray(div_bt)).max() < 1e-6, beta
        grad_btv = jax.grad(total)(logits_btv)
        assert np.all(np.isfinite(np.asarray(grad_btv))), beta
        assert np.abs(np.asarray(grad_btv)).max() < 1e-6, beta
        # …and a nearby student does have a gradient (so the check above can fail).
        moved_btv = logits_btv.at[..., 0].add(1.0)
        assert np.abs(np.asarray(jax.grad(total)(moved_btv))).max() > 1e-3, beta


# top 3: the teacher's top tokens never include the masked entries
@pytest.mark.parametrize("beta,top_k", [(b, k) for b in BETAS for k in (0, 3)])
def test_masked_vocabulary_matches_unpadded(beta, top_k):
    """Vocabulary padding masked to -inf in both models (as a sampler or padded embedding
    would) changes neither the divergence nor the student's gradient."""
    student_btv, teacher_btv = random_logits(24, (2, 3, 9)), random_logits(25, (2, 3, 9))
    live_v = np.arange(9) < 7
    teacher_masked_btv = jnp.where(live_v, jnp.asarray(teacher_btv), -jnp.inf)

    def padded(x):
        return jnp.sum(losses.distill_divergence(jnp.where(live_v, x, -jnp.inf),
                                                 teacher_masked_btv, beta=beta, top_k=top_k))

    def unpadded(x):
        return jnp.sum(losses.distill_divergence(x[..., :7], jnp.asarray(teacher_btv)[..., :7],
                                                 beta=beta, top_k=top_k))

    s = jnp.asarray(student_btv)
    np.testing.assert_allclose(float(padded(s)), float(unpadded(s)), rtol=1e-6)
    grad_btv, want_btv = np.asarray(jax.grad(padded)(s)), np.asarray(jax.grad(unpadded)(s))
    assert np.all(np.isfinite(grad_btv))
    np.testing.assert_allclose(grad_btv[..., :7], want_btv[..., :7], rtol=1e-5, atol=1e-7)
    assert np.all(grad_btv[..., 7:] == 0.0)


# -- true bounds ----------------------------------------------------------------------

@pytest.mark.parametrize("scale", (1.0, 3.0, 30.0))
def test_nonnegative_and_bounded_by_weight_entropy(scale):
    """0 ≤ JSD(β) for every β, and for 0<β<1 JSD(β) ≤ H(β) (ln 2 at β = ½), whose bound
    peaked, nearly disjoint distributions (scale 30) come close to."""
    student_btv = random_logits(15, (4, 6, 29), scale)
    teacher_btv = random_logits(16, (4, 6, 29), scale)
    s, t = jnp.asarray(student_btv), jnp.asarray(teacher_btv)
    for beta in BETAS + (0.3, 0.7):
        div_bt = np.asarray(losses.distill_divergence(s, t, beta=beta))
        assert np.all(np.isfinite(div_bt)), beta
        assert div_bt.min() >= 0.0, (beta, div_bt.min())
        if 0.0 < beta < 1.0:
            h = -beta * np.log(beta) - (1 - beta) * np.log1p(-beta)
            assert div_bt.max() <= h * (1 + 1e-6), (beta, div_bt.max(), h)
    half_bt = np.asarray(losses.distill_divergence(s, t, beta=0.5))
    assert half_bt.max() <= np.log(2.0) * (1 + 1e-6)
    if scale == 30.0:
        assert half_bt.max() > 0.9 * np.log(2.0)


# -- gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_forward_kl_grad_is_student_minus_teacher(temperature):
    """d/dz Σ KL(T‖softmax(z/τ)) = (S − T)/τ per position."""
    student_btv, teacher_btv = random_logits(17), random_logits(18)
    grad_btv = jax.grad(lambda x: jnp.sum(losses.distill_divergence(
        x, jnp.asarray(teacher_btv), beta=0.0, temperature=temperature)))(
            jnp.asarray(student_btv))
    s_btv = np.exp(np_log_softmax(student_btv, temperature))
    t_btv = np.exp(np_log_softmax(teacher_btv, temperature))
    np.testing.assert_allclose(np.asarray(grad_btv), (s_btv - t_btv) / temperature,
                               rtol=1e-5, atol=1e-6)


def test_student_grad_matches_finite_difference():
    """Gradients w.r.t. the student for every β on far-apart inputs: finite, nonzero, and
    equal to a float64 central difference along a random direction."""
    student_btv, teacher_btv = random_logits(19), random_logits(20)
    direction_btv = np.random.default_rng(21).standard_normal(student_btv.shape)
    for beta in BETAS:
        grad_btv = np.asarray(jax.grad(lambda x, beta=beta: jnp.sum(
            losses.distill_divergence(x, jnp.asarray(teacher_btv), beta=beta)))(
                jnp.asarray(student_btv)), np.float64)
        eps = 1e-5
        plus = np_divergence(student_btv + eps * direction_btv, teacher_btv, beta).sum()
        minus = np_divergence(student_btv - eps * direction_btv, teacher_btv, beta).sum()
        want = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad_btv * direction_btv), want, rtol=1e-4)


# -- chunking -------------------------------------------------------------------------

def _distill_setup():
    rng = np.random.default_rng(22)
    hs_btd = jnp.asarray(rng.standard_normal((2, 11, 8)), jnp.float32)
    ht_btd = jnp.asarray(rng.standard_normal((2, 11, 8)), jnp.float32)
    ws_dv = jnp.asarray(rng.standard_normal((8, 23)), jnp.float32)
    wt_dv = jnp.asarray(rng.standard_normal((8, 23)), jnp.float32)
    mask_bt = jnp.asarray(rng.integers(0, 2, (2, 11)), jnp.float32)
    return hs_btd, ht_btd, ws_dv, wt_dv, mask_bt


def _distill_outputs(hs_btd, ht_btd, ws_dv, wt_dv, chunk):
    def fn(hs_bcd, ht_bcd):
        return {"div_bt": losses.distill_divergence(hs_bcd @ ws_dv, ht_bcd @ wt_dv, beta=0.5),
                "fwd_bt": losses.distill_divergence(hs_bcd @ ws_dv, ht_bcd @ wt_dv, beta=0.0,
                                                    top_k=5)}

    if chunk is None:
        return fn(hs_btd, ht_btd)
    return losses.map_position_chunks(fn, chunk, hs_btd, ht_btd)


@pytest.mark.parametrize("chunk", (1, 4, 11, 16))
def test_map_position_chunks_matches_unchunked(chunk):
    hs_btd, ht_btd, ws_dv, wt_dv, mask_bt = _distill_setup()
    want = _distill_outputs(hs_btd, ht_btd, ws_dv, wt_dv, None)
    got = _distill_outputs(hs_btd, ht_btd, ws_dv, wt_dv, chunk)
    assert set(got) == {"div_bt", "fwd_bt"}
    for key in want:
        assert got[key].shape == (2, 11), key
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
    # …and the float64 reference, so both paths are also right, not just equal.
    s_btv = np.asarray(hs_btd, np.float64) @ np.asarray(ws_dv, np.float64)
    t_btv = np.asarray(ht_btd, np.float64) @ np.asarray(wt_dv, np.float64)
    np.testing.assert_allclose(np.asarray(got["div_bt"]), np_divergence(s_btv, t_btv, 0.5),
                               rtol=1e-4, atol=1e-6)

    def loss(hs, ws, chunk):
        out = _distill_outputs(hs, ht_btd, ws, wt_dv, chunk)
        return jnp.sum((out["div_bt"] + out["fwd_bt"]) * mask_bt)

    want_g = jax.grad(loss, argnums=(0, 1))(hs_btd, ws_dv, None)
    got_g = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(hs_btd, ws_dv, chunk)
    for name, g, w in zip(("d hs", "d Ws"), got_g, want_g, strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-3, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    # Masked-out positions get no gradient into the student's hidden states.
    dead_bt = np.asarray(mask_bt) == 0
    assert dead_bt.any()
    assert np.all(np.asarray(got_g[0])[dead_bt] == 0.0)


def test_chunked_token_stats_still_matches_token_stats():
    hs_btd, _, ws_dv, _, _ = _distill_setup()
    targets_bt = jnp.asarray(np.random.default_rng(23).integers(0, 23, (2, 11)), jnp.int32)
    want = losses.token_stats(hs_btd @ ws_dv, targets_bt, with_hits=True, with_entropy=True)
    got = losses.chunked_token_stats(hs_btd, lambda h: h @ ws_dv, targets_bt, chunk=4,
                                     with_hits=True, with_entropy=True)
    assert set(got) == {"logps_bt", "hits_bt", "entropy_bt"}
    for key in want:
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]),
                                   rtol=1e-5, atol=1e-6, err_msg=key)
