"""Logit processing for one decode step: temperature, top-k, top-p, min-p, repetition penalty.

Every function takes float logits ``[B, V]`` (one decode step for B sequences), returns
float32 logits ``[B, V]`` of the same static shape, and works under ``jax.jit``,
``jax.vmap`` and inside ``lax.while_loop`` (no data-dependent shapes: filtering never
removes entries, it overwrites them).

Filtered-out entries are set to the finite constant ``FILTER_VALUE = -1e30`` rather than
``-inf``: ``exp(-1e30 - max) == 0`` exactly in float32, so the filtered tokens have
probability exactly 0 and are never sampled, while ``log_softmax`` stays finite and
``p · log p`` (entropy, KL) is ``0 · (−1e30) = 0`` instead of ``0 · (−inf) = NaN``.
Entries that are already ``-inf`` on input (e.g. a masked vocabulary pad) are never kept:
a filter overwrites them with ``FILTER_VALUE``, and with no filter active they stay ``-inf``.
At least one token (the most likely one) always survives every filter, so
``log_softmax`` of the processed logits never produces NaN.

The semantics follow the Hugging Face ``transformers`` logits warpers
(``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``,
``MinPLogitsWarper``, ``RepetitionPenaltyLogitsProcessor``) and ``process_logits``
composes them in the same order as ``transformers.generate``
(temperature → top-k → top-p → min-p), so that ``log_softmax(process_logits(x, ...))`` is
exactly the distribution the token is sampled from (what ``Rollout.logprobs`` records).

Static options (``temperature``, ``top_k``, ``top_p``, ``min_p``, ``penalty``) are Python
numbers validated at trace time with a ``ValueError`` naming the argument.
``temperature``, ``top_p`` and ``min_p`` may also be JAX arrays (scalar or ``[B]``, e.g.
per-sequence values); those cannot be validated and are always applied.

References:
  Holtzman et al. 2020, The Curious Case of Neural Text Degeneration (top-p),
  https://arxiv.org/abs/1904.09751
  Nguyen et al. 2024, Turning Up the Heat: Min-p Sampling, https://arxiv.org/abs/2407.01082
  Keskar et al. 2019, CTRL (repetition penalty), https://arxiv.org/abs/1909.05858
"""

from __future__ import annotations

import numbers

import chex
import jax
import jax.numpy as jnp

from jaxrl_llm.ops.checks import (
    check_leading_dim,
    check_mask,
    check_rank,
    check_same_shape,
)

# Value written into filtered-out logits (see the module docstring for why it is finite).
FILTER_VALUE = -1e30


def _is_static(value) -> bool:
    """True for a concrete Python / numpy number (validated, may be short-circuited)."""
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _check_logits(logits: chex.Array) -> jax.Array:
    check_rank(2, hint="[B, V]", logits=logits)
    return jnp.asarray(logits, jnp.float32)


