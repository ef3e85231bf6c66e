"""Shared helpers for model tests: tiny random transformers (PyTorch) checkpoints and
padded token batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 128


def hf_config_dict(family: str, *, tie: bool = False, **overrides) -> dict:
    """Kwargs for a tiny transformers config of `family` (2 layers, D=32)."""
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
    )
    if family == "qwen3":
        cfg.update(head_dim=16)  # explicit head_dim != hidden / heads
    if family == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen3_moe":
        cfg.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            head_dim=16,
        )
    if family == "mistral":
        cfg.update(sliding_window=None)
    cfg.update(overrides)
    return cfg


def make_hf_model(
    family: str, *, tie: bool = False, seed: int = 0, head: str = "causal_lm", **overrides
):
    """A tiny transformers model with O(1) random weights (eval mode, float32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.for_model(family, **hf_config_dict(family, tie=tie, **overrides))
    torch.manual_seed(seed)
    if head == "causal_lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.15 * noise)
    return model.eval()


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(
    rng: np.random.Generator, lengths, total: int, side: str, vocab: int = VOCAB, low: int = 1
):
    """(tokens [B, L] int32, mask [B, L] int32, positions [B, L] int32) with the given
    valid lengths padded on `side` (pad id 0); positions = cumsum(mask) − 1 clipped at 0."""
    b = len(lengths)
    tokens = rng.integers(low, vocab, size=(b, total)).astype(np.int32)
    steps = np.arange(total)[None]
    lengths = np.asarray(lengths)[:, None]
    mask = (steps < lengths) if side == "right" else (steps >= total - lengths)
    mask = mask.astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def scale_params(model, scale: float = 7.5, seed: int = 0):
    """Multiplies every non-norm parameter of an NNX model by `scale` (0.02 init → O(1)
    logits) and jitters norm scales, in place."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten_with_path(state)
    key = jax.random.key(seed)
    new = []
    for path, leaf in leaves:
        key, sub = jax.random.split(key)
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            new.append(leaf + 0.2 * jax.random.normal(sub, leaf.shape, leaf.dtype))
        else:
            new.append(leaf * scale)
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def max_diff_valid(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max |a − b| over positions with mask 1 (a, b: [B, L, V])."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max(axis=-1)
    return float(np.max(np.where(mask == 1, diff, 0.0)))


def as_jnp(*xs):
    return tuple(jnp.asarray(x) for x in xs)


def small_config(family: str = "llama", **overrides):
    """ModelConfig with exactly the dims of `hf_config_dict(family)` (so every test shares
    the same shapes and JAX's compiled-op cache), with ModelConfig field overrides."""
    from jaxrl_llm.models import ModelConfig

    return ModelConfig.from_hf({"model_type": family, **hf_config_dict(family)}).replace(
        **overrides
    )


def small_model(family: str = "llama", seed: int = 0, **overrides):
    """CausalLM of `small_config(family)` with O(1) random weights."""
    from flax import nnx

    from jaxrl_llm.models import CausalLM

    return scale_params(CausalLM(small_config(family, **overrides), rngs=nnx.Rngs(seed)), seed=seed)
