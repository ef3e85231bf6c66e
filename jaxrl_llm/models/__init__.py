"""Flax NNX decoder-only transformers with Hugging Face interop.

Families llama, mistral, qwen2, qwen3, mixtral, qwen3_moe; KV-cache decoding; value and
reward heads; MoE routing record/replay; a byte-level `CharTokenizer` for tiny models.
"""

from jaxrl_llm.models.config import FAMILIES, ModelConfig, tiny_config
from jaxrl_llm.models.heads import (
    POOLS,
    RewardModel,
    ScalarHeadModel,
    ScalarHeadOutput,
    ValueModel,
    last_valid_index,
    pool_values,
)
from jaxrl_llm.models.hf_io import load_hf, load_tokenizer, read_config, save_hf
from jaxrl_llm.models.moe import MoEMLP, load_balancing_loss, route
from jaxrl_llm.models.tokenizer import CharTokenizer
from jaxrl_llm.models.transformer import (
    ATTENTION_IMPLS,
    CausalLM,
    CausalLMOutput,
    KVCache,
    Transformer,
    count_params,
    init_cache,
    reference_attention,
)

__all__ = [
    "ATTENTION_IMPLS",
    "FAMILIES",
    "POOLS",
    "CausalLM",
    "CausalLMOutput",
    "CharTokenizer",
    "KVCache",
    "ModelConfig",
    "MoEMLP",
    "RewardModel",
    "ScalarHeadModel",
    "ScalarHeadOutput",
    "Transformer",
    "ValueModel",
    "count_params",
    "init_cache",
    "last_valid_index",
    "load_balancing_loss",
    "load_hf",
    "load_tokenizer",
    "pool_values",
    "read_config",
    "reference_attention",
    "route",
    "save_hf",
    "tiny_config",
]
