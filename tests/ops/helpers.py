"""Shared test data for ops tests: ragged right-padded masks and random arrays."""

import numpy as np


def ragged_mask(rng: np.random.Generator, batch: int, length: int, min_len: int = 0, holes: bool = False):
    """[B, T] float32 right-padded mask with random lengths in [min_len, T].

    holes=True also zeroes a few interior positions (e.g. tool outputs inside a response).
    """
    lengths = rng.integers(min_len, length + 1, size=batch)
    lengths[0] = length  # always exercise a full row
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    if holes:
        hole = rng.random((batch, length)) < 0.15
        mask = np.where(hole, 0.0, mask).astype(np.float32)
    return mask


def float32(rng: np.random.Generator, *shape, scale: float = 1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)
