"""Trace-time input checks for the ops: errors that name the argument and say what was
expected (shapes are static under jit, so these cost nothing at run time).

Mask policy: a mask is a bool, integer or float array holding only 0 and 1 (1 = the
position counts). Its dtype is checked always; its values only when it is concrete
(outside jit), since a traced value cannot be inspected. To weight tokens, multiply the
loss, not the mask: the aggregations divide by the mask's sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(rank: int, *, hint: str | None = None, **arrays) -> None:
    """Every named array has ``rank`` dimensions; ``hint`` (e.g. "[B, T, D]") names the
    expected axes in the message (default: [B], [B, T], [B, T, V] by rank)."""
    letters = hint or {1: "[B]", 2: "[B, T]", 3: "[B, T, V]"}.get(rank, f"rank {rank}")
    for name, x in arrays.items():
        if len(_shape(x)) != rank:
            raise ValueError(f"{name} must be {letters} (rank {rank}), got shape {_shape(x)}")


def check_same_shape(**arrays) -> None:
    """All named arrays have the shape of the first one."""
    (first, first_x), *rest = arrays.items()
    for name, x in rest:
        if _shape(x) != _shape(first_x):
            raise ValueError(
                f"{name} has shape {_shape(x)}, expected {_shape(first_x)} (the shape of {first})"
            )


def check_leading_dim(reference: str, ref_x, *, dims: int = 1, **arrays) -> None:
    """The named arrays' first ``dims`` dimensions equal ``ref_x``'s (e.g. [B] scores vs
    [B, T] mask; [B, T] tokens vs [B, T, V] logits with dims=2)."""
    what = "first dimension" if dims == 1 else f"first {dims} dimensions"
    for name, x in arrays.items():
        if _shape(x)[:dims] != _shape(ref_x)[:dims]:
            raise ValueError(
                f"{name} has shape {_shape(x)}: its {what} must match {reference} "
                f"(shape {_shape(ref_x)})"
            )


def _dtype(x):
    """The dtype of an array, tracer or nested list (without copying device arrays)."""
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None else np.asarray(x).dtype


def check_int(**arrays) -> None:
    """The named arrays hold integers (token ids, lengths), not floats."""
    for name, x in arrays.items():
        if not jnp.issubdtype(_dtype(x), jnp.integer):
            raise ValueError(f"{name} must be an integer array (token ids), got dtype {_dtype(x)}")


def check_mask(**masks) -> None:
    """Each named mask is bool / int / float with values in {0, 1} (see module docstring).

    Values are checked only for concrete arrays: a tracer (under jit) has none to read.
    """
    for name, m in masks.items():
        dtype = _dtype(m)
        if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating)):
            raise ValueError(f"{name} must be a bool, int or float mask of 0/1, got dtype {dtype}")
        if isinstance(m, jax.core.Tracer) or not getattr(m, "is_fully_addressable", True):
            continue
        values = np.asarray(m)
        if jnp.issubdtype(dtype, jnp.bool_) or values.size == 0:
            continue
        bad = ~((values == 0) | (values == 1))
        if np.any(bad):
            raise ValueError(
                f"{name} must hold only 0 and 1 (1 = the position counts), found "
                f"{np.unique(values[bad])[:5].tolist()}; to weight positions, scale the loss instead"
            )


def is_concrete(x) -> bool:
    """True when ``x``'s values can be read on this host: not a tracer (under ``jit``)
    and, for a ``jax.Array``, fully addressable (not split over other processes)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def check_token_ids(vocab_size: int | None, *, mask=None, **arrays) -> None:
    """Every id in each named array (or int, or sequence of ints) lies in
    ``[0, vocab_size)``: an id past the embedding table is not an error in JAX (gathers
    clamp or fill with NaN), it is silent garbage.

    The message names the argument, the offending value(s), where the first one is and
    the model's vocab_size. Only concrete values are read (a tracer under ``jit`` has none,
    and is skipped); ``vocab_size=None`` (unknown) checks nothing. ``mask`` (same shape as
    the arrays, optional) only annotates the message: positions with mask 0 are embedded
    too, so they are checked as well.
    """
    if vocab_size is None:
        return
    for name, x in arrays.items():
        if x is None or not is_concrete(x):
            continue
        ids = np.asarray(x)
        if ids.size == 0:
            continue
        if not (np.issubdtype(ids.dtype, np.integer) or np.issubdtype(ids.dtype, np.bool_)):
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= vocab_size)
        if not np.any(bad):
            continue
        values = np.unique(ids[bad])
        shown = ", ".join(str(v) for v in values[:5].tolist()) + (", ..." if values.size > 5 else "")
        if ids.ndim == 0:
            raise ValueError(
                f"{name}={int(ids)} is outside the vocabulary [0, {vocab_size}): the model's "
                f"vocab_size is {vocab_size}"
            )
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"first at index {first}" if ids.ndim != 2 else f"first at row {first[0]}, column {first[1]}"
        if mask is not None and is_concrete(mask) and np.shape(mask) == ids.shape and not np.asarray(mask)[first]:
            where += " (a padding position: padding is embedded too, so it must hold a valid id such as the pad id)"
        raise ValueError(
            f"{name} holds token id(s) {shown} outside [0, {vocab_size}) ({int(bad.sum())} such, {where}): "
            f"the model's vocab_size is {vocab_size}; were they made by another model's tokenizer?"
        )
