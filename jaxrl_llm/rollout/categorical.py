"""Exact categorical sampling by a two-level inverse CDF: one uniform per level per row.

`jax.random.categorical` draws a Gumbel variable for *every* vocabulary entry (the
Gumbel-max trick): B·V random words plus two logs each per decode step. On CPU that is
the most expensive part of a decode step at RL batch sizes (measured: 92 ms of threefry
Gumbel noise for 64 rows × 32 000 tokens on one core, vs 3.3 ms for this sampler with the
log-softmax included). Here the vocabulary is cut into blocks of `BLOCK` entries; a block is
drawn by the inverse CDF of the block masses, then a token within it by the inverse CDF of
its entries, so P(token) = P(block) · P(token | block) = p_token, exactly, from 2 uniforms
per row and three cheap passes over [B, V] (exp, block sums, one block's cumsum).

A zero-probability entry is never drawn: the index returned is the number of cumulative
sums ≤ u·total, whose entry has a cumulative sum > u·total ≥ the previous one, i.e. a
positive weight; a u·total that rounds up to the total is clamped to the last positive
entry. Float32 cumulative sums lose entries of relative weight below ~1e-7 of their
prefix, the same order of bias as any float32 sampler's.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

BLOCK = 256
"""Vocabulary entries per first-level block (V = 32 000: 125 blocks)."""


def inverse_cdf(weights: chex.Array, u: chex.Array) -> jax.Array:
    """Per row, the index i with cdf[i − 1] ≤ u · total < cdf[i] (cdf = cumsum(weights)).

    Args:
      weights: [B, N] non-negative, at least one positive per row.
      u: [B] uniform in [0, 1).

    Returns:
      [B] int32 indices, always of a positive weight.
    """
    cdf = jnp.cumsum(weights, axis=-1)
    target = u * cdf[:, -1]
    index = jnp.sum(cdf <= target[:, None], axis=-1)
    last_positive = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(index, last_positive).astype(jnp.int32)


def sample_categorical(rng: chex.PRNGKey, logprobs: chex.Array, block: int = BLOCK) -> jax.Array:
    """One exact draw per row from Categorical(exp(logprobs)).

    Args:
      rng: PRNG key.
      logprobs: [B, V] normalised log-probabilities (log_softmax output; entries of
        probability 0 — filtered tokens, −inf — are never drawn).
      block: first-level block size (static).

    Returns:
      [B] int32 token ids.
    """
    b, v = logprobs.shape
    block = min(block, v)
    num_blocks = -(-v // block)
    probs = jnp.exp(logprobs.astype(jnp.float32))
    probs = jnp.pad(probs, ((0, 0), (0, num_blocks * block - v))).reshape(b, num_blocks, block)
    u = jax.random.uniform(rng, (b, 2), jnp.float32)
    first = inverse_cdf(jnp.sum(probs, axis=-1), u[:, 0])
    within = jnp.take_along_axis(probs, first[:, None, None], axis=1)[:, 0]
    return first * block + inverse_cdf(within, u[:, 1])
