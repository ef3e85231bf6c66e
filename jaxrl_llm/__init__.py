"""jaxrl_llm: post-train language models with RL and preference optimisation in JAX."""

from jaxrl_llm import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
