"""Masked reductions and loss aggregation.

Every reduction over tokens in jaxrl_llm goes through these functions, so that
padding and prompt positions never leak into a statistic and an empty selection
gives 0 instead of NaN.

Shapes: B batch, T response length. ``mask`` is 1.0 on valid tokens, 0.0 elsewhere.

Masked positions never leak: they are removed with ``jnp.where`` before any arithmetic
(``where_valid``), never multiplied by 0, so a NaN or ±inf there changes neither a value
nor a gradient (NaN·0 is NaN; so is a NaN partial derivative times a zero cotangent).
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

from jaxrl_llm.ops.checks import check_mask, check_rank, check_same_shape

AGGREGATION_MODES = (
    "token_mean",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_sum_norm",
)


def upcast(x: chex.Array) -> chex.Array:
    """Casts to float32, or keeps a wider float (float64 under x64, for gradient checks)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _broadcast_mask(x: chex.Array, mask: chex.Array) -> chex.Array:
    """``mask`` broadcast to ``x``'s shape (its own dtype), checking it can be."""
    mask = jnp.asarray(mask)
    try:
        return jnp.broadcast_to(mask, jnp.shape(x))
    except ValueError as err:
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to x of shape {jnp.shape(x)}"
        ) from err


def valid_positions(x: chex.Array, mask: chex.Array) -> chex.Array:
    """Bool array of ``x``'s shape: True where the (broadcast) mask is > 0.

    A NaN in a traced float mask reads as masked (NaN > 0 is False); a concrete mask
    with values other than 0/1 is rejected by ``check_mask`` before this is reached.
    """
    return _broadcast_mask(x, mask) > 0


def where_valid(x: chex.Array, valid: chex.Array) -> chex.Array:
    """``x`` with masked positions replaced by 0, BEFORE any arithmetic.

    ``x * mask`` is not enough: NaN·0 = NaN and inf·0 = NaN, and in the backward pass a
    NaN/inf partial derivative times a zero cotangent is NaN again. ``jnp.where`` selects
    instead of multiplying: its value at masked positions is exactly 0, its gradient
    there is exactly 0, and everything computed from its output is finite where the
    valid inputs are. Unmasked values are passed through bit for bit.
    """
    return jnp.where(valid, x, jnp.zeros((), x.dtype))


def check_reduction_mask(x: chex.Array, mask: chex.Array) -> None:
    """The checks of the public masked reductions: ``mask`` broadcasts to ``x`` and is a
    0/1 mask (dtype always; values when concrete, as ``checks.check_mask``)."""
    _broadcast_mask(x, mask)
    check_mask(mask=mask)


# Unchecked reductions, for callers that have checked their mask already (the losses,
# aggregate_loss): checking a concrete mask reads it back to the host.


def _masked_sum(x, mask, axis=None):
    x = upcast(x)
    return jnp.sum(where_valid(x, valid_positions(x, mask)), axis=axis)


def _masked_mean(x, mask, axis=None):
    x = upcast(x)
    valid = valid_positions(x, mask)
    count = jnp.sum(valid.astype(jnp.float32), axis=axis)
    total = jnp.sum(where_valid(x, valid), axis=axis)
    # Double-where: the division is never evaluated at count == 0, so grads stay finite.
    safe_count = jnp.where(count > 0, count, 1.0)
    return jnp.where(count > 0, total / safe_count, 0.0)


def _masked_var(x, mask, unbiased=True):
    x = upcast(x)
    valid = valid_positions(x, mask)
    x = where_valid(x, valid)
    mean = _masked_mean(x, valid)
    sq_dev_sum = jnp.sum(where_valid(jnp.square(x - mean), valid))
    n = jnp.sum(valid.astype(jnp.float32))
    denom = n - 1.0 if unbiased else n
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, sq_dev_sum / safe_denom, 0.0)


def _masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    x = upcast(x)
    valid = valid_positions(x, mask)
    x = where_valid(x, valid)
    mean = _masked_mean(x, valid)
    var = _masked_var(x, valid, unbiased=True)
    whitened = (x - mean) * jnp.reciprocal(jnp.sqrt(var + eps))
    if not shift_mean:
        whitened = whitened + mean
    return where_valid(whitened, valid)


