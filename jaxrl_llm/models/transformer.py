"""Decoder-only transformer (llama / mistral / qwen2 / qwen3 / mixtral / qwen3_moe) in NNX.

Pre-norm blocks: RMSNorm → GQA attention with RoPE → residual → RMSNorm → SwiGLU MLP
(or top-k MoE, `moe.py`) → residual; final RMSNorm; output matrix (`unembed`, tied to
the embedding or not).

Attention masks: a query attends a key slot iff the slot holds a real token
(`attention_mask`/cache validity), the slot is not after the query's slot (causal), and,
for sliding-window layers, `q_position - k_position < W`. So right- and left-padded
batches both work; padded query rows only see themselves (no NaN).

KV cache (`KVCache`): static shapes for jitted decoding. `model.init_cache(B, S)` gives
an empty cache; a call with `cache=` writes the new tokens' keys/values at
`cache.index`, attends over all S slots with the mask above, and returns the advanced
cache. Prefill a [B, P] prompt into a cache of size P + max_new, then decode [B, 1] at a
time (e.g. in `lax.while_loop`). Positions are explicit per token; when omitted they
continue each row from `cache.next_position` (or `cumsum(attention_mask) − 1`).

Parameters carry logical axis names ('vocab', 'embed', 'heads', 'kv_heads', 'head_dim',
'mlp', 'experts', 'norm') for `parallel/` to map onto a mesh.

Scanned decoder (`scan_layers=True`, opt-in): runs of consecutive identical blocks
(`block_runs`) are *stored* stacked — one `Block` per run whose parameters carry a
leading [n] axis (logical name 'layers'), at `model.stacks.<run>` instead of
`model.layers.<i>` — and go through one `lax.scan`, so XLA compiles one block body per
run and the optimizer updates n layers per kernel: compile time nearly flat in depth for
forward, decoding and the training update alike. Same outputs and gradients as the
unrolled loop; `stack_layers` / `unstack_layers` (`layer_stacking.py`) convert a model
between the two layouts, and the HF loader / exporter go through them
(`benchmarks/README.md`, "Compile time: scanned layers").

Shapes: B batch, T new tokens, S cache slots, D model dim, H heads, K kv heads,
Hd head dim, F MLP width, V vocab, N layers, M MoE layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrl_llm.models.config import ModelConfig
from jaxrl_llm.models.moe import MoEMLP, make_param
from jaxrl_llm.parallel.sharding import constrain
from jaxrl_llm.ops.checks import (
    check_int,
    check_leading_dim,
    check_mask,
    check_rank,
    check_same_shape,
    check_token_ids,
)

Array = jax.Array
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "einsum")


# ----------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [Hd/2] float32, with "linear"/"llama3" scaling applied.

    inv_freq_i = θ^(−2i/Hd); linear: / factor; llama3: wavelengths above
    original_max/low_freq_factor divided by factor, below original_max/high_freq_factor
    kept, smooth interpolation between (Llama 3.1 report; transformers' rope utils).
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotates x [B, T, N, Hd] by angles positions [B, T] · inv_freq (half-split layout)."""
    chex.assert_rank(x, 4)
    chex.assert_rank(positions, 2)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Hd/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _check_routing(routing: Array, expected: tuple[int, ...]) -> None:
    if tuple(routing.shape) != expected:
        raise ValueError(
            f"routing has shape {tuple(routing.shape)}, expected [M, B, T, k] = {expected} "
            "(MoE layers, batch, length, experts per token)"
        )


def make_attention_mask(
    q_slots: Array, q_positions: Array, kv_valid: Array, kv_positions: Array, window: int | None
) -> Array:
    """Boolean attention mask [B, T, S].

    Args:
      q_slots: [T] int slot of each query (its own key slot).
      q_positions: [B, T] int RoPE position of each query.
      kv_valid: [B, S] bool, slot holds a real token.
      kv_positions: [B, S] int position of the token in each slot.
      window: sliding window W or None.
    """
    slots = jnp.arange(kv_valid.shape[1])
    causal = slots[None, None, :] <= q_slots[None, :, None]
    allowed = kv_valid[:, None, :] & causal
    if window is not None:
        allowed &= (q_positions[:, :, None] - kv_positions[:, None, :]) < window
    own = slots[None, None, :] == q_slots[None, :, None]
    return allowed | own


