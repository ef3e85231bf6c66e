"""PPO / GSPO / value losses against per-token numpy loops and the sequence-level objective."""

import functools
import math

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings

from jaxrl_llm.ops import AGGREGATION_MODES, gspo_policy_loss, ppo_policy_loss, value_loss
from tests.ops.helpers import float32, ragged_mask
from tests.ops.test_masked import ref_aggregate


def ref_ppo(logp, old, adv, mask, cl, ch, dual, agg):
    b_size, t_size = logp.shape
    loss = np.zeros((b_size, t_size))
    clipped_flags, lower_flags = np.zeros_like(loss), np.zeros_like(loss)
    high_flags, low_flags = np.zeros_like(loss), np.zeros_like(loss)
    for b in range(b_size):
        for t in range(t_size):
            a = adv[b] if adv.ndim == 1 else adv[b, t]
            rho = math.exp(min(max(logp[b, t] - old[b, t], -20), 20))
            l1 = -a * rho
            l2 = -a * min(max(rho, 1 - cl), 1 + ch)
            loss[b, t] = max(l1, l2)
            clipped_flags[b, t] = l2 > l1
            high_flags[b, t] = l2 > l1 and rho > 1
            low_flags[b, t] = l2 > l1 and rho < 1
            if dual is not None and a < 0:
                lower_flags[b, t] = loss[b, t] > -a * dual
                loss[b, t] = min(loss[b, t], -a * dual)
    m = mask > 0
    return (
        ref_aggregate(loss, mask, agg),
        clipped_flags[m].mean(),
        lower_flags[m].mean(),
        (old - logp)[m].mean(),
        np.exp(np.clip(logp - old, -20, 20))[m].mean(),
        high_flags[m].mean(),
        low_flags[m].mean(),
    )


def make_batch(seed, b=6, t=10, drift=0.3):
    rng = np.random.default_rng(seed)
    old = float32(rng, b, t) - 2.0
    logp = old + float32(rng, b, t, scale=drift)
    mask = ragged_mask(rng, b, t, min_len=1)
    return rng, logp, old, mask


class PPOLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(agg=AGGREGATION_MODES, clip=((0.2, 0.2), (0.2, 0.28)), dual=(None, 3.0), token_adv=(True, False))
    def test_matches_loop(self, agg, clip, dual, token_adv):
        rng, logp, old, mask = make_batch(0)
        adv = float32(rng, 6, 10) if token_adv else float32(rng, 6)
        fn = functools.partial(ppo_policy_loss, clip_low=clip[0], clip_high=clip[1], dual_clip=dual, agg=agg)
        loss, metrics = self.variant(fn)(logp, old, adv, mask)
        r_loss, r_clip, r_lower, r_kl, r_ratio, r_high, r_low = ref_ppo(logp, old, adv, mask, clip[0], clip[1], dual, agg)
        chex.assert_trees_all_close(loss, r_loss, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics["clipfrac"], r_clip, atol=1e-6)
        chex.assert_trees_all_close(metrics["clipfrac_lower"], r_lower, atol=1e-6)
        chex.assert_trees_all_close(metrics["clipfrac_high"], r_high, atol=1e-6)
        chex.assert_trees_all_close(metrics["clipfrac_low"], r_low, atol=1e-6)
        chex.assert_trees_all_close(metrics["clipfrac_high"] + metrics["clipfrac_low"], metrics["clipfrac"], atol=1e-6)
        chex.assert_trees_all_close(metrics["approx_kl"], r_kl, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics["ratio_mean"], r_ratio, rtol=1e-5)

    def test_dual_clip_bounds_negative_advantage_loss(self):
        logp = np.array([[3.0]], np.float32)  # ratio e^3 ≈ 20
        loss, metrics = ppo_policy_loss(logp, np.zeros((1, 1)), np.array([-1.0]), np.ones((1, 1)), dual_clip=3.0)
        np.testing.assert_allclose(loss, 3.0, rtol=1e-6)
        self.assertEqual(float(metrics["clipfrac_lower"]), 1.0)
        g = jax.grad(lambda l: ppo_policy_loss(l, np.zeros((1, 1)), np.array([-1.0]), np.ones((1, 1)), dual_clip=3.0)[0])(logp)
        self.assertEqual(float(g[0, 0]), 0.0)  # the dual-clip branch is constant

    def test_clip_higher_lets_low_prob_tokens_rise_further(self):
        """DAPO's point: with ε_high > ε_low a positive-advantage token is pushed up to 1+ε_high."""
        logp = np.log(np.array([[1.25]], np.float32))
        args = (logp, np.zeros((1, 1), np.float32), np.array([1.0]), np.ones((1, 1)))
        g_sym = jax.grad(lambda l: ppo_policy_loss(l, *args[1:], clip_high=0.2)[0])(logp)
        g_high = jax.grad(lambda l: ppo_policy_loss(l, *args[1:], clip_high=0.28)[0])(logp)
        self.assertEqual(float(g_sym[0, 0]), 0.0)
        self.assertLess(float(g_high[0, 0]), 0.0)

    def test_extreme_log_ratio_finite(self):
        logp = np.array([[0.0, -200.0]], np.float32)
        old = np.array([[-200.0, 0.0]], np.float32)
        f = lambda l: ppo_policy_loss(l, old, np.array([1.0]), np.ones((1, 2)), dual_clip=3.0)[0]
        self.assertTrue(np.isfinite(float(f(logp))))
        self.assertTrue(np.all(np.isfinite(jax.grad(f)(logp))))

    def test_bad_args(self):
        _, logp, old, mask = make_batch(1)
        with pytest.raises(ValueError, match="dual_clip"):
            ppo_policy_loss(logp, old, np.zeros(6), mask, dual_clip=0.5)
        with pytest.raises(ValueError, match="clip_low"):
            ppo_policy_loss(logp, old, np.zeros(6), mask, clip_low=1.5)
        with pytest.raises(ValueError, match="mode must be one of"):
            ppo_policy_loss(logp, old, np.zeros(6), mask, agg="sum")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_ppo_at_ratio_one_is_minus_mean_advantage(seed):
    rng = np.random.default_rng(seed)
    logp = float32(rng, 4, 6)
    adv = float32(rng, 4, 6)
    mask = ragged_mask(rng, 4, 6, min_len=1)
    loss, metrics = ppo_policy_loss(logp, logp, adv, mask)
    np.testing.assert_allclose(loss, -adv[mask > 0].mean(), rtol=1e-5, atol=1e-6)
    assert float(metrics["clipfrac"]) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 3.0))
def test_ppo_clipfrac_in_unit_interval(seed, drift):
    rng, logp, old, mask = make_batch(seed, drift=drift)
    _, metrics = ppo_policy_loss(logp, old, float32(rng, 6), mask, dual_clip=2.0)
    for k in ("clipfrac", "clipfrac_lower"):
        assert 0.0 <= float(metrics[k]) <= 1.0


def ref_gspo_objective(logp, old, adv, mask, cl, ch):
    """GSPO as written in the paper: per-sequence ratio s = exp(mean log-ratio), then
    mean over sequences of max(−A·s, −A·clip(s)). Differentiable in logp (no stop-grad trick)."""
    m = jnp.asarray(mask)
    seq_lr = jnp.sum((logp - old) * m, -1) / jnp.sum(m, -1)
    s = jnp.exp(seq_lr)
    per_seq = jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - cl, 1 + ch))
    return jnp.mean(per_seq)


class GSPOLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((3e-4, 4e-4, 0.01), (0.2, 0.2, 0.3), (3e-4, 4e-4, 1e-5))
    def test_value_and_grad_match_sequence_objective(self, cl, ch, drift):
        rng, logp, old, mask = make_batch(2, drift=drift)
        adv = float32(rng, 6)
        fn = self.variant(functools.partial(gspo_policy_loss, clip_low=cl, clip_high=ch))
        loss, metrics = fn(logp, old, adv, mask)
        chex.assert_trees_all_close(loss, ref_gspo_objective(logp, old, adv, mask, cl, ch), rtol=1e-5, atol=1e-7)
        g = jax.grad(lambda l: gspo_policy_loss(l, old, adv, mask, cl, ch)[0])(logp)
        g_ref = jax.grad(lambda l: ref_gspo_objective(l, old, adv, mask, cl, ch))(logp)
        chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-7)
        # clipfrac: token mean of "this token's sequence ratio was clipped" (loop reference)
        flags = []
        for b in range(6):
            n = mask[b].sum()
            s = math.exp(sum((logp[b, t] - old[b, t]) for t in range(10) if mask[b, t]) / n)
            l1, l2 = -adv[b] * s, -adv[b] * min(max(s, 1 - cl), 1 + ch)
            flags += [float(l2 > l1)] * int(n)
        np.testing.assert_allclose(metrics["clipfrac"], np.mean(flags), atol=1e-6)

    def test_equal_token_weight_within_sequence(self):
        """Every token of a sequence gets the same ratio weight (s_b), unlike token-level PPO."""
        rng, logp, old, mask = make_batch(3, drift=0.02)
        adv = np.ones(6, np.float32)
        g = np.asarray(jax.grad(lambda l: gspo_policy_loss(l, old, adv, mask, 0.5, 0.5)[0])(logp))
        for b in range(6):
            vals = g[b][mask[b] > 0]
            np.testing.assert_allclose(vals, vals[0], rtol=1e-5)
            self.assertTrue(np.all(g[b][mask[b] == 0] == 0))

    def test_needs_sequence_advantages(self):
        _, logp, old, mask = make_batch(4)
        with pytest.raises(ValueError, match=r"advantages must be \[B\] \(rank 1\)"):
            gspo_policy_loss(logp, old, np.zeros((6, 10)), mask)


def ref_value_loss(v, old_v, ret, mask, clip, agg):
    loss = np.zeros(v.shape)
    flags = np.zeros(v.shape)
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            un = (v[b, t] - ret[b, t]) ** 2
            if clip is None:
                loss[b, t] = 0.5 * un
            else:
                vc = old_v[b, t] + min(max(v[b, t] - old_v[b, t], -clip), clip)
                cl = (vc - ret[b, t]) ** 2
                loss[b, t] = 0.5 * max(un, cl)
                flags[b, t] = cl > un
    return ref_aggregate(loss, mask, agg), flags[mask > 0].mean()


class ValueLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(clip=(0.2, None), agg=("token_mean", "seq_mean_token_mean"))
    def test_matches_loop(self, clip, agg):
        rng = np.random.default_rng(6)
        v, old_v, ret = float32(rng, 5, 8), float32(rng, 5, 8), float32(rng, 5, 8)
        mask = ragged_mask(rng, 5, 8, min_len=1)
        loss, metrics = self.variant(functools.partial(value_loss, clip=clip, agg=agg))(v, old_v, ret, mask)
        r_loss, r_frac = ref_value_loss(v, old_v, ret, mask, clip, agg)
        chex.assert_trees_all_close(loss, r_loss, rtol=1e-5, atol=1e-6)
        if clip is not None:
            chex.assert_trees_all_close(metrics["vf_clipfrac"], r_frac, atol=1e-6)

    def test_returns_get_no_gradient(self):
        rng = np.random.default_rng(7)
        v, old_v, ret = float32(rng, 2, 3), float32(rng, 2, 3), float32(rng, 2, 3)
        g = jax.grad(lambda r: value_loss(v, old_v, r, np.ones((2, 3)))[0])(ret)
        np.testing.assert_array_equal(g, 0.0)
