"""Token-level divergences between a student and a teacher language model (distillation).

`distill_divergence` works from the two models' final hidden states and unembedding
matrices, a chunk of tokens at a time (`lax.scan` over chunks, each step under
`jax.checkpoint`), so neither model's float32 `[B, T, V]` logits are ever built: not in
the forward pass and not in the backward pass, which recomputes each chunk's logits.
`divergence_from_logits` is the same math on materialised logits (small vocabularies,
tests). Gradients reach the student only: the teacher's inputs are `stop_gradient`.

With p the teacher's and q the student's next-token distribution at a position, both
softmax(logits / temperature):

  forward_kl:  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)       (mean-seeking, classic KD)
  reverse_kl:  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)       (mode-seeking)
  jsd:         JSD(β)    = β·KL(p ‖ m) + (1 − β)·KL(q ‖ m),  m = β·p + (1 − β)·q

JSD(β) is the generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024, eq. in
§3) and of TRL's ``GKDTrainer.generalized_jsd_loss`` (same β: the weight of the teacher
in the mixture). β = 0.5 is the symmetric JSD. It vanishes at both ends; the KLs are
its normalised limits: JSD(β)/β → KL(p ‖ q) (forward) as β → 0 and
JSD(β)/(1 − β) → KL(q ‖ p) (reverse) as β → 1. TRL's ``beta=0`` / ``beta=1`` special
cases compute exactly those KLs, i.e. our ``kind="forward_kl"`` / ``"reverse_kl"``.

All math runs in float32 whatever the input dtype; outputs are float32.
"""

from __future__ import annotations

import functools
import math
import numbers

import chex
import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.ops.checks import check_leading_dim, check_mask, check_rank
from jaxrl_llm.ops.masked import _masked_mean, aggregate_loss, upcast

__all__ = ["DISTILL_KINDS", "distill_divergence", "distill_loss", "divergence_from_logits"]

DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")

# Contract the last axis of the left operand with the first axis of the right one.
_MATMUL_DIMS = (((1,), (0,)), ((), ()))


def _check_options(kind, beta, temperature, teacher_top_k, vocab) -> None:
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {DISTILL_KINDS}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd' (the teacher's weight in the mixture; "
                         f"use kind='forward_kl' / 'reverse_kl' for the limits 0 / 1), got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_top_k is not None:
        is_int = isinstance(teacher_top_k, numbers.Integral) and not isinstance(teacher_top_k, bool)
        if not is_int or not 1 <= teacher_top_k <= vocab:
            raise ValueError(f"teacher_top_k must be None or an int in [1, V={vocab}], got {teacher_top_k!r}")


def _kl_terms(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
    """Σ_v a_v (log a_v − log b_v) over the last axis, with 0·log 0 read as 0."""
    a = jnp.exp(log_a)
    return jnp.sum(jnp.where(a > 0, a * (log_a - jnp.where(a > 0, log_b, 0.0)), 0.0), axis=-1)


def _row_divergence(student_logits, teacher_logits, *, kind, beta, temperature, teacher_top_k):
    """Divergence per row of `[..., V]` float32 logits → `[...]` (teacher already constant).

    With ``teacher_top_k = k`` the support is the teacher's k largest logits: the teacher
    is renormalised over them and the student is restricted to the same k entries and
    renormalised too, so all three kinds stay finite proper divergences (a reverse KL or
    JSD against a teacher with zero mass off its top-k would otherwise be infinite).
    """
    s = student_logits / temperature
    t = teacher_logits / temperature
    if teacher_top_k is not None:
        t, idx = lax.top_k(t, teacher_top_k)
        s = jnp.take_along_axis(s, idx, axis=-1)
    log_q = jax.nn.log_softmax(s, axis=-1)
    log_p = jax.nn.log_softmax(t, axis=-1)
    if kind == "forward_kl":
        return _kl_terms(log_p, log_q)
    if kind == "reverse_kl":
        return _kl_terms(log_q, log_p)
    log_m = jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
    return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)


def _position_mask(mask, reference):
    if mask is None:
        return None
    check_rank(2, hint="[B, T]", mask=mask)
    check_leading_dim("student_hidden", reference, dims=2, mask=mask)
    check_mask(mask=mask)
    return jnp.asarray(mask) > 0


