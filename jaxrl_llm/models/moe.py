"""Mixture-of-experts feed-forward block: top-k router, SwiGLU experts, routing replay.

Router (mixtral, qwen3_moe): p = softmax(x · W_r) in float32; the k experts with the
largest p are chosen; their gates are p renormalised over the k chosen experts
(`norm_topk_prob`, always on for mixtral) or the raw p (qwen3_moe default).

Routing replay: the forward returns the chosen expert indices; passing recorded indices
back (`routing=`) makes a later forward (e.g. the training forward after the rollout) use
the same experts, with gates recomputed from the *current* router probabilities of those
experts (so the router still gets gradients), renormalised as above.

Two expert implementations, equal up to float rounding (no Python loop over experts):
  "dense":  every expert on every token, mixed by a sparse combine tensor [B, T, E];
            E/k times the FLOPs of the routed computation but plain einsums that shard
            naturally along the 'experts' axis. Default; right for small E.
  "ragged": tokens sorted by expert and run through `jax.lax.ragged_dot` (grouped
            matmul), only the k chosen experts per token; for large E.

Shapes: B batch, T tokens, D model dim, E experts, k experts per token, F expert width.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
INIT_STD = 0.02
MOE_IMPLS = ("dense", "ragged")


def make_param(rngs: nnx.Rngs, shape, names, param_dtype, init: str = "normal") -> nnx.Param:
    """A parameter annotated with logical axis names (one per dim; None = unsharded)."""
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"init={init!r}; expected 'normal', 'ones' or 'zeros'.")
    return nnx.Param(value.astype(param_dtype), out_sharding=tuple(names), eager_sharding=False)


def route(
    router_logits: Array, k: int, *, norm_topk_prob: bool, routing: Array | None = None
) -> tuple[Array, Array, Array]:
    """Top-k routing, or gates for replayed expert choices.

    Args:
      router_logits: [..., E] router scores.
      k: experts per token.
      norm_topk_prob: renormalise the k gates to sum to 1.
      routing: optional [..., k] int recorded expert indices to reuse.

    Returns:
      (gates [..., k] float32, indices [..., k] int32, probs [..., E] float32).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    if routing is None:
        gates, indices = jax.lax.top_k(probs, k)
    else:
        chex.assert_shape(routing, (*probs.shape[:-1], k))
        indices = routing
        gates = jnp.take_along_axis(probs, indices.astype(jnp.int32), axis=-1)
    if norm_topk_prob:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, indices.astype(jnp.int32), probs


def router_z_loss(router_logits: Array, mask: Array | None = None) -> Array:
    """Router z-loss of ST-MoE: mean over tokens of logsumexp(router logits)².

    Penalises large router logits, which keeps the softmax (and so the top-k choice) from
    becoming brittle — one of the known remedies for MoE RL instability.

    References:
      Zoph et al. 2022, ST-MoE, https://arxiv.org/abs/2202.08906 (eq. 5)

    Args:
      router_logits: [B, T, E] float router scores.
      mask: optional [B, T] 1 on real tokens.

    Returns:
      [] float32.
    """
    z = jnp.square(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1))
    if mask is None:
        return jnp.mean(z)
    m = mask.astype(jnp.float32)
    return jnp.sum(z * m) / jnp.maximum(jnp.sum(m), 1.0)


def load_balancing_loss(probs: Array, indices: Array, mask: Array | None = None) -> Array:
    """Switch/mixtral load-balancing loss of one MoE layer.

    aux = E · Σ_e f_e · P_e, with f_e = (1/N) Σ_t Σ_j 1[indices_tj = e] (share of tokens
    sent to expert e, summed over the k choices, as in transformers'
    `load_balancing_loss_func`) and P_e = (1/N) Σ_t probs_te; N counts valid tokens.
    Minimal (= k) when routing is uniform.

    References: Fedus et al. 2021, https://arxiv.org/abs/2101.03961 (eq. 4).

    Args:
      probs: [..., E] float32 router probabilities.
      indices: [..., k] int chosen experts.
      mask: optional [...] 1 for real tokens, 0 for padding.

    Returns:
      scalar float32.
    """
    num_experts = probs.shape[-1]
    probs = probs.reshape(-1, num_experts).astype(jnp.float32)
    counts = jax.nn.one_hot(
        indices.reshape(probs.shape[0], -1), num_experts, dtype=jnp.float32
    ).sum(axis=1)  # [N, E]
    if mask is None:
        weights = jnp.ones((probs.shape[0],), jnp.float32)
    else:
        weights = mask.reshape(-1).astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    frac = jnp.sum(counts * weights[:, None], axis=0) / denom
    mean_prob = jnp.sum(probs * weights[:, None], axis=0) / denom
    return num_experts * jnp.sum(frac * mean_prob)