def _per_row(value, batch: int) -> jax.Array:
    """A scalar or [B] option as a float32 [B, 1] column (broadcasts over V)."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return jnp.broadcast_to(value, (batch, 1))
    if value.shape != (batch,):
        raise ValueError(f"per-row option must be a scalar or have shape ({batch},), got {value.shape}")
    return value[:, None]


def is_kept(processed_logits: chex.Array) -> jax.Array:
    """Mask of the entries a filter kept.

    Args:
      processed_logits: [B, V] float, output of one of the filters in this module.

    Returns:
      [B, V] bool, True where the entry was not filtered out (and was not -inf on input).
    """
    return jnp.asarray(processed_logits) > 0.5 * FILTER_VALUE


def validate_sampling_args(
    *,
    temperature: float | chex.Array = 1.0,
    top_k: int = 0,
    top_p: float | chex.Array = 1.0,
    min_p: float | chex.Array = 0.0,
) -> None:
    """Raise a ValueError naming the first invalid static sampling option.

    Valid values: temperature ≥ 0 (0 = greedy); top_k an int ≥ 0 (0 = off);
    0 < top_p ≤ 1 (1 = off); 0 ≤ min_p ≤ 1 (0 = off). Array values are not checked.
    """
    if _is_static(temperature) and not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables top-k), got {top_k!r}")
    if _is_static(top_p) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables top-p), got {top_p}")
    if _is_static(min_p) and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 disables min-p), got {min_p}")


def greedy_logits(logits: chex.Array) -> jax.Array:
    """The degenerate (temperature → 0) distribution: only the argmax survives.

    Ties for the maximum are broken towards the lowest token id (as ``jnp.argmax``).

    Args:
      logits: [B, V] float.

    Returns:
      [B, V] float32: the original logit at argmax, FILTER_VALUE elsewhere; its
      log_softmax is 0 at the argmax.
    """
    logits = _check_logits(logits)
    best = jnp.argmax(logits, axis=-1)
    one_hot = jnp.arange(logits.shape[-1])[None, :] == best[:, None]
    return jnp.where(one_hot, logits, FILTER_VALUE)


def apply_temperature(logits: chex.Array, temperature: float | chex.Array) -> jax.Array:
    """Scale logits by 1/temperature: softmax(logits / τ).

    τ = 0 is the greedy limit and returns ``greedy_logits(logits)`` (a one-token
    distribution) instead of dividing by zero.

    Args:
      logits: [B, V] float.
      temperature: τ ≥ 0, a Python float or a float array of shape [] or [B].

    Returns:
      [B, V] float32.
    """
    validate_sampling_args(temperature=temperature)
    logits = _check_logits(logits)
    if _is_static(temperature):
        if temperature == 0:
            return greedy_logits(logits)
        if temperature == 1:
            return logits
        return logits / jnp.float32(temperature)
    tau = _per_row(temperature, logits.shape[0])
    positive = tau > 0
    scaled = logits / jnp.where(positive, tau, 1.0)  # double-where: no division by 0
    return jnp.where(positive, scaled, greedy_logits(logits))


def top_k_filter(logits: chex.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row; k = 0 disables the filter.

    keep_i = logits_i ≥ (k-th largest logit). Ties at the k-th value are resolved
    deterministically by keeping *all* tied entries (so more than k may survive), which
    is exactly what ``transformers.TopKLogitsWarper`` does. k > V keeps everything.

    Args:
      logits: [B, V] float.
      k: static int ≥ 0.

    Returns:
      [B, V] float32 with filtered entries set to FILTER_VALUE.
    """
    validate_sampling_args(top_k=k)
    logits = _check_logits(logits)
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, logits, FILTER_VALUE)


