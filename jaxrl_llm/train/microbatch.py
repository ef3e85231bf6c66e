"""Gradient accumulation inside one update: a batch too large for one forward/backward is
run as ``k`` micro-batches (``lax.scan``), and their gradients are summed with weights that
make the result the gradient of the *whole-batch* loss.

A mean over the whole batch is not the mean of the micro-batch means: with
``token_mean`` a micro-batch of long responses holds more of the batch's tokens than one
of short responses. The weights follow the loss's aggregation (``ops.aggregate_loss``):

* ``token_mean``: micro-batch j weighs (its valid tokens) / (the batch's valid tokens);
* ``seq_mean_*``: (its sequences with a valid token) / (the batch's such sequences),

so Σ_j w_j · loss_j is exactly the loss of the whole batch at once, and so is its
gradient, whatever the split (``optim.grad_accum_steps``, by contrast, averages
successive updates' mean gradients). Micro-batch j holds rows j, j + k, j + 2k, ...: with
rows split over the mesh in contiguous blocks, every micro-batch stays spread over every
device, with no data movement.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.parallel.train_step import split_microbatches


def row_weights(mask: jax.Array, mode: str) -> jax.Array:
    """[B] weight of each row in a loss aggregated with ``mode`` over ``mask`` [B, T]:
    its valid tokens (``token_mean``) or 1 if it has any (the ``seq_mean_*`` modes)."""
    tokens = jnp.sum(jnp.asarray(mask, jnp.float32), axis=-1)
    return tokens if mode == "token_mean" else (tokens > 0).astype(jnp.float32)


def _shares(weights: jax.Array, k: int) -> jax.Array:
    """[k] fraction of the batch's total row weight in each micro-batch."""
    per_micro = jnp.sum(split_microbatches(jnp.asarray(weights, jnp.float32), k), axis=1)
    return per_micro / jnp.maximum(jnp.sum(per_micro), 1e-30)  # no valid row at all: every share is 0


def accumulated_value_and_grad(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, dict]],
    params: Any,
    batch: Any,
    weights: jax.Array,
    num_microbatches: int,
    metric_weights: Mapping[str, jax.Array | None] | None = None,
) -> tuple[tuple[jax.Array, dict], Any]:
    """``jax.value_and_grad(loss_fn, has_aux=True)(params, batch)``, computed in
    ``num_microbatches`` micro-batches.

    Args:
      loss_fn: ``(params, batch) -> (loss [], metrics {name: []})``, a mean over the rows
        of ``batch`` as ``weights`` describe.
      params: differentiated pytree.
      batch: pytree of ``[B, ...]`` arrays (rank-0 leaves are shared by all micro-batches).
      weights: [B] row weights of the loss's aggregation (:func:`row_weights`).
      num_microbatches: k; B must divide by k.
      metric_weights: ``{metric: [B] row weights}`` for metrics that are means over other
        rows than the loss (e.g. a token mean beside a sequence-mean loss), or ``None``
        for a metric that is a sum (a count). Other metrics use ``weights``. A metric that
        is a non-linear function of a mean (a perplexity) is not exact: recompute it.

    Returns:
      ``((loss, metrics), grads)`` of the whole batch.
    """
    if num_microbatches == 1:
        return jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    k = num_microbatches
    micro = split_microbatches(batch, k)
    out = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro)))
    metric_weights = dict(metric_weights or {})
    loss_share = _shares(weights, k)
    metric_shares = {name: (jnp.ones((k,), jnp.float32) if metric_weights[name] is None
                            else _shares(metric_weights[name], k)) if name in metric_weights else loss_share
                     for name in out[1]}

    def add(total, share, x):
        # where, not multiply: a micro-batch without valid rows may give NaN (0/0 means)
        return total + jnp.where(share > 0, share * x, 0.0).astype(total.dtype)

    def body(carry, xs):
        mb, share, m_share = xs
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, mb)
        acc_loss, acc_metrics, acc_grads = carry
        return (add(acc_loss, share, loss),
                {n: add(acc_metrics[n], m_share[n], metrics[n]) for n in acc_metrics},
                jax.tree.map(lambda t, g: add(t, share, g), acc_grads, grads)), None

    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)  # noqa: E731
    grad_zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, metrics, grads), _ = jax.lax.scan(
        body, (zeros(out[0]), zeros(out[1]), grad_zeros), (micro, loss_share, metric_shares))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, metrics), grads
