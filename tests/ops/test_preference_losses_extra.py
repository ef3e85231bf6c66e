"""SimPO, ORPO and KTO against scalar loops from the papers, numpy transcriptions of TRL's
code, finite differences, and their edge cases."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from jaxrl_llm.ops import kto_loss, kto_reference_point, orpo_loss, simpo_loss
from jaxrl_llm.ops.preference_losses import log1mexp


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def pair_data(seed, b=8):
    """Summed log-probs (so that the per-token average is in about [−3, −0.2]) and lengths."""
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, 12, b).astype(np.float32)
    nr = rng.integers(1, 12, b).astype(np.float32)
    pc = (-rng.uniform(0.2, 3.0, b) * nc).astype(np.float32)
    pr = (-rng.uniform(0.2, 3.0, b) * nr).astype(np.float32)
    return pc, pr, nc, nr


# ---------------------------------------------------------------------------- SimPO


def loop_simpo(pc, pr, nc, nr, beta, gamma, eps):
    """Meng et al. 2024, eq. 6 (+ label smoothing), one pair at a time."""
    losses = []
    for i in range(len(pc)):
        z = beta / nc[i] * pc[i] - beta / nr[i] * pr[i] - gamma
        losses.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    return np.mean(losses)


def trl_simpo(pc, pr, nc, nr, beta, simpo_gamma, label_smoothing):
    """TRL CPOTrainer.cpo_loss, loss_type="simpo" (log-probs already averaged per token)."""
    logits = pc.astype(np.float64) / nc - pr.astype(np.float64) / nr
    logits = logits - simpo_gamma / beta
    losses = (-np_log_sigmoid(beta * logits) * (1 - label_smoothing)
              - np_log_sigmoid(-beta * logits) * label_smoothing)
    return losses.mean()


class SimPOTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(beta=(2.0, 0.5), gamma=(0.0, 0.5, 1.4), eps=(0.0, 0.1))
    def test_matches_loop_and_trl(self, beta, gamma, eps):
        pc, pr, nc, nr = pair_data(0)
        fn = self.variant(functools.partial(simpo_loss, beta=beta, gamma=gamma, label_smoothing=eps))
        loss, metrics = fn(pc, pr, nc, nr)
        chex.assert_trees_all_close(loss, loop_simpo(pc, pr, nc, nr, beta, gamma, eps), rtol=1e-5)
        chex.assert_trees_all_close(loss, trl_simpo(pc, pr, nc, nr, beta, gamma, eps), rtol=1e-5)
        rc, rr = beta * pc / nc, beta * pr / nr
        chex.assert_trees_all_close(metrics["reward_margin"], np.mean(rc - rr), rtol=1e-5)
        chex.assert_trees_all_close(metrics["reward_accuracy"], np.mean(rc > rr))
        chex.assert_trees_all_close(metrics["logps_chosen"], np.mean(pc / nc), rtol=1e-5)

    def test_zero_length_counts_as_one(self):
        loss, _ = simpo_loss(jnp.zeros(2), jnp.array([-1.0, -2.0]), jnp.zeros(2), jnp.ones(2), beta=1.0, gamma=0.0)
        np.testing.assert_allclose(loss, np.mean([-log_sigmoid(1.0), -log_sigmoid(2.0)]), rtol=1e-6)

    def test_gradient_finite_differences(self):
        pc, pr, nc, nr = (x.astype(np.float64) for x in pair_data(1, b=4))
        with jax.enable_x64(True):
            fn = lambda c, r: simpo_loss(c, r, nc, nr, beta=2.0, gamma=0.5, label_smoothing=0.1)[0]
            check_grads(fn, (pc, pr), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)
            g = jax.grad(lambda n: simpo_loss(pc, pr, n, nr)[0])(nc)
            np.testing.assert_array_equal(g, 0.0)  # lengths are constants

    def test_bad_args(self):
        pc, pr, nc, nr = pair_data(2)
        with pytest.raises(ValueError, match="beta"):
            simpo_loss(pc, pr, nc, nr, beta=0.0)
        with pytest.raises(ValueError, match="gamma"):
            simpo_loss(pc, pr, nc, nr, gamma=-0.1)
        with pytest.raises(ValueError, match="label_smoothing"):
            simpo_loss(pc, pr, nc, nr, label_smoothing=0.5)
        with pytest.raises(ValueError, match="chosen_lengths"):
            simpo_loss(pc, pr, nc[:3], nr)


# ---------------------------------------------------------------------------- ORPO


def loop_orpo(pc, pr, nc, nr, nll, lam):
    """Hong et al. 2024, eqs. 4, 6, 7 with odds(y) = P/(1 − P), P = exp(mean log-prob)."""
    terms = []
    for i in range(len(pc)):
        p_c, p_r = math.exp(pc[i] / nc[i]), math.exp(pr[i] / nr[i])
        log_or = math.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        terms.append(-log_sigmoid(log_or))
    return nll + lam * np.mean(terms), np.mean(terms)


def trl_orpo(pc, pr, nc, nr, nll, beta):
    """TRL ORPOTrainer.odds_ratio_loss + its total loss (policy_nll_loss − losses.mean())."""
    c, r = pc.astype(np.float64) / nc, pr.astype(np.float64) / nr
    log_odds = (c - r) - (np.log1p(-np.exp(c)) - np.log1p(-np.exp(r)))
    losses = beta * np_log_sigmoid(log_odds)
    return nll - losses.mean()


class ORPOTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(0.1, 0.5, 1.0)
    def test_matches_loop_and_trl(self, lam):
        pc, pr, nc, nr = pair_data(3)
        nll = np.float32(1.7)
        loss, metrics = self.variant(functools.partial(orpo_loss, lam=lam))(pc, pr, nc, nr, nll)
        expected, or_term = loop_orpo(pc, pr, nc, nr, float(nll), lam)
        chex.assert_trees_all_close(loss, expected, rtol=1e-5)
        chex.assert_trees_all_close(loss, trl_orpo(pc, pr, nc, nr, float(nll), lam), rtol=1e-5)
        chex.assert_trees_all_close(metrics["or_loss"], or_term, rtol=1e-5)
        chex.assert_trees_all_close(metrics["nll"], nll)
        chex.assert_trees_all_close(metrics["chosen_reward"], np.mean(lam * pc / nc), rtol=1e-5)

    def test_log1mexp(self):
        x = np.array([-1e-7, -1e-3, -0.5, -0.7, -1.0, -5.0, -40.0])
        with jax.enable_x64(True):
            # each branch's exact form where it is accurate (log(−expm1) rounds to 0 at −40)
            expected = [math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v)) for v in x]
            np.testing.assert_allclose(log1mexp(x), expected, rtol=1e-12)
            np.testing.assert_allclose(log1mexp(np.float64(-40.0)), -math.exp(-40.0), rtol=1e-15)
            g = jax.grad(lambda v: jnp.sum(log1mexp(v)))(x)
            np.testing.assert_allclose(g, -np.exp(x) / -np.expm1(x), rtol=1e-9)

    @parameterized.parameters(0.0, -1e-9, -1e-7)
    def test_average_logp_near_zero_is_finite(self, avg):
        """A response of average probability ≈ 1 (TRL: log1p(−1) = −inf, then NaN)."""
        n = np.array([4.0, 3.0], np.float32)
        pc = np.array([avg * 4, avg * 4], np.float32)
        pr = np.array([-2.0, avg * 3], np.float32)  # second pair: both near 0
        loss, metrics = orpo_loss(pc, pr, n, n, jnp.float32(0.5), lam=0.2)
        grads = jax.grad(lambda c, r: orpo_loss(c, r, n, n, jnp.float32(0.5), lam=0.2)[0], argnums=(0, 1))(pc, pr)
        chex.assert_tree_all_finite((loss, metrics, grads))

    def test_gradient_finite_differences(self):
        pc, pr, nc, nr = (x.astype(np.float64) for x in pair_data(4, b=4))
        with jax.enable_x64(True):
            fn = lambda c, r, nll: orpo_loss(c, r, nc, nr, nll, lam=0.3)[0]
            check_grads(fn, (pc, pr, np.float64(1.2)), order=1, modes=("rev",), atol=1e-6, rtol=1e-6, eps=1e-6)

    def test_bad_args(self):
        pc, pr, nc, nr = pair_data(5)
        with pytest.raises(ValueError, match="lam"):
            orpo_loss(pc, pr, nc, nr, jnp.float32(1.0), lam=-1.0)
        with pytest.raises(ValueError, match="chosen_nll"):
            orpo_loss(pc, pr, nc, nr, jnp.ones(3))


# ---------------------------------------------------------------------------- KTO


def kto_data(seed, b=10):
    rng = np.random.default_rng(seed)
    pol = (rng.standard_normal(b) * 3 - 20).astype(np.float32)
    ref = (pol + rng.standard_normal(b) * 2).astype(np.float32)
    labels = rng.integers(0, 2, b).astype(np.float32)
    labels[:2] = (1, 0)  # both kinds present
    kl_pol = (rng.standard_normal(b) * 3 - 30).astype(np.float32)
    kl_ref = (kl_pol - rng.standard_normal(b) - 0.5).astype(np.float32)
    return pol, ref, labels, kl_pol, kl_ref


def loop_kto(pol, ref, labels, kl_pol, kl_ref, beta, w_d, w_u):
    """Ethayarajh et al. 2024, eq. 8: L = E[λ_y − v(x, y)], with λ_y = w_y (the constant
    λ_y makes this the trainer's 1 − σ form), z0 = max(0, mean KL estimate)."""
    z0 = max(0.0, float(np.mean(kl_pol.astype(np.float64) - kl_ref)))
    losses = []
    for i in range(len(pol)):
        r = float(pol[i]) - float(ref[i])
        if labels[i] == 1:
            losses.append(w_d - w_d * sigmoid(beta * (r - z0)))
        else:
            losses.append(w_u - w_u * sigmoid(beta * (z0 - r)))
    return np.mean(losses), z0


def trl_kto(pol, ref, labels, kl_pol, kl_ref, beta, desirable_weight, undesirable_weight):
    """TRL KTOTrainer.kto_loss (loss_type="kto"), chosen = desirable rows."""
    sig = lambda x: 1 / (1 + np.exp(-x))
    kl = max(np.mean(kl_pol.astype(np.float64) - kl_ref), 0.0)
    d = labels == 1
    chosen_losses = 1 - sig(beta * ((pol[d] - ref[d]).astype(np.float64) - kl))
    rejected_losses = 1 - sig(beta * (kl - (pol[~d] - ref[~d]).astype(np.float64)))
    return np.concatenate([desirable_weight * chosen_losses, undesirable_weight * rejected_losses]).mean()


class KTOTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(beta=(0.1, 0.5), weights=((1.0, 1.0), (1.0, 1.33), (2.0, 0.5)))
    def test_matches_loop_and_trl(self, beta, weights):
        pol, ref, labels, kl_pol, kl_ref = kto_data(0)
        w_d, w_u = weights

        def fn(p, r, y, kp, kr):
            z0 = kto_reference_point(kp, kr)
            return kto_loss(p, r, y, z0, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)

        loss, metrics = self.variant(fn)(pol, ref, labels, kl_pol, kl_ref)
        expected, z0 = loop_kto(pol, ref, labels, kl_pol, kl_ref, beta, w_d, w_u)
        chex.assert_trees_all_close(loss, expected, rtol=1e-5)
        chex.assert_trees_all_close(loss, trl_kto(pol, ref, labels, kl_pol, kl_ref, beta, w_d, w_u), rtol=1e-5)
        chex.assert_trees_all_close(metrics["kl"], z0, rtol=1e-5)
        assert z0 > 0
        d = labels == 1
        r = beta * (pol - ref)
        chex.assert_trees_all_close(metrics["chosen_reward"], np.mean(r[d]), rtol=1e-5)
        chex.assert_trees_all_close(metrics["rejected_reward"], np.mean(r[~d]), rtol=1e-5)
        right = np.where(d, pol - ref > z0, pol - ref < z0)
        chex.assert_trees_all_close(metrics["reward_accuracy"], np.mean(right))
        chex.assert_trees_all_close(metrics["desirable_fraction"], np.mean(d))

    def test_reference_point_is_clamped_and_detached(self):
        _, _, _, kl_pol, kl_ref = kto_data(1)
        assert float(kto_reference_point(kl_ref, kl_pol)) == 0.0  # negative mean → 0
        g = jax.grad(lambda kp: kto_reference_point(kp, kl_ref))(kl_pol)
        np.testing.assert_array_equal(g, 0.0)

    def test_bool_labels_and_one_sided_batch(self):
        pol, ref, _, _, _ = kto_data(2)
        ones = np.ones_like(pol, bool)
        loss_b, metrics = kto_loss(pol, ref, ones, jnp.float32(0.3))
        loss_f, _ = kto_loss(pol, ref, ones.astype(np.float32), jnp.float32(0.3))
        np.testing.assert_allclose(loss_b, loss_f)
        assert float(metrics["rejected_reward"]) == 0.0 and float(metrics["desirable_fraction"]) == 1.0

    def test_gradient_finite_differences_and_closed_form(self):
        pol, ref, labels, _, _ = (x.astype(np.float64) for x in kto_data(3, b=6))
        beta, z0, w_d, w_u = 0.3, 0.7, 1.0, 1.5
        with jax.enable_x64(True):
            fn = lambda p: kto_loss(p, ref, labels, np.float64(z0), beta=beta, desirable_weight=w_d,
                                    undesirable_weight=w_u)[0]
            check_grads(fn, (pol,), order=1, modes=("rev",), atol=1e-7, rtol=1e-6, eps=1e-6)
            g = jax.grad(fn)(pol)
            sig = lambda x: 1 / (1 + np.exp(-x))
            r = pol - ref
            # d/dr of w(1 − σ(±β(r − z0))) = ∓w·β·σ'(·)
            expected = np.where(labels == 1, -w_d * beta * sig(beta * (r - z0)) * sig(-beta * (r - z0)),
                                w_u * beta * sig(beta * (z0 - r)) * sig(-beta * (z0 - r))) / len(pol)
            np.testing.assert_allclose(g, expected, rtol=1e-9)
            g_ref = jax.grad(lambda rr: kto_loss(pol, rr, labels, np.float64(z0))[0])(ref)
            np.testing.assert_array_equal(g_ref, 0.0)

    def test_bad_args(self):
        pol, ref, labels, _, _ = kto_data(4)
        z0 = jnp.float32(0.0)
        with pytest.raises(ValueError, match="beta"):
            kto_loss(pol, ref, labels, z0, beta=0.0)
        with pytest.raises(ValueError, match="undesirable_weight"):
            kto_loss(pol, ref, labels, z0, undesirable_weight=0.0)
        with pytest.raises(ValueError, match="labels"):
            kto_loss(pol, ref, labels * 2, z0)
        with pytest.raises(ValueError, match="kl_reference_point"):
            kto_loss(pol, ref, labels, jnp.zeros(3))
        with pytest.raises(ValueError, match="reference_logps"):
            kto_loss(pol, ref[:3], labels, z0)
