"""Supervised fine-tuning loss: token-level negative log-likelihood on response tokens."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_rank, check_same_shape
from jaxrl_llm.ops.masked import _masked_mean, aggregate_loss, upcast, valid_positions, where_valid


def sft_loss(
    logp: chex.Array, mask: chex.Array, agg: str = "token_mean"
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Negative log-likelihood of the target tokens, aggregated over valid tokens.

      loss = aggregate(−logp_t, mask)

    Args:
      logp: [B, T] float log π(target token) (e.g. ``token_logprobs``).
      mask: [B, T] 1.0 on tokens to learn (response), 0.0 on prompt and padding.
      agg: aggregation mode of ``aggregate_loss``.

    Returns:
      (loss, metrics) with ``nll`` (token-mean NLL), ``perplexity`` (exp of it) and
      ``num_tokens``.
    """
    check_rank(2, logp=logp)
    check_same_shape(logp=logp, mask=mask)
    check_mask(mask=mask)
    valid = valid_positions(logp, mask)
    # zeroed before any arithmetic: a NaN / -inf log-prob at a masked position (e.g. an
    # ignore index -100) leaves the loss and its gradient finite
    nll = -where_valid(upcast(logp), valid)
    loss = aggregate_loss(nll, mask, agg)
    token_nll = jax.lax.stop_gradient(_masked_mean(nll, valid))
    metrics = {
        "nll": token_nll,
        "perplexity": jnp.exp(token_nll),
        "num_tokens": jnp.sum(upcast(mask)),
    }
    return loss, metrics