def reference_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Plain einsum GQA attention (reference for tests).

    Args:
      q: [B, T, H, Hd]; k, v: [B, S, K, Hd]; mask: [B, T, S] bool.

    Returns:
      [B, T, H, Hd].
    """
    b, t, h, hd = q.shape
    groups = h // k.shape[2]
    qg = q.reshape(b, t, k.shape[2], groups, hd).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(hd)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", weights, v.astype(jnp.float32))
    return out.reshape(b, t, h, hd).astype(q.dtype)


def attend(q: Array, k: Array, v: Array, mask: Array, impl: str = "xla") -> Array:
    """GQA attention via `jax.nn.dot_product_attention` (impl "xla"/"cudnn"/"auto") or
    the einsum reference ("einsum"). Shapes as `reference_attention`."""
    if impl == "einsum":
        return reference_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], implementation=None if impl == "auto" else impl
    )


def default_positions(attention_mask_: Array, start: Array | None = None) -> Array:
    """Positions [B, T] = start + cumsum(mask) − 1, clipped at start (works for left and
    right padding)."""
    mask = attention_mask_.astype(jnp.int32)
    pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    if start is not None:
        pos = pos + start[:, None]
    return pos


# ----------------------------------------------------------------------------------------
# Cache and outputs
# ----------------------------------------------------------------------------------------


@struct.dataclass
class KVCache:
    """Static-shape key/value cache.

    Attributes:
      k, v: [N, B, S, K, Hd] keys (after RoPE) / values of every layer.
      valid: [B, S] bool, slot holds a real (non-padding) token.
      positions: [B, S] int32 position of the token in each slot.
      next_position: [B] int32, one past the largest valid position written per row.
      index: [] int32, next slot to write (shared by all rows).
    """

    k: Array
    v: Array
    valid: Array
    positions: Array
    next_position: Array
    index: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def repeat(self, num: int) -> KVCache:
        """Repeats each row `num` times (group layout: row b → rows b·num … b·num+num−1)."""
        return KVCache(
            k=jnp.repeat(self.k, num, axis=1),
            v=jnp.repeat(self.v, num, axis=1),
            valid=jnp.repeat(self.valid, num, axis=0),
            positions=jnp.repeat(self.positions, num, axis=0),
            next_position=jnp.repeat(self.next_position, num, axis=0),
            index=self.index,
        )


@struct.dataclass
class CausalLMOutput:
    """Outputs of `CausalLM.forward`.

    Attributes:
      logits: [B, T, V] float32, or None when `return_hidden=True`.
      hidden: [B, T, D] final (normed) hidden states, compute dtype.
      cache: the advanced KVCache, or None.
      routing: [M, B, T, k] int32 chosen experts per MoE layer, or None (dense model).
      aux_loss: [] float32 load-balancing loss averaged over MoE layers (0 if dense).
      router_z_loss: [] float32 router z-loss averaged over MoE layers (0 if dense).
    """

    logits: Array | None
    hidden: Array
    cache: KVCache | None
    routing: Array | None
    aux_loss: Array
    router_z_loss: Array | None = None


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """y = scale · x / sqrt(mean(x²) + eps), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with RoPE, optional q/k/v bias (qwen2) and q/k norm (qwen3)."""

    def __init__(
        self, config: ModelConfig, *, rngs: nnx.Rngs, param_dtype, dtype, impl: str = "xla"
    ):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype = dtype
        self.impl = impl
        self.config = config
        self.q_proj = make_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = make_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), param_dtype)
        if config.qkv_bias:
            self.q_bias = make_param(rngs, (h, hd), ("heads", "head_dim"), param_dtype, "zeros")
            self.k_bias = make_param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, "zeros")
            self.v_bias = make_param(rngs, (kv, hd), ("kv_heads", "head_dim"), param_dtype, "zeros")
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, eps=config.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, eps=config.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def _project(self, x, w, b, norm):
        y = jnp.einsum("btd,dnh->btnh", x, w[...].astype(self.dtype))
        if b is not None:
            y = y + b[...].astype(self.dtype)
        if norm is not None:
            y = norm(y)
        return y

    def __call__(
        self,
        x: Array,
        positions: Array,
        mask: Array,
        kv: tuple[Array, Array] | None,
        index: Array | None,
        layer: int | Array = 0,
    ):
        """x [B, T, D], positions [B, T], mask [B, T, S]; kv: the whole cache (k, v)
        [N, B, S, K, Hd] (this layer's new keys/values are written in place at
        [layer, :, index]) or None (then S = T). `layer` is a Python int, or a traced []
        int32 (the scanned decoder, `Transformer(scan_layers=True)`). Returns
        (y [B, T, D], kv)."""
        inv_freq = rope_inv_freq(self.config)
        q = apply_rope(self._project(x, self.q_proj, self.q_bias, self.q_norm), positions, inv_freq)
        k = apply_rope(self._project(x, self.k_proj, self.k_bias, self.k_norm), positions, inv_freq)
        v = self._project(x, self.v_proj, self.v_bias, None)
        if kv is not None:
            zero = jnp.zeros((), jnp.int32)
            start = (jnp.asarray(layer, jnp.int32), zero, index, zero, zero)
            k_all = jax.lax.dynamic_update_slice(kv[0], k[None].astype(kv[0].dtype), start)
            v_all = jax.lax.dynamic_update_slice(kv[1], v[None].astype(kv[1].dtype), start)
            kv = (k_all, v_all)
            if isinstance(layer, int):
                k, v = k_all[layer], v_all[layer]
            else:  # traced layer index (inside lax.scan over layers)
                k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
        out = attend(q, k.astype(self.dtype), v.astype(self.dtype), mask, self.impl)
        y = jnp.einsum("btnh,nhd->btd", out, self.o_proj[...].astype(self.dtype))
        return y, kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(x·W_gate) ⊙ x·W_up)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs, param_dtype, dtype
    ):
        self.dtype = dtype
        self.gate_proj = make_param(
            rngs, (hidden_size, intermediate_size), ("embed", "mlp"), param_dtype
        )
        self.up_proj = make_param(
            rngs, (hidden_size, intermediate_size), ("embed", "mlp"), param_dtype
        )
        self.down_proj = make_param(
            rngs, (intermediate_size, hidden_size), ("mlp", "embed"), param_dtype
        )

    def __call__(self, x: Array) -> Array:
        gate = x @ self.gate_proj[...].astype(self.dtype)
        up = x @ self.up_proj[...].astype(self.dtype)
        return (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(self.dtype)


class Block(nnx.Module):
    """One pre-norm decoder block (attention + dense or MoE MLP)."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        impl: str = "xla",
        moe_impl: str = "dense",
    ):
        self.dtype = dtype
        self.layer = layer
        self.window = config.layer_window(layer)
        self.is_moe = config.is_moe_layer(layer)
        eps = config.rms_norm_eps
        self.input_norm = RMSNorm(config.hidden_size, eps=eps, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(config, rngs=rngs, param_dtype=param_dtype, dtype=dtype, impl=impl)
        self.post_attn_norm = RMSNorm(
            config.hidden_size, eps=eps, rngs=rngs, param_dtype=param_dtype
        )
        if self.is_moe:
            self.mlp = MoEMLP(
                config.hidden_size,
                config.moe_intermediate_size,
                config.num_experts,
                config.num_experts_per_tok,
                norm_topk_prob=config.norm_topk_prob,
                rngs=rngs,
                param_dtype=param_dtype,
                dtype=dtype,
                impl=moe_impl,
            )
        else:
            self.mlp = MLP(
                config.hidden_size,
                config.intermediate_size,
                rngs=rngs,
                param_dtype=param_dtype,
                dtype=dtype,
            )

    def __call__(self, x, positions, mask, kv, index, routing, token_mask, layer=None):
        """Returns (x [B, T, D], kv cache or None, indices [B, T, k] or None, aux [2] =
        (load-balancing loss, router z-loss), zeros for a dense block).

        `layer`: this block's index in the KV cache; default `self.layer`. The scanned
        decoder passes a traced index instead (one block body serves a run of layers,
        so the static `self.layer` of the run's first block must not be read)."""
        layer = self.layer if layer is None else layer
        h, kv = self.attn(self.input_norm(x), positions, mask, kv, index, layer)
        x = x + h
        h = self.post_attn_norm(x)
        if self.is_moe:
            h, indices, aux = self.mlp(h, routing=routing, mask=token_mask)
        else:
            h, indices, aux = self.mlp(h), None, jnp.zeros((2,), jnp.float32)
        return x + h, kv, indices, aux


class Transformer(nnx.Module):
    """Backbone: embedding, decoder blocks, final norm. Returns normed hidden states.

    `scan_layers=True` stores each run of consecutive identical blocks (same structure,
    sliding window and dense/MoE kind; `block_runs`) as one `Block` with stacked [n, ...]
    parameters (`self.stacks[r]`, layers `self.stack_ranges[r]` = [start, stop)) and runs
    it as one `jax.lax.scan`, so XLA compiles one block body per run instead of one per
    layer, for the forward and its gradient, and the gradient arrives stacked (no
    per-layer slices for the optimizer). Unrolled (default): `self.layers[i]`.
    See `benchmarks/README.md`, "Compile time: scanned layers".
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        remat: bool = False,
        attention_impl: str = "xla",
        moe_impl: str = "dense",
        scan_layers: bool = False,
    ):
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={attention_impl!r}; expected one of {ATTENTION_IMPLS}."
            )
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embed = make_param(
            rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), param_dtype
        )
        blocks = [
            Block(
                config,
                i,
                rngs=rngs,
                param_dtype=param_dtype,
                dtype=dtype,
                impl=attention_impl,
                moe_impl=moe_impl,
            )
            for i in range(config.num_layers)
        ]
        if scan_layers:
            # built per layer first, so a scanned model has the unrolled one's weights
            self.set_stacks(blocks)
        else:
            self.layers = nnx.List(blocks)
        self.norm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, param_dtype=param_dtype
        )

    def set_stacks(self, blocks: list[Block]) -> None:
        """Stores `blocks` (the decoder, per layer, in order) stacked: one `stack_blocks`
        per `block_runs` range (`self.stacks`, `self.stack_ranges`), no `self.layers`."""
        runs = block_runs(blocks)
        self.stack_ranges = tuple(runs)
        self.stacks = nnx.List([stack_blocks(blocks[start:stop]) for start, stop in runs])
        if "layers" in vars(self):
            del self.layers

    def set_layers(self, blocks: list[Block]) -> None:
        """Stores `blocks` per layer (`self.layers`), the unrolled decoder."""
        self.layers = nnx.List(blocks)
        for name in ("stacks", "stack_ranges"):
            if name in vars(self):
                delattr(self, name)

    @property
    def scan_layers(self) -> bool:
        """Whether the decoder is stored stacked. Read-only: the layout is the parameter
        tree's, so convert with `layer_stacking.stack_layers` / `unstack_layers`."""
        return "stacks" in vars(self)

    def blocks(self) -> list[Block]:
        """The decoder as per-layer `Block`s (slices of the stacks when scanned: new
        arrays, not views — for conversion and inspection, not for training)."""
        if not self.scan_layers:
            return list(self.layers)
        return [
            block
            for stack, (start, stop) in zip(self.stacks, self.stack_ranges)
            for block in unstack_block(stack, start, stop - start)
        ]

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        cache: KVCache | None = None,
        *,
        attention_mask: Array | None = None,
        routing: Array | None = None,
        segment_ids: Array | None = None,
    ):
        """Returns (hidden [B, T, D], cache, routing [M, B, T, k] or None, aux) where aux is
        {"load_balance": [], "router_z": []} averaged over MoE layers (0 for dense models).

        ``segment_ids`` [B, T] (packed rows, no cache): a token attends only to earlier
        tokens of the same segment, so packed examples never see each other.
        """
        config = self.config
        check_rank(2, hint="[B, T]", tokens=tokens)
        check_int(tokens=tokens)
        b, t = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        check_same_shape(tokens=tokens, attention_mask=attention_mask)
        check_mask(attention_mask=attention_mask)
        # concrete (eager) calls only: an id past the table would embed as NaN, silently
        check_token_ids(config.vocab_size, mask=attention_mask, tokens=tokens)
        if cache is not None:
            check_leading_dim("tokens", tokens, **{"cache (batch size)": cache.valid})
        token_valid = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = default_positions(
                token_valid, None if cache is None else cache.next_position
            )
        check_same_shape(tokens=tokens, positions=positions)
        positions = positions.astype(jnp.int32)
        if routing is not None:
            _check_routing(routing, (config.num_moe_layers, b, t, config.num_experts_per_tok))

        if cache is None:
            index = None
            q_slots = jnp.arange(t)
            kv_valid, kv_positions = token_valid, positions
            new_cache = None
        else:
            _check_cache_room(cache, t)
            index = cache.index
            q_slots = index + jnp.arange(t)
            kv_valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, index))
            kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            new_next = jnp.maximum(
                cache.next_position, jnp.max(jnp.where(token_valid, positions + 1, 0), axis=1)
            )
            new_cache = cache.replace(
                valid=kv_valid,
                positions=kv_positions,
                next_position=new_next.astype(jnp.int32),
                index=index + t,
            )

        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        masks = {}
        for window in {blk.window for blk in (self.stacks if self.scan_layers else self.layers)}:
            masks[window] = make_attention_mask(q_slots, positions, kv_valid, kv_positions, window)
            if segment_ids is not None:
                check_same_shape(tokens=tokens, segment_ids=segment_ids)
                same = segment_ids[:, :, None] == segment_ids[:, None, :]
                masks[window] = masks[window] & (same | jnp.eye(t, dtype=bool)[None])

        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        all_indices, aux_total = [], jnp.zeros((2,), jnp.float32)
        kv = None if cache is None else (cache.k, cache.v)
        moe_i = 0
        if self.scan_layers:
            for stack, (start, stop) in zip(self.stacks, self.stack_ranges):
                num_moe = (stop - start) if stack.is_moe else 0
                run_routing = None
                if num_moe and routing is not None:
                    run_routing = routing[moe_i : moe_i + num_moe]
                x, kv, indices, aux_total = _scan_blocks(
                    stack, start, stop - start, self.remat,
                    x, positions, masks[stack.window], kv, index, run_routing, token_valid, aux_total,
                )
                if num_moe:
                    all_indices.extend(indices[j] for j in range(num_moe))
                    moe_i += num_moe
        else:
            for block in self.layers:
                layer_routing = None
                if block.is_moe and routing is not None:
                    layer_routing = routing[moe_i]
                call = _remat_block if self.remat else _call_block
                # Rows split over the mesh's batch axes at every block boundary: without the
                # hint XLA may keep activations replicated over fsdp (a no-op without a mesh).
                x = constrain(x, ("batch", "length", "embed"))
                x, kv, indices, aux = call(
                    block, x, positions, masks[block.window], kv, index, layer_routing, token_valid
                )
                x = constrain(x, ("batch", "length", "embed"))
                if block.is_moe:
                    all_indices.append(indices)
                    aux_total = aux_total + aux
                    moe_i += 1
        hidden = self.norm(x)
        if cache is not None:
            new_cache = new_cache.replace(k=kv[0], v=kv[1])
        out_routing = jnp.stack(all_indices) if all_indices else None
        aux = aux_total / max(moe_i, 1)
        return hidden, new_cache, out_routing, {"load_balance": aux[0], "router_z": aux[1]}


