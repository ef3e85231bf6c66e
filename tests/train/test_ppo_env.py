"""PPO on multi-turn episodes: per-step rewards on their tokens, GAE across the masked
observation spans (numpy reference), and a short end-to-end run with an environment."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, tiny_config
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.ppo import PPOConfig, compute_ppo_targets, train
from tests.train.test_grpo_env import DATA, STOPS, TINY, TOK, EchoEnv
from tests.train.test_ppo import ref_targets


@pytest.mark.parametrize("placement", ["token", "sequence"])
def test_step_rewards_and_gae_across_observation_spans_match_numpy(placement):
    rng = np.random.default_rng(0)
    n, t = 4, 12
    logp = rng.normal(-2, 0.5, (n, t)).astype(np.float32)
    ref_logp = (logp + rng.normal(0, 0.3, (n, t))).astype(np.float32)
    values = rng.normal(0, 1, (n, t)).astype(np.float32)
    # policy tokens (1) with observation spans (0) between messages, then padding
    mask = np.array([[1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1],
                     [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
                     [1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]], np.float32)
    token_scores = np.zeros((n, t), np.float32)
    for b in range(n):  # a step reward at the last token of every message
        ends = [i for i in range(t) if mask[b, i] and (i + 1 == t or not mask[b, i + 1])]
        token_scores[b, ends] = rng.normal(0, 1, len(ends))
    zeros = np.zeros(n, np.float32)
    out = jax.jit(lambda *a, s: compute_ppo_targets(*a, beta=0.1, gamma=0.95, lam=0.9, whiten=False,
                                                    kl_reward_placement=placement, token_scores=s))(
        zeros, logp, ref_logp, values, mask, s=token_scores)
    kl, rewards, adv, returns = ref_targets(zeros, logp, ref_logp, values, mask, 0.1, "k1", 0.95, 0.9, False,
                                            placement, token_scores=token_scores)
    for name, expected in (("rewards", rewards), ("advantages", adv), ("returns", returns)):
        np.testing.assert_allclose(np.asarray(out[name]), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.all(np.asarray(out["advantages"])[mask == 0] == 0)


def test_ppo_trains_on_episodes(tmp_path):
    config = PPOConfig(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False),
                       optim=OptimConfig(learning_rate=1e-3), prompts_per_step=2, samples_per_prompt=2,
                       max_prompt_len=32, max_new_tokens=8, max_turns=3, max_total_tokens=80, ppo_epochs=2,
                       stop_token_ids=STOPS)
    result = train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=TOK,
                   prompts=DATA, env=EchoEnv)
    row = result.history[-1]
    for key in ("turns_mean", "observation_tokens_mean", "episode_reward_mean", "explained_variance", "kl",
                "pg_loss", "vf_loss"):
        assert key in row and np.isfinite(row[key]), key
    assert row["turns_mean"] > 1 and row["observation_tokens_mean"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(env="m:f", reward_norm=True), "reward_norm"),
    (dict(env="m:f", stop_strings=("x",)), "stop_strings"),
    (dict(max_turns=2.0), "max_turns"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPOConfig(**kwargs)
