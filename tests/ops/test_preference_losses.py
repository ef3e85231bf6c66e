"""DPO variants, Bradley–Terry and Plackett–Luce losses against scalar math loops."""

import functools
import itertools
import math

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm.ops import DPO_KINDS, bradley_terry_loss, dpo_loss, plackett_luce_loss
from tests.ops.helpers import float32


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def ref_dpo(pc, pr, rc, rr, beta, kind, eps):
    losses, acc, margin = [], [], []
    for i in range(len(pc)):
        delta = (pc[i] - rc[i]) - (pr[i] - rr[i])
        z = beta * delta
        if kind == "sigmoid":
            loss = -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
        elif kind == "robust":
            loss = (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
        elif kind == "ipo":
            loss = (delta - 1 / (2 * beta)) ** 2
        else:
            loss = max(0.0, 1 - z)
        losses.append(loss)
        c, r = beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])
        acc.append(1.0 if c > r else 0.5 if c == r else 0.0)  # a tie counts half
        margin.append(c - r)
    return np.mean(losses), np.mean(acc), np.mean(margin)


def random_logps(seed, b=8):
    rng = np.random.default_rng(seed)
    return [float32(rng, b, scale=3.0) - 20.0 for _ in range(4)]


class DPOTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(kind=DPO_KINDS, beta=(0.1, 0.5), eps=(0.0, 0.1))
    def test_matches_loop(self, kind, beta, eps):
        pc, pr, rc, rr = random_logps(0)
        fn = self.variant(functools.partial(dpo_loss, beta=beta, kind=kind, label_smoothing=eps))
        loss, metrics = fn(pc, pr, rc, rr)
        r_loss, r_acc, r_margin = ref_dpo(pc, pr, rc, rr, beta, kind, eps)
        chex.assert_trees_all_close(loss, r_loss, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics["reward_accuracy"], r_acc)
        chex.assert_trees_all_close(metrics["reward_margin"], r_margin, rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(metrics["chosen_reward"], np.mean(beta * (pc - rc)), rtol=1e-4, atol=1e-6)

    def test_log2_at_reference(self):
        pc, pr, _, _ = random_logps(1)
        loss, metrics = dpo_loss(pc, pr, pc, pr, beta=0.3)
        np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
        # π = π_ref: every implicit reward is 0, a tie, which counts half (chance), not wrong
        assert float(metrics["reward_accuracy"]) == 0.5 and float(metrics["ties"]) == 1.0

    def test_ties_count_half(self):
        zeros = np.zeros(4, np.float32)
        pc = np.array([1.0, -1.0, 0.0, 0.0], np.float32)  # right, wrong, tie, tie
        _, metrics = dpo_loss(pc, zeros, zeros, zeros, beta=0.5)
        assert float(metrics["reward_accuracy"]) == (1 + 0 + 0.5 + 0.5) / 4
        assert float(metrics["ties"]) == 0.5

    @parameterized.parameters(0.0, 0.2)
    def test_gradient_closed_form(self, eps):
        """∂L/∂pi_chosen = β·(−(1−ε)σ(−βΔ) + εσ(βΔ)) / B; at policy == reference σ(0) = ½."""
        pc, pr, rc, rr = random_logps(2)
        beta = 0.2
        grads = jax.grad(lambda c, r: dpo_loss(c, r, rc, rr, beta, "sigmoid", eps)[0], argnums=(0, 1))(pc, pr)
        sig = lambda x: 1 / (1 + np.exp(-x))
        delta = (pc - rc) - (pr - rr)
        expected = beta * (-(1 - eps) * sig(-beta * delta) + eps * sig(beta * delta)) / len(pc)
        np.testing.assert_allclose(grads[0], expected, rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(grads[1], -expected, rtol=1e-4, atol=1e-8)
        g_ref = jax.grad(lambda c: dpo_loss(c, pr, pc, pr, beta)[0])(pc)
        np.testing.assert_allclose(g_ref, -beta * 0.5 / len(pc), rtol=1e-6)

    def test_reference_gets_no_gradient(self):
        pc, pr, rc, rr = random_logps(3)
        g = jax.grad(lambda r: dpo_loss(pc, pr, r, rr)[0])(rc)
        np.testing.assert_array_equal(g, 0.0)

    def test_bad_args(self):
        pc, pr, rc, rr = random_logps(4)
        with pytest.raises(ValueError, match="kind must be one of"):
            dpo_loss(pc, pr, rc, rr, kind="kto")
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(pc, pr, rc, rr, beta=0.0)
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)


class BradleyTerryTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(use_margin=(False, True), center=(0.0, 0.01))
    def test_matches_loop(self, use_margin, center):
        rng = np.random.default_rng(5)
        rc, rr = float32(rng, 9), float32(rng, 9)
        margin = np.abs(float32(rng, 9)) if use_margin else None
        fn = self.variant(functools.partial(bradley_terry_loss, center_coef=center))
        loss, metrics = fn(rc, rr, margin) if use_margin else fn(rc, rr)
        terms = [-log_sigmoid(rc[i] - rr[i] - (margin[i] if use_margin else 0.0)) for i in range(9)]
        expected = np.mean(terms) + center * np.mean([(rc[i] + rr[i]) ** 2 for i in range(9)])
        chex.assert_trees_all_close(loss, expected, rtol=1e-5)
        chex.assert_trees_all_close(metrics["accuracy"], np.mean([rc[i] > rr[i] for i in range(9)]))


def ref_plackett_luce(scores):
    total = 0.0
    for row in scores:
        ll = 0.0
        for k in range(len(row)):
            ll += row[k] - math.log(sum(math.exp(s) for s in row[k:]))
        total += -ll
    return total / len(scores)


class PlackettLuceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(2, 3, 4, 6)
    def test_matches_loop(self, k):
        scores = float32(np.random.default_rng(k), 7, k)
        loss, metrics = self.variant(plackett_luce_loss)(scores)
        chex.assert_trees_all_close(loss, ref_plackett_luce(scores), rtol=1e-5)
        pairs = [(b, i, j) for b in range(7) for i, j in itertools.combinations(range(k), 2)]
        expected_pair_acc = np.mean([scores[b, i] > scores[b, j] for b, i, j in pairs])
        chex.assert_trees_all_close(metrics["pairwise_accuracy"], expected_pair_acc, rtol=1e-6)

    def test_k2_equals_bradley_terry(self):
        scores = float32(np.random.default_rng(9), 10, 2)
        pl, _ = plackett_luce_loss(scores)
        bt, _ = bradley_terry_loss(scores[:, 0], scores[:, 1])
        np.testing.assert_allclose(pl, bt, rtol=1e-6)
        g_pl = jax.grad(lambda s: plackett_luce_loss(s)[0])(scores)
        g_bt = jax.grad(lambda a, b: bradley_terry_loss(a, b)[0], argnums=(0, 1))(scores[:, 0], scores[:, 1])
        np.testing.assert_allclose(g_pl, np.stack(g_bt, axis=1), rtol=1e-5, atol=1e-7)

    def test_needs_two_items(self):
        with pytest.raises(ValueError, match="K >= 2"):
            plackett_luce_loss(np.zeros((3, 1)))
