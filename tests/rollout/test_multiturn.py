"""Multi-turn rollouts: KV-cache continuation is exact, recorded log-probs equal a
teacher-forced forward of the final sequence, finish reasons, masks and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.envs import StepResult
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.ops import token_logprobs
from jaxrl_llm.rollout.filters import process_logits
from jaxrl_llm.rollout.multiturn import FINISH_REASONS, _extend, generate_episodes, observation_ids
from jaxrl_llm.rollout.sampler import generate

TOK = CharTokenizer()
# Many stop ids: a random model then ends its messages after a few tokens, so episodes
# take several turns.
STOPS = tuple(range(97, 123)) + (TOK.eos_token_id,)


class ToolLikeEnv:
    """Answers each message with a tool observation holding a seeded random number, for
    ``turns`` turns, then ends the episode (observation None); reward = number of turns."""

    tools = [{"type": "function", "function": {"name": "rand", "parameters": {"type": "object", "properties": {}}}}]

    def __init__(self, turns=2, done_at=None):
        self.turns, self.done_at = turns, done_at

    def reset(self, record, *, seed):
        self.rng = np.random.default_rng(seed)
        self.count = 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.count += 1
        if self.done_at == self.count:
            return StepResult([{"role": "tool", "content": "bye"}], 0.5, True, {"calls": 0.0})
        if self.count > self.turns:
            return StepResult(None, float(self.count), False, {"calls": 0.0})
        return StepResult([{"role": "tool", "content": str(self.rng.integers(1000))}], 0.0, False, {"calls": 1.0})


RECORDS = [{"prompt": "hi"}, {"prompt": "a longer question"}]


@pytest.fixture(scope="module")
def model():
    return CausalLM(tiny_config("llama"), rngs=nnx.Rngs(0))


def run(model, env_factory=ToolLikeEnv, **kwargs):
    options = dict(max_turns=4, max_new_tokens=12, max_total_tokens=96, num_samples=3, stop_token_ids=STOPS,
                   pad_token_id=TOK.pad_token_id, rng=jax.random.PRNGKey(1), seed=7)
    options.update(kwargs)
    return generate_episodes(model, TOK, RECORDS, env_factory, **options)


def teacher_forced(model, rollout, **filters):
    tokens, mask = rollout.full_tokens()
    logits, _ = model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    p = rollout.prompt_tokens.shape[1]
    logits = logits[:, p - 1: -1]
    if filters:
        logits = jax.vmap(lambda l: process_logits(l, **filters), in_axes=1, out_axes=1)(logits)
    return np.asarray(token_logprobs(logits, jnp.asarray(rollout.tokens)))


@pytest.mark.parametrize("filters", [{}, dict(temperature=0.7, top_k=20)])
def test_recorded_logprobs_equal_teacher_forced_forward(model, filters):
    ep = run(model, **filters)
    r = ep.rollout
    mask, seq = np.asarray(r.mask), np.asarray(r.sequence_mask)
    assert (ep.turns >= 2).any() and (seq - mask).sum() > 0, "the test needs episodes with observations"
    raw = teacher_forced(model, r)
    np.testing.assert_allclose(raw * mask, np.asarray(r.raw_logprobs) * mask, atol=3e-5)
    if filters:
        sampled = teacher_forced(model, r, **filters)
        np.testing.assert_allclose(sampled * mask, np.asarray(r.logprobs) * mask, atol=3e-5)


def test_logits_after_appended_observation_equal_a_fresh_prefill(model):
    rng = np.random.default_rng(0)
    n, p, t, o = 3, 6, 5, 7
    prompt = rng.integers(0, 256, (n, p)).astype(np.int32)
    prompt_mask = np.ones((n, p), np.int32)
    prompt_mask[0, :2] = 0  # a left-padded row
    turn = rng.integers(0, 256, (n, t)).astype(np.int32)
    obs = rng.integers(0, 256, (n, o)).astype(np.int32)
    obs_mask = (np.arange(o)[None] < np.array([[7], [3], [5]])).astype(np.int32)  # ragged observations
    graphdef, state = nnx.split(model)
    cache = model.init_cache(n, p + t + o)
    zeros = jnp.zeros((n, model.config.vocab_size))
    cache, _, _ = _extend(graphdef, state, cache, zeros, jnp.asarray(prompt), jnp.asarray(prompt_mask))
    cache, _, _ = _extend(graphdef, state, cache, zeros, jnp.asarray(turn), jnp.ones((n, t), jnp.int32))
    _, logits, _ = _extend(graphdef, state, cache, zeros, jnp.asarray(obs), jnp.asarray(obs_mask))
    for i in range(n):
        seq = np.concatenate([prompt[i][prompt_mask[i] > 0], turn[i], obs[i][obs_mask[i] > 0]])
        fresh, _ = model(jnp.asarray(seq)[None])
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(fresh[0, -1]), atol=2e-5, rtol=2e-5)


def test_masks_layout_and_observation_tokens(model):
    ep = run(model)
    r = ep.rollout
    mask, seq, tokens = np.asarray(r.mask), np.asarray(r.sequence_mask), np.asarray(r.tokens)
    # the response area is packed from column 0; the loss mask is inside it
    lengths = seq.sum(axis=1)
    np.testing.assert_array_equal(seq, (np.arange(seq.shape[1])[None] < lengths[:, None]).astype(np.int32))
    assert np.all(mask <= seq) and np.array_equal(np.asarray(r.lengths), lengths)
    assert np.all(np.asarray(r.logprobs)[mask == 0] == 0)
    for i in range(len(tokens)):
        # the observation spans decode to the template's tool turns (and the next header)
        obs_text = TOK.decode(tokens[i][(seq[i] - mask[i]) > 0].tolist(), skip_special_tokens=False)
        for m in ep.conversations[i][2:]:
            if m["role"] == "tool":
                assert f"<|tool|>\n{m['content']}\n<|assistant|>\n" in obs_text
        assert ep.finish_reasons[i] in FINISH_REASONS
        n_msgs = sum(m["role"] == "assistant" for m in ep.conversations[i])
        assert n_msgs == ep.turns[i]


def test_finish_reasons_and_rewards(model):
    # 2 tool turns then an answer: 3 messages, reward 3 — unless a message was cut
    ep = run(model, max_new_tokens=30)
    for i, reason in enumerate(ep.finish_reasons):
        if reason == "stop":
            assert ep.turns[i] == 3 and ep.rewards[i] == 3.0
            assert ep.env_info["calls"][i] == 2.0
            last = int(np.asarray(ep.rollout.lengths)[i]) - 1
            assert ep.step_rewards[i, last] == 3.0 and ep.step_rewards[i].sum() == 3.0
    assert "stop" in ep.finish_reasons
    # max_turns: the environment never stops answering within 2 turns
    ep = run(model, max_turns=2, max_new_tokens=30, env_factory=lambda: ToolLikeEnv(turns=10))
    assert set(ep.finish_reasons) <= {"max_turns", "length"} and "max_turns" in ep.finish_reasons
    assert ep.turns.max() == 2
    # env_done at the first step
    ep = run(model, max_new_tokens=30, env_factory=lambda: ToolLikeEnv(done_at=1))
    done = [i for i, r in enumerate(ep.finish_reasons) if r == "env_done"]
    assert done and all(ep.turns[i] == 1 and ep.rewards[i] == 0.5 for i in done)
    # length: a budget too small for any message to end
    ep = run(model, max_new_tokens=4, max_total_tokens=4, stop_token_ids=(TOK.eos_token_id,))
    assert set(ep.finish_reasons) == {"length"} and not np.any(np.asarray(ep.rollout.finished))
    assert np.all(np.asarray(ep.rollout.lengths) == 4)
    summary = ep.summary()
    assert summary["finish_length"] == 1.0 and summary["policy_tokens_mean"] == 4.0


def test_moe_expert_choices_are_recorded_for_every_token():
    moe = CausalLM(tiny_config("qwen3_moe"), rngs=nnx.Rngs(0))
    r = run(moe, num_samples=2).rollout
    assert r.routing is not None and r.routing.shape[2] == r.prompt_tokens.shape[1] + r.tokens.shape[1]
    tokens, mask = r.full_tokens()
    fresh = moe.forward(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), return_hidden=True).routing
    same = np.all(np.sort(np.asarray(r.full_routing()), -1) == np.sort(np.asarray(fresh), -1), axis=-1)  # [M, N, L]
    valid = np.broadcast_to(np.asarray(mask)[None] > 0, same.shape)
    observation = np.asarray(r.sequence_mask) - np.asarray(r.mask)
    assert observation.sum() > 0  # observation tokens' choices are recorded too
    assert same[valid].mean() == 1.0


def test_greedy_first_turn_matches_single_turn_generate(model):
    ep = run(model, temperature=0.0, num_samples=1, max_new_tokens=12)
    prompts, pmask = np.asarray(ep.rollout.prompt_tokens), np.asarray(ep.rollout.prompt_mask)
    single = generate(model, prompts, pmask, max_new_tokens=12, temperature=0.0, stop_token_ids=STOPS,
                      pad_token_id=TOK.pad_token_id, rng=jax.random.PRNGKey(0))
    for i in range(len(prompts)):
        first = int(np.asarray(single.lengths)[i])
        np.testing.assert_array_equal(np.asarray(ep.rollout.tokens)[i, :first], np.asarray(single.tokens)[i, :first])


def test_same_keys_replay_the_same_episodes_environment_rng_included(model):
    a, b = run(model), run(model)
    np.testing.assert_array_equal(np.asarray(a.rollout.tokens), np.asarray(b.rollout.tokens))
    assert a.conversations == b.conversations
    c = run(model, seed=8)  # another environment seed: other tool outputs, same first messages
    assert c.conversations != a.conversations
    assert [x[1] for x in c.conversations] == [x[1] for x in a.conversations]


def test_observation_ids_drop_the_stop_text_already_sampled():
    ids = observation_ids(TOK, [{"role": "tool", "content": "42"}])
    assert TOK.decode(ids, skip_special_tokens=False) == "\n<|tool|>\n42\n<|assistant|>\n"
    ids = observation_ids(TOK, [{"role": "tool", "content": "42"}], stop_text="\n")
    assert TOK.decode(ids, skip_special_tokens=False) == "<|tool|>\n42\n<|assistant|>\n"


@pytest.mark.parametrize("bad, match", [
    (lambda: object(), "no reset/step"),
    (lambda: type("E", (ToolLikeEnv,), {"step": lambda self, t: "oops"})(), "must return a StepResult"),
    (lambda: type("E", (ToolLikeEnv,), {"step": lambda self, t: StepResult(None, float("nan"))})(), "non-finite"),
    (lambda: type("E", (ToolLikeEnv,), {"reset": lambda self, r, seed: "hello"})(), "list of chat messages"),
])
def test_bad_environments_are_named(model, bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        run(model, env_factory=bad, max_new_tokens=30)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_turns=0), "max_turns must be a positive int"),
    (dict(max_total_tokens=2.5), "max_total_tokens must be a positive int"),
    (dict(prompt_width=4), "prompt_width=4"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(model, **kwargs)
