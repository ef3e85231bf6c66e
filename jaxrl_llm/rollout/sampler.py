"""Jitted sampling: one prefill per prompt, G samples per prompt sharing it, and the whole
decode inside one ``lax.while_loop`` over a static-shape KV cache.

Shapes: B prompts, G samples per prompt (``num_samples``), P prompt length (padded up to a
bucket so that a new batch seldom recompiles), T = ``max_new_tokens``, V vocabulary,
M MoE layers, k experts per token. Outputs use the group layout: the G samples of prompt b
are rows b·G … b·G + G − 1.

Which log-probs are recorded: ``Rollout.logprobs`` are log-probs under the distribution
the token was actually drawn from — the policy's logits after temperature, top-k, top-p
and min-p (``filters.process_logits``). Those are what an importance ratio against the
sampler needs. They differ from the policy's own log-probs at temperature 1 (what a
training forward computes); pass ``return_raw_logprobs=True`` to also get those
(``Rollout.raw_logprobs``). With temperature 0 (greedy) the sampling distribution is a
point mass and ``logprobs`` is 0.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxrl_llm.data.padding import bucket_length
from jaxrl_llm.ops.advantages import last_valid_index
from jaxrl_llm.ops.checks import check_int, check_mask, check_token_ids
from jaxrl_llm.rollout.filters import sample_token, validate_sampling_args


@struct.dataclass
class Rollout:
    """Generated responses in group layout (N = B·G rows).

    Attributes:
      prompt_tokens: [N, P] int32 prompts (each repeated G times), padded as given.
      prompt_mask: [N, P] int32, 1 on real prompt tokens.
      tokens: [N, T] int32 response tokens; ``pad_token_id`` after the end.
      logprobs: [N, T] float32 log-prob of each token under the sampling distribution
        (after temperature / filters); 0 on masked positions.
      mask: [N, T] int32, 1 on generated tokens up to and including the stop token.
      lengths: [N] int32 number of response tokens (sum of mask).
      finished: [N] bool, True if a stop token ended the response, False if it was cut
        at ``max_new_tokens`` (finish reason "stop" vs "length").
      raw_logprobs: [N, T] float32 policy log-probs at temperature 1 without filters,
        or None unless requested.
      routing: [M, N, P + T, k] int32 expert choices of every prompt and response token
        (MoE policies; None for dense ones), for routing replay in the training forward.
      sequence_mask: [N, T] int32, 1 on every real token of the response area: the
        policy's tokens and, in multi-turn episodes (``rollout.multiturn``), the
        environment's observation tokens between them, which ``mask`` (the loss mask)
        leaves out. None: the same as ``mask`` (single-turn). ``lengths`` counts these.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    finished: jax.Array
    raw_logprobs: jax.Array | None = None
    routing: jax.Array | None = None
    sequence_mask: jax.Array | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    def full_tokens(self) -> tuple[jax.Array, jax.Array]:
        """Prompt and response as one sequence for the teacher-forced training / reference
        forward: ([N, P + T] tokens, [N, P + T] mask of real tokens, observation tokens
        of multi-turn episodes included).

        Prompts are moved to the left padding layout, so the last prompt token sits at
        column P − 1 for every row and the logits at columns P − 1 … P + T − 2 predict
        response tokens 0 … T − 1.
        """
        prompt_tokens, prompt_mask = left_align(self.prompt_tokens, self.prompt_mask)
        tokens = jnp.concatenate([prompt_tokens, self.tokens], axis=1)
        response_mask = self.mask if self.sequence_mask is None else self.sequence_mask
        mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
        return tokens, mask

    def full_routing(self) -> jax.Array | None:
        """``routing`` in the layout of ``full_tokens`` ([M, N, P + T, k], prompt positions
        left-aligned the same way), for routing replay in the training forward."""
        if self.routing is None:
            return None
        p = self.prompt_tokens.shape[1]
        order = _left_align_order(self.prompt_mask)[None, :, :, None]
        prompt_part = jnp.take_along_axis(self.routing[:, :, :p], order, axis=2)
        return jnp.concatenate([prompt_part, self.routing[:, :, p:]], axis=2)


