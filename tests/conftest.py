"""Test-wide setup: simulate an 8-device CPU mesh before JAX is imported anywhere, and
share compiled programs between tests through JAX's persistent compilation cache (the
tiny models of many tests compile to the same programs)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAXRL_LLM_TEST_CACHE", os.path.join(tempfile.gettempdir(), "jaxrl_llm_test_jax_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
