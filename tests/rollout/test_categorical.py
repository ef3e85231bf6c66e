"""Two-level Gumbel-max categorical sampling: the sampled frequencies of distributions
with mass at block boundaries and in the padded last block (chi-square, total
variation), never a zero-probability entry, the check's power, and robustness of the
drawn token to float-level noise in the log-probs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxrl_llm.rollout.categorical import sample_categorical


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


def test_float_noise_almost_never_changes_the_token():
    """Another mesh or micro-batching changes logits at the float32 rounding level; an
    argmax of noisy scores flips only when two are that close. Relative noise 1e-5 on
    4 096-entry rows, same keys, 20 000 draws: measured 1 changed draw (5e-5). A
    two-level inverse CDF, whose token moves whenever its uniform is near one of the
    cumulative-sum boundaries, changed 19 (9.5e-4) and fails this bound."""
    v, n = 4096, 5000
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, v)) * 2, jnp.float32)
    noisy = logits * (1 + 1e-5 * jnp.asarray(np.random.default_rng(1).normal(size=(4, v)), jnp.float32))
    a = _draws(jax.nn.log_softmax(logits), n, 256)
    b = _draws(jax.nn.log_softmax(noisy), n, 256)
    assert np.mean(a != b) < 3e-4, np.mean(a != b)
