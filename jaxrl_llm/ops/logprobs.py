"""Token log-probabilities and entropies from logits, or from hidden states in chunks.

`token_logprobs` and `entropy_from_logits` work on materialised logits `[B, T, V]`.
`logprobs_from_hidden` computes the same two quantities straight from the last hidden
states `[B, T, D]` and the output (unembedding) matrix `[D, V]`, a chunk of tokens at a
time, so the float32 `[B, T, V]` logits tensor never exists: not in the forward pass and
not in the backward pass (a `jax.custom_vjp` recomputes each chunk's logits). This is what
makes vocabularies of 150k-260k tokens fit next to a long batch.

All math runs in float32 whatever the input dtype (bfloat16 hidden states and weights are
fine); outputs are float32.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.ops.checks import check_int, check_leading_dim, check_mask, check_rank

__all__ = ["entropy_from_logits", "logprobs_from_hidden", "token_logprobs"]

# Contract the last axis of the left operand with the first axis of the right one.
_MATMUL_DIMS = (((1,), (0,)), ((), ()))


def _expected_logit(logits: jax.Array, probs: jax.Array) -> jax.Array:
    """Σ_v p_v · z_v over the last axis, with 0 · (−inf) read as 0 (masked vocab entries)."""
    safe_logits = jnp.where(probs > 0, logits, 0.0)
    return jnp.sum(probs * safe_logits, axis=-1)


def _finite_max(logits: jax.Array) -> jax.Array:
    """Row max over the last axis (kept as a trailing axis), 0 where a row has no finite max."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _gather_tokens(values: jax.Array, tokens: jax.Array) -> jax.Array:
    """values[..., tokens] over the last axis; NaN where a token id is outside [0, V).

    (Plain indexing would wrap negative ids such as −100 to a real vocabulary entry.)
    """
    vocab = values.shape[-1]
    valid = (tokens >= 0) & (tokens < vocab)
    picked = jnp.take_along_axis(values, jnp.where(valid, tokens, 0)[..., None], axis=-1)
    return jnp.where(valid, picked[..., 0], jnp.nan)


def _position_mask(mask, reference_name: str, reference) -> jax.Array | None:
    """[B, T] bool "position counts" from an optional 0/1 ``mask`` (checked against the
    [B, T] ``reference``), or None."""
    if mask is None:
        return None
    check_rank(2, hint="[B, T]", mask=mask)
    check_leading_dim(reference_name, reference, dims=2, mask=mask)
    check_mask(mask=mask)
    return jnp.asarray(mask) > 0


def _zero_rows(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """``x`` ([B, T, ...]) with the rows of masked positions set to 0 (``jnp.where``, so
    that NaN / inf there reach neither a value nor a gradient)."""
    if valid is None:
        return x
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), x.dtype))


def token_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Log-probability of each chosen token under the softmax of its logits.

    log π(y_t) = z_{t, y_t} − log Σ_v exp(z_{t, v}), computed in float32.

    References:
        Sutton & Barto, "Reinforcement Learning: An Introduction", 2nd ed. (2018), §13.3
        (softmax policy); http://incompleteideas.net/book/the-book-2nd.html

    Args:
        logits: `[B, T, V]` float (any float dtype; upcast to float32).
        tokens: `[B, T]` int, token ids in `[0, V)`; an id outside that range (e.g. an
            ignore index −100) gives NaN, so padding positions should hold a valid id such as 0
            (or be masked).
        mask: optional `[B, T]` 0/1, 1 on positions that count. Masked positions give
            exactly 0, whatever their logits (NaN / inf of padded rows) and token ids hold,
            and their logits get gradient 0.

    Returns:
        logprobs: `[B, T]` float32, each ≤ 0.
    """
    check_rank(3, hint="[B, T, V]", logits=logits)
    check_rank(2, hint="[B, T]", tokens=tokens)
    check_leading_dim("logits", logits, dims=2, tokens=tokens)
    check_int(tokens=tokens)
    valid = _position_mask(mask, "logits", logits)
    if valid is not None:
        logits, tokens = _zero_rows(logits, valid), jnp.where(valid, tokens, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    out = _gather_tokens(logp, tokens)
    return out if valid is None else jnp.where(valid, out, 0.0)


def entropy_from_logits(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Entropy of the softmax distribution at every position.

    H_t = −Σ_v p_{t,v} log p_{t,v} = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_{t,v},
    computed in float32. Logits equal to −inf (masked-out vocabulary entries) contribute 0.

    References:
        Shannon, "A Mathematical Theory of Communication" (1948);
        https://people.math.harvard.edu/~ctm/home/text/others/shannon/entropy/entropy.pdf

    Args:
        logits: `[B, T, V]` float (any float dtype; upcast to float32).
        mask: optional `[B, T]` 0/1, 1 on positions that count; masked positions give
            exactly 0 and gradient 0, whatever their logits hold.

    Returns:
        entropy: `[B, T]` float32, in `[0, log V]`.
    """
    check_rank(3, hint="[B, T, V]", logits=logits)
    valid = _position_mask(mask, "logits", logits)
    if valid is not None:
        return jnp.where(valid, entropy_from_logits(_zero_rows(logits, valid)), 0.0)
    # Shift by the row max first: lse and Σ p·z share any common offset, which would
    # otherwise cancel catastrophically (logits ~1e4 lose 3 digits in float32).
    logits = logits.astype(jnp.float32)
    shifted = logits - lax.stop_gradient(_finite_max(logits))
    lse = jax.nn.logsumexp(shifted, axis=-1)
    probs = jnp.exp(shifted - lse[..., None])
    return lse - _expected_logit(shifted, probs)


