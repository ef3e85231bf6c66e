"""Trace-time input checks for the ops: errors that name the argument and say what was
expected (shapes are static under jit, so these cost nothing at run time)."""

from __future__ import annotations

import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(rank: int, **arrays) -> None:
    """Every named array has ``rank`` dimensions (``shape_hint`` in the message)."""
    letters = {1: "[B]", 2: "[B, T]", 3: "[B, T, V]"}.get(rank, f"rank {rank}")
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


def check_leading_dim(reference: str, ref_x, **arrays) -> None:
    """The named arrays' first dimension equals ``ref_x``'s (e.g. [B] scores vs [B, T])."""
    for name, x in arrays.items():
        if _shape(x)[:1] != _shape(ref_x)[:1]:
            raise ValueError(
                f"{name} has shape {_shape(x)}: its first dimension must match {reference} "
                f"(shape {_shape(ref_x)})"
            )
