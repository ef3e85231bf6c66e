"""Off-policy correction between the policy that sampled a batch (the *behaviour* or
rollout policy: another numeric precision, another engine, or an older version of the
weights in asynchronous RL) and the policy the trainer computes (the proximal / old policy
of the clipped objective).

With w_t = π_train(y_t) / π_rollout(y_t) (from log-probs, in log space):

- level "token": ρ_t = w_t;
- level "sequence": ρ_t = Π_u w_u for every token of the sequence;
- level "geometric": ρ_t = (Π_u w_u)^(1/n), the per-token geometric mean (n tokens).

and the bound [lower, upper] (lower default 1/upper) acts by mode:

- "truncate" (TIS): weights min(ρ, upper); nothing is rejected;
- "mask" (MIS, rejection sampling): weights ρ, and tokens with ρ outside [lower, upper]
  leave the loss mask (at sequence / geometric level the whole sequence goes).

A veto threshold v rejects every sequence holding a token with w_t < v, in either mode.
Rejection acts on the mask, never by zeroing a weight, so the loss's normaliser counts
only the kept tokens. The weights carry no gradient.

References:
  Yao et al. 2025, Your Efficient RL Framework Secretly Brings You Off-Policy RL Training
  (truncated importance sampling), https://fengyao.notion.site/off-policy-rl
  Liu, Li et al. 2025, When Speed Kills Stability: Demystifying RL Collapse from the
  Training-Inference Mismatch (masked IS, geometric level, veto)
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_same_shape
from jaxrl_llm.ops.masked import masked_mean, masked_sum

IS_LEVELS = ("token", "sequence", "geometric")
IS_MODES = ("truncate", "mask")
_LOG_CLAMP = 20.0  # exp(±20): beyond it a ratio is an outlier whatever its exact value


def rollout_correction(
    train_logp: chex.Array,
    rollout_logp: chex.Array,
    mask: chex.Array,
    *,
    upper: float,
    lower: float | None = None,
    level: str = "token",
    mode: str = "truncate",
    veto: float | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Importance weights and the rejection mask of a batch (see the module docstring).

    Args:
      train_logp: [N, T] log π_train of the sampled tokens (trainer's recompute).
      rollout_logp: [N, T] log π_rollout of the same tokens (recorded when sampling).
      mask: [N, T] 1 on response tokens.
      upper: the truncation cap C > 0, or the upper rejection bound (mode "mask").
      lower: the lower rejection bound in (0, upper) (mode "mask"); None: 1 / upper.
        Counted in ``is_frac_low`` in either mode.
      level: one of IS_LEVELS.
      mode: one of IS_MODES.
      veto: reject sequences holding a token ratio below this (None: off).

    Returns:
      (weights [N, T] float32, 0 off the mask; kept [N, T] float32, the mask after
      rejection; metrics: ``is_mean``, ``is_std``, ``is_min``, ``is_max`` of the raw ratios
      ρ over valid tokens, ``is_ess`` the effective sample size (Σρ)² / (n·Σρ²) in (0, 1],
      ``is_frac_high`` / ``is_frac_low`` (ρ above upper / below lower), ``is_masked_fraction``
      (valid tokens rejected), ``is_seq_masked_fraction``, ``is_veto_fraction`` (sequences
      vetoed), ``mismatch_kl`` (k1 estimate of KL(π_rollout ‖ π_train)) and
      ``mismatch_k3``).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    if mode not in IS_MODES:
        raise ValueError(f"mode must be one of {IS_MODES}, got {mode!r}")
    if not upper > 0:
        raise ValueError(f"upper must be > 0 (the cap / upper ratio bound), got {upper!r}")
    lower = 1.0 / upper if lower is None else lower
    if mode == "mask" and not 0 < lower < upper:
        raise ValueError(f"lower must be in (0, upper={upper}) for mode 'mask' (default 1 / upper, so upper > 1), "
                         f"got {lower!r}")
    if veto is not None and not 0 < veto < 1:
        raise ValueError(f"veto must be in (0, 1) or None, got {veto!r}")
    check_same_shape(train_logp=train_logp, rollout_logp=rollout_logp, mask=mask)
    check_mask(mask=mask)
    valid = jnp.asarray(mask) > 0
    m = valid.astype(jnp.float32)
    log_w = jnp.where(valid, jax.lax.stop_gradient(jnp.asarray(train_logp, jnp.float32))
                      - jnp.asarray(rollout_logp, jnp.float32), 0.0)
    n = jnp.sum(m, axis=-1, keepdims=True)
    if level == "token":
        log_rho = log_w
    elif level == "sequence":
        log_rho = jnp.broadcast_to(jnp.sum(log_w, axis=-1, keepdims=True), log_w.shape)
    else:
        log_rho = jnp.broadcast_to(jnp.sum(log_w, axis=-1, keepdims=True) / jnp.maximum(n, 1.0), log_w.shape)
    rho = jnp.exp(jnp.clip(log_rho, -_LOG_CLAMP, _LOG_CLAMP))
    high, low = valid & (rho > upper), valid & (rho < lower)

    kept = valid
    if mode == "mask":
        kept = kept & ~high & ~low  # at sequence / geometric level a row's tokens share ρ: all go together
        weights = jnp.where(kept, rho, 0.0)
    else:
        weights = jnp.where(valid, jnp.minimum(rho, upper), 0.0)
    vetoed = jnp.zeros(valid.shape[:-1], bool)
    if veto is not None:
        vetoed = jnp.any(valid & (log_w < jnp.log(veto)), axis=-1)
        kept = kept & ~vetoed[:, None]
        weights = jnp.where(kept, weights, 0.0) if mode == "mask" else weights
    kept_f = kept.astype(jnp.float32)

    rho_valid = jnp.where(valid, rho, 0.0)
    total = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(rho_valid) / total
    has_rows = jnp.any(valid, axis=-1)
    rows = jnp.maximum(jnp.sum(has_rows), 1)
    metrics = {
        "is_mean": mean,
        "is_std": jnp.sqrt(jnp.maximum(masked_mean(jnp.square(rho - mean), m), 0.0)),
        "is_min": jnp.min(jnp.where(valid, rho, jnp.inf)),
        "is_max": jnp.max(jnp.where(valid, rho, -jnp.inf)),
        "is_ess": jnp.square(jnp.sum(rho_valid)) / (total * jnp.maximum(jnp.sum(jnp.square(rho_valid)), 1e-30)),
        "is_frac_high": jnp.sum(high) / total,
        "is_frac_low": jnp.sum(low) / total,
        "is_masked_fraction": jnp.sum(valid & ~kept) / total,
        "is_seq_masked_fraction": jnp.sum(has_rows & jnp.any(valid & ~kept, axis=-1)) / rows,
        "is_veto_fraction": jnp.sum(vetoed & has_rows) / rows,
        "mismatch_kl": masked_mean(-log_w, m),
        "mismatch_k3": masked_sum(jnp.exp(jnp.clip(log_w, -_LOG_CLAMP, _LOG_CLAMP)) - log_w - 1.0, m) / total,
    }
    return weights, kept_f, metrics