# --------------------------------------------------------------------------------------
# Chunked path: logits are built one chunk of tokens at a time, never for the whole batch.
# --------------------------------------------------------------------------------------


def _chunk_logits(hidden_chunk: jax.Array, unembed: jax.Array) -> jax.Array:
    """`[C, D] @ [D, V] -> [C, V]` float32 logits (float32 accumulation for bf16 inputs)."""
    return lax.dot_general(hidden_chunk, unembed, _MATMUL_DIMS, preferred_element_type=jnp.float32)


def _chunk_stats(hidden_chunk, unembed, tokens_chunk):
    """Per-token statistics of one chunk, all `[C]` float32.

    Returns (logprob, entropy, row max m, logsumexp(z − m), Σ p·(z − m)); the last three
    let the backward pass rebuild p and z − z̄ from recomputed logits without a reduction.
    """
    logits = _chunk_logits(hidden_chunk, unembed)
    row_max = _finite_max(logits)
    shifted = logits - row_max
    lse = jax.nn.logsumexp(shifted, axis=-1)
    probs = jnp.exp(shifted - lse[:, None])
    mean_shifted = _expected_logit(shifted, probs)
    picked = _gather_tokens(shifted, tokens_chunk)
    return picked - lse, lse - mean_shifted, row_max[:, 0], lse, mean_shifted


def _column(x: jax.Array, m: jax.Array) -> jax.Array:
    """x[:, m] for x of shape `[C, M, ...]`: the m-th chunk (copies `[C, ...]`, never all of x)."""
    return lax.dynamic_index_in_dim(x, m, axis=1, keepdims=False)


def _chunked_forward(hidden, unembed, tokens):
    """Scan over chunks. hidden `[C, M, D]`, tokens `[C, M]` -> five `[M, C]` float32 arrays."""

    def body(_, m):
        return None, _chunk_stats(_column(hidden, m), unembed, _column(tokens, m))

    _, stats = lax.scan(body, None, jnp.arange(hidden.shape[1]))
    return stats


@jax.custom_vjp
def _chunked_logprobs_entropy(hidden, unembed, tokens):
    logp, ent, _, _, _ = _chunked_forward(hidden, unembed, tokens)
    return logp, ent


def _chunked_fwd(hidden, unembed, tokens):
    logp, ent, row_max, lse, mean_shifted = _chunked_forward(hidden, unembed, tokens)
    # Residuals are O(B·T·D + D·V): no per-token array of size V is kept.
    return (logp, ent), (hidden, unembed, tokens, row_max, lse, mean_shifted)


