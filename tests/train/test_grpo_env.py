"""GRPO on multi-turn episodes: observation tokens get exactly zero gradient (policy
loss, KL and entropy), empty observations make a multi-turn trajectory the single-turn
sample with the same tokens, the CLI/config take ``env``, and resume replays episodes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.envs import StepResult
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout.multiturn import generate_episodes
from jaxrl_llm.rollout.sampler import generate
from jaxrl_llm.train import grpo
from jaxrl_llm.train.grpo import GRPOConfig, _policy_loss, _Static, train
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import ResponseLogprobs, split_model

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TOK = CharTokenizer()
STOPS = tuple(range(97, 123))


class EchoEnv:
    """Two tool turns (observation: a seeded random number), then ends; reward 1 if the
    final message holds a digit, else 0 (so groups differ)."""

    def reset(self, record, *, seed):
        self.rng, self.count = np.random.default_rng(seed), 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.count += 1
        if self.count <= 2:
            return StepResult([{"role": "tool", "content": str(self.rng.integers(100))}], 0.0, False, {"tool_calls": 1.0})
        return StepResult(None, float(any(c.isdigit() for c in text)), True, {"tool_calls": 0.0})


class SilentEnv:
    """Answers every message with an empty observation for ``turns`` turns."""

    def __init__(self, turns=3):
        self.turns = turns

    def reset(self, record, *, seed):
        self.count = 0
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.count += 1
        return StepResult([] if self.count < self.turns else None, 0.0, False, {})


class PlainTokenizer(CharTokenizer):
    """A template that renders message contents only: an empty observation adds no token."""

    def apply_chat_template(self, messages, *, add_generation_prompt=True, tokenize=False, tools=None):
        text = "".join(m["content"] for m in messages)
        return self.encode(text) if tokenize else text


DATA = [{"prompt": p} for p in ("ab", "cde", "f", "ghij")]


def _config(tmp_path, **kw):
    base = dict(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False, seed=3),
                optim=OptimConfig(learning_rate=1e-3), prompts_per_step=2, group_size=4, max_prompt_len=32,
                max_new_tokens=8, max_turns=3, max_total_tokens=80, kl_coef=0.1, entropy_coef=0.01,
                stop_token_ids=STOPS)
    base.update(kw)
    return GRPOConfig(**base)


@pytest.fixture(scope="module")
def model():
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))


def _batch_from(episodes, rng):
    r = episodes.rollout
    tokens, full_mask = r.full_tokens()
    mask = np.asarray(r.mask, np.float32)
    n, t = mask.shape
    return {
        "tokens": jnp.asarray(tokens), "full_mask": jnp.asarray(full_mask), "mask": jnp.asarray(mask),
        "advantages": jnp.asarray(rng.normal(0, 1, n), jnp.float32), "tis_weight": jnp.ones((n, t)),
        "old_logp": jnp.asarray(r.raw_logprobs) + jnp.asarray(rng.normal(0, 0.1, (n, t)), jnp.float32),
        "ref_logp": jnp.asarray(r.raw_logprobs) + jnp.asarray(rng.normal(0, 0.2, (n, t)), jnp.float32),
        "routing": None,
    }


def test_observation_tokens_get_exactly_zero_gradient(model, tmp_path, monkeypatch):
    episodes = generate_episodes(model, TOK, DATA[:2], EchoEnv, max_turns=3, max_new_tokens=8, max_total_tokens=80,
                                 num_samples=2, stop_token_ids=STOPS, pad_token_id=TOK.pad_token_id,
                                 rng=jax.random.PRNGKey(0), seed=1, prompt_width=32)
    r = episodes.rollout
    observation = (np.asarray(r.sequence_mask) - np.asarray(r.mask)) > 0
    assert observation.sum() > 10, "the test needs observation tokens"
    batch = _batch_from(episodes, np.random.default_rng(0))
    n, t = observation.shape
    logits0 = jax.random.normal(jax.random.PRNGKey(1), (n, t, model.config.vocab_size))

    # the trainer's loss (policy + KL + entropy) with the response logits as the variable
    for config in (_config(tmp_path), _config(tmp_path, policy_loss="gspo", clip_low=0.05, clip_high=0.05)):
        def loss_of(logits):
            def fake_logprobs(model, tokens, full_mask, prompt_len, **kwargs):
                logp = ops.token_logprobs(logits, tokens[:, prompt_len:])
                return ResponseLogprobs(logp, ops.entropy_from_logits(logits), routing=None,
                                        aux_loss=jnp.zeros(()), router_z_loss=jnp.zeros(()))
            monkeypatch.setattr(grpo, "response_logprobs", fake_logprobs)
            static = _Static(32, config, has_old=True, has_ref=True, replay=False, train_router=True)
            split = split_model(model)
            return _policy_loss(split.params, batch, split, static)[0]

        grads = np.asarray(jax.grad(loss_of)(logits0))
        assert np.all(grads[observation] == 0.0)
        assert np.abs(grads[np.asarray(r.mask) > 0]).sum() > 0  # policy tokens do get gradient


def test_empty_observations_give_the_single_turn_sample_and_loss(model, tmp_path):
    tok = PlainTokenizer()
    episodes = generate_episodes(model, tok, DATA, lambda: SilentEnv(turns=3), max_turns=3, max_new_tokens=10,
                                 max_total_tokens=30, temperature=0.0, stop_token_ids=STOPS,
                                 pad_token_id=tok.pad_token_id, rng=jax.random.PRNGKey(0), prompt_width=8)
    r = episodes.rollout
    assert (episodes.turns == 3).any(), "the test needs episodes with several messages"
    np.testing.assert_array_equal(np.asarray(r.sequence_mask), np.asarray(r.mask))  # nothing observed
    lengths = np.asarray(r.lengths)
    single = generate(model, np.asarray(r.prompt_tokens), np.asarray(r.prompt_mask), max_new_tokens=30,
                      temperature=0.0, pad_token_id=tok.pad_token_id, rng=jax.random.PRNGKey(0),
                      return_raw_logprobs=True, prompt_bucket=0)
    for i in range(len(lengths)):  # the k messages are the single greedy sample, cut into turns
        np.testing.assert_array_equal(np.asarray(r.tokens)[i, :lengths[i]], np.asarray(single.tokens)[i, :lengths[i]])
    as_single = single.replace(tokens=r.tokens, mask=r.mask, lengths=r.lengths,
                               raw_logprobs=jnp.asarray(single.raw_logprobs) * jnp.asarray(r.mask))
    np.testing.assert_allclose(np.asarray(as_single.raw_logprobs), np.asarray(r.raw_logprobs), atol=2e-5)
    config = _config(tmp_path, max_prompt_len=8, max_total_tokens=30)
    static = _Static(8, config, has_old=True, has_ref=True, replay=False, train_router=True)
    split = split_model(model)
    losses = []
    for rollout in (r, as_single):
        b = _batch_from(dataclasses.replace(episodes, rollout=rollout), np.random.default_rng(0))
        losses.append(float(_policy_loss(split.params, b, split, static)[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)


def test_grpo_trains_on_episodes_and_logs_their_metrics(model, tmp_path):
    result = train(_config(tmp_path), policy=model, tokenizer=TOK, prompts=DATA, env=EchoEnv)
    assert len(result.history) == 2
    row = result.history[-1]
    for key in ("turns_mean", "policy_tokens_mean", "observation_tokens_mean", "finish_stop", "finish_length",
                "env_tool_calls", "episode_reward_mean", "loss", "kl"):
        assert key in row and np.isfinite(row[key]), key
    assert row["observation_tokens_mean"] > 0 and row["turns_mean"] > 1


def test_resume_replays_the_same_episodes(model, tmp_path):
    full = train(_config(tmp_path / "a"), policy=model, tokenizer=TOK, prompts=DATA, env=EchoEnv)
    half = _config(tmp_path / "b", run=RunConfig(output_dir=str(tmp_path / "b"), total_steps=1, progress=False,
                                                 seed=3, checkpoint_every=1))
    train(half, policy=model, tokenizer=TOK, prompts=DATA, env=EchoEnv)
    resumed = train(dataclasses.replace(half, run=dataclasses.replace(half.run, total_steps=2, resume=True)),
                    policy=model, tokenizer=TOK, prompts=DATA, env=EchoEnv)
    a, b = full.history[-1], resumed.history[-1]
    for key in ("episode_reward_mean", "turns_mean", "policy_tokens_mean", "observation_tokens_mean", "loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for x, y in zip(jax.tree.leaves(nnx.state(full.model, nnx.Param)), jax.tree.leaves(nnx.state(resumed.model, nnx.Param))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_env_spec_from_the_config_and_the_cli(tmp_path):
    env_file = tmp_path / "my_env.py"
    env_file.write_text("from tests.train.test_grpo_env import EchoEnv\n\ndef make():\n    return EchoEnv()\n")
    config = _config(tmp_path / "run", env=f"{env_file}:make",
                     run=RunConfig(output_dir=str(tmp_path / "run"), total_steps=1, progress=False))
    result = train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=TOK,
                   prompts=DATA)
    assert result.history[0]["turns_mean"] > 1
    with pytest.raises(ValueError, match="env 'nowhere.py:make': file"):
        train(_config(tmp_path / "x", env="nowhere.py:make"), policy=CausalLM(tiny_config("llama", **TINY),
              rngs=nnx.Rngs(0)), tokenizer=TOK, prompts=DATA)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_turns=0), "max_turns"),
    (dict(max_total_tokens=4), "max_total_tokens"),
    (dict(env=3), "env must be a factory spec"),
    (dict(env="m:f", overlong_buffer=2), "overlong_buffer=2 penalises single responses"),
])
def test_config_checks(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_train_rejects_mixed_scoring_and_turns_without_env(model, tmp_path):
    with pytest.raises(ValueError, match="scored by its rewards"):
        train(_config(tmp_path), policy=model, tokenizer=TOK, prompts=DATA, env=EchoEnv,
              reward_fn=lambda p, c, **k: [0.0] * len(c))
    with pytest.raises(ValueError, match="apply to multi-turn episodes"):
        train(_config(tmp_path), policy=model, tokenizer=TOK, prompts=DATA, reward_fn=lambda p, c, **k: [0.0] * len(c))
