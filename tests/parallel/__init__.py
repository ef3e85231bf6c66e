"""Tests for jaxrl_llm.parallel."""