def top_p_filter(logits: chex.Array, p: float | chex.Array) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens with total prob ≥ p.

    With probabilities sorted ascending, q_(1) ≤ … ≤ q_(V), and cumulative sums
    c_(j) = Σ_{i≤j} q_(i), token (j) is removed iff c_(j) ≤ 1 − p, except that the most
    likely token is always kept (``transformers.TopPLogitsWarper`` with
    min_tokens_to_keep=1, computed the same way). Entries tied with the least likely
    kept token are all kept (deterministic tie handling). p = 1 disables the filter.

    Args:
      logits: [B, V] float.
      p: 0 < p ≤ 1, a Python float or a float array of shape [] or [B].

    Returns:
      [B, V] float32 with filtered entries set to FILTER_VALUE.
    """
    validate_sampling_args(top_p=p)
    logits = _check_logits(logits)
    if _is_static(p) and p == 1.0:
        return logits
    ascending = jnp.sort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = cum <= 1.0 - _per_row(p, logits.shape[0])
    remove = remove.at[:, -1].set(False)
    # cum is non-decreasing, so the removed entries are a prefix of the ascending order
    # and the smallest kept logit is at index (number removed).
    n_removed = jnp.sum(remove, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(ascending, n_removed, axis=-1)
    return jnp.where(logits >= threshold, logits, FILTER_VALUE)


def min_p_filter(logits: chex.Array, min_p: float | chex.Array) -> jax.Array:
    """Min-p filter: keep tokens with prob_i ≥ min_p · max_j prob_j; min_p = 0 disables.

    The most likely token always survives (min_p ≤ 1). Matches
    ``transformers.MinPLogitsWarper`` (probabilities from a float32 softmax).

    Args:
      logits: [B, V] float.
      min_p: 0 ≤ min_p ≤ 1, a Python float or a float array of shape [] or [B].

    Returns:
      [B, V] float32 with filtered entries set to FILTER_VALUE.
    """
    validate_sampling_args(min_p=min_p)
    logits = _check_logits(logits)
    if _is_static(min_p) and min_p == 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = _per_row(min_p, logits.shape[0]) * jnp.max(probs, axis=-1, keepdims=True)
    keep = (probs >= threshold) | (logits == jnp.max(logits, axis=-1, keepdims=True))
    return jnp.where(keep, logits, FILTER_VALUE)


def repetition_penalty(
    logits: chex.Array,
    prev_tokens: chex.Array,
    prev_mask: chex.Array,
    penalty: float,
) -> jax.Array:
    """CTRL repetition penalty on every token id that already occurred.

    For each token id v present in the row's valid previous tokens (at most once per id,
    however often it occurred):  logit_v ← logit_v / penalty if logit_v > 0, else
    logit_v · penalty (``transformers.RepetitionPenaltyLogitsProcessor``). penalty > 1
    discourages repetition, 0 < penalty < 1 encourages it, 1 is a no-op. Token ids
    outside [0, V) are ignored.

    Args:
      logits: [B, V] float.
      prev_tokens: [B, L] int token ids generated (and/or prompted) so far.
      prev_mask: [B, L] bool or float; positions with mask 0 (padding, ignored prompt)
        do not count.
      penalty: static float > 0.

    Returns:
      [B, V] float32.
    """
    if not _is_static(penalty) or not penalty > 0:
        raise ValueError(f"penalty must be a float > 0 (1 disables it), got {penalty!r}")
    logits = _check_logits(logits)
    check_rank(2, hint="[B, L]", prev_tokens=prev_tokens, prev_mask=prev_mask)
    check_same_shape(prev_tokens=prev_tokens, prev_mask=prev_mask)
    check_mask(prev_mask=prev_mask)
    check_leading_dim("logits", logits, prev_tokens=prev_tokens)
    batch, vocab = logits.shape
    tokens = jnp.asarray(prev_tokens, jnp.int32)
    valid = (jnp.asarray(prev_mask) > 0) & (tokens >= 0) & (tokens < vocab)
    # Invalid positions scatter into an extra column V that is dropped afterwards.
    tokens = jnp.where(valid, tokens, vocab)
    rows = jnp.arange(batch)[:, None]
    seen = jnp.zeros((batch, vocab + 1), bool).at[rows, tokens].set(True)[:, :vocab]
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def process_logits(
    logits: chex.Array,
    *,
    temperature: float | chex.Array = 1.0,
    top_k: int = 0,
    top_p: float | chex.Array = 1.0,
    min_p: float | chex.Array = 0.0,
) -> jax.Array:
    """Temperature → top-k → top-p → min-p, the order used by ``transformers.generate``.

    ``jax.nn.log_softmax(process_logits(x, ...))`` is the log-probability of each token
    under the distribution that ``sample_token`` samples from. temperature = 0 gives the
    greedy one-token distribution (the other filters then change nothing, since the
    argmax survives all of them).

    Args:
      logits: [B, V] float raw logits of one decode step.
      temperature: τ ≥ 0 (0 = greedy); float or array [] / [B].
      top_k: static int ≥ 0 (0 = off).
      top_p: 0 < p ≤ 1 (1 = off); float or array [] / [B].
      min_p: 0 ≤ min_p ≤ 1 (0 = off); float or array [] / [B].

    Returns:
      [B, V] float32 processed logits; filtered entries are FILTER_VALUE.
    """
    validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits = apply_temperature(logits, temperature)
    if _is_static(temperature) and temperature == 0:
        return logits
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return min_p_filter(logits, min_p)


def sample_token(
    rng: chex.PRNGKey,
    logits: chex.Array,
    temperature: float | chex.Array = 1.0,
    *,
    top_k: int = 0,
    top_p: float | chex.Array = 1.0,
    min_p: float | chex.Array = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row from the processed distribution, with its log-prob.

    token ~ Categorical(softmax(process_logits(logits, ...))), and
    logprob = log_softmax(process_logits(logits, ...))[token].
    (`categorical.sample_categorical` draws the same distribution ~25x cheaper on CPU;
    not the default yet: switching changes every sampled trajectory, see its docstring.)

    Greedy decoding: with temperature == 0 the token is ``argmax(logits)`` (lowest id on
    ties) and its logprob is **0.0**, the log-probability under the degenerate one-token
    distribution actually used, *not* the model's log-softmax of that token. (Callers who
    need the model's probability recompute it from the raw logits.) With a static
    temperature of 0 the rng is not used.

    Args:
      rng: PRNG key.
      logits: [B, V] float raw logits.
      temperature, top_k, top_p, min_p: as in ``process_logits``.

    Returns:
      tokens: [B] int32.
      logprobs: [B] float32, log-prob of each token under the processed distribution.
    """
    processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if _is_static(temperature) and temperature == 0:
        tokens = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    else:
        # Rows with a traced temperature of 0 have a one-token processed distribution,
        # so categorical sampling returns their argmax as well.
        tokens = jax.random.categorical(rng, processed, axis=-1).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(processed, axis=-1)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_logprobs