def _check_cache_room(cache: KVCache, t: int) -> None:
    """Raises if writing t tokens would run past the cache (checked when not traced; under
    jit the write would be clamped, so callers size the cache as P + max_new)."""
    if t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit a KVCache of max_len={cache.max_len}.")
    try:
        index = int(cache.index)
    except jax.errors.ConcretizationTypeError:
        return
    if index + t > cache.max_len:
        raise ValueError(
            f"KVCache overflow: writing {t} tokens at index {index} exceeds "
            f"max_len={cache.max_len}; init_cache with max_len >= prompt + new tokens."
        )


def _call_block(block, *args):
    return block(*args)


def _scan_signature(block: Block):
    """What must match for two blocks to share one scanned body: the block's graphdef
    (module types, static attributes — window, MoE or dense, dtypes, attention impl —,
    parameter names and metadata) with `Block.layer`, the one attribute that differs by
    index alone, neutralised. Parameter shapes and dtypes are checked when stacking."""
    graphdef = nnx.graphdef(block)
    attributes = getattr(graphdef, "attributes", None)
    if attributes is None or not dataclasses.is_dataclass(graphdef):
        # unknown GraphDef layout (another flax version): every block is its own run,
        # i.e. the unrolled decoder (correct, just not compile-time flat)
        return graphdef
    neutral = tuple((name, None) if name == "layer" else (name, value) for name, value in attributes)
    return dataclasses.replace(graphdef, attributes=neutral)


