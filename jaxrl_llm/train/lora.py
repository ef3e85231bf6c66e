"""LoRA for the policy: train low-rank adapters of chosen projection matrices instead of
all parameters, as a parameter transformation (no change to the model code).

For a target weight W with input dims I and output dims O (flattened):
  W_eff = W + (alpha / rank) · reshape(A @ B),   A: [prod(I), r] ~ N(0, 1/prod(I)), B: [r, prod(O)] = 0
so training starts exactly at the base model. A decoder stored stacked
(`scan_layers=True`, leading [n] layers axis under `stacks`) gets stacked adapters,
A: [n, prod(I), r], B: [n, r, prod(O)], one independent pair per layer as unrolled. Only {A, B} are trained and checkpointed;
the base weights stay frozen; the final model has the adapters merged in.

References:
  Hu et al. 2021, LoRA, https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jaxrl_llm.train.validation import check_int_field, check_real

# How many leading dims are the input side, for weights that are not [in, out].
_INPUT_RANK = {"o_proj": 2}  # [H, Hd, D]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Attributes:
      rank: adapter rank r (0: LoRA off — all parameters train).
      alpha: scaling numerator (the update is scaled by alpha / rank).
      targets: parameter names to adapt (attention and MLP projections by default).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self):
        check_int_field("rank", self.rank, 0, why="0: LoRA off")
        if self.rank:
            check_real("alpha", self.alpha, low=0, low_open=True, why="the adapters' update is scaled by alpha / rank")
            targets = self.targets
            if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(f"targets must be a non-empty list of parameter names when rank > 0 (LoRA on), "
                                 f"got {self.targets!r}")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]


def _target(path, config: LoRAConfig) -> str | None:
    hits = [n for n in _names(path) if n in config.targets]
    return hits[-1] if hits else None


def _key(path) -> str:
    """A checkpoint-safe flat key for a parameter path."""
    return re.sub(r"[^A-Za-z0-9]+", "_", jax.tree_util.keystr(path)).strip("_")


def _is_stacked(path) -> bool:
    """A weight of a stacked decoder run (`scan_layers=True`): leading [n] layers axis."""
    return "stacks" in _names(path)


def init_lora(params: Any, config: LoRAConfig, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Adapters {flat key: {"a": [in, r], "b": [r, out]}} for every targeted 2-D+ weight
    (expert-stacked MoE weights are left out); [n, in, r] / [n, r, out] for a weight of a
    stacked decoder run of n layers."""
    adapters = {}
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for i, (path, w) in enumerate(leaves):
        name = _target(path, config)
        lead = w.shape[:1] if _is_stacked(path) else ()  # (n,) when stacked
        if name is None or w.ndim - len(lead) < 2 or "experts" in _names(path):
            continue
        n_in = len(lead) + _INPUT_RANK.get(name, 1)
        fan_in, fan_out = math.prod(w.shape[len(lead) : n_in]), math.prod(w.shape[n_in:])
        key = jax.random.fold_in(rng, i)
        adapters[_key(path)] = {
            "a": jax.random.normal(key, (*lead, fan_in, config.rank), jnp.float32) / math.sqrt(fan_in),
            "b": jnp.zeros((*lead, config.rank, fan_out), jnp.float32),
        }
    if not adapters:
        raise ValueError(f"LoRA targets {config.targets} match no parameter of the model")
    return adapters


def apply_lora(params: Any, adapters: dict, config: LoRAConfig) -> Any:
    """Base params with the scaled adapter products added (same tree as ``params``)."""
    scale = config.alpha / config.rank

    def add(path, w):
        adapter = adapters.get(_key(path))
        if adapter is None:
            return w
        delta = (adapter["a"] @ adapter["b"]).reshape(w.shape) * scale  # batched over layers
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(add, params)


def count(adapters: dict) -> int:
    """Number of trainable adapter scalars."""
    return sum(x.size for x in jax.tree.leaves(adapters))
