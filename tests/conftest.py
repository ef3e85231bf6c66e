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


def _write_cache_entries_atomically() -> None:
    """JAX's file cache (``LRUCache.put``, eviction off) writes an entry in place, with
    no lock, so one xdist worker can read an entry the other is still writing and
    deserialize a partial executable: a segfault, seen once in a full run. Write to a
    temporary file and rename it: a reader sees a whole entry or none."""
    try:
        from jax._src import lru_cache
    except ImportError:  # another jax layout: keep its own writes
        return
    original = lru_cache.LRUCache.put

    def put(self, key: str, value: bytes) -> None:
        if getattr(self, "eviction_enabled", True) or not key:
            return original(self, key, value)  # locked path (or its own error)
        path = self.path / f"{key}{lru_cache._CACHE_SUFFIX}"
        if path.exists():
            return
        temporary = self.path / f".{key}.{os.getpid()}.tmp"
        temporary.write_bytes(value)
        os.replace(temporary, path)

    lru_cache.LRUCache.put = put


_write_cache_entries_atomically()
