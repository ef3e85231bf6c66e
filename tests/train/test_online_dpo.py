"""Online DPO: pairs from the judge's best / worst answers, the [2B, L] batch layout, a
run with a reward function and with a judge, skipped steps, and learning."""

import dataclasses
import logging

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout.sampler import Rollout
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.online_dpo import OnlineDPOConfig, best_worst_pairs, pair_batch, train
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.preference_data import FunctionJudge

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
TOK = CharTokenizer()
PROMPTS = [{"prompt": f"q{i}:"} for i in range(16)]


def count_a(prompts, completions, **columns):
    """Toy reward: the number of 'a' characters."""
    return [float(c.count("a")) for c in completions]


def _config(tmp_path, **kw):
    fields = dict(run=RunConfig(output_dir=str(tmp_path), total_steps=2, progress=False),
                  optim=OptimConfig(learning_rate=3e-3), prompts_per_step=4, samples_per_prompt=4, max_prompt_len=8,
                  max_new_tokens=8, beta=0.5)
    fields.update(kw)
    return OnlineDPOConfig(**fields)


def test_best_worst_pairs():
    scores = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [np.nan, 3.0, -1.0], [np.nan, np.nan, 1.0]])
    assert best_worst_pairs(scores) == [(0, 1, 0), (2, 1, 2)]  # ties and single scores give no pair


def test_pair_batch_puts_chosen_rows_first():
    rollout = Rollout(prompt_tokens=np.array([[5, 6, 0]] * 4), prompt_mask=np.array([[1, 1, 0]] * 4),
                      tokens=np.arange(8).reshape(4, 2) + 10, logprobs=np.zeros((4, 2)),
                      mask=np.array([[1, 1], [1, 0], [1, 1], [0, 0]]), lengths=np.array([2, 1, 2, 0]),
                      finished=np.ones(4, bool))
    batch = pair_batch(rollout, [(2, 1), (0, 3)])
    np.testing.assert_array_equal(batch["tokens"][:, 3:], [[14, 15], [10, 11], [12, 13], [16, 17]])
    np.testing.assert_array_equal(batch["tokens"][0, :3], [0, 5, 6])  # prompt left-aligned
    np.testing.assert_array_equal(batch["mask"], [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0],
                                                  [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["attention_mask"][2], [0, 1, 1, 1, 0])

    # pairs across sampling rounds: rows of the rounds stacked in order
    later = dataclasses.replace(rollout, tokens=rollout.tokens + 100)
    mixed = pair_batch([rollout, later], [(2, 4 + 1), (4 + 0, 3)])
    np.testing.assert_array_equal(mixed["tokens"][:, 3:], [[14, 15], [110, 111], [112, 113], [16, 17]])
    np.testing.assert_array_equal(mixed["mask"], batch["mask"])


def test_runs_with_a_reward_function_or_a_judge(tmp_path):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    for name, kwargs in (("fn", dict(reward_fn=count_a)), ("judge", dict(judge=FunctionJudge(count_a)))):
        result = train(_config(tmp_path / name), policy=model, tokenizer=TOK, prompts=PROMPTS, **kwargs)
        row = result.history[-1]
        assert row["pairs"] > 0 and row["chosen_score_mean"] > row["rejected_score_mean"]
        assert np.isfinite(row["loss"]) and "reward_accuracy" in row


def test_a_step_without_pairs_is_skipped(tmp_path, caplog):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with caplog.at_level(logging.WARNING):
        result = train(_config(tmp_path, max_sampling_rounds=2), policy=model, tokenizer=TOK, prompts=PROMPTS,
                       reward_fn=lambda p, c, **k: [1.0] * len(c))
    assert all(row["pairs"] == 0 and row["sampling_rounds"] == 2 and "loss" not in row for row in result.history)
    assert "step skipped" in caplog.text


def test_online_dpo_raises_the_reward(tmp_path):
    """30 steps on 2 seeds: the mean reward of the last 8 steps exceeds the first 5's by 50%.
    Measured (first 5 → last 8 steps, AVX2): seed 0 0.074 → 0.363, seed 1 0.042 → 0.237,
    seed 2 0.034 → 0.340 (4.9–9.9×)."""
    for seed in (0, 1):
        out = tmp_path / str(seed)
        config = _config(out, run=RunConfig(output_dir=str(out), total_steps=30, progress=False, seed=seed))
        result = train(config, policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed)), tokenizer=TOK,
                       prompts=PROMPTS, reward_fn=count_a)
        curve = [row["reward_mean"] for row in result.history]
        assert np.mean(curve[-8:]) > 1.5 * np.mean(curve[:5]), (seed, curve)


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples_per_prompt=1), "samples_per_prompt"),
    (dict(loss_kind="simpo"), "loss_kind must be one of"),
    (dict(beta=0.0), "beta"),
])
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineDPOConfig(**kwargs)


def test_judge_and_reward_fn_together_is_an_error(tmp_path):
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="either a judge or a reward_fn"):
        train(_config(tmp_path), policy=model, tokenizer=TOK, prompts=PROMPTS, reward_fn=count_a,
              judge=FunctionJudge(count_a))
