"""Generation: logit filters and the jitted KV-cache sampler."""

from jaxrl_llm.rollout.filters import (
    FILTER_VALUE,
    apply_temperature,
    greedy_logits,
    is_kept,
    min_p_filter,
    process_logits,
    repetition_penalty,
    sample_token,
    top_k_filter,
    top_p_filter,
    validate_sampling_args,
)

__all__ = [
    "FILTER_VALUE",
    "apply_temperature",
    "greedy_logits",
    "is_kept",
    "min_p_filter",
    "process_logits",
    "repetition_penalty",
    "sample_token",
    "top_k_filter",
    "top_p_filter",
    "validate_sampling_args",
]

from jaxrl_llm.rollout.sampler import Rollout, apply_stop_strings, generate, left_align  # noqa: E402

__all__ += ["Rollout", "apply_stop_strings", "generate", "left_align"]
