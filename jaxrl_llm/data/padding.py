"""Padding and length bucketing for token batches.

Jitted steps recompile for every new input shape, so batch lengths are rounded up to a
*bucket*: a multiple of a fixed number (``bucket=16``), the next power of two
(``bucket="pow2"``), a fixed length (``bucket="max"``: always the length cap), or the
longest row (``bucket=None``). ``pad_rows`` then writes variable-length rows into a
``[B, L]`` int32 array, right- or left-padded, with a matching 0/1 mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PADDING_SIDES = ("right", "left")
BUCKET_KINDS = ("pow2", "max")


def check_bucket(bucket) -> None:
    """Validates a bucket option: None, a positive int, "pow2" or "max"."""
    if bucket is None or bucket in BUCKET_KINDS:
        return
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
        raise ValueError(f"bucket={bucket!r}; expected None, a positive int, or one of {BUCKET_KINDS}.")


def check_side(side: str, name: str = "padding_side") -> None:
    if side not in PADDING_SIDES:
        raise ValueError(f"{name}={side!r}; expected one of {PADDING_SIDES}.")


def bucket_length(length: int, bucket=16, max_len: int | None = None) -> int:
    """The padded length for a batch whose longest row has ``length`` tokens.

    Args:
      length: longest row in the batch (>= 0).
      bucket: None (exactly ``length``), int m (round up to a multiple of m),
        "pow2" (next power of two), "max" (``max_len``).
      max_len: cap on the result (rows are never longer than it); required for "max".

    Returns:
      int >= max(length, 1), at most ``max_len`` when given.
    """
    check_bucket(bucket)
    length = max(int(length), 1)
    if max_len is not None and length > max_len:
        raise ValueError(f"row length {length} exceeds max_len={max_len}.")
    if bucket is None:
        out = length
    elif bucket == "pow2":
        out = 1 << (length - 1).bit_length()
    elif bucket == "max":
        if max_len is None:
            raise ValueError('bucket="max" needs a max_len.')
        out = max_len
    else:
        out = -(-length // bucket) * bucket
    return min(out, max_len) if max_len is not None else out


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int,
             side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Pads rows of token ids to ``length``.

    Args:
      rows: B sequences of ids, each at most ``length`` long.
      length: L, the padded length.
      pad_id: id written in padding slots.
      side: "right" (tokens start at column 0) or "left" (tokens end at column L-1).

    Returns:
      (tokens [B, L] int32, mask [B, L] int32), mask 1 on real tokens.
    """
    check_side(side)
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for b, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"row {b} has {n} tokens > padded length {length}.")
        if n == 0:
            continue
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        tokens[b, sl] = row
        mask[b, sl] = 1
    return tokens, mask
