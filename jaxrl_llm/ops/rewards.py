"""Reward-side helpers: DAPO's soft overlong punishment and sequence log-prob
reduction with optional length normalisation (SimPO / length-normalised DPO).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_rank, check_same_shape
from jaxrl_llm.ops.masked import _masked_mean, _masked_sum, upcast


def overlong_penalty(
    lengths: chex.Array,
    max_len: int,
    buffer_len: int,
    factor: float = 1.0,
) -> chex.Array:
    """DAPO soft overlong punishment, added to the task reward.

      0                                         if L ≤ max_len − buffer_len
      ((max_len − buffer_len) − L) / buffer_len · factor   if inside the buffer
      −factor                                   if L > max_len

    References:
      Yu et al. 2025, DAPO §3.4 (eq. 13), https://arxiv.org/abs/2503.14476

    Args:
      lengths: [B] int or float response lengths in tokens.
      max_len: maximum response length L_max.
      buffer_len: punishment interval L_cache, 0 < buffer_len ≤ max_len.
      factor: penalty at and beyond max_len.

    Returns:
      [B] float32 penalty in [−factor, 0].
    """
    check_rank(1, lengths=lengths)
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    lengths = upcast(lengths)
    expected = max_len - buffer_len
    inside = (expected - lengths) / buffer_len * factor
    return jnp.where(lengths <= expected, 0.0, jnp.where(lengths <= max_len, inside, -factor))


def sequence_logprobs(
    token_logp: chex.Array, mask: chex.Array, length_normalize: bool = False
) -> chex.Array:
    """Sequence log-prob Σ_t m·logp_t, or its per-token mean when length_normalize.

    Length normalisation removes the advantage long responses would otherwise get (or
    lose) in DPO-style margins (SimPO, ORPO users expect it).

    Masked positions are selected away, not multiplied by 0: a NaN / -inf log-prob there
    changes neither the result nor its (zero) gradient.

    Args:
      token_logp: [B, T] float per-token log-probs.
      mask: [B, T] 1.0 on response tokens.
      length_normalize: divide by the number of response tokens.

    Returns:
      [B] float32.
    """
    check_rank(2, token_logp=token_logp)
    check_same_shape(token_logp=token_logp, mask=mask)
    check_mask(mask=mask)
    if length_normalize:
        return _masked_mean(token_logp, mask, axis=-1)
    return _masked_sum(token_logp, mask, axis=-1)
