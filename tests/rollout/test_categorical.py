"""Two-level inverse-CDF categorical sampling against numpy: the index rule (a worked
example and `np.searchsorted`), never a zero-probability entry, and the sampled
frequencies of distributions with mass at block boundaries and in the padded last block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrl_llm.rollout.categorical import inverse_cdf, sample_categorical


class InverseCdfTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_worked_example_and_clamp(self):
        weights = jnp.asarray([[0.0, 1.0, 0.0, 2.0, 0.0]] * 6)  # cdf 0, 1, 1, 3, 3
        # u·3: 0 → index 1; 0.99 → 1; 1.0 → 3 (cdf 1 <= 1); 2.97 → 3; just below 3 → 3;
        # u = 1 (outside [0, 1), as a rounded-up u·total would act) → clamped to 3, not 4
        u = jnp.asarray([0.0, 0.33, 1 / 3, 0.99, 1 - 2**-24, 1.0])
        got = self.variant(inverse_cdf)(weights, u)
        np.testing.assert_array_equal(got, [1, 1, 3, 3, 3, 3])

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy_searchsorted(self):
        rng = np.random.default_rng(0)
        weights = rng.random((64, 37)) * (rng.random((64, 37)) < 0.5)
        weights[:, 5] += 0.1  # at least one positive weight per row
        u = rng.random(64)
        got = np.asarray(self.variant(inverse_cdf)(jnp.asarray(weights, jnp.float32), jnp.asarray(u, jnp.float32)))
        cdf = np.cumsum(weights.astype(np.float32), -1)
        want = [np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u.astype(np.float32))]
        np.testing.assert_array_equal(got, want)
        assert (weights[np.arange(64), got] > 0).all()


def _draws(logprobs, n, block, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: sample_categorical(k, logprobs, block=block)))(keys))  # [n, B]


@pytest.mark.parametrize("block", [256, 7])
def test_frequencies_match_probabilities(block):
    """V = 600 (2 full blocks of 256 + a padded one; or 86 blocks of 7): mass on both sides
    of every block boundary of 256, on the last entry (padded block), on a smooth part, and
    zeros in between; plus a random dense row."""
    v, n = 600, 40_000
    probs = np.zeros((2, v))
    probs[0, [0, 255, 256, 511, 512, 599]] = [0.05, 0.2, 0.1, 0.15, 0.2, 0.1]
    probs[0, 300:340] = 0.2 / 40
    probs[1] = np.random.default_rng(1).dirichlet(np.full(v, 0.3))
    logprobs = jnp.log(jnp.asarray(probs, jnp.float32))  # log 0 = -inf: excluded
    tokens = _draws(logprobs, n, block)
    for row in range(2):
        counts = np.bincount(tokens[:, row], minlength=v)
        assert counts[probs[row] == 0].sum() == 0, "drew a zero-probability token"
        if row == 0:  # few categories: total variation well above sampling noise (~0.005)
            assert 0.5 * np.abs(counts / n - probs[row]).sum() < 0.02
        support = probs[row] > 1e-3
        _, pvalue = stats.chisquare(counts[support], counts[support].sum() * probs[row][support] / probs[row][support].sum())
        assert pvalue > 1e-4, (row, pvalue)


def test_off_by_one_would_be_caught():
    """The frequency check has power: shifting every draw by one token fails it."""
    v, n = 600, 40_000
    probs = np.zeros((1, v))
    probs[0, [255, 256]] = [0.7, 0.3]
    tokens = _draws(jnp.log(jnp.asarray(probs, jnp.float32)), n, 256)
    counts = np.bincount(tokens[:, 0], minlength=v)
    assert abs(counts[255] / n - 0.7) < 0.01 and abs(counts[256] / n - 0.3) < 0.01
    shifted = np.bincount(np.minimum(tokens[:, 0] + 1, v - 1), minlength=v)
    assert 0.5 * np.abs(shifted / n - probs[0]).sum() > 0.5


def test_one_token_rows_and_shapes():
    v = 300
    logprobs = jnp.full((3, v), -jnp.inf).at[jnp.arange(3), jnp.asarray([0, 257, 299])].set(0.0)
    tokens = jax.jit(sample_categorical)(jax.random.key(3), logprobs)
    chex.assert_shape(tokens, (3,))
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, [0, 257, 299])
