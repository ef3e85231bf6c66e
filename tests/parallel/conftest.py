"""Shared fixtures for the parallel tests: one eagerly initialised toy model per session."""

import jax
import pytest
from flax import nnx

from .toy_model import make_toy


@pytest.fixture(scope="session")
def toy_state():
    """Host copy of the state of ``make_toy(seed=0)`` built eagerly (slow: done once)."""
    return jax.device_get(nnx.state(make_toy(seed=0)))


@pytest.fixture
def toy(toy_state):
    """A fresh toy model (seed 0) that a test may re-place in place."""
    model = nnx.eval_shape(make_toy)
    nnx.update(model, toy_state)
    return model
