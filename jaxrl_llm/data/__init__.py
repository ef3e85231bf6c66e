"""Datasets, batching and candidate post-processing."""

from jaxrl_llm.data.candidates import (
    CandidateStats,
    dedup_within_groups,
    filter_candidates,
    group_kept_counts,
)
from jaxrl_llm.data.padding import bucket_length, pad_rows
from jaxrl_llm.data.preferences import (
    KwiseBatch,
    PreferenceBatch,
    PreferenceLoader,
    PreferenceStats,
    cohens_kappa,
    collate_kwise,
    collate_pairs,
    expand_kwise_to_pairs,
    preferences_from_scores,
    tokenize_preferences,
)
from jaxrl_llm.data.prompts import PromptBatch, PromptLoader, PromptStats, collate_prompts, tokenize_prompts
from jaxrl_llm.data.records import load_records, rename_columns, save_records, validate_records
from jaxrl_llm.data.sampler import BatchLoader, EpochSampler
from jaxrl_llm.data.sft import SFTBatch, SFTLoader, SFTStats, collate_sft, pack_examples, tokenize_sft
from jaxrl_llm.data.tokenization import (
    decode_ids,
    encode_text,
    eos_id,
    pad_id,
    render_prompt,
    response_text,
)

__all__ = [
    "CandidateStats", "dedup_within_groups", "filter_candidates", "group_kept_counts",
    "bucket_length", "pad_rows",
    "KwiseBatch", "PreferenceBatch", "PreferenceLoader", "PreferenceStats", "cohens_kappa",
    "collate_kwise", "collate_pairs", "expand_kwise_to_pairs", "preferences_from_scores",
    "tokenize_preferences",
    "PromptBatch", "PromptLoader", "PromptStats", "collate_prompts", "tokenize_prompts",
    "load_records", "rename_columns", "save_records", "validate_records",
    "BatchLoader", "EpochSampler",
    "SFTBatch", "SFTLoader", "SFTStats", "collate_sft", "pack_examples", "tokenize_sft",
    "decode_ids", "encode_text", "eos_id", "pad_id", "render_prompt", "response_text",
]