def left_align(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves every row's padding to the left, keeping the order of real tokens.

    Args:
      tokens: [B, P] int.
      mask: [B, P] 1 on real tokens.

    Returns:
      ([B, P] tokens, [B, P] mask) with real tokens right-aligned.
    """
    order = _left_align_order(mask)
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


def _left_align_order(mask: jax.Array) -> jax.Array:
    """[B, P] column order that puts padding first, keeping real tokens in order."""
    return jnp.argsort(jnp.asarray(mask) > 0, axis=1, stable=True)


def _validate(prompts, prompt_mask, max_new_tokens, num_samples, temperature, top_k, top_p, min_p):
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be [B, P] token ids, got shape {prompts.shape}")
    if prompt_mask.shape != prompts.shape:
        raise ValueError(
            f"prompt_mask must have the shape of prompts {prompts.shape}, got {prompt_mask.shape}"
        )
    check_int(prompts=prompts)
    check_mask(prompt_mask=prompt_mask)
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    lengths = np.asarray(prompt_mask).sum(axis=1)
    if np.any(lengths == 0):
        raise ValueError(f"every prompt needs at least one token; empty prompt rows: {np.where(lengths == 0)[0].tolist()}")


def model_vocab_size(model: Any) -> int | None:
    """The vocabulary size of a model (``model.config.vocab_size``), or None if unknown."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return None if size is None else int(size)


def _token_id(name: str, value: Any) -> int:
    """``value`` as a Python int token id (an int, numpy int or integer scalar array)."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must hold int token ids, got {value!r}") from None


def check_ids_fit(model: Any, prompts: Any = None, prompt_mask: Any = None, *,
                  pad_token_id: Any = None, stop_token_ids: Sequence[int] = ()) -> None:
    """Prompt ids, ``pad_token_id`` and ``stop_token_ids`` lie in [0, the model's vocab_size).

    An id past the embedding table is not an error in JAX (gathers clamp, or fill with
    NaN): it would silently give garbage. The ValueError names the argument, the offending
    value and the model's vocab_size. Concrete values only: traced ids (under ``jit``) are
    not checked. Models without ``config.vocab_size`` are not checked.
    """
    vocab = model_vocab_size(model)
    check_token_ids(vocab, mask=prompt_mask, prompts=prompts)
    if pad_token_id is not None:
        check_token_ids(vocab, pad_token_id=np.asarray(_token_id("pad_token_id", pad_token_id)))
    stops = [_token_id("stop_token_ids", s) for s in stop_token_ids]
    if vocab is not None and stops:
        bad = [s for s in stops if not 0 <= s < vocab]
        if bad:
            raise ValueError(
                f"stop_token_ids {stops} hold {bad}, outside the vocabulary [0, {vocab}): the model's vocab_size "
                f"is {vocab}; a stop id the model cannot emit never stops a response"
            )


def _check_context(model: Any, prompt_mask: np.ndarray, max_new_tokens: int) -> None:
    """The longest prompt plus max_new_tokens fits the model's context window (positions
    beyond ``max_position_embeddings`` were never trained and RoPE scaling assumes them)."""
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is None:
        return
    lengths = np.asarray(prompt_mask).sum(axis=1)
    longest = int(lengths.max())
    if longest + max_new_tokens > window:
        rows = np.where(lengths + max_new_tokens > window)[0].tolist()
        raise ValueError(
            f"prompts too long for the context window: the longest prompt has {longest} tokens "
            f"+ max_new_tokens={max_new_tokens} > max_position_embeddings={window} "
            f"(rows {rows[:8]}); truncate the prompts (data max_prompt_len) or lower max_new_tokens"
        )


def generate(
    model: nnx.Module,
    prompts: Any,
    prompt_mask: Any,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    rng: jax.Array,
    return_raw_logprobs: bool = False,
    prompt_bucket: int = 32,
    decode_window: int = 64,
    mesh: Any = None,
) -> Rollout:
    """Samples ``num_samples`` responses per prompt.

    The prompt's KV cache is computed once and broadcast to its G samples; decoding runs
    in one compiled ``lax.while_loop`` that exits as soon as every row has produced a stop
    token. One compilation serves every batch with the same (B, bucketed P, T, G, options).

    Args:
      model: a ``CausalLM`` (any module with ``forward(tokens, positions, cache, *,
        attention_mask, return_hidden)``, ``init_cache`` and ``unembed``).
      prompts: [B, P] int token ids in [0, model.config.vocab_size), left- or
        right-padded (padding positions are embedded too: they must hold valid ids).
      prompt_mask: [B, P] 1 on real prompt tokens.
      max_new_tokens: T > 0.
      num_samples: G ≥ 1 responses per prompt.
      temperature, top_k, top_p, min_p: sampling options (``rollout.filters``).
      stop_token_ids: ids that end a response (e.g. EOS and end-of-turn); the stop token
        is part of the response and its mask. Each in [0, vocab_size).
      pad_token_id: written after the end of a response; in [0, vocab_size).
      rng: PRNG key.
      return_raw_logprobs: also return temperature-1 unfiltered policy log-probs.
      prompt_bucket: pad P up to a multiple of this (0: no bucketing).
      decode_window: new tokens of the first KV-cache window; later windows double, so a
        decode step attends over at most prompt + 2·max(step, decode_window) slots
        instead of prompt + max_new_tokens (``decode_windows``). Budgets up to twice
        this are one window (one compiled loop).
      mesh: a ``parallel.make_mesh`` mesh: prompts, the KV cache and every output row are
        split over its batch axes (data × fsdp), so each device decodes its own rows
        (place the params with ``parallel.shard_model`` first). None: no constraint.

    Returns:
      Rollout with N = B·G rows in group layout.

    Raises:
      ValueError: bad shapes or options; a prompt id, ``pad_token_id`` or stop id outside
        [0, vocab_size) (the message names the argument, the value and the model's
        vocab_size).
    """
    prompts = np.asarray(prompts)
    prompt_mask = np.asarray(prompt_mask)
    _validate(prompts, prompt_mask, max_new_tokens, num_samples, temperature, top_k, top_p, min_p)
    check_ids_fit(model, prompts, prompt_mask, pad_token_id=pad_token_id, stop_token_ids=stop_token_ids)
    _check_context(model, prompt_mask, max_new_tokens)
    if isinstance(decode_window, bool) or not isinstance(decode_window, int) or decode_window < 1:
        raise ValueError(f"decode_window must be a positive int (new tokens of the first cache window), "
                         f"got {decode_window!r}")
    batch, plen = prompts.shape
    padded = bucket_length(plen, prompt_bucket or None)
    if padded > plen:  # extra columns are masked out, so either padding side still works
        extra = padded - plen
        prompts = np.pad(prompts, ((0, 0), (0, extra)), constant_values=pad_token_id)
        prompt_mask = np.pad(prompt_mask, ((0, 0), (0, extra)))
    rows = None
    prompts, prompt_mask = jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_mask, jnp.int32)
    if mesh is not None:
        from jaxrl_llm.parallel.sharding import batch_sharding, check_batch_size

        check_batch_size(batch, mesh, name="prompts")
        rows = batch_sharding(mesh)
        prompts, prompt_mask = jax.device_put(prompts, rows), jax.device_put(prompt_mask, rows)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef,
        state,
        prompts,
        prompt_mask,
        rng,
        rows=rows,
        max_new_tokens=max_new_tokens,
        num_samples=num_samples,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        min_p=float(min_p),
        stop_token_ids=tuple(int(t) for t in stop_token_ids),
        pad_token_id=int(pad_token_id),
        return_raw_logprobs=bool(return_raw_logprobs),
        decode_window=int(decode_window),
    )


def decode_windows(max_new_tokens: int, first: int) -> tuple[int, ...]:
    """Ends (in new tokens) of the decode phases: first, 2·first, 4·first, …, max_new_tokens.

    Each phase is its own ``while_loop`` over a cache of prompt + end slots, so step t
    attends over fewer than 2·max(t, first) + prompt slots instead of all of them, for one
    cache copy per phase. Short budgets (≤ 2·first) stay one phase: one compiled loop.
    """
    if max_new_tokens <= 2 * first:
        return (max_new_tokens,)
    ends = [first]
    while ends[-1] < max_new_tokens:
        ends.append(min(2 * ends[-1], max_new_tokens))
    return tuple(ends)


def grow_cache(cache, max_len: int):
    """``cache`` with room for ``max_len`` slots: new slots are empty (not valid)."""
    extra = max_len - cache.max_len
    pad = lambda x, axis: jnp.pad(x, [(0, extra) if a == axis else (0, 0) for a in range(x.ndim)])  # noqa: E731
    return cache.replace(k=pad(cache.k, 2), v=pad(cache.v, 2), valid=pad(cache.valid, 1),
                         positions=pad(cache.positions, 1))


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_new_tokens",
        "num_samples",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "stop_token_ids",
        "pad_token_id",
        "return_raw_logprobs",
        "rows",
        "decode_window",
    ),
)
def _generate_jit(
    graphdef,
    state,
    prompts,
    prompt_mask,
    rng,
    *,
    max_new_tokens,
    num_samples,
    temperature,
    top_k,
    top_p,
    min_p,
    stop_token_ids,
    pad_token_id,
    return_raw_logprobs,
    rows=None,
    decode_window=64,
):
    model = nnx.merge(graphdef, state)

    def split_rows(x, axis=0):
        """Keeps axis ``axis`` (rows) split over the mesh's batch axes when a mesh is set."""
        if rows is None or x is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = rows.spec[0]
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(rows.mesh, jax.sharding.PartitionSpec(*spec)))

    batch, plen = prompts.shape
    n = batch * num_samples
    total = plen + max_new_tokens

    # the cache grows in windows so that each decode step attends over the slots written
    # so far (rounded up to the window), not over all prompt + max_new_tokens slots
    window_ends = decode_windows(max_new_tokens, decode_window)
    # prefill: one forward over the prompts; logits only at each row's last real token
    cache = model.init_cache(batch, plen + window_ends[0])
    out = model.forward(prompts, cache=cache, attention_mask=prompt_mask, return_hidden=True)
    last = last_valid_index(prompt_mask)
    last_hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]
    first_logits = jnp.einsum(
        "bd,dv->bv", last_hidden, model.unembed.astype(last_hidden.dtype), preferred_element_type=jnp.float32
    )

    # broadcast the prompt's cache and next-token logits to its G samples
    cache = out.cache.repeat(num_samples) if num_samples > 1 else out.cache

    def place(cache):
        return cache.replace(k=split_rows(cache.k, 1), v=split_rows(cache.v, 1), valid=split_rows(cache.valid),
                             positions=split_rows(cache.positions), next_position=split_rows(cache.next_position))

    cache = place(cache)
    first_logits = split_rows(jnp.repeat(first_logits, num_samples, axis=0))
    routing = None
    if out.routing is not None:
        m, _, _, k = out.routing.shape
        routing = jnp.zeros((m, n, total, k), jnp.int32)
        routing = routing.at[:, :, :plen].set(jnp.repeat(out.routing, num_samples, axis=1))

    stop_ids = jnp.asarray(stop_token_ids if stop_token_ids else (-1,), jnp.int32)
    sample_kwargs = dict(top_k=top_k, top_p=top_p, min_p=min_p)

    def cond_until(end):
        def cond(carry):
            step, done = carry[0], carry[5]
            return (step < end) & ~jnp.all(done)

        return cond

    def body(carry):
        step, cache, logits, tokens, logps, done, raw, routing, rng = carry
        rng, key = jax.random.split(rng)
        token, logp = sample_token(key, logits, temperature, **sample_kwargs)
        active = ~done
        token = jnp.where(active, token, pad_token_id)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(active, logp, 0.0))
        if raw is not None:
            raw_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
            raw = raw.at[:, step].set(jnp.where(active, raw_logp, 0.0))
        new_done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        # feed the token; rows already finished write an invalid (masked) slot
        out = model.forward(
            token[:, None], cache=cache, attention_mask=active[:, None].astype(jnp.int32), return_hidden=True
        )
        next_logits = jnp.einsum(
            "bd,dv->bv", out.hidden[:, 0], model.unembed.astype(out.hidden.dtype), preferred_element_type=jnp.float32
        )
        if routing is not None:
            routing = jax.lax.dynamic_update_slice(routing, out.routing, (0, 0, plen + step, 0))
        return step + 1, out.cache, next_logits, tokens, logps, new_done, raw, routing, rng

    init = (
        jnp.zeros((), jnp.int32),
        cache,
        first_logits,
        split_rows(jnp.full((n, max_new_tokens), pad_token_id, jnp.int32)),
        split_rows(jnp.zeros((n, max_new_tokens), jnp.float32)),
        split_rows(jnp.zeros((n,), jnp.bool_)),
        split_rows(jnp.zeros((n, max_new_tokens), jnp.float32)) if return_raw_logprobs else None,
        routing,
        rng,
    )
    carry = init
    for i, end in enumerate(window_ends):
        if i > 0:  # grow the cache to this window (one copy per window, not per step)
            carry = (carry[0], place(grow_cache(carry[1], plen + end)), *carry[2:])
        carry = jax.lax.while_loop(cond_until(end), body, carry)
    steps, _, _, tokens, logps, done, raw, routing, _ = carry

    # response mask: tokens up to and including the first stop token
    is_stop = jnp.any(tokens[:, :, None] == stop_ids[None, None, :], axis=-1)
    after_stop = jnp.cumsum(is_stop, axis=1) - is_stop.astype(jnp.int32) > 0
    written = jnp.arange(max_new_tokens)[None, :] < steps
    mask = (written & ~after_stop).astype(jnp.int32)
    return Rollout(
        prompt_tokens=jnp.repeat(prompts, num_samples, axis=0),
        prompt_mask=jnp.repeat(prompt_mask, num_samples, axis=0),
        tokens=tokens,
        logprobs=logps,
        mask=mask,
        lengths=jnp.sum(mask, axis=1).astype(jnp.int32),
        finished=done,
        raw_logprobs=raw,
        routing=routing,
    )


