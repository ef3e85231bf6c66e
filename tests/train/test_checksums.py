"""Checkpoint checksums: a numpy loop of the formula, invariance to sharding, and that any
changed element changes the checksum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_llm.train.checksums import checksum_mismatches, tree_checksums


def reference_checksum(x: np.ndarray) -> str:
    """The docstring's formula, one element at a time, in Python integers."""
    bits = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64)
    c1 = c2 = 0
    for i, b in enumerate(int(v) for v in bits):
        mixed = (b ^ (b >> 16) ^ (b << 7)) % 2**32
        c1 = (c1 + (i * (2 * 0x9E3779B1) + 1) * b) % 2**32
        c2 = (c2 + (i * (2 * 0x85EBCA6B) + 1) * mixed) % 2**32
    return f"{x.dtype}:{c2:08x}{c1:08x}"


@pytest.mark.parametrize("dtype", ["float32", "int32", "uint32", "bfloat16", "float16", "int8", "bool"])
def test_matches_the_formula(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 7)) * 100).astype(dtype)
    got = tree_checksums({"x": x})["['x']"]
    assert got == reference_checksum(np.asarray(x).astype(np.uint8) if dtype == "bool" else np.asarray(x)).replace(
        "uint8", "bool")


def test_same_for_every_sharding():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 48))
    want = tree_checksums({"w": x})
    for shape, spec in (((8,), jax.P("a")), ((4, 2), jax.P("a", "b")), ((2, 4), jax.P(None, ("a", "b")))):
        mesh = jax.make_mesh(shape, ("a", "b")[: len(shape)])
        assert tree_checksums({"w": jax.device_put(x, jax.NamedSharding(mesh, spec))}) == want, shape


@settings(max_examples=40, deadline=None)
@given(i=st.integers(0, 12 * 9 - 1), bit=st.integers(0, 31))
def test_any_single_bit_flip_is_detected(i, bit):
    x = np.random.default_rng(1).normal(size=(12, 9)).astype(np.float32)
    flipped = x.copy().reshape(-1).view(np.uint32)
    flipped[i] ^= np.uint32(1 << bit)
    saved = tree_checksums({"p": {"w": jnp.asarray(x)}})
    assert checksum_mismatches(saved, {"p": {"w": jnp.asarray(flipped.view(np.float32).reshape(12, 9))}}) == ["['p']['w']"]
    assert checksum_mismatches(saved, {"p": {"w": jnp.asarray(x)}}) == []


def test_swapped_elements_and_other_leaves():
    x = jnp.arange(10, dtype=jnp.float32)
    saved = tree_checksums({"a": x, "b": jnp.zeros(3), "step": 4, "key": jax.random.key(0)})
    assert set(saved) == {"['a']", "['b']", "['key']"}  # Python scalars are not arrays
    assert checksum_mismatches(saved, {"a": x[::-1], "b": jnp.zeros(3), "key": jax.random.key(0)}) == ["['a']"]
    assert checksum_mismatches(saved, {"a": x, "b": jnp.zeros(3), "key": jax.random.key(1)}) == ["['key']"]
    # a leaf restored in another dtype (a cast on restore) is not compared
    assert checksum_mismatches(saved, {"a": x.astype(jnp.bfloat16), "b": jnp.zeros(3), "key": jax.random.key(0)}) == []
