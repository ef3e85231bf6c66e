"""Functional view of an NNX policy for jitted training: split once into (graphdef,
params, rest), then compute response log-probs from params without full logits.

Shapes: N rows, P prompt length, T response length, L = P + T, D model dim, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.ops.logprobs import logprobs_from_hidden
from jaxrl_llm.parallel.placement import MeshConfig, Placement


class SplitModel(NamedTuple):
    """A model as (static graph, trainable params, everything else)."""

    graphdef: Any
    params: Any
    rest: Any

    def merge(self, params=None) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params if params is None else params, self.rest)


def as_model(policy: Any) -> nnx.Module:
    """A model object as is, or a CausalLM loaded from a local HF checkpoint path."""
    if isinstance(policy, nnx.Module):
        return policy
    if isinstance(policy, str):
        from jaxrl_llm.models.hf_io import load_hf

        model, _ = load_hf(policy)
        return model
    raise ValueError(f"policy must be an NNX model or a local checkpoint path, got {type(policy).__name__}")


def model_config_of(model: Any) -> Any:
    """The ``ModelConfig`` of an NNX model or of a local HF checkpoint (read, not loaded)."""
    if isinstance(model, str):
        from jaxrl_llm.models.hf_io import read_config

        return read_config(model)[0]
    return getattr(model, "config", None)


def make_placement(mesh: MeshConfig, model: Any, rows: dict[str, int]) -> Placement:
    """The run's :class:`Placement`: ``mesh`` checked against the batch ``rows``
    (``{config field: row count}``) and the policy's head count."""
    return Placement.create(mesh, rows=rows, model_config=model_config_of(model))


def placed_model(model: Any, placement: Placement, **load_kwargs) -> nnx.Module:
    """A model on the run's mesh: an NNX model is placed by the rules in place; a local HF
    checkpoint path is streamed tensor by tensor straight into its sharding."""
    return placement.model(model if isinstance(model, str) else as_model(model), **load_kwargs)


def split_model(model: nnx.Module) -> SplitModel:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return SplitModel(graphdef, params, rest)


class ResponseLogprobs(NamedTuple):
    """Per-token outputs of a teacher-forced forward over prompt + response.

    Attributes:
      logprobs: [N, T] float32 log π(response token).
      entropy: [N, T] float32 entropy of π at each response position.
      routing: [M, N, L, k] int32 expert choices (MoE) or None.
      aux_loss: [] float32 MoE load-balancing loss (0 for dense models).
      router_z_loss: [] float32 MoE router z-loss (0 for dense models).
    """

    logprobs: jax.Array
    entropy: jax.Array
    routing: jax.Array | None
    aux_loss: jax.Array
    router_z_loss: jax.Array


def response_logprobs(
    model: nnx.Module,
    tokens: jax.Array,
    mask: jax.Array,
    prompt_len: int,
    *,
    routing: jax.Array | None = None,
    chunk_size: int = 1024,
) -> ResponseLogprobs:
    """Teacher-forced log-probs of the response tokens.

    ``tokens`` must hold left-aligned prompts (``Rollout.full_tokens``), so the hidden
    state at column P − 1 + t predicts response token t. Uses the chunked
    ``logprobs_from_hidden``: the float32 [N, T, V] logits are never materialised.

    Args:
      model: CausalLM.
      tokens: [N, L] int32, L = P + T.
      mask: [N, L] 1 on real tokens (prompt and response).
      prompt_len: P (static).
      routing: [M, N, L, k] recorded expert choices to replay (MoE), or None.
      chunk_size: tokens per chunk of the log-prob computation.
    """
    out = model.forward(tokens, attention_mask=mask, return_hidden=True, routing=routing)
    hidden = out.hidden[:, prompt_len - 1 : -1]
    targets = tokens[:, prompt_len:]
    logp, entropy = logprobs_from_hidden(hidden, model.unembed, targets, chunk_size=chunk_size)
    z = jnp.zeros((), jnp.float32) if out.router_z_loss is None else jnp.asarray(out.router_z_loss, jnp.float32)
    return ResponseLogprobs(logp, entropy, out.routing, jnp.asarray(out.aux_loss, jnp.float32), z)


def routing_change_fraction(recorded: jax.Array | None, current: jax.Array | None, mask: jax.Array) -> jax.Array:
    """Fraction of valid tokens (over MoE layers) whose expert set changed.

    Args:
      recorded, current: [M, N, L, k] int32 expert indices (or None: dense → 0).
      mask: [N, L] 1 on real tokens.
    """
    if recorded is None or current is None:
        return jnp.zeros((), jnp.float32)
    same = jnp.all(jnp.sort(recorded, axis=-1) == jnp.sort(current, axis=-1), axis=-1)  # [M, N, L]
    m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32)[None], same.shape)
    return jnp.sum((~same) * m) / jnp.maximum(jnp.sum(m), 1.0)
