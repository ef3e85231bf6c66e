"""A tiny decoder-only LM annotated with logical axis names, for the parallel tests.

embed [V, D] → 2 × (RMSNorm, GQA attention with q/k/v/o projections, RMSNorm,
SwiGLU MLP) → RMSNorm → unembed [D, V]. Every parameter follows the project
convention ``nnx.Param(value, out_sharding=(logical names...), eager_sharding=False)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.parallel import constrain


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab: int = 32
    embed: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 4
    mlp: int = 32
    layers: int = 2


def _param(rngs: nnx.Rngs, shape, names, scale=None):
    scale = 1.0 / np.sqrt(shape[0]) if scale is None else scale
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int):
        self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * self.scale[...]


class Block(nnx.Module):
    def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
        D, H, K, Hd, F = cfg.embed, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.mlp
        self.attn_norm = RMSNorm(D)
        self.q = _param(rngs, (D, H, Hd), ("embed", "heads", "head_dim"))
        self.k = _param(rngs, (D, K, Hd), ("embed", "kv_heads", "head_dim"))
        self.v = _param(rngs, (D, K, Hd), ("embed", "kv_heads", "head_dim"))
        self.o = _param(rngs, (H, Hd, D), ("heads", "head_dim", "embed"), scale=1.0 / np.sqrt(H * Hd))
        self.mlp_norm = RMSNorm(D)
        self.gate = _param(rngs, (D, F), ("embed", "mlp"))
        self.up = _param(rngs, (D, F), ("embed", "mlp"))
        self.down = _param(rngs, (F, D), ("mlp", "embed"))
        self.groups = H // K

    def __call__(self, x):  # x: [B, T, D]
        T = x.shape[1]
        h = self.attn_norm(x)
        q = jnp.einsum("BTD,DHK->BTHK", h, self.q[...])
        k = jnp.repeat(jnp.einsum("BTD,DHK->BTHK", h, self.k[...]), self.groups, axis=2)
        v = jnp.repeat(jnp.einsum("BTD,DHK->BTHK", h, self.v[...]), self.groups, axis=2)
        s = jnp.einsum("BTHK,BSHK->BHTS", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -1e30)
        a = jnp.einsum("BHTS,BSHK->BTHK", jax.nn.softmax(s, axis=-1), v)
        x = x + jnp.einsum("BTHK,HKD->BTD", a, self.o[...])
        x = constrain(x, ("batch", "length", "embed"))
        h = self.mlp_norm(x)
        g = jax.nn.silu(h @ self.gate[...]) * (h @ self.up[...])
        x = x + g @ self.down[...]
        return constrain(x, ("batch", "length", "embed"))


class ToyLM(nnx.Module):
    def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
        self.embed = _param(rngs, (cfg.vocab, cfg.embed), ("vocab", "embed"), scale=1.0)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.final_norm = RMSNorm(cfg.embed)
        self.unembed = _param(rngs, (cfg.embed, cfg.vocab), ("embed", "vocab"))

    def __call__(self, tokens):  # tokens: [B, T] int32 → logits [B, T, V] float32
        table = constrain(self.embed[...], ("vocab", None))  # all-gather over fsdp before the lookup
        x = jnp.take(table, tokens, axis=0)
        x = constrain(x, ("batch", "length", "embed"))
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x) @ self.unembed[...]


def make_toy(seed: int = 0, cfg: ToyConfig = ToyConfig()) -> ToyLM:
    return ToyLM(cfg, rngs=nnx.Rngs(seed))


def token_loss(model: ToyLM, batch):
    """Next-token NLL: (sum over valid tokens, (number of valid tokens, metrics)).

    batch: {'tokens': [B, T] int32, 'mask': [B, T] float32 (1 on tokens to predict)}.
    """
    tokens, mask = batch["tokens"], batch["mask"]
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = mask[:, 1:]
    loss_sum = jnp.sum(nll * m)
    num_tokens = jnp.sum(m)
    return loss_sum, (num_tokens, {"max_nll": jnp.max(jnp.where(m > 0, nll, 0.0))})


def make_batch(batch_size: int = 16, seq_len: int = 9, vocab: int = 32, seed: int = 0, ragged: bool = True):
    """Random tokens and a right-padded mask with very different valid lengths per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
    if ragged:
        lengths = rng.integers(1, seq_len + 1, batch_size)
        lengths[: batch_size // 2] = np.minimum(lengths[: batch_size // 2], 2)  # short first half
    else:
        lengths = np.full(batch_size, seq_len)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float32)
    return {"tokens": tokens, "mask": mask}
