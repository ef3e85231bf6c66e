"""Datasets, batching and candidate post-processing."""

from jaxrl_llm.data.candidates import (
    CandidateStats,
    dedup_within_groups,
    filter_candidates,
    group_kept_counts,
)

__all__ = ["CandidateStats", "dedup_within_groups", "filter_candidates", "group_kept_counts"]
