"""Clipped policy-gradient losses (PPO, dual-clip, clip-higher, GSPO) and the clipped
value loss.

All losses return ``(loss, metrics)`` with scalar float32 entries so they plug into
``jax.value_and_grad(..., has_aux=True)``. Shapes: B batch, T response length.

Every float input is zeroed at masked positions (``jnp.where``) before any arithmetic,
so NaN / ±inf there (padding log-probs, unscored samples' advantages, ...) leave the
loss, the metrics and the gradients finite; unmasked positions are computed as before.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_leading_dim, check_mask, check_rank, check_same_shape
from jaxrl_llm.ops.masked import _masked_mean, aggregate_loss, upcast, valid_positions, where_valid

# exp(20) ≈ 4.9e8: large enough never to bind in healthy training, small enough that
# ρ·A stays finite in float32 when the policy has drifted far from the sampler.
LOG_RATIO_CLAMP = 20.0
# GSPO's sequence log-ratio bound (as in verl's implementation).
SEQ_LOG_RATIO_CLAMP = 10.0


def _token_advantages(advantages: chex.Array, mask: chex.Array, valid: chex.Array) -> chex.Array:
    """[B] or [B, T] advantages → [B, T] float32, stop-gradient, 0 at masked positions."""
    advantages = jax.lax.stop_gradient(upcast(advantages))
    if advantages.ndim == 1:
        check_leading_dim("mask", mask, advantages=advantages)
        advantages = jnp.broadcast_to(advantages[:, None], jnp.shape(mask))
    else:
        check_same_shape(mask=mask, advantages=advantages)
    return where_valid(advantages, valid)


def _check_clip(clip_low: float, clip_high: float) -> None:
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")


PPO_TOKEN_MEAN_METRICS: tuple[str, ...] = (
    "clipfrac", "clipfrac_high", "clipfrac_low", "clipfrac_lower", "approx_kl", "ratio_mean"
)
"""Metrics of :func:`ppo_policy_loss` that are token means over the mask."""

VALUE_TOKEN_MEAN_METRICS: tuple[str, ...] = ("vf_clipfrac", "value_error")
"""Metrics of :func:`value_loss` that are token means over the mask."""


def ppo_policy_loss(
    logp: chex.Array,
    old_logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    norm_length: float | None = None,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """PPO clipped surrogate, with asymmetric (clip-higher) and dual clipping.

      ρ_t = exp(clamp(logp − old_logp, −20, 20))
      l_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − clip_low, 1 + clip_high))
      dual clip (c > 1), where A_t < 0:  l_t = min(l_t, −A_t·c)

    ``old_logp`` and ``advantages`` are constants (stop-gradient).

    References:
      Schulman et al. 2017, PPO, https://arxiv.org/abs/1707.06347
      Ye et al. 2020, Dual-clip PPO, https://arxiv.org/abs/1912.09729
      Yu et al. 2025, DAPO clip-higher, https://arxiv.org/abs/2503.14476

    Args:
      logp: [B, T] float log π_θ(token) (differentiable).
      old_logp: [B, T] float log π_old(token) recorded at sampling time.
      advantages: [B, T] or [B] float (broadcast over tokens).
      mask: [B, T] 1.0 on valid response tokens.
      clip_low, clip_high: ε_low, ε_high.
      dual_clip: c > 1 or None.
      agg: aggregation mode of ``aggregate_loss``.
      norm_length: for agg="seq_mean_token_sum_norm".

    Returns:
      (loss scalar, metrics) with metrics ``clipfrac`` (the clipped branch is the larger
      one), split into ``clipfrac_high`` (ρ above 1 + clip_high) and ``clipfrac_low``
      (ρ below 1 − clip_low), ``clipfrac_lower`` (dual clip active), ``approx_kl`` (mean old_logp − logp),
      ``ratio_mean`` — masked token means.
    """
    check_rank(2, logp=logp)
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    _check_clip(clip_low, clip_high)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    # Masked positions are zeroed BEFORE any arithmetic (NaN·0 is NaN, also in the
    # backward pass): whatever they hold, the loss and its gradient stay finite.
    check_mask(mask=mask)
    valid = valid_positions(logp, mask)
    logp = where_valid(upcast(logp), valid)
    old_logp = jax.lax.stop_gradient(where_valid(upcast(old_logp), valid))
    adv = _token_advantages(advantages, mask, valid)

    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    clipfrac = _masked_mean(is_clipped.astype(jnp.float32), mask)
    # Which bound bit: ρ > 1 + ε_high (A > 0) or ρ < 1 − ε_low (A < 0) — clip-higher
    # monitoring (DAPO) needs them apart.
    clipfrac_high = _masked_mean((is_clipped & (ratio > 1.0)).astype(jnp.float32), mask)
    clipfrac_low = _masked_mean((is_clipped & (ratio < 1.0)).astype(jnp.float32), mask)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        lower_active = (adv < 0) & (loss_mat > dual_bound)
        loss_mat = jnp.where(adv < 0, jnp.minimum(loss_mat, dual_bound), loss_mat)
        clipfrac_lower = _masked_mean(lower_active.astype(jnp.float32), mask)
    else:
        clipfrac_lower = jnp.zeros((), jnp.float32)

    loss = aggregate_loss(loss_mat, mask, agg, norm_length)
    metrics = {
        "clipfrac": clipfrac,
        "clipfrac_high": clipfrac_high,
        "clipfrac_low": clipfrac_low,
        "clipfrac_lower": clipfrac_lower,
        "approx_kl": _masked_mean(jax.lax.stop_gradient(old_logp - logp), mask),
        "ratio_mean": _masked_mean(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def gspo_policy_loss(
    logp: chex.Array,
    old_logp: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """GSPO: a sequence-level importance ratio, clipped per sequence.

      log s_b = Σ_t m·(logp − old_logp) / Σ_t m      (s = geometric mean of token ratios)
      per token: log s_bt = logp_t − sg(logp_t) + sg(log s_b), clamped at 10 before exp
      l_bt = max(−A_b·s_bt, −A_b·clip(s_bt, 1 − clip_low, 1 + clip_high))
      loss = seq_mean_token_mean(l)

    The value of s_bt equals s_b; its gradient is s_b·∇logp_t, so a sequence's gradient
    is A_b·s_b·mean_t ∇logp_t, the GSPO gradient. Because the ratio is per sequence, a
    few tokens with wild ratios (as MoE routing changes produce) cannot dominate.

    References:
      Zheng et al. 2025, Group Sequence Policy Optimization, https://arxiv.org/abs/2507.18071

    Args:
      logp: [B, T] float log π_θ(token) (differentiable).
      old_logp: [B, T] float log π_old(token).
      advantages: [B] float sequence advantages.
      mask: [B, T] 1.0 on valid response tokens.
      clip_low, clip_high: sequence-ratio clip range (GSPO defaults 3e-4, 4e-4).

    Returns:
      (loss scalar, metrics) with ``clipfrac`` (masked token mean of "this token's
      sequence ratio was clipped"), ``clipfrac_lower`` (0), ``approx_kl``, ``ratio_mean``
      (mean sequence ratio over sequences with tokens).
    """
    check_rank(2, logp=logp)
    check_rank(1, advantages=advantages)
    check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    _check_clip(clip_low, clip_high)
    check_mask(mask=mask)
    valid = valid_positions(logp, mask)
    logp = where_valid(upcast(logp), valid)
    old_logp = jax.lax.stop_gradient(where_valid(upcast(old_logp), valid))
    adv = _token_advantages(advantages, mask, valid)

    seq_log_ratio = _masked_mean(logp - old_logp, mask, axis=-1)  # [B]
    token_log_ratio = logp - jax.lax.stop_gradient(logp) + jax.lax.stop_gradient(seq_log_ratio)[:, None]
    ratio = jnp.exp(jnp.minimum(token_log_ratio, SEQ_LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_mat = jnp.maximum(unclipped, clipped)
    loss = aggregate_loss(loss_mat, mask, "seq_mean_token_mean")

    seq_has_tokens = jnp.any(valid, axis=-1)
    seq_ratio = jnp.exp(jnp.minimum(jax.lax.stop_gradient(seq_log_ratio), SEQ_LOG_RATIO_CLAMP))
    metrics = {
        "clipfrac": _masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "clipfrac_lower": jnp.zeros((), jnp.float32),
        "approx_kl": _masked_mean(jax.lax.stop_gradient(old_logp - logp), mask),
        "ratio_mean": _masked_mean(seq_ratio, seq_has_tokens),
    }
    return loss, metrics


def value_loss(
    values: chex.Array,
    old_values: chex.Array,
    returns: chex.Array,
    mask: chex.Array,
    clip: float | None = 0.2,
    agg: str = "token_mean",
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Clipped value loss of PPO.

      l_t = ½·max((v − R)², (old_v + clip(v − old_v, −c, c) − R)²)
      clip=None: l_t = ½·(v − R)²

    ``old_values`` and ``returns`` are constants (stop-gradient).

    References:
      Schulman et al. 2017, PPO; OpenAI baselines ppo2 value clipping.

    Args:
      values: [B, T] float current value estimates (differentiable).
      old_values: [B, T] float values recorded at rollout time.
      returns: [B, T] float GAE returns.
      mask: [B, T] 1.0 on valid response tokens.
      clip: value clip range c, or None.
      agg: aggregation mode of ``aggregate_loss``.

    Returns:
      (loss scalar, metrics) with ``vf_clipfrac`` (the clipped branch is the larger one)
      and ``value_error`` (masked mean of (v − R)²).
    """
    check_rank(2, values=values)
    check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    check_mask(mask=mask)
    valid = valid_positions(values, mask)
    values = where_valid(upcast(values), valid)
    old_values = jax.lax.stop_gradient(where_valid(upcast(old_values), valid))
    returns = jax.lax.stop_gradient(where_valid(upcast(returns), valid))

    unclipped = jnp.square(values - returns)
    if clip is None:
        loss_mat = 0.5 * unclipped
        vf_clipfrac = jnp.zeros((), jnp.float32)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped = jnp.square(clipped_values - returns)
        loss_mat = 0.5 * jnp.maximum(unclipped, clipped)
        vf_clipfrac = _masked_mean((clipped > unclipped).astype(jnp.float32), mask)
    loss = aggregate_loss(loss_mat, mask, agg)
    metrics = {
        "vf_clipfrac": vf_clipfrac,
        "value_error": _masked_mean(jax.lax.stop_gradient(unclipped), mask),
    }
    return loss, metrics