def _chunked_bwd(residuals, cotangents):
    """Recompute each chunk's logits and push both cotangents through them.

    With z the logits of a row, p = softmax(z), y the token and z̄ = Σ_v p_v z_v:
        ∂ log p_y / ∂z = onehot(y) − p,      ∂H / ∂z = −p ⊙ (z − z̄),
    so  ∂L/∂z = g_logp · (onehot(y) − p) − g_ent · p ⊙ (z − z̄);
    then ∂L/∂hidden = ∂L/∂z · unembedᵀ and ∂L/∂unembed = Σ_chunks hiddenᵀ · ∂L/∂z
    (accumulated in float32 across chunks).
    """
    hidden, unembed, tokens, row_max, lse, mean_shifted = residuals
    g_logp, g_ent = cotangents
    vocab = unembed.shape[1]

    def body(carry, xs):
        d_unembed, d_hidden = carry
        m, max_c, lse_c, mean_c, g_lp_c, g_ent_c = xs
        h, tok = _column(hidden, m), _column(tokens, m)
        shifted = _chunk_logits(h, unembed) - max_c[:, None]
        probs = jnp.exp(shifted - lse_c[:, None])
        onehot = tok[:, None] == jnp.arange(vocab, dtype=tok.dtype)[None, :]
        centred = jnp.where(probs > 0, shifted - mean_c[:, None], 0.0)
        d_logits = g_lp_c[:, None] * (onehot - probs) - g_ent_c[:, None] * probs * centred
        d_h = lax.dot_general(
            d_logits, unembed, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_unembed = d_unembed + lax.dot_general(
            h, d_logits, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        d_hidden = lax.dynamic_update_index_in_dim(d_hidden, d_h.astype(hidden.dtype), m, axis=1)
        return (d_unembed, d_hidden), None

    init = (jnp.zeros(unembed.shape, jnp.float32), jnp.zeros_like(hidden))
    xs = (jnp.arange(hidden.shape[1]), row_max, lse, mean_shifted, g_logp, g_ent)
    (d_unembed, d_hidden), _ = lax.scan(body, init, xs)
    return d_hidden, d_unembed.astype(unembed.dtype), None


_chunked_logprobs_entropy.defvjp(_chunked_fwd, _chunked_bwd)


def logprobs_from_hidden(
    hidden: jax.Array,
    unembed: jax.Array,
    tokens: jax.Array,
    chunk_size: int = 1024,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Token log-probs and entropies from hidden states, without materialising the logits.

    With z_t = hidden_t · unembed (float32 accumulation),
        logprobs_t = z_{t, y_t} − logsumexp(z_t),
        entropy_t  = logsumexp(z_t) − Σ_v softmax(z_t)_v · z_{t,v},
    i.e. exactly `token_logprobs(hidden @ unembed, tokens)` and
    `entropy_from_logits(hidden @ unembed)`. The B·T tokens are flattened, padded up to a
    multiple of `chunk_size` and processed `chunk_size` at a time by `lax.scan`, so only a
    `[chunk_size, V]` float32 block of logits is live at once. The backward pass (a
    `jax.custom_vjp`) recomputes each chunk's logits instead of storing them and
    accumulates ∂/∂unembed in float32 over chunks. Gradients reach `hidden` and `unembed`
    from both outputs. Works under `jit`, `vmap` and `grad` (reverse mode; forward-mode
    `jvp` is not defined for a `custom_vjp`).

    Peak extra memory is about two float32 `[chunk_size, V]` blocks, plus a float32
    `[D, V]` gradient accumulator in the backward pass, independent of B·T. Chunks take
    strided tokens of the flattened axis, so a batch sharded over devices is processed
    shard-locally (no all-gather of `hidden`; one all-reduce of ∂/∂unembed).

    References:
        Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models" (2024),
        https://arxiv.org/abs/2411.09009 (same idea, blockwise over tokens);
        Chen et al., "Training Deep Nets with Sublinear Memory Cost" (2016),
        https://arxiv.org/abs/1604.06174 (recomputation in the backward pass).

    Args:
        hidden: `[B, T, D]` float (float32 or bfloat16), final hidden states (after the
            final norm).
        unembed: `[D, V]` float (float32 or bfloat16), output projection.
        tokens: `[B, T]` int, token ids in `[0, V)` whose log-probs are wanted; an id outside
            that range (e.g. an ignore index −100) gives a NaN log-prob, so padding positions
            should hold a valid id such as 0 (and be masked by the caller).
        chunk_size: static int > 0, number of flattened tokens per chunk. Larger is faster
            and uses more memory; values above B·T are clipped to B·T.
        mask: optional `[B, T]` 0/1, 1 on positions whose log-prob is used (response
            tokens). Masked positions give exactly 0 (log-prob and entropy) and gradient
            0, and their hidden states and token ids are replaced by 0 before the matmul,
            so a NaN / inf hidden state of a padded row (or an out-of-range id there)
            cannot reach ∂/∂unembed, which sums over all rows.

    Returns:
        logprobs: `[B, T]` float32.
        entropy: `[B, T]` float32.
    """
    check_rank(3, hint="[B, T, D]", hidden=hidden)
    check_rank(2, hint="[D, V]", unembed=unembed)
    check_rank(2, hint="[B, T]", tokens=tokens)
    check_leading_dim("hidden", hidden, dims=2, tokens=tokens)
    check_int(tokens=tokens)
    if hidden.shape[-1] != unembed.shape[0]:
        raise ValueError(
            f"`unembed` must have shape [D, V] with D = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {unembed.shape}."
        )
    is_int = isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool)
    if not is_int or chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    valid = _position_mask(mask, "hidden", hidden)
    if valid is not None:
        logp, ent = logprobs_from_hidden(_zero_rows(hidden, valid), unembed, jnp.where(valid, tokens, 0), chunk_size)
        return jnp.where(valid, logp, 0.0), jnp.where(valid, ent, 0.0)

    batch, length, _ = hidden.shape
    num_tokens = batch * length
    if num_tokens == 0:
        empty = jnp.zeros((batch, length), jnp.float32)
        return empty, empty
    chunk = min(int(chunk_size), num_tokens)
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens

    # Chunk m holds the strided tokens {m, m + M, m + 2M, ...} of the flattened axis
    # (M = num_chunks): [N, ...] is viewed as [chunk, M, ...] (a free reshape) and the scan
    # slices column m. A batch sharded over devices then stays sharded inside every chunk
    # (each device works on its own rows) instead of being gathered chunk by chunk.
    def to_chunks(x):
        x = jnp.pad(x.reshape(num_tokens, *x.shape[2:]), [(0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(chunk, num_chunks, *x.shape[1:])

    def from_chunks(x):  # [M, chunk] -> [B, T]
        return x.T.reshape(-1)[:num_tokens].reshape(batch, length)

    # Padded rows (hidden 0, token 0) are valid inputs and are sliced off the outputs.
    logp, ent = _chunked_logprobs_entropy(to_chunks(hidden), unembed, to_chunks(tokens))
    return from_chunks(logp), from_chunks(ent)
