"""Rollout correction (TIS / MIS at token, sequence and geometric level, veto) against a
numpy loop written from the definitions; metrics; no gradient through the weights."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from jaxrl_llm import ops


def ref_correction(train, rollout, mask, upper, lower, level, mode, veto):
    """Plain loops: ρ per token from the chosen level, then truncation or rejection."""
    n, t = train.shape
    lower = 1.0 / upper if lower is None else lower
    weights, kept = np.zeros((n, t)), np.zeros((n, t))
    for i in range(n):
        valid = [j for j in range(t) if mask[i, j]]
        log_w = {j: float(train[i, j]) - float(rollout[i, j]) for j in valid}
        seq = sum(log_w.values())
        vetoed = veto is not None and any(lw < math.log(veto) for lw in log_w.values())
        for j in valid:
            log_rho = {"token": log_w[j], "sequence": seq, "geometric": seq / max(len(valid), 1)}[level]
            rho = math.exp(min(max(log_rho, -20.0), 20.0))
            if mode == "truncate":
                weights[i, j], kept[i, j] = min(rho, upper), 0.0 if vetoed else 1.0
            else:
                ok = lower <= rho <= upper and not vetoed
                weights[i, j], kept[i, j] = (rho, 1.0) if ok else (0.0, 0.0)
    return weights, kept


def _batch(seed=0, n=6, t=9, spread=0.6):
    rng = np.random.default_rng(seed)
    rollout = rng.normal(-1.5, 0.5, (n, t)).astype(np.float32)
    train = (rollout + rng.normal(0, spread, (n, t))).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, n)[:, None]).astype(np.float32)
    mask[1, 2] = 0.0  # a hole
    mask[5] = 0.0  # an empty row
    train[2, 0] = rollout[2, 0] - 12.0  # a catastrophic token (ratio e^-12)
    return train, rollout, mask


class RolloutCorrectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*itertools.product(ops.IS_LEVELS, ops.IS_MODES, (None, 1e-4)))
    def test_matches_numpy_loop(self, level, mode, veto):
        train, rollout, mask = _batch()
        upper = 2.0 if level == "token" else (8.0 if level == "sequence" else 1.3)
        fn = self.variant(lambda a, b, m: ops.rollout_correction(a, b, m, upper=upper, level=level, mode=mode,
                                                                 veto=veto))
        weights, kept, metrics = fn(train, rollout, mask)
        ref_w, ref_k = ref_correction(train, rollout, mask, upper, None, level, mode, veto)
        np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(kept), ref_k)
        assert 0 < float(metrics["is_ess"]) <= 1.0 + 1e-6
        valid = mask > 0
        np.testing.assert_allclose(float(metrics["is_masked_fraction"]), (valid & (ref_k == 0)).sum() / valid.sum(),
                                   rtol=1e-6)
        if mode == "mask":  # something is rejected in this batch, something kept
            assert 0 < float(metrics["is_masked_fraction"]) < 1


def test_metrics_against_numpy():
    train, rollout, mask = _batch(seed=1, spread=0.3)
    _, _, m = ops.rollout_correction(train, rollout, mask, upper=1.5, lower=0.8, veto=1e-3)
    valid = mask > 0
    log_w = (train - rollout)[valid].astype(np.float64)
    rho = np.exp(log_w)
    np.testing.assert_allclose(float(m["is_mean"]), rho.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["is_std"]), rho.std(), rtol=1e-4)
    np.testing.assert_allclose(float(m["is_ess"]), rho.sum() ** 2 / (len(rho) * (rho ** 2).sum()), rtol=1e-5)
    np.testing.assert_allclose(float(m["is_frac_high"]), np.mean(rho > 1.5), rtol=1e-6)
    np.testing.assert_allclose(float(m["is_frac_low"]), np.mean(rho < 0.8), rtol=1e-6)
    np.testing.assert_allclose(float(m["mismatch_kl"]), np.mean(-log_w), rtol=1e-5)
    np.testing.assert_allclose(float(m["mismatch_k3"]), np.mean(rho - log_w - 1), rtol=1e-4)
    rows_with_tokens = valid.any(axis=1)
    vetoed = np.array([(train[i] - rollout[i])[valid[i]].min(initial=0) < np.log(1e-3) for i in range(len(mask))])
    np.testing.assert_allclose(float(m["is_veto_fraction"]), (vetoed & rows_with_tokens).sum() / rows_with_tokens.sum())


def test_default_token_truncation_is_the_previous_tis_formula():
    train, rollout, mask = _batch(seed=2)
    weights, kept, _ = ops.rollout_correction(train, rollout, mask, upper=2.0)
    expected = np.minimum(np.exp(np.clip(train - rollout, -20, 20)), 2.0) * mask
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(kept), mask)


def test_weights_carry_no_gradient():
    train, rollout, mask = _batch(seed=3)
    grad = jax.grad(lambda a: jnp.sum(ops.rollout_correction(a, rollout, mask, upper=2.0, mode="mask")[0]))(
        jnp.asarray(train))
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(upper=0.0), "upper must be > 0"), (dict(upper=2.0, lower=3.0, mode="mask"), "lower must be in"),
    (dict(upper=1.0, mode="mask"), "lower must be in"),
    (dict(upper=2.0, level="batch"), "level must be one of"), (dict(upper=2.0, mode="clip"), "mode must be one of"),
    (dict(upper=2.0, veto=1.5), "veto must be in"),
])
def test_bad_options(kwargs, match):
    train, rollout, mask = _batch()
    with pytest.raises(ValueError, match=match):
        ops.rollout_correction(train, rollout, mask, **kwargs)
