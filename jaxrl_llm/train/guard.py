"""Non-finite guard: a NaN/inf loss or gradient skips the update instead of corrupting
the parameters; too many skips in a row stop the run with an error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


def all_finite(*trees) -> jax.Array:
    """True iff every floating leaf of every tree is finite (a scalar bool array)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_if_finite(tx: optax.GradientTransformation, params, opt_state, grads, loss):
    """One optimizer update, skipped (params and optimizer state unchanged) when the loss
    or any gradient is non-finite. Jittable.

    Returns:
      (new_params, new_opt_state, finite: scalar bool).
    """
    finite = all_finite(loss, grads)
    # Zero the grads first so the skipped branch never computes with NaN.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
    updates, new_opt_state = tx.update(safe_grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    return keep(new_params, params), keep(new_opt_state, opt_state), finite


class NonFiniteGuard:
    """Counts skipped updates on the host; raises after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def update(self, finite: bool, step: int) -> None:
        if bool(finite):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive updates had a non-finite loss or gradient "
                f"(last at step {step}); stopping. The last checkpoint holds the last good state."
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total_skipped = int(state.get("total_skipped", 0))
