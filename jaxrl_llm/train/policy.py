"""Functional view of an NNX policy for jitted training: split once into (graphdef,
params, rest), then compute response log-probs from params without full logits.

Shapes: N rows, P prompt length, T response length, L = P + T, D model dim, V vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.ops.checks import check_token_ids
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


SPECIAL_ID_ROLES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _vocab_size_of(model: Any) -> int | None:
    """``vocab_size`` of a ModelConfig, an NNX model or a local HF checkpoint path (None:
    no model, or one without a config)."""
    if model is None:
        return None
    config = model if hasattr(model, "vocab_size") and not isinstance(model, nnx.Module) else model_config_of(model)
    size = getattr(config, "vocab_size", None)
    return None if size is None else int(size)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """{role: id} of the tokenizer's bos / eos / pad / unk ids that are set (a list of eos
    ids, as some configs hold, gives one entry per id)."""
    out = {}
    for role in SPECIAL_ID_ROLES:
        value = getattr(tokenizer, role, None)
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            if v is not None:
                out[role if len(values) == 1 else f"{role}[{i}]"] = int(v)
    return out


def check_tokenizer_fits(model: Any, tokenizer: Any) -> None:
    """The tokenizer's ids all index the model's embedding table: ``len(tokenizer)`` ≤
    the model's ``vocab_size`` and its bos / eos / pad / unk ids are < ``vocab_size``.

    A smaller tokenizer is normal (embedding tables are often padded up to a multiple of
    64 or 128); a larger one means the tokenizer belongs to another model: its ids past
    the table would be clamped or turned into NaN by the gathers, silently. Call it at the
    start of training, before any weights are loaded.

    Args:
      model: a ModelConfig, an NNX model (its ``config``) or a local HF checkpoint path
        (its config.json is read, the weights are not loaded). None, or a model without a
        ``config.vocab_size``, is not checked (so optional models can be passed as they are).
      tokenizer: an HF tokenizer (``len(tokenizer)`` counts added tokens) or a
        ``CharTokenizer``.

    Raises:
      ValueError: naming both sizes and the special ids that do not fit, e.g. "tokenizer
        has 50257 tokens (eos_token_id=50256) but the model's vocab_size is 32000: they
        do not belong together".
    """
    vocab = _vocab_size_of(model)
    if vocab is None:
        return
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)
    bad_ids = {role: i for role, i in _special_ids(tokenizer).items() if not 0 <= i < vocab}
    if (size is None or int(size) <= vocab) and not bad_ids:
        return
    ids = ", ".join(f"{role}={i}" for role, i in bad_ids.items())
    what = " ".join(part for part in (f"has {int(size)} tokens" if size is not None else "", f"({ids})" if ids else "") if part)
    raise ValueError(
        f"tokenizer {what} but the model's vocab_size is {vocab}: they do not belong together "
        "(ids past the embedding table would silently become garbage; load the tokenizer saved with the model)"
    )


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

    Log-probs and entropies are 0 at response positions where ``mask`` is 0 (as
    ``Rollout.logprobs``), whatever the model's hidden states hold there: those rows are
    zeroed before the unembedding, so a NaN / inf hidden state of a padded row reaches
    neither a value nor a gradient. Concrete ``tokens`` (outside ``jit``) are checked to
    lie in [0, vocab_size).
    """
    check_token_ids(getattr(getattr(model, "config", None), "vocab_size", None), mask=mask, tokens=tokens)
    out = model.forward(tokens, attention_mask=mask, return_hidden=True, routing=routing)
    hidden = out.hidden[:, prompt_len - 1 : -1]
    targets = tokens[:, prompt_len:]
    logp, entropy = logprobs_from_hidden(hidden, model.unembed, targets, chunk_size=chunk_size,
                                         mask=mask[:, prompt_len:])
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
