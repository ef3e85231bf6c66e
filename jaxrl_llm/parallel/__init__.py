"""jaxrl_llm.parallel."""
