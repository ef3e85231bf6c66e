"""Scalar heads on the transformer backbone: per-token values (PPO critic) and sequence
rewards (reward model).

`ScalarHeadModel` = `Transformer` backbone + `score` [D, 1] on the final normed hidden
state, like transformers' `*ForSequenceClassification` with num_labels=1 (whose
`score.weight` loads here, see `hf_io.load_hf(kind="reward")`). Pooling:
  "none": values [B, T] (one per token; value head),
  "last": the value at the LAST VALID token of each row ([B]; right or left padding,
          never a padding position),
  "mean": the masked mean over valid tokens ([B]).

Shapes: B batch, T length, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxrl_llm import ops
from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.moe import make_param
from jaxrl_llm.models.transformer import Transformer
from jaxrl_llm.ops.checks import check_mask, check_rank, check_same_shape

Array = jax.Array
POOLS = ("none", "last", "mean")


def last_valid_index(mask: Array) -> Array:
    """[B] index of the rightmost position with mask 1 (0 for an all-zero row, so it is
    always a valid gather index; ``ops.last_valid_index`` gives −1 there)."""
    return jnp.maximum(ops.last_valid_index(mask), 0)


def pool_values(values: Array, mask: Array, pool: str) -> Array:
    """Pools per-token values [B, T] with mask [B, T] by `pool` (see module docstring)."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; expected one of {POOLS}.")
    check_rank(2, hint="[B, T]", values=values)
    check_same_shape(values=values, mask=mask)
    check_mask(mask=mask)
    if pool == "none":
        return values
    if pool == "last":
        idx = last_valid_index(mask)
        return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]
    if pool == "mean":
        m = mask.astype(jnp.float32)
        return jnp.sum(values * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    raise ValueError(f"pool={pool!r}; expected one of {POOLS}.")


@struct.dataclass
class ScalarHeadOutput:
    """Outputs of `ScalarHeadModel.forward`.

    Attributes:
      scores: [B] pooled scores, or [B, T] when pool="none"; float32.
      values: [B, T] float32 per-token head outputs.
      routing: [M, B, T, k] int32 expert choices (MoE) or None.
      aux_loss: [] float32 MoE load-balancing loss (0 if dense).
    """

    scores: Array
    values: Array
    routing: Array | None
    aux_loss: Array


class ScalarHeadModel(nnx.Module):
    """Backbone + linear scalar head.

    Args:
      config: architecture.
      pool: "none" (per-token values), "last" (reward at last valid token) or "mean".
      rngs, param_dtype, dtype, remat, attention_impl, moe_impl, scan_layers: as `CausalLM`.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        pool: str = "last",
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        remat: bool = False,
        attention_impl: str = "xla",
        moe_impl: str = "dense",
        scan_layers: bool = False,
    ):
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}; expected one of {POOLS}.")
        self.config = config
        self.pool = pool
        self.model = Transformer(
            config,
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=dtype,
            remat=remat,
            attention_impl=attention_impl,
            moe_impl=moe_impl,
            scan_layers=scan_layers,
        )
        self.score = make_param(rngs, (config.hidden_size, 1), ("embed", None), param_dtype)

    def forward(
        self,
        tokens: Array,
        positions: Array | None = None,
        *,
        attention_mask: Array | None = None,
        routing: Array | None = None,
    ) -> ScalarHeadOutput:
        """tokens [B, T]; positions [B, T] (default cumsum(mask) − 1); attention_mask
        [B, T]; routing [M, B, T, k] (MoE replay)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.bool_)
        hidden, _, out_routing, aux = self.model(
            tokens, positions, attention_mask=attention_mask, routing=routing
        )
        values = jnp.einsum(
            "btd,do->bto",
            hidden,
            self.score[...].astype(hidden.dtype),
            preferred_element_type=jnp.float32,
        )[..., 0]
        scores = pool_values(values, attention_mask, self.pool)
        return ScalarHeadOutput(scores=scores, values=values, routing=out_routing, aux_loss=aux["load_balance"])

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        *,
        attention_mask: Array | None = None,
        routing: Array | None = None,
    ) -> Array:
        """Scores: [B] (pool "last"/"mean") or [B, T] (pool "none"), float32."""
        return self.forward(
            tokens, positions, attention_mask=attention_mask, routing=routing
        ).scores


class ValueModel(ScalarHeadModel):
    """Per-token value head (PPO critic): `ScalarHeadModel` with pool="none"."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, **kwargs):
        kwargs.setdefault("pool", "none")
        super().__init__(config, rngs=rngs, **kwargs)


class RewardModel(ScalarHeadModel):
    """Sequence reward at the last valid token: `ScalarHeadModel` with pool="last"."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, **kwargs):
        kwargs.setdefault("pool", "last")
        super().__init__(config, rngs=rngs, **kwargs)