def block_runs(blocks: list[Block]) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive blocks of equal `_scan_signature`, which
    `scan_layers=True` stores stacked and runs as one `lax.scan` each. E.g. llama:
    [(0, N)]; qwen3_moe with `mlp_only_layers=(0,)`: [(0, 1), (1, N)]; alternating
    dense/MoE layers: all of length 1."""
    runs: list[tuple[int, int]] = []
    previous = None
    for i, block in enumerate(blocks):
        signature = _scan_signature(block)
        if runs and signature == previous:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
        previous = signature
    return runs


def layer_runs(model: Transformer) -> list[tuple[int, int]]:
    """The [start, stop) layer ranges `model` runs as one block each: its stacks'
    ranges when scanned, else one range per layer."""
    if model.scan_layers:
        return list(model.stack_ranges)
    return [(i, i + 1) for i in range(len(model.layers))]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _with_layers_axis(variable: nnx.Variable, value: Array, add: bool) -> nnx.Variable:
    """`variable` holding `value`, its logical axis names with a leading 'layers' added
    (`add`) or removed."""
    metadata = {}
    for key in ("out_sharding", "sharding_names"):
        names = variable.get_metadata().get(key)
        if names is not None:
            metadata[key] = ("layers", *names) if add else tuple(names)[1:]
    return variable.replace(value=value, **metadata)


def stack_blocks(blocks: list[Block]) -> Block:
    """One `Block` (the first's structure) whose parameters are the blocks' stacked on a
    new leading [n] axis, named 'layers' in the sharding metadata. The blocks must be one
    `block_runs` range (equal structure; `jnp.stack` checks the shapes)."""
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(block) for block in blocks]

    def stack(*variables):
        value = jnp.stack([v.get_value() for v in variables])
        return _with_layers_axis(variables[0], value, add=True)

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_variable))


def unstack_block(stack: Block, start: int, size: int) -> list[Block]:
    """The `size` per-layer `Block`s (layers start, start + 1, …) of a stacked block."""
    graphdef, state = nnx.split(stack)
    blocks = []
    for j in range(size):
        sliced = jax.tree.map(
            lambda v, j=j: _with_layers_axis(v, v.get_value()[j], add=False), state, is_leaf=_is_variable
        )
        block = nnx.merge(graphdef, sliced)
        block.layer = start + j  # the one static attribute that differs within a run
        blocks.append(block)
    return blocks


def _scan_blocks(stack, start, size, remat, x, positions, mask, kv, index, routing, token_mask, aux_total):
    """Runs a stacked block (layers start … start + size − 1) as one `lax.scan`.

    The scan body merges one layer's slice of the stored [size, ...] parameters into the
    block's graphdef and calls it with the traced layer index, which picks the layer's
    slice of the stacked KV cache (updated in place in the carry). Nothing is stacked per
    call, so the gradient of the parameters arrives stacked too. The activation sharding
    hints of the unrolled loop sit inside the body; with `remat` the body is
    rematerialised (`jax.checkpoint`), i.e. per block as in the unrolled decoder.

    Args:
      stack: a `stack_blocks` Block.
      start, size: its first layer and number of layers.
      routing: [size, B, T, k] replayed expert choices of these (MoE) layers, or None.
      aux_total: [2] running sum of MoE aux losses (carried, summed in layer order).

    Returns:
      (x, kv, indices [size, B, T, k] or None (dense), aux_total).
    """
    graphdef, stacked = nnx.split(stack)
    layers = jnp.arange(start, start + size, dtype=jnp.int32)
    is_moe = stack.is_moe

    def body(carry, xs):
        x, kv, aux_total = carry
        state, layer, layer_routing = xs
        block = nnx.merge(graphdef, state)
        x = constrain(x, ("batch", "length", "embed"))
        x, kv, indices, aux = block(
            x, positions, mask, kv, index, layer_routing, token_mask, layer=layer
        )
        x = constrain(x, ("batch", "length", "embed"))
        if is_moe:
            aux_total = aux_total + aux
        return (x, kv, aux_total), indices

    if remat:
        # prevent_cse=False is safe (and cheaper) inside scan (jax.checkpoint docs)
        body = jax.checkpoint(body, prevent_cse=False)
    (x, kv, aux_total), indices = jax.lax.scan(
        body, (x, kv, aux_total), (stacked, layers, routing)
    )
    return x, kv, indices, aux_total


@partial(nnx.remat, prevent_cse=True)
def _remat_block(block, *args):
    return block(*args)


class CausalLM(nnx.Module):
    """Causal language model: `Transformer` backbone + output matrix.

    Args:
      config: architecture.
      rngs: parameter initialisation RNGs.
      param_dtype: storage dtype of parameters.
      dtype: compute dtype of activations (logits are always float32).
      remat: wrap every decoder block in `jax.checkpoint`.
      attention_impl: "xla" (default), "cudnn", "auto" (jax picks) or "einsum".
      moe_impl: MoE expert computation, "dense" (default) or "ragged" (`moe.py`).
      scan_layers: store runs of identical decoder blocks stacked ([n, ...] parameters
        at `model.stacks.<r>`) and run each as one `lax.scan` (same weights as built
        unrolled from the same `rngs`, same results; see `Transformer`). Compile time of
        the training update, log-prob passes and decoding is then nearly flat in depth.
        `layer_stacking.stack_layers` / `unstack_layers` convert a built or loaded model.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        remat: bool = False,
        attention_impl: str = "xla",
        moe_impl: str = "dense",
        scan_layers: bool = False,
    ):
        self.config = config
        self.dtype = dtype
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
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = make_param(
                rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), param_dtype
            )

    @property
    def unembed(self) -> Array:
        """Output matrix [D, V] (tied: embedding transpose), for `logprobs_from_hidden`."""
        if self.lm_head is None:
            return self.model.embed[...].T
        return self.lm_head[...]

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KVCache for `batch` rows and `max_len` slots (dtype: compute dtype)."""
        return init_cache(self.config, batch, max_len, dtype or self.dtype)

    def forward(
        self,
        tokens: Array,
        positions: Array | None = None,
        cache: KVCache | None = None,
        *,
        attention_mask: Array | None = None,
        return_hidden: bool = False,
        routing: Array | None = None,
        segment_ids: Array | None = None,
    ) -> CausalLMOutput:
        """Full forward.

        Args:
          tokens: [B, T] int token ids.
          positions: [B, T] int RoPE positions; default: cumsum(attention_mask) − 1
            (continuing from `cache.next_position` when a cache is given).
          cache: KVCache to write into and attend over, or None.
          attention_mask: [B, T] 1 for real tokens, 0 for padding (default all 1).
          return_hidden: skip the output projection (`logits` is None).
          routing: [M, B, T, k] int32 recorded expert choices to replay (MoE only).
          segment_ids: [B, T] int example id of each token in packed rows (no cache);
            attention stays within a segment. Pass per-example ``positions`` with it.

        Returns:
          CausalLMOutput.
        """
        hidden, cache, out_routing, aux = self.model(
            tokens, positions, cache, attention_mask=attention_mask, routing=routing,
            segment_ids=segment_ids,
        )
        logits = None
        if not return_hidden:
            logits = jnp.einsum(
                "btd,dv->btv",
                hidden,
                self.unembed.astype(hidden.dtype),
                preferred_element_type=jnp.float32,
            )
        return CausalLMOutput(
            logits=logits, hidden=hidden, cache=cache, routing=out_routing,
            aux_loss=aux["load_balance"], router_z_loss=aux["router_z"],
        )

    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        cache: KVCache | None = None,
        *,
        attention_mask: Array | None = None,
        return_hidden: bool = False,
        routing: Array | None = None,
    ) -> tuple[Array, KVCache | None]:
        """Returns (logits [B, T, V] float32 — or hidden [B, T, D] if return_hidden —,
        cache). Arguments as `forward`; use `forward` for MoE routing / aux loss."""
        out = self.forward(
            tokens,
            positions,
            cache,
            attention_mask=attention_mask,
            return_hidden=return_hidden,
            routing=routing,
        )
        return (out.hidden if return_hidden else out.logits), out.cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KVCache: k/v zeros [N, B, S, K, Hd], nothing valid, index 0."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), jnp.bool_),
        positions=jnp.zeros((batch, max_len), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