def apply_stop_strings(rollout: Rollout, tokenizer: Any, stop_strings: Sequence[str]) -> Rollout:
    """Ends each response at the first token whose decoded prefix contains a stop string.

    Stop strings can span several tokens, so they are found after decoding: the response
    keeps the tokens up to and including the one that completes the stop string, and is
    marked finished. Runs on the host (numpy + tokenizer).
    """
    if not stop_strings:
        return rollout
    tokens = np.asarray(rollout.tokens)
    mask = np.asarray(rollout.mask).copy()
    finished = np.asarray(rollout.finished).copy()
    for row in range(tokens.shape[0]):
        length = int(mask[row].sum())
        text = tokenizer.decode(tokens[row, :length].tolist())
        if not any(s in text for s in stop_strings):
            continue
        for end in range(1, length + 1):  # shortest prefix containing a stop string
            prefix = tokenizer.decode(tokens[row, :end].tolist())
            if any(s in prefix for s in stop_strings):
                mask[row, end:] = 0
                finished[row] = True
                break
    mask_j = jnp.asarray(mask)
    return rollout.replace(
        mask=mask_j,
        lengths=jnp.asarray(mask.sum(axis=1), jnp.int32),
        finished=jnp.asarray(finished),
        logprobs=rollout.logprobs * mask_j,
        raw_logprobs=None if rollout.raw_logprobs is None else rollout.raw_logprobs * mask_j,
    )
