"""Multi-turn rollouts: the policy talks with an environment (tools, games, verifiers)
over several turns, on one KV cache that every turn extends.

For each of the N = B·G episodes (G per record, group layout like ``generate``):

1. ``env.reset(record, seed=...)`` gives the opening messages; the chat template renders
   them (with the environment's ``tools``) and one forward prefills every row's prompt.
2. A jitted ``lax.while_loop`` decodes one assistant message per row until a stop token
   or the turn's token budget; rows not in play write masked (invalid) cache slots.
3. On the host each message is decoded and passed to ``env.step``. An observation
   (e.g. a tool's output) is rendered by the chat template as the *difference* between
   the conversation with and without it (``observation_ids``), tokenised, and appended
   to the cache in one forward over the new tokens only — the prompt and earlier turns
   are never recomputed.
4. Repeat until every episode has ended: ``stop`` (the model answered and the environment
   returned no observation), ``env_done`` (the environment ended it), ``max_turns``
   (the last allowed message was written) or ``length`` (the ``max_total_tokens`` budget
   of the response area ran out, or a message was cut at ``max_new_tokens``).

What the trainer gets is a ``Rollout`` whose response area holds the exact token ids the
policy sampled and the observation ids appended after them, in order, packed from
column 0 (no re-tokenisation of decoded text: the ids the policy was trained on are the
ids it sampled). ``mask`` (the loss mask) is 1 only on policy tokens; ``sequence_mask``
is 1 on policy and observation tokens, so the teacher-forced training forward
(``Rollout.full_tokens``) sees the whole conversation with the positions the cache used,
and the recorded log-probs equal its log-probs.

Shapes: N rows, P prompt width, T = ``max_total_tokens`` response width, L observation
width of one turn, V vocabulary, S cache slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.data.padding import bucket_length
from jaxrl_llm.data.tokenization import decode_ids, encode_text, observation_ids, render_prompt
from jaxrl_llm.envs.base import check_messages_list, check_step_result
from jaxrl_llm.ops.advantages import last_valid_index
from jaxrl_llm.rollout.filters import sample_token, validate_sampling_args
from jaxrl_llm.rollout.sampler import Rollout, check_ids_fit, grow_cache

FINISH_REASONS = ("stop", "env_done", "max_turns", "length")


@dataclasses.dataclass
class Episodes:
    """N multi-turn episodes in group layout, as host arrays.

    Attributes:
      rollout: the trajectories (``Rollout`` with ``sequence_mask``; ``finished`` is
        False for "length" episodes).
      rewards: [N] float32 sum of the environment's step rewards.
      step_rewards: [N, T] float32 each step's reward at the last token of the assistant
        message it answers (token-level rewards for PPO / GAE).
      turns: [N] int32 assistant messages written.
      finish_reasons: N strings from ``FINISH_REASONS``.
      env_info: name → [N] float32, the environment's ``info`` numbers summed over each
        episode's steps.
      conversations: N lists of chat messages (opening messages, the decoded assistant
        messages, the observations), for logging.
    """

    rollout: Rollout
    rewards: np.ndarray
    step_rewards: np.ndarray
    turns: np.ndarray
    finish_reasons: list[str]
    env_info: dict[str, np.ndarray]
    conversations: list[list[dict]]

    def summary(self) -> dict[str, float]:
        """Batch means: reward, turns, policy / observation tokens per episode, the
        fraction of each finish reason, and every ``env_info`` number per episode."""
        mask = np.asarray(self.rollout.mask)
        seq = np.asarray(self.rollout.sequence_mask)
        reasons = np.asarray(self.finish_reasons)
        out = {
            "episode_reward_mean": float(np.mean(self.rewards)),
            "turns_mean": float(np.mean(self.turns)),
            "policy_tokens_mean": float(mask.sum(axis=1).mean()),
            "observation_tokens_mean": float((seq - mask).sum(axis=1).mean()),
        }
        out.update({f"finish_{r}": float(np.mean(reasons == r)) for r in FINISH_REASONS})
        out.update({f"env_{k}": float(np.mean(v)) for k, v in self.env_info.items()})
        return out


# ---------------------------------------------------------------------------- device steps


def _logits_at(model, hidden):
    """[..., D] hidden → [..., V] float32 logits."""
    return jnp.einsum("...d,dv->...v", hidden, model.unembed.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _extend(graphdef, state, cache, logits, tokens, mask):
    """Appends [N, L] tokens (mask 1 on real ones) to the cache in one forward.

    Returns the advanced cache, [N, V] next-token logits (after each row's last new
    token, or ``logits`` unchanged for rows with no new token) and the [M, N, L, k]
    expert choices of the new tokens (None for dense models).
    """
    model = nnx.merge(graphdef, state)
    out = model.forward(tokens, cache=cache, attention_mask=mask, return_hidden=True)
    last = last_valid_index(mask)
    hidden = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]
    has_new = jnp.any(mask > 0, axis=1)
    return out.cache, jnp.where(has_new[:, None], _logits_at(model, hidden), logits), out.routing


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                                             "stop_token_ids", "pad_token_id"))
def _decode_turn(graphdef, state, cache, logits, budget, rng, *, max_new_tokens, temperature, top_k, top_p, min_p,
                 stop_token_ids, pad_token_id):
    """Decodes one message per row with budget[i] > 0 (at most budget[i] tokens).

    Returns:
      tokens [N, max_new_tokens] int32, logprobs / raw_logprobs [N, max_new_tokens]
      float32 (sampling distribution / temperature-1 policy), count [N] int32 tokens
      written, stopped [N] bool (a stop token ended the message), the cache with every
      written token in it, [N, V] logits after each row's last token, and the
      [M, N, max_new_tokens, k] expert choices of the written tokens (None: dense model).
    """
    model = nnx.merge(graphdef, state)
    n = budget.shape[0]
    moe_layers = getattr(model.config, "num_moe_layers", 0)
    stop_ids = jnp.asarray(stop_token_ids if stop_token_ids else (-1,), jnp.int32)

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[6])

    def body(carry):
        step, cache, logits, tokens, logps, raw, done, stopped, count, rng, routing = carry
        rng, key = jax.random.split(rng)
        token, logp = sample_token(key, logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        live = ~done
        token = jnp.where(live, token, pad_token_id)
        tokens = tokens.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(live, logp, 0.0))
        raw_logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=1)[:, 0]
        raw = raw.at[:, step].set(jnp.where(live, raw_logp, 0.0))
        is_stop = live & jnp.any(token[:, None] == stop_ids[None, :], axis=1)
        count = count + live.astype(jnp.int32)
        done = done | is_stop | (count >= budget)
        # every token written is fed, the last one too: the next turn continues after it
        out = model.forward(token[:, None], cache=cache, attention_mask=live[:, None].astype(jnp.int32),
                            return_hidden=True)
        logits = jnp.where(live[:, None], _logits_at(model, out.hidden[:, 0]), logits)
        if routing is not None:
            routing = jax.lax.dynamic_update_slice(routing, out.routing, (0, 0, step, 0))
        return step + 1, out.cache, logits, tokens, logps, raw, done, stopped | is_stop, count, rng, routing

    zeros = jnp.zeros((n, max_new_tokens), jnp.float32)
    routing = (jnp.zeros((moe_layers, n, max_new_tokens, model.config.num_experts_per_tok), jnp.int32)
               if moe_layers else None)
    init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((n, max_new_tokens), pad_token_id, jnp.int32), zeros,
            zeros, budget <= 0, jnp.zeros((n,), jnp.bool_), jnp.zeros((n,), jnp.int32), rng, routing)
    _, cache, logits, tokens, logps, raw, _, stopped, count, _, routing = jax.lax.while_loop(cond, body, init)
    return tokens, logps, raw, count, stopped, cache, logits, routing


# ---------------------------------------------------------------------------- host loop


def _env_seed(seed: int, row: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(row)]).generate_state(1)[0] % (2**31 - 1))


def _ensure_room(cache, needed: int, bucket: int):
    """The cache with at least ``needed`` free slots after its index (grown in buckets,
    so a run compiles its steps for a few cache sizes only)."""
    index = int(cache.index)
    if index + needed <= cache.max_len:
        return cache
    return grow_cache(cache, max(2 * cache.max_len, bucket_length(index + needed, bucket)))


def _pad_rows(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads lists of ids to [len(rows), width] (ids, mask)."""
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def generate_episodes(
    model: nnx.Module,
    tokenizer: Any,
    records: Sequence[dict],
    env_factory: Callable[[], Any],
    *,
    max_turns: int,
    max_new_tokens: int,
    max_total_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    rng: jax.Array,
    seed: int = 0,
    prompt_width: int | None = None,
    cache_bucket: int = 64,
) -> Episodes:
    """Runs ``num_samples`` episodes per record with a fresh ``env_factory()`` each.

    Args:
      model: a ``CausalLM``.
      tokenizer: HF tokenizer with a chat template, or a CharTokenizer.
      records: B dataset records, passed to ``env.reset``.
      env_factory: called with no arguments, returns an environment
        (``jaxrl_llm.envs.Environment``).
      max_turns: assistant messages per episode at most (≥ 1).
      max_new_tokens: tokens per assistant message at most.
      max_total_tokens: T, the response area (policy + observation tokens) per episode.
      num_samples: G episodes per record (a GRPO group).
      temperature, top_k, top_p, min_p: sampling options (``rollout.filters``).
      stop_token_ids: ids that end an assistant message (EOS, end-of-turn).
      pad_token_id: filler id.
      rng: PRNG key of the sampling.
      seed: environment seed: row i's environment is reset with a seed derived from
        (seed, i), so the same (rng, seed) replays the same episodes.
      prompt_width: pad the rendered prompts to this width P (an error names the longest
        prompt if it does not fit); None: the longest prompt, rounded up to 32.
      cache_bucket: the KV cache grows in multiples of this many slots.

    Returns:
      Episodes with a Rollout of N = B·G rows and response width T.
    """
    for name, value in (("max_turns", max_turns), ("max_new_tokens", max_new_tokens),
                        ("max_total_tokens", max_total_tokens), ("num_samples", num_samples),
                        ("cache_bucket", cache_bucket)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not callable(env_factory):
        raise TypeError(f"env_factory must be callable (returning an environment), got {env_factory!r}")
    validate_sampling_args(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    check_ids_fit(model, pad_token_id=pad_token_id, stop_token_ids=stop_token_ids)
    stop_set = {int(t) for t in stop_token_ids}
    n = len(records) * num_samples

    # reset: one environment per row, its opening messages rendered by the chat template
    envs, conversations, prompts = [], [], []
    for row in range(n):
        env = env_factory()
        if not callable(getattr(env, "reset", None)) or not callable(getattr(env, "step", None)):
            raise TypeError(f"env_factory returned {type(env).__name__}, which has no reset/step methods "
                            "(see jaxrl_llm.envs.Environment)")
        messages = check_messages_list(list(env.reset(records[row // num_samples], seed=_env_seed(seed, row))),
                                       f"{type(env).__name__}.reset")
        envs.append(env)
        conversations.append([dict(m) for m in messages])
        prompts.append(encode_text(tokenizer, render_prompt(tokenizer, messages, tools=getattr(env, "tools", None))))
    longest = max(len(p) for p in prompts)
    width = bucket_length(longest, 32) if prompt_width is None else prompt_width
    if longest > width:
        raise ValueError(f"a rendered prompt has {longest} tokens, more than prompt_width={width} "
                         f"(row {int(np.argmax([len(p) for p in prompts]))}); raise the prompt width (max_prompt_len)")
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if window is not None and longest + max_total_tokens > window:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_total_tokens={max_total_tokens} exceeds the "
                         f"model's max_position_embeddings={window}")
    prompt_tokens, prompt_mask = _pad_rows(prompts, width, pad_token_id)
    check_ids_fit(model, prompt_tokens, prompt_mask)

    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size
    cache = model.init_cache(n, bucket_length(width + max_new_tokens, cache_bucket))
    cache, logits, prompt_routing = _extend(graphdef, state, cache, jnp.zeros((n, vocab), jnp.float32),
                                            jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask))
    # MoE: the expert choices of every token, to replay them in the training forward
    routes = None if prompt_routing is None else [[] for _ in range(n)]  # per row: [M, k] per token

    tokens = [[] for _ in range(n)]
    logps = [[] for _ in range(n)]
    raws = [[] for _ in range(n)]
    policy = [[] for _ in range(n)]
    step_rewards = np.zeros((n, max_total_tokens), np.float32)
    rewards = np.zeros(n, np.float32)
    turns = np.zeros(n, np.int32)
    reasons: list[str | None] = [None] * n
    info_sums: dict[str, np.ndarray] = {}
    options = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), min_p=float(min_p),
                   stop_token_ids=tuple(sorted(stop_set)), pad_token_id=int(pad_token_id))

    for turn in range(max_turns):
        live = [i for i in range(n) if reasons[i] is None]
        if not live:
            break
        budget = np.zeros(n, np.int32)
        for i in live:
            budget[i] = min(max_new_tokens, max_total_tokens - len(tokens[i]))
        cache = _ensure_room(cache, max_new_tokens, cache_bucket)
        out = _decode_turn(graphdef, state, cache, logits, jnp.asarray(budget), jax.random.fold_in(rng, turn),
                           max_new_tokens=max_new_tokens, **options)
        new, new_logp, new_raw, count, stopped, cache, logits, new_routing = out
        new, new_logp, new_raw, count, stopped = map(np.asarray, (new, new_logp, new_raw, count, stopped))

        observations: dict[int, list[int]] = {}
        for i in live:
            c = int(count[i])
            ids = new[i, :c].tolist()
            tokens[i] += ids
            logps[i] += new_logp[i, :c].tolist()
            raws[i] += new_raw[i, :c].tolist()
            policy[i] += [1] * c
            if routes is not None:
                routes[i] += list(np.moveaxis(np.asarray(new_routing[:, i, :c]), 1, 0))
            turns[i] += 1
            ended_by_stop = bool(stopped[i])
            text = decode_ids(tokenizer, ids[:-1] if ended_by_stop else ids)
            conversations[i].append({"role": "assistant", "content": text})
            if not ended_by_stop:  # cut at the message or episode budget: not a message to answer
                reasons[i] = "length"
                continue
            result = check_step_result(envs[i].step(text), envs[i])
            rewards[i] += result.reward
            step_rewards[i, len(tokens[i]) - 1] += result.reward
            for key, value in result.info.items():
                info_sums.setdefault(key, np.zeros(n, np.float32))[i] += float(value)
            if result.observation is None:  # the model answered, nothing comes back
                reasons[i] = "stop"
                continue
            if result.done:  # the environment ended it (its last observation is not shown)
                reasons[i] = "env_done"
                continue
            if turn == max_turns - 1:
                reasons[i] = "max_turns"
                continue
            conversations[i] += [dict(m) for m in result.observation]
            obs = observation_ids(tokenizer, result.observation, tools=getattr(envs[i], "tools", None),
                                  stop_text=decode_ids(tokenizer, ids[-1:]))
            if len(tokens[i]) + len(obs) >= max_total_tokens:  # no room left to answer it
                reasons[i] = "length"
                continue
            observations[i] = obs
            tokens[i] += obs
            logps[i] += [0.0] * len(obs)
            raws[i] += [0.0] * len(obs)
            policy[i] += [0] * len(obs)

        if observations:
            obs_width = bucket_length(max(len(o) for o in observations.values()), 16)
            obs_tokens, obs_mask = _pad_rows([observations.get(i, []) for i in range(n)], obs_width, pad_token_id)
            cache = _ensure_room(cache, obs_width, cache_bucket)
            cache, logits, obs_routing = _extend(graphdef, state, cache, logits, jnp.asarray(obs_tokens),
                                                 jnp.asarray(obs_mask))
            if routes is not None:
                for i, obs in observations.items():
                    routes[i] += list(np.moveaxis(np.asarray(obs_routing[:, i, :len(obs)]), 1, 0))

    reasons = [r or "max_turns" for r in reasons]
    out_tokens, sequence_mask = _pad_rows(tokens, max_total_tokens, pad_token_id)
    pack = functools.partial(_pack_values, width=max_total_tokens)
    rollout = Rollout(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        tokens=out_tokens,
        logprobs=pack(logps, dtype=np.float32),
        mask=pack(policy, dtype=np.int32),
        lengths=sequence_mask.sum(axis=1).astype(np.int32),
        finished=np.array([r != "length" for r in reasons]),
        raw_logprobs=pack(raws, dtype=np.float32),
        sequence_mask=sequence_mask,
        routing=None if routes is None else _pack_routing(np.asarray(prompt_routing), routes, max_total_tokens),
    )
    return Episodes(rollout, rewards, step_rewards, turns, reasons, info_sums, conversations)


def _pack_routing(prompt_routing: np.ndarray, routes: list[list[np.ndarray]], width: int) -> np.ndarray:
    """[M, N, P + T, k] int32: the prompt's expert choices, then each row's response
    tokens' (policy and observation, in order), zeros after the end."""
    m, n, p, k = prompt_routing.shape
    out = np.zeros((m, n, p + width, k), np.int32)
    out[:, :, :p] = prompt_routing
    for i, r in enumerate(routes):
        if r:
            out[:, i, p:p + len(r)] = np.moveaxis(np.stack(r), 0, 1)
    return out


def _pack_values(rows: Sequence[Sequence[float]], width: int, dtype) -> np.ndarray:
    """Right-pads per-row value lists with 0 to [len(rows), width]."""
    out = np.zeros((len(rows), width), dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out
