"""GAE, group advantages, RLOO and reward shaping against numpy loops and rlax."""

import functools

import chex
import hypothesis.strategies as st
import jax
import numpy as np
import pytest
import rlax
from absl.testing import parameterized
from hypothesis import given, settings

from jaxrl_llm.ops import (
    GROUP_SCALES,
    gae,
    group_advantages,
    rloo_advantages,
    shape_token_rewards,
)
from tests.ops.helpers import float32, ragged_mask


def ref_gae(rewards, values, mask, gamma, lam):
    """GAE from Schulman et al. 2016, one sequence at a time, over the valid tokens only."""
    adv = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t] > 0]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            adv[b, t] = next_adv
    returns = np.where(mask > 0, adv + values, 0.0)
    return adv, returns


class GaeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        holes=(False, True),
        gamma_lam=((1.0, 0.95), (0.99, 0.9), (0.9, 0.0), (0.97, 1.0)),
        method=("scan", "associative"),
    )
    def test_matches_loop(self, holes, gamma_lam, method):
        gamma, lam = gamma_lam
        rng = np.random.default_rng(0)
        rewards, values = float32(rng, 5, 12), float32(rng, 5, 12)
        mask = ragged_mask(rng, 5, 12, holes=holes)
        adv, ret = self.variant(functools.partial(gae, gamma=gamma, lam=lam, method=method))(rewards, values, mask)
        chex.assert_shape([adv, ret], (5, 12))
        ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
        chex.assert_trees_all_close((adv, ret), (ref_adv, ref_ret), rtol=1e-5, atol=1e-5)

    @parameterized.product(gamma_lam=((0.99, 0.95), (1.0, 0.0), (0.9, 1.0)), method=("scan", "associative"))
    def test_matches_rlax_on_unpadded(self, gamma_lam, method):
        gamma, lam = gamma_lam
        rng = np.random.default_rng(1)
        rewards, values = float32(rng, 4, 16), float32(rng, 4, 16)
        adv, _ = gae(rewards, values, np.ones((4, 16), np.float32), gamma, lam, method=method)
        boot = np.concatenate([values, np.zeros((4, 1), np.float32)], axis=1)  # V after last = 0
        discounts = np.full((4, 16), gamma, np.float32)
        expected = jax.vmap(rlax.truncated_generalized_advantage_estimation, in_axes=(0, 0, None, 0))(
            rewards, discounts, lam, boot
        )
        chex.assert_trees_all_close(adv, expected, rtol=1e-5, atol=1e-5)

    def test_lambda_one_is_monte_carlo_minus_value(self):
        rng = np.random.default_rng(2)
        gamma = 0.95
        rewards, values = float32(rng, 3, 10), float32(rng, 3, 10)
        mask = ragged_mask(rng, 3, 10, min_len=1)
        adv, ret = gae(rewards, values, mask, gamma, 1.0)
        for b in range(3):
            n = int(mask[b].sum())
            for t in range(n):
                mc = sum(gamma ** (k - t) * rewards[b, k] for k in range(t, n))
                np.testing.assert_allclose(adv[b, t], mc - values[b, t], rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(ret[b, t], mc, rtol=1e-4, atol=1e-5)

    def test_lambda_zero_is_td_error(self):
        rng = np.random.default_rng(3)
        gamma = 0.9
        rewards, values = float32(rng, 3, 10), float32(rng, 3, 10)
        mask = ragged_mask(rng, 3, 10, min_len=1)
        adv, _ = gae(rewards, values, mask, gamma, 0.0)
        for b in range(3):
            n = int(mask[b].sum())
            for t in range(n):
                next_v = values[b, t + 1] if t + 1 < n else 0.0
                np.testing.assert_allclose(adv[b, t], rewards[b, t] + gamma * next_v - values[b, t], rtol=1e-5, atol=1e-6)

    @parameterized.parameters("scan", "associative")
    def test_padding_does_not_leak(self, method):
        rng = np.random.default_rng(4)
        rewards, values = float32(rng, 2, 8), float32(rng, 2, 8)
        mask = ragged_mask(rng, 2, 8, min_len=2)
        mask[1, 5:] = 0
        adv1, _ = gae(rewards, values, mask, 1.0, 0.95, method=method)
        rewards[1, 5:] = 1e6
        values[1, 5:] = -1e6
        adv2, ret2 = gae(rewards, values, mask, 1.0, 0.95, method=method)
        np.testing.assert_array_equal(adv1, adv2)
        self.assertTrue(np.all(np.asarray(adv2)[1, 5:] == 0) and np.all(np.asarray(ret2)[1, 5:] == 0))

    def test_auto_method_picks_scan_on_cpu_and_rejects_unknown(self):
        rng = np.random.default_rng(5)
        rewards, values = float32(rng, 3, 64), float32(rng, 3, 64)
        mask = ragged_mask(rng, 3, 64, holes=True)
        auto = gae(rewards, values, mask, 0.99, 0.95)
        chosen = "scan" if jax.default_backend() == "cpu" else "associative"
        chex.assert_trees_all_equal(auto, gae(rewards, values, mask, 0.99, 0.95, method=chosen))
        # the two algorithms agree on long sequences with holes too
        chex.assert_trees_all_close(
            gae(rewards, values, mask, 0.99, 0.95, method="scan"),
            gae(rewards, values, mask, 0.99, 0.95, method="associative"), rtol=1e-5, atol=1e-5)
        with self.assertRaisesRegex(ValueError, "method='parallel'; expected one of"):
            gae(rewards, values, mask, method="parallel")


def ref_group(scores, g, scale, eps):
    out = np.zeros(len(scores))
    all_std = np.std(scores, ddof=1)
    for start in range(0, len(scores), g):
        grp = scores[start : start + g]
        mean = sum(grp) / g
        std = (sum((x - mean) ** 2 for x in grp) / (g - 1)) ** 0.5
        for i, s in enumerate(grp):
            if scale == "group":
                out[start + i] = (s - mean) / (std + eps)
            elif scale == "batch":
                out[start + i] = (s - mean) / (all_std + eps)
            else:
                out[start + i] = s - mean
    return out


class GroupAdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(scale=GROUP_SCALES, g=(2, 4, 8))
    def test_matches_loop(self, scale, g):
        scores = np.random.default_rng(g).standard_normal(3 * g).astype(np.float32)
        out = self.variant(functools.partial(group_advantages, group_size=g, scale=scale))(scores)
        chex.assert_shape(out, (3 * g,))
        chex.assert_trees_all_close(out, ref_group(scores.astype(np.float64), g, scale, 1e-6), rtol=1e-4, atol=1e-5)

    @parameterized.parameters(*GROUP_SCALES)
    def test_all_equal_group_is_exactly_zero(self, scale):
        scores = np.array([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 1.0, 0.0], np.float32)
        out = np.asarray(group_advantages(scores, 4, scale))
        np.testing.assert_array_equal(out[:4], 0.0)
        self.assertTrue(np.all(np.isfinite(out)))
        self.assertTrue(np.all(out[4:] != 0))

    def test_group_size_one_raises(self):
        with pytest.raises(ValueError, match="group_size"):
            group_advantages(np.zeros(4), 1)

    def test_not_divisible_raises(self):
        with pytest.raises(ValueError, match="not a multiple of group_size=4"):
            group_advantages(np.zeros(6), 4)

    def test_unknown_scale(self):
        with pytest.raises(ValueError, match="scale must be one of"):
            group_advantages(np.zeros(4), 2, "std")


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False, width=32), min_size=12, max_size=12), st.sampled_from([2, 3, 4, 6]))
def test_group_advantages_zero_mean_per_group(scores, g):
    for scale in GROUP_SCALES:
        out = np.asarray(group_advantages(np.array(scores, np.float32), g, scale)).reshape(-1, g)
        np.testing.assert_allclose(out.mean(axis=1), 0.0, atol=1e-4)


class RlooTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(2, 3, 5)
    def test_matches_loop(self, g):
        scores = np.random.default_rng(g).standard_normal(4 * g).astype(np.float32)
        out = self.variant(functools.partial(rloo_advantages, group_size=g))(scores)
        expected = np.zeros(4 * g)
        for start in range(0, 4 * g, g):
            for i in range(g):
                others = [scores[start + j] for j in range(g) if j != i]
                expected[start + i] = scores[start + i] - sum(others) / len(others)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)

    def test_group_size_one_raises(self):
        with pytest.raises(ValueError, match="group_size"):
            rloo_advantages(np.zeros(4), 1)


class ShapeTokenRewardsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_loop(self):
        rng = np.random.default_rng(5)
        scores, kl = float32(rng, 6), float32(rng, 6, 9)
        mask = ragged_mask(rng, 6, 9, holes=True)
        mask[2] = 0.0  # empty response: gets nothing at all
        beta = 0.05
        out = self.variant(functools.partial(shape_token_rewards, beta=beta))(scores, kl, mask)
        expected = np.zeros((6, 9))
        for b in range(6):
            valid = [t for t in range(9) if mask[b, t]]
            for t in valid:
                expected[b, t] = -beta * kl[b, t]
            if valid:
                expected[b, valid[-1]] += scores[b]
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)

    def test_score_never_on_padding(self):
        mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
        out = np.asarray(shape_token_rewards(np.array([3.0, 5.0]), np.zeros((2, 4)), mask, 0.1))
        np.testing.assert_array_equal(out, [[0, 3, 0, 0], [0, 0, 0, 5]])