def divergence_from_logits(
    student_logits: chex.Array,
    teacher_logits: chex.Array,
    mask: chex.Array | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_top_k: int | None = None,
) -> jax.Array:
    """Per-token divergence from materialised logits (see the module docstring).

    Args:
      student_logits, teacher_logits: `[B, T, V]` float.
      mask: optional `[B, T]` 0/1; masked positions give exactly 0 and gradient 0.
      kind, beta, temperature, teacher_top_k: as in `distill_divergence`.

    Returns:
      `[B, T]` float32 ≥ 0.
    """
    check_rank(3, hint="[B, T, V]", student_logits=student_logits, teacher_logits=teacher_logits)
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(f"teacher_logits has shape {jnp.shape(teacher_logits)}, expected "
                         f"{jnp.shape(student_logits)} (the shape of student_logits)")
    _check_options(kind, beta, temperature, teacher_top_k, jnp.shape(student_logits)[-1])
    valid = _position_mask(mask, student_logits)
    s = upcast(student_logits)
    t = lax.stop_gradient(upcast(teacher_logits))
    if valid is not None:
        s, t = jnp.where(valid[..., None], s, 0.0), jnp.where(valid[..., None], t, 0.0)
    out = _row_divergence(s, t, kind=kind, beta=beta, temperature=temperature, teacher_top_k=teacher_top_k)
    return out if valid is None else jnp.where(valid, out, 0.0)


def _chunk_logits(hidden_chunk, unembed):
    """`[C, D] @ [D, V] -> [C, V]` float32 logits (float32 accumulation for bf16 inputs)."""
    return lax.dot_general(hidden_chunk, unembed, _MATMUL_DIMS, preferred_element_type=jnp.float32)


