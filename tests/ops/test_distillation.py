"""Distillation divergences: float64 loops from the definitions (GKD's JSD(β)), a numpy
transcription of TRL's generalized_jsd_loss, gradients vs the full-logits computation and
finite differences, masking, top-k, and the chunked path's compiled memory."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm.ops import (
    DISTILL_KINDS,
    aggregate_loss,
    distill_divergence,
    distill_loss,
    divergence_from_logits,
)
from tests.ops.helpers import ragged_mask

# ---------------------------------------------------------------------------- references


def _np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def _np_kl(a, b):
    return sum(a[v] * math.log(a[v] / b[v]) for v in range(len(a)) if a[v] > 0)


def loop_divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0, top_k=None):
    """Per (b, t): q = softmax(student / τ), p = softmax(teacher / τ), both restricted to the
    teacher's top-k logits when top_k is set; then the divergence from its definition:
    forward KL(p‖q), reverse KL(q‖p), GKD's JSD(β) = β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q."""
    B, T, _ = student_logits.shape
    out = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            s = np.asarray(student_logits[b, t], np.float64) / temperature
            te = np.asarray(teacher_logits[b, t], np.float64) / temperature
            if top_k is not None:
                keep = np.argsort(-te, kind="stable")[:top_k]
                s, te = s[keep], te[keep]
            q, p = _np_softmax(s), _np_softmax(te)
            if kind == "forward_kl":
                out[b, t] = _np_kl(p, q)
            elif kind == "reverse_kl":
                out[b, t] = _np_kl(q, p)
            else:
                m = beta * p + (1 - beta) * q
                out[b, t] = beta * _np_kl(p, m) + (1 - beta) * _np_kl(q, m)
    return out


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL GKDTrainer.generalized_jsd_loss, per token (before its reduction):
    F.kl_div(input, target, log_target=True) = exp(target)·(target − input), summed over V."""
    s = _np_log_softmax(student_logits / temperature)
    t = _np_log_softmax(teacher_logits / temperature)
    kl_div = lambda inp, target: np.exp(target) * (target - inp)
    if beta == 0:
        jsd = kl_div(s, t)
    elif beta == 1:
        jsd = kl_div(t, s)
    else:
        m = np.logaddexp(s + math.log(1 - beta), t + math.log(beta))
        jsd = beta * kl_div(m, t) + (1 - beta) * kl_div(m, s)
    return jsd.sum(-1)


def _inputs(seed, B=2, T=5, D=6, Dt=4, V=11, scale=1.5, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    sh = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    su = jnp.asarray(rng.normal(size=(D, V)) * scale / math.sqrt(D), dtype)
    th = jnp.asarray(rng.normal(size=(B, T, Dt)), dtype)
    tu = jnp.asarray(rng.normal(size=(Dt, V)) * scale / math.sqrt(Dt), dtype)
    return sh, su, th, tu


def _logits(h, w):
    return np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))


# ---------------------------------------------------------------------------- values


class DivergenceValueTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(kind=DISTILL_KINDS, temperature=(1.0, 2.0), top_k=(None, 3), chunk=(1, 4, 256))
    def test_matches_loop(self, kind, temperature, top_k, chunk):
        sh, su, th, tu = _inputs(0)
        fn = self.variant(functools.partial(distill_divergence, kind=kind, beta=0.3, temperature=temperature,
                                            chunk_size=chunk, teacher_top_k=top_k))
        got = fn(sh, su, th, tu)
        expected = loop_divergence(_logits(sh, su), _logits(th, tu), kind, 0.3, temperature, top_k)
        chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=1e-6)
        assert got.dtype == jnp.float32 and got.shape == (2, 5)
        assert np.all(np.asarray(got) >= -1e-6)

    @parameterized.parameters(0.0, 0.1, 0.5, 0.9, 1.0)
    def test_matches_trl_generalized_jsd(self, trl_beta):
        sh, su, th, tu = _inputs(1)
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(trl_beta, "jsd")
        got = distill_divergence(sh, su, th, tu, kind=kind, beta=trl_beta if kind == "jsd" else 0.5,
                                 temperature=0.7, chunk_size=3)
        expected = trl_generalized_jsd(_logits(sh, su), _logits(th, tu), trl_beta, 0.7)
        chex.assert_trees_all_close(got, expected, rtol=2e-4, atol=1e-6)

    def test_jsd_limits_are_the_kls(self):
        """JSD(β)/β → KL(p‖q) as β → 0 and JSD(β)/(1−β) → KL(q‖p) as β → 1."""
        sh, su, th, tu = _inputs(2)
        with jax.enable_x64(True):
            s, t = jnp.asarray(_logits(sh, su)), jnp.asarray(_logits(th, tu))
            fwd = divergence_from_logits(s, t, kind="forward_kl")
            rev = divergence_from_logits(s, t, kind="reverse_kl")
            eps = 1e-6
            np.testing.assert_allclose(divergence_from_logits(s, t, kind="jsd", beta=eps) / eps, fwd, rtol=1e-4)
            np.testing.assert_allclose(divergence_from_logits(s, t, kind="jsd", beta=1 - eps) / eps, rev, rtol=1e-4)

    def test_top_k_full_vocab_is_full(self):
        sh, su, th, tu = _inputs(3)
        for kind in DISTILL_KINDS:
            full = distill_divergence(sh, su, th, tu, kind=kind)
            topv = distill_divergence(sh, su, th, tu, kind=kind, teacher_top_k=11)
            chex.assert_trees_all_close(full, topv, rtol=1e-5, atol=1e-7)

    def test_zero_when_student_is_teacher(self):
        sh, su, _, _ = _inputs(4)
        for kind in DISTILL_KINDS:
            np.testing.assert_allclose(distill_divergence(sh, su, sh, su, kind=kind), 0.0, atol=1e-6)

    def test_bf16_inputs(self):
        sh, su, th, tu = _inputs(5, T=9, V=40)
        got = distill_divergence(*(x.astype(jnp.bfloat16) for x in (sh, su, th, tu)), kind="jsd", chunk_size=4)
        assert got.dtype == jnp.float32
        chex.assert_trees_all_close(got, distill_divergence(sh, su, th, tu, kind="jsd"), rtol=0.1, atol=0.02)


# ---------------------------------------------------------------------------- gradients


def _naive(sh, su, th, tu, mask=None, **kw):
    s = jnp.einsum("btd,dv->btv", sh, su, preferred_element_type=jnp.float32)
    t = jnp.einsum("btd,dv->btv", th, tu, preferred_element_type=jnp.float32)
    return divergence_from_logits(s, t, mask, **kw)


class GradientTest(chex.TestCase):
    @parameterized.product(kind=DISTILL_KINDS, top_k=(None, 4))
    def test_grads_match_naive_and_teacher_gets_none(self, kind, top_k):
        sh, su, th, tu = _inputs(6, B=3, T=7)
        w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 7)), jnp.float32)
        loss = lambda f: (lambda *a: jnp.sum(w * f(*a, kind=kind, beta=0.4, teacher_top_k=top_k)))
        chunked = functools.partial(distill_divergence, chunk_size=4)
        grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2, 3)))(sh, su, th, tu)
        expected = jax.jit(jax.grad(loss(_naive), argnums=(0, 1, 2, 3)))(sh, su, th, tu)
        assert all(float(jnp.abs(g).max()) > 1e-4 for g in grads[:2])
        chex.assert_trees_all_close(grads, expected, rtol=1e-4, atol=1e-6)
        for g in grads[2:]:
            np.testing.assert_array_equal(g, 0.0)

    @parameterized.parameters(*DISTILL_KINDS)
    def test_grads_match_finite_differences(self, kind):
        """Central differences of the float64 numpy loop (no JAX in the reference)."""
        sh, su, th, tu = _inputs(7, B=1, T=3, D=3, Dt=2, V=5)
        np_sh, np_su = np.asarray(sh, np.float64), np.asarray(su, np.float64)
        t_logits = _logits(th, tu)
        w = np.array([[1.0, -0.5, 2.0]])

        def np_loss(h, u):
            return np.sum(w * loop_divergence(_logits(h, u), t_logits, kind, 0.3, 1.3))

        def fd(i, eps=1e-6):
            args = [np_sh, np_su]
            g = np.zeros_like(args[i])
            for idx in np.ndindex(g.shape):
                plus, minus = [a.copy() for a in args], [a.copy() for a in args]
                plus[i][idx] += eps
                minus[i][idx] -= eps
                g[idx] = (np_loss(*plus) - np_loss(*minus)) / (2 * eps)
            return g

        got = jax.grad(lambda h, u: jnp.sum(w * distill_divergence(h, u, th, tu, kind=kind, beta=0.3,
                                                                   temperature=1.3, chunk_size=2)),
                       argnums=(0, 1))(sh, su)
        chex.assert_trees_all_close(got, (fd(0), fd(1)), rtol=1e-3, atol=1e-5)

    def test_masked_positions_zero_value_and_gradient(self):
        rng = np.random.default_rng(8)
        sh, su, th, tu = _inputs(8, B=3, T=6)
        mask = ragged_mask(rng, 3, 6, min_len=1, holes=True)
        bad = mask[..., None] == 0
        sh_nan = jnp.where(bad, jnp.nan, sh)
        th_inf = jnp.where(bad, jnp.inf, th)
        for kind in DISTILL_KINDS:
            out = distill_divergence(sh_nan, su, th_inf, tu, mask, kind=kind, chunk_size=5)
            np.testing.assert_array_equal(np.asarray(out)[mask == 0], 0.0)
            clean = distill_divergence(sh, su, th, tu, kind=kind)
            chex.assert_trees_all_close(np.asarray(out)[mask == 1], np.asarray(clean)[mask == 1], rtol=1e-5)
            g_h, g_u = jax.grad(lambda h, u: jnp.sum(distill_divergence(h, u, th_inf, tu, mask, kind=kind,
                                                                         chunk_size=5)), argnums=(0, 1))(sh_nan, su)
            chex.assert_tree_all_finite((g_h, g_u))
            np.testing.assert_array_equal(np.asarray(g_h)[mask == 0], 0.0)


# ---------------------------------------------------------------------------- memory


def test_chunked_temp_memory_far_below_naive():
    """B=2, T=256, V=8192: two float32 [B, T, V] logits are 16 MiB each; the chunked grad
    keeps a few [chunk, V] blocks."""
    B, T, D, V = 2, 256, 64, 8192
    args = (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, kind="jsd")), argnums=(0, 1)))
        stats = grad.lower(*args).compile().memory_analysis()
        if stats is None:
            pytest.skip("memory_analysis unavailable on this backend")
        return stats.temp_size_in_bytes

    chunked = temp_bytes(functools.partial(distill_divergence, chunk_size=64))
    naive = temp_bytes(_naive)
    logits_bytes = B * T * V * 4
    assert naive >= 2 * logits_bytes, naive
    assert chunked < naive / 8, (chunked, naive)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)


# ---------------------------------------------------------------------------- API


def test_distill_loss_aggregates():
    rng = np.random.default_rng(9)
    per_token = np.abs(rng.normal(size=(3, 5))).astype(np.float32)
    mask = ragged_mask(rng, 3, 5, min_len=1)
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum"):
        loss, metrics = distill_loss(per_token, mask, agg)
        np.testing.assert_allclose(loss, aggregate_loss(per_token, mask, agg), rtol=1e-6)
    np.testing.assert_allclose(metrics["divergence"], per_token[mask == 1].mean(), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="tvd"), "kind must be one of"),
    (dict(kind="jsd", beta=0.0), "beta"),
    (dict(kind="jsd", beta=1.0), "beta"),
    (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(teacher_top_k=0), "teacher_top_k"),
    (dict(teacher_top_k=12), "teacher_top_k"),
])
def test_bad_options(kwargs, match):
    sh, su, th, tu = _inputs(10)
    with pytest.raises(ValueError, match=match):
        distill_divergence(sh, su, th, tu, **kwargs)


def test_bad_shapes():
    sh, su, th, tu = _inputs(11)
    with pytest.raises(ValueError, match="student_unembed"):
        distill_divergence(sh, su[:3], th, tu)
    with pytest.raises(ValueError, match="one vocabulary"):
        distill_divergence(sh, su, th, tu[:, :7])
    with pytest.raises(ValueError, match="teacher_hidden"):
        distill_divergence(sh, su, th[:, :3], tu)
    with pytest.raises(ValueError, match="mask"):
        distill_divergence(sh, su, th, tu, np.ones((2, 4)))