def dense_experts(
    x: Array, indices: Array, gates: Array, w_gate: Array, w_up: Array, w_down: Array
) -> Array:
    """Σ_j gates_j · SwiGLU_{indices_j}(x), computing all experts.

    Args:
      x: [N, D]; indices, gates: [N, k]; w_gate, w_up: [E, D, F]; w_down: [E, F, D].

    Returns:
      [N, D].
    """
    num_experts = w_gate.shape[0]
    combine = jnp.sum(
        jax.nn.one_hot(indices, num_experts, dtype=jnp.float32)
        * gates[..., None].astype(jnp.float32),
        axis=-2,
    )  # [N, E]
    gate = jnp.einsum("nd,edf->nef", x, w_gate)
    up = jnp.einsum("nd,edf->nef", x, w_up)
    out = jnp.einsum("nef,efd->ned", jax.nn.silu(gate) * up, w_down)
    return jnp.einsum("ned,ne->nd", out, combine.astype(x.dtype))


def ragged_experts(
    x: Array, indices: Array, gates: Array, w_gate: Array, w_up: Array, w_down: Array
) -> Array:
    """Same as `dense_experts`, computing only the chosen experts: the N·k (token,
    expert) pairs are sorted by expert and multiplied with `jax.lax.ragged_dot`."""
    num_experts = w_gate.shape[0]
    k = indices.shape[-1]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x[token]  # [N·k, D]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)
    out = out * gates.reshape(-1)[order][:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[token].add(out)


class MoEMLP(nnx.Module):
    """Top-k routed SwiGLU experts.

    Parameters (logical axes): router [D, E] ('embed', None);
    gate_proj, up_proj [E, D, F] ('experts', 'embed', 'mlp'); down_proj [E, F, D].
    `impl`: "dense" or "ragged" (see module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        *,
        norm_topk_prob: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        impl: str = "dense",
    ):
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe impl={impl!r}; expected one of {MOE_IMPLS}.")
        self.impl = impl
        self.num_experts = num_experts
        self.k = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.dtype = dtype
        d, f, e = hidden_size, intermediate_size, num_experts
        self.router = make_param(rngs, (d, e), ("embed", None), param_dtype)
        self.gate_proj = make_param(rngs, (e, d, f), ("experts", "embed", "mlp"), param_dtype)
        self.up_proj = make_param(rngs, (e, d, f), ("experts", "embed", "mlp"), param_dtype)
        self.down_proj = make_param(rngs, (e, f, d), ("experts", "mlp", "embed"), param_dtype)

    def __call__(
        self, x: Array, *, routing: Array | None = None, mask: Array | None = None
    ) -> tuple[Array, Array, Array]:
        """Applies the MoE block.

        Args:
          x: [B, T, D] activations.
          routing: optional [B, T, k] int32 recorded expert indices (replay).
          mask: optional [B, T] token mask for the load-balancing loss.

        Returns:
          (y [B, T, D] in the compute dtype, indices [B, T, k] int32, aux [2] float32 =
          (load-balancing loss, router z-loss)).
        """
        chex.assert_rank(x, 3)
        x = x.astype(self.dtype)
        router_logits = jnp.einsum(
            "btd,de->bte", x.astype(jnp.float32), self.router[...].astype(jnp.float32)
        )
        gates, indices, probs = route(
            router_logits, self.k, norm_topk_prob=self.norm_topk_prob, routing=routing
        )
        b, t, d = x.shape
        experts = dense_experts if self.impl == "dense" else ragged_experts
        y = experts(
            x.reshape(b * t, d),
            indices.reshape(b * t, -1),
            gates.reshape(b * t, -1),
            self.gate_proj[...].astype(self.dtype),
            self.up_proj[...].astype(self.dtype),
            self.down_proj[...].astype(self.dtype),
        ).reshape(b, t, d)
        aux = jnp.stack([load_balancing_loss(probs, indices, mask), router_z_loss(router_logits, mask)])
        return y, indices, aux