def distill_divergence(
    student_hidden: chex.Array,
    student_unembed: chex.Array,
    teacher_hidden: chex.Array,
    teacher_unembed: chex.Array,
    mask: chex.Array | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 256,
    teacher_top_k: int | None = None,
) -> jax.Array:
    """Per-token student–teacher divergence from hidden states, in chunks of tokens.

    Equals ``divergence_from_logits(student_hidden @ student_unembed,
    teacher_hidden @ teacher_unembed, mask, ...)`` without materialising either
    `[B, T, V]` logits tensor: the B·T tokens are flattened, padded to a multiple of
    ``chunk_size`` and processed ``chunk_size`` at a time by a ``lax.scan`` whose body is
    ``jax.checkpoint``-ed, so the backward pass recomputes each chunk's two `[C, V]`
    logits blocks instead of storing them. Peak extra memory is a few float32
    `[chunk_size, V]` blocks (plus the float32 `[D, V]` gradient of ``student_unembed``),
    independent of B·T. Chunks take strided tokens of the flattened axis (as
    ``logprobs_from_hidden``), so a batch sharded over devices stays shard-local.

    Gradients flow to ``student_hidden`` and ``student_unembed`` only; the teacher's
    hidden states and unembedding are constants (``stop_gradient``). ``temperature``
    divides both models' logits (as TRL's GKD; no T² rescaling of the result).

    References:
      Hinton et al. 2015, Distilling the Knowledge in a Neural Network,
        https://arxiv.org/abs/1503.02531 (forward KL, temperature)
      Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD),
        https://arxiv.org/abs/2306.13649 (generalised JSD(β), reverse KL)
      Gu et al. 2024, MiniLLM, https://arxiv.org/abs/2306.08543 (reverse KL)

    Args:
      student_hidden: `[B, T, D]` float, the student's final hidden states.
      student_unembed: `[D, V]` float, the student's output projection.
      teacher_hidden: `[B, T, Dt]` float, the teacher's final hidden states (Dt may
        differ from D).
      teacher_unembed: `[Dt, V]` float, the teacher's output projection (same V: a
        shared tokenizer).
      mask: optional `[B, T]` 0/1, 1 on positions that count. Masked positions give
        exactly 0 and gradient 0; their hidden states are replaced by 0 before the
        matmuls, so NaN / inf of padded rows reach neither value nor gradient.
      kind: one of DISTILL_KINDS: "forward_kl" KL(teacher ‖ student), "reverse_kl"
        KL(student ‖ teacher), "jsd" (generalised JSD with weight ``beta``).
      beta: β in (0, 1), the teacher's weight in JSD's mixture (jsd only).
      temperature: τ > 0, both logits are divided by it.
      chunk_size: static int > 0, flattened tokens per chunk (clipped to B·T).
      teacher_top_k: None, or k in [1, V]: keep only the teacher's k largest logits
        (renormalised) and restrict the student to the same k entries (renormalised).

    Returns:
      `[B, T]` float32 per-token divergence ≥ 0 (0 at masked positions).
    """
    check_rank(3, hint="[B, T, D]", student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    check_rank(2, hint="[D, V]", student_unembed=student_unembed, teacher_unembed=teacher_unembed)
    check_leading_dim("student_hidden", student_hidden, dims=2, teacher_hidden=teacher_hidden)
    for name, h, w in (("student", student_hidden, student_unembed), ("teacher", teacher_hidden, teacher_unembed)):
        if h.shape[-1] != w.shape[0]:
            raise ValueError(f"{name}_unembed must have shape [D, V] with D = {name}_hidden.shape[-1] = "
                             f"{h.shape[-1]}, got {w.shape}")
    if student_unembed.shape[1] != teacher_unembed.shape[1]:
        raise ValueError(f"teacher_unembed has V = {teacher_unembed.shape[1]} but student_unembed has "
                         f"V = {student_unembed.shape[1]}: student and teacher must share one vocabulary")
    _check_options(kind, beta, temperature, teacher_top_k, student_unembed.shape[1])
    is_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not is_int or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    teacher_hidden = lax.stop_gradient(teacher_hidden)
    teacher_unembed = lax.stop_gradient(teacher_unembed)
    valid = _position_mask(mask, student_hidden)
    if valid is not None:
        student_hidden = jnp.where(valid[..., None], student_hidden, jnp.zeros((), student_hidden.dtype))
        teacher_hidden = jnp.where(valid[..., None], teacher_hidden, jnp.zeros((), teacher_hidden.dtype))

    batch, length, _ = student_hidden.shape
    num_tokens = batch * length
    if num_tokens == 0:
        return jnp.zeros((batch, length), jnp.float32)
    chunk = min(int(chunk_size), num_tokens)
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    # Chunk m holds the strided tokens {m, m + M, ...} of the flattened axis: [N, D] is
    # viewed as [chunk, M, D] (free) and moved to [M, chunk, D] for the scan's xs, which
    # keeps the (possibly sharded) token axis inside every chunk.
    def to_chunks(x):
        x = jnp.pad(x.reshape(num_tokens, x.shape[-1]), [(0, pad), (0, 0)])
        return jnp.swapaxes(x.reshape(chunk, num_chunks, x.shape[-1]), 0, 1)

    row_fn = functools.partial(_row_divergence, kind=kind, beta=beta, temperature=temperature,
                               teacher_top_k=teacher_top_k)

    @jax.checkpoint
    def body(_, xs):
        h_s, h_t = xs
        s_logits = _chunk_logits(h_s, student_unembed)
        t_logits = lax.stop_gradient(_chunk_logits(h_t, teacher_unembed))
        return None, row_fn(s_logits, t_logits)

    _, out = lax.scan(body, None, (to_chunks(student_hidden), to_chunks(teacher_hidden)))  # [M, chunk]
    out = out.T.reshape(-1)[:num_tokens].reshape(batch, length)
    return out if valid is None else jnp.where(valid, out, 0.0)


def distill_loss(
    per_token: chex.Array, mask: chex.Array, agg: str = "token_mean"
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Aggregates a per-token divergence ``[B, T]`` (e.g. ``distill_divergence``) to a loss.

      loss = aggregate_loss(per_token, mask, agg)

    Args:
      per_token: [B, T] float divergence.
      mask: [B, T] 0/1, 1 on tokens that count.
      agg: a mode of ``aggregate_loss`` (AGGREGATION_MODES).

    Returns:
      (loss, metrics) with ``divergence`` (token mean over valid tokens, a constant).
    """
    loss = aggregate_loss(per_token, mask, agg)
    token_mean = lax.stop_gradient(_masked_mean(upcast(per_token), jnp.asarray(mask) > 0))
    return loss, {"divergence": token_mean}