def masked_sum(x: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """Σ x·mask over ``axis`` (all axes when None).

    Masked entries are selected away (``jnp.where``), not multiplied by 0: a NaN or inf
    there changes neither the value nor the (zero) gradient. ``mask`` must broadcast to
    ``x`` and hold only 0/1 (checked like the losses' masks).
    """
    check_reduction_mask(x, mask)
    return _masked_sum(x, mask, axis)


def masked_mean(x: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """Σ x·mask / Σ mask over ``axis``; 0 where the mask selects nothing.

    NaN / inf at masked entries do not leak (see ``masked_sum``).
    """
    check_reduction_mask(x, mask)
    return _masked_mean(x, mask, axis)


def masked_var(x: chex.Array, mask: chex.Array, unbiased: bool = True) -> chex.Array:
    """Variance of the selected entries of ``x`` (a scalar).

    unbiased=True divides by (n − 1) (Bessel's correction); with n ≤ 1 the result is 0.
    NaN / inf at masked entries do not leak (see ``masked_sum``).
    """
    check_reduction_mask(x, mask)
    return _masked_var(x, mask, unbiased)


def masked_whiten(
    x: chex.Array, mask: chex.Array, shift_mean: bool = True, eps: float = 1e-8
) -> chex.Array:
    """(x − mean)·rsqrt(var + eps) over the selected entries (unbiased var).

    With shift_mean=False the mean is added back (only the scale changes), as in
    TRL/verl's ``masked_whiten``. Masked positions are returned as 0, whatever they held
    (NaN / inf included), with gradient 0.
    """
    check_reduction_mask(x, mask)
    return _masked_whiten(x, mask, shift_mean, eps)


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")


def aggregate_loss(
    loss_mat: chex.Array,
    mask: chex.Array,
    mode: str = "token_mean",
    norm_length: float | None = None,
) -> chex.Array:
    """Reduces a per-token loss ``[B, T]`` to a scalar.

    Modes (DAPO §3.3 and Dr. GRPO §3.1 discuss why the choice matters):
      - ``token_mean``: Σ_bt l·m / Σ_bt m — every valid token of the batch weighs the
        same (DAPO token-level loss).
      - ``seq_mean_token_mean``: mean over sequences of (Σ_t l·m / Σ_t m) — original
        GRPO; tokens of short sequences weigh more.
      - ``seq_mean_token_sum``: mean over sequences of Σ_t l·m.
      - ``seq_mean_token_sum_norm``: mean over sequences of Σ_t l·m / norm_length
        (default T) — Dr. GRPO's constant normaliser, no length bias.

    Sequences with no valid token are left out of the mean over sequences; a batch with
    no valid token at all gives 0.

    References:
      Yu et al. 2025, DAPO, https://arxiv.org/abs/2503.14476
      Liu et al. 2025, Understanding R1-Zero-Like Training, https://arxiv.org/abs/2503.20783

    Args:
      loss_mat: [B, T] float per-token loss.
      mask: [B, T] 1.0 on valid tokens.
      mode: one of AGGREGATION_MODES.
      norm_length: constant divisor for ``seq_mean_token_sum_norm`` (default T).

    Returns:
      scalar float32 loss.
    """
    _check_mode(mode)
    check_rank(2, loss_mat=loss_mat)
    check_same_shape(loss_mat=loss_mat, mask=mask)
    check_mask(mask=mask)
    loss_mat = upcast(loss_mat)
    valid = valid_positions(loss_mat, mask)
    if mode == "token_mean":
        return _masked_mean(loss_mat, valid)
    seq_has_tokens = jnp.any(valid, axis=-1)
    if mode == "seq_mean_token_mean":
        per_seq = _masked_mean(loss_mat, valid, axis=-1)
    elif mode == "seq_mean_token_sum":
        per_seq = _masked_sum(loss_mat, valid, axis=-1)
    else:
        if norm_length is None:
            norm_length = loss_mat.shape[-1]
        if norm_length <= 0:
            raise ValueError(f"norm_length must be > 0, got {norm_length}")
        per_seq = _masked_sum(loss_mat, valid, axis=-1) / norm_length
    return _masked_mean(per_seq, seq_has_tokens)
