"""Per-token KL estimators and the adaptive KL coefficient.

The estimators approximate KL(π‖π_ref) from tokens sampled from π, using only the
log-probabilities of the sampled tokens (Schulman 2020). With r = π_ref/π:
  k1 = −log r           unbiased, high variance, can be negative per token;
  k2 = ½ (log r)²       biased, low variance; its gradient is the true KL gradient;
  k3 = (r − 1) − log r  unbiased, low variance, always ≥ 0 (GRPO's default).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_same_shape
from jaxrl_llm.ops.masked import upcast, valid_positions, where_valid

KL_KINDS = ("k1", "abs", "k2", "k3")


def kl_penalty(
    logp: chex.Array,
    ref_logp: chex.Array,
    kind: str = "k3",
    clamp: float | None = 10.0,
    mask: chex.Array | None = None,
) -> chex.Array:
    """Per-token estimate of KL(π‖π_ref) from the sampled tokens' log-probs.

      k1:  logp − ref_logp
      abs: |logp − ref_logp|
      k2:  ½ (logp − ref_logp)²
      k3:  exp(ref_logp − logp) − (ref_logp − logp) − 1, clamped to [−clamp, clamp]

    The k3 log-ratio is clamped to ±20 before ``exp`` so that a policy far from the
    reference gives a large finite value, never inf. Neither input is stop-gradiented:
    callers decide (``ref_logp`` normally carries no gradient).

    References:
      Schulman 2020, Approximating KL Divergence, http://joschu.net/blog/kl-approx.html

    Args:
      logp: [B, T] float log π(token).
      ref_logp: [B, T] float log π_ref(token).
      kind: one of KL_KINDS.
      clamp: bound for k3 (None: no clamp).
      mask: optional [B, T] 1 on valid tokens. Pass it whenever padding may hold NaN /
        ±inf log-probs: both inputs are zeroed there before any arithmetic, so the
        estimate is exactly 0 at masked positions and the gradient is 0 there (without
        it, multiplying the result by the mask afterwards still gives NaN: NaN·0 = NaN,
        in the value and in the backward pass of exp / square).

    Returns:
      [B, T] float32 per-token estimate (the caller aggregates; 0 where mask is 0).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    check_same_shape(logp=logp, ref_logp=ref_logp)
    logp, ref_logp = upcast(logp), upcast(ref_logp)
    if mask is not None:
        check_same_shape(logp=logp, mask=mask)
        check_mask(mask=mask)
        valid = valid_positions(logp, mask)
        logp, ref_logp = where_valid(logp, valid), where_valid(ref_logp, valid)
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "abs":
        return jnp.abs(log_ratio)
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    neg_log_ratio = jnp.clip(-log_ratio, -20.0, 20.0)
    # expm1(x) − x, not exp(x) − x − 1: near x = 0 (policy ≈ reference, the common case)
    # the latter rounds to ±6e-8 and can go negative in float32; expm1 keeps k3 ≥ 0.
    k3 = jnp.expm1(neg_log_ratio) - neg_log_ratio
    if clamp is not None:
        k3 = jnp.clip(k3, -clamp, clamp)
    return k3


def adaptive_kl_coef(
    coef: chex.Numeric,
    current_kl: chex.Numeric,
    n_steps: int,
    target: float,
    horizon: float,
) -> chex.Array:
    """Proportional KL controller of Ziegler et al. (2019).

      err = clip(current_kl / target − 1, −0.2, 0.2)
      coef ← coef · (1 + err · n_steps / horizon)

    References:
      Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences,
      https://arxiv.org/abs/1909.08593 (§2.2)

    Args:
      coef: current β (scalar).
      current_kl: measured KL of the last batch (scalar, per sequence).
      n_steps: number of samples (or steps) since the last update.
      target: target KL, > 0.
      horizon: controller horizon, > 0.

    Returns:
      scalar float32 new β.
    """
    if target <= 0:
        raise ValueError(f"target must be > 0, got {target}")
    if horizon <= 0:
        raise ValueError(f"horizon must be > 0, got {horizon}")
    err = jnp.clip(upcast(current_kl) / target - 1.0, -0.2, 0.2)
    return upcast(coef) * (1.0 + err * n_steps / horizon)
