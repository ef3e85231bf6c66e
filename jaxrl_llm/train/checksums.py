"""Checksums of a pytree's arrays, computed where the arrays live (on device, sharded or
not), so a checkpoint can prove that what it restores is what it saved.

orbax keeps no checksums: bytes overwritten in place inside an array file (a bad disk
sector, a bit flip, a stray write) restore without an error, as other numbers — often
NaN parameters that surface steps later as a "diverged" run. ``Checkpointer.save`` stores
``tree_checksums(state)`` in the JSON side-car and ``restore`` compares them.

Each leaf's checksum is two weighted sums of its raw bits (as uint32 words) modulo 2³²:

    c = Σᵢ wᵢ · bitsᵢ,   wᵢ odd

An integer sum that wraps is associative and commutative, so it is the same for any
sharding, reduction order or device count, and since every weight is odd, any change to a
single element changes it (w·Δ ≢ 0 mod 2³² for odd w and Δ ≢ 0). The second sum, with
other weights over the bits mixed with their upper half, makes a coincidence over several
changed elements a 2⁻⁶⁴ event. This is a check against damage, not against tampering.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# weights w = i·2k + 1 (odd); k = 2³²/φ spreads consecutive indices over the words
_STEP_1 = np.uint32(2 * 0x9E3779B1 % 2**32)
_STEP_2 = np.uint32(2 * 0x85EBCA6B % 2**32)


def _words(x: jax.Array) -> jax.Array:
    """uint32 raw bits of ``x``, same shape (16- and 8-bit values widened; 64-bit values
    split over a new last axis of 2). Never reshaped: a sharded leaf stays where it is."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 row-major position of every element of an array of ``shape`` (mod 2³²)."""
    i = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        i = i + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return i


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[2] uint32 checksum of one array."""
    bits = _words(x)
    i = _flat_index(bits.shape)
    w1 = i * _STEP_1 + 1
    w2 = i * _STEP_2 + 1
    mixed = bits ^ (bits >> 16) ^ (bits << 7)
    return jnp.stack([jnp.sum(bits * w1, dtype=jnp.uint32), jnp.sum(mixed * w2, dtype=jnp.uint32)])


_checksums = jax.jit(lambda leaves: [_leaf_checksum(x) for x in leaves])


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def tree_checksums(tree: Any) -> dict[str, str]:
    """``{leaf path: "<dtype>:<16 hex digits>"}`` for every array leaf of ``tree`` (other
    leaves, e.g. Python scalars, are left out). Works on arrays sharded over a mesh, also
    across processes (the sums are replicated scalars)."""
    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if _is_array(x)]
    if not leaves:
        return {}
    sums = _checksums([jnp.asarray(x) if isinstance(x, np.ndarray) else x for _, x in leaves])
    out = {}
    for (name, x), s in zip(leaves, sums):
        lo, hi = (int(v) for v in np.asarray(s.addressable_data(0)))
        out[name] = f"{x.dtype}:{hi:08x}{lo:08x}"
    return out


def checksum_mismatches(saved: dict[str, str], restored: Any, limit: int = 5) -> list[str]:
    """Leaves of ``restored`` whose values differ from the ones ``saved`` was taken of
    (leaves restored with another dtype, e.g. a cast on restore, are not compared)."""
    now = tree_checksums(restored)
    bad = []
    for name, want in saved.items():
        got = now.get(name)
        if got is None or got.split(":")[0] != want.split(":")[0]:
            continue
        if got != want:
            bad.append(name)
    return bad[:limit] + ([f"... ({len(bad) - limit} more)"] if len(bad) > limit else [])
