"""Reward scoring shared by GRPO / PPO / RFT: what a reward function receives, health
stops, weighted lists of rewards, reward specs, RFT's default threshold, preset warnings."""

import dataclasses
import logging

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rewards import arithmetic_reward, make_arithmetic_dataset, math_accuracy_reward
from jaxrl_llm.rewards.registry import BUILTIN_REWARDS, build_reward, load_reward_fn
from jaxrl_llm.train import grpo, ppo, rft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.scoring import RewardHealthError, RewardScorer, reward_inputs

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)


def _model(seed=0):
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed))


def _run(tmp_path, name="run", steps=1):
    return RunConfig(output_dir=str(tmp_path / name), total_steps=steps, progress=False)


def _grpo_config(tmp_path, **kw):
    base = dict(run=_run(tmp_path), optim=OptimConfig(learning_rate=1e-3), prompts_per_step=2, group_size=4,
                max_prompt_len=48, max_new_tokens=4)
    return grpo.GRPOConfig.preset("grpo", **{**base, **kw})


def _needs_answer(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer)]


# ---------------------------------------------------------------------------- inputs


def test_reward_inputs_repeat_prompts_and_wrap_conversational_completions():
    chat = [{"role": "user", "content": "1+1="}]
    prompts, completions = reward_inputs(["2+2=", chat], ["4", "5", "2", "3"], repeats=2)
    assert prompts == ["2+2=", "2+2=", chat, chat]
    assert completions == ["4", "5", [{"role": "assistant", "content": "2"}], [{"role": "assistant", "content": "3"}]]


def test_conversational_prompts_reach_the_reward_as_messages(tmp_path):
    """TRL's contract for chat data: prompts are message lists, completions one assistant
    message each; columns arrive repeated per completion."""
    seen = {}

    def spy(prompts, completions, answer, **columns):
        seen.update(prompts=prompts, completions=completions, answer=answer)
        return arithmetic_reward(prompts, completions, answer=answer)

    data = [{"prompt": [{"role": "user", "content": d["prompt"]}], "answer": d["answer"]}
            for d in make_arithmetic_dataset(8, 0, max_operand=9)]
    grpo.train(_grpo_config(tmp_path), policy=_model(), tokenizer=CharTokenizer(), prompts=data, reward_fn=spy)
    assert len(seen["prompts"]) == len(seen["completions"]) == len(seen["answer"]) == 8
    assert all(isinstance(p, list) and p[0]["role"] == "user" for p in seen["prompts"])
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen["completions"])
    # the four completions of a prompt share its record's answer
    assert seen["answer"][:4] == [seen["answer"][0]] * 4


# ---------------------------------------------------------------------------- health


def test_a_reward_that_cannot_read_the_data_stops_grpo_with_the_cause(tmp_path):
    data = [{"prompt": d["prompt"], "gold": d["answer"]} for d in make_arithmetic_dataset(8, 0, max_operand=9)]
    with pytest.raises(RewardHealthError) as err:
        grpo.train(_grpo_config(tmp_path), policy=_model(), tokenizer=CharTokenizer(), prompts=data,
                   reward_fn=_needs_answer)
    message = str(err.value)
    assert "could not score 8 of 8" in message
    assert "_needs_answer(prompts, completions, gold=[...])" in message  # the function and what it got
    assert "TypeError" in message and "answer" in message  # its first exception
    assert "['gold']" in message


@pytest.mark.parametrize("stage", ["ppo", "rft"])
def test_ppo_and_rft_stop_on_an_unscorable_reward_too(tmp_path, stage):
    data = [{"prompt": d["prompt"], "gold": d["answer"]} for d in make_arithmetic_dataset(8, 0, max_operand=9)]
    if stage == "ppo":
        config = ppo.PPOConfig(run=_run(tmp_path), prompts_per_step=2, samples_per_prompt=2, max_prompt_len=8,
                               max_new_tokens=4)
        call = lambda: ppo.train(config, policy=_model(), tokenizer=CharTokenizer(), prompts=data,  # noqa: E731
                                 reward_fn=_needs_answer)
    else:
        config = rft.RFTConfig(run=_run(tmp_path), prompts_per_iteration=4, samples_per_prompt=2,
                               sampling_batch_size=4, steps_per_iteration=1, batch_size=2, max_prompt_len=8,
                               max_new_tokens=4)
        call = lambda: rft.train(config, policy=_model(), tokenizer=CharTokenizer(), prompts=data,  # noqa: E731
                                 reward_fn=_needs_answer)
    with pytest.raises(RewardHealthError, match="could not score"):
        call()


def test_scorer_reports_a_low_failure_rate_and_stops_above_the_limit():
    def every_third_none(prompts, completions, **columns):
        return [None if i % 3 == 0 else 1.0 for i in range(len(completions))]

    scorer = RewardScorer(every_third_none, max_unscored_frac=0.5)
    scores = scorer(["a", "b", "c"], ["x"] * 6, {}, repeats=2)  # 2 of 6 unscored
    np.testing.assert_array_equal(np.isnan(scores), [True, False, False, True, False, False])
    assert scorer.step_metrics()["reward_unscored_frac"] == pytest.approx(2 / 6)
    assert scorer.step_metrics()["reward_unscored_frac"] == 0.0  # reset after reading
    strict = RewardScorer(every_third_none, max_unscored_frac=0.2)
    with pytest.raises(RewardHealthError, match="2 of 6"):
        strict(["a", "b", "c"], ["x"] * 6, {}, repeats=2)


def test_a_failing_component_of_a_weighted_list_is_named():
    def broken(prompts, completions, **columns):
        raise KeyError("no judge")

    scorer = RewardScorer(build_reward([arithmetic_reward, broken], [1.0, 0.5]), max_unscored_frac=0.5)
    with pytest.raises(RewardHealthError) as err:
        scorer(["1+1="], ["2", "3"], {"answer": ["2"]}, repeats=2)
    assert "broken(prompts, completions, answer=[...]) failed on 2 samples" in str(err.value)
    assert "KeyError" in str(err.value)
    assert "arithmetic_reward(prompts, completions, answer=[...]) raised nothing" in str(err.value)


# ---------------------------------------------------------------------------- several rewards, specs


def test_weighted_rewards_sum_and_log_each_component():
    def length(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    scorer = RewardScorer(build_reward([arithmetic_reward, length], [2.0, -0.5]))
    scores = scorer(["1+1=", "2+2="], ["2", "5", "44", "4"], {"answer": ["2", "4"]}, repeats=2)
    np.testing.assert_allclose(scores, [2.0 - 0.5, 0.0 - 0.5, 0.0 - 1.0, 2.0 - 0.5])
    metrics = scorer.step_metrics()
    assert metrics["reward/arithmetic_reward"] == pytest.approx(0.5)
    assert metrics["reward/length"] == pytest.approx(1.25)


def test_a_none_leaves_only_that_function_out_of_the_sum_as_in_trl():
    def only_even(prompts, completions, **columns):
        return [1.0 if i % 2 == 0 else None for i in range(len(completions))]

    def never(prompts, completions, **columns):
        return [None] * len(completions)

    reward = build_reward([only_even, arithmetic_reward, never], [10.0, 1.0, 5.0])
    assert reward(["q"] * 4, ["2", "2", "3", "3"], answer=["2", "2", "2", None]) == [11.0, 1.0, 10.0, None]
    scorer = RewardScorer(reward, max_unscored_frac=0.5)
    scores = scorer(["q", "q"], ["2", "2", "3", "3"], {"answer": ["2", None]}, repeats=2)
    np.testing.assert_array_equal(scores, [11.0, 1.0, 10.0, np.nan])
    assert scorer.step_metrics()["reward_unscored_frac"] == 0.25


def test_build_reward_validates_weights_and_passes_a_single_function_through():
    assert build_reward(arithmetic_reward) is arithmetic_reward
    assert build_reward(["math"]) is math_accuracy_reward
    with pytest.raises(ValueError, match="2 values for 1"):
        build_reward([arithmetic_reward], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        build_reward([arithmetic_reward], [float("nan")])
    with pytest.raises(ValueError, match="empty"):
        build_reward([])


def test_reward_specs_builtins_files_modules_and_errors(tmp_path):
    for name in BUILTIN_REWARDS:
        assert callable(load_reward_fn(name))
    path = tmp_path / "mine.py"
    path.write_text("def short(prompts, completions, **kw):\n    return [float(len(c) < 3) for c in completions]\n")
    assert load_reward_fn(f"{path}:short")([""], ["ab", "abcd"]) == [1.0, 0.0]
    assert load_reward_fn("jaxrl_llm.rewards.math:math_accuracy_reward") is math_accuracy_reward
    with pytest.raises(ValueError, match=r"unknown reward 'accuracy'.*'arithmetic', 'math'"):
        load_reward_fn("accuracy")
    with pytest.raises(ValueError, match="no function 'long'.*\\['short'\\]"):
        load_reward_fn(f"{path}:long")
    with pytest.raises(ValueError, match="not found"):
        load_reward_fn(f"{tmp_path}/absent.py:f")
    with pytest.raises(ValueError, match="cannot import module"):
        load_reward_fn("no_such_pkg_xyz.mod:f")


def test_config_reward_funcs_drive_training_and_clash_with_reward_fn(tmp_path):
    data = make_arithmetic_dataset(8, 0, max_operand=9)
    config = _grpo_config(tmp_path, reward_funcs=("arithmetic",), max_prompt_len=8)
    result = grpo.train(config, policy=_model(), tokenizer=CharTokenizer(), prompts=data)
    assert np.isfinite(result.history[0]["reward_mean"])
    with pytest.raises(ValueError, match="not both"):
        grpo.train(dataclasses.replace(config, run=_run(tmp_path, "b")), policy=_model(), tokenizer=CharTokenizer(),
                   prompts=data, reward_fn=arithmetic_reward)
    with pytest.raises(ValueError, match="no reward"):
        grpo.train(_grpo_config(tmp_path, run=_run(tmp_path, "c")), policy=_model(), tokenizer=CharTokenizer(),
                   prompts=data)
    with pytest.raises(ValueError, match="reward_weights has 2 values for 1"):
        grpo.GRPOConfig(reward_funcs=("math",), reward_weights=(1.0, 2.0))


def test_math_reward_reads_trls_solution_column():
    assert math_accuracy_reward(["q", "q"], ["The answer is \\boxed{4}", "\\boxed{5}"], solution=["4", "4"]) == [1.0, 0.0]


# ---------------------------------------------------------------------------- RFT threshold, presets


def test_rft_keeps_only_rewarded_answers_by_default_and_says_when_starved(tmp_path, caplog):
    data = make_arithmetic_dataset(8, 0, max_operand=9)
    config = rft.RFTConfig(run=_run(tmp_path, steps=1), prompts_per_iteration=4, samples_per_prompt=2,
                           sampling_batch_size=4, steps_per_iteration=1, batch_size=2, max_prompt_len=8,
                           max_new_tokens=4, drop_unfinished=False, dedup=False)
    assert config.reward_threshold == 0.5
    zero = lambda prompts, completions, **kw: [0.0] * len(completions)  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.train.rft"):
        row = rft.train(config, policy=_model(), tokenizer=CharTokenizer(), prompts=data, reward_fn=zero).history[0]
    assert row["kept"] == 0 and row["candidates/below_threshold"] == 8
    assert "kept 0 of 8 candidates" in caplog.text and "8 reward below reward_threshold=0.5" in caplog.text
    # None: the best of each prompt is kept whatever its reward (RAFT)
    raft = dataclasses.replace(config, reward_threshold=None, run=_run(tmp_path, "raft", steps=1))
    assert rft.train(raft, policy=_model(), tokenizer=CharTokenizer(), prompts=data,
                     reward_fn=zero).history[0]["kept"] == 4


def test_dapo_preset_warns_when_its_overlong_buffer_does_not_fit_the_budget():
    with pytest.warns(UserWarning, match="penalises every response longer than 7 tokens"):
        grpo.GRPOConfig.preset("dapo", max_new_tokens=8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grpo.GRPOConfig.preset("dapo", max_new_tokens=4096)  # DAPO's regime: no warning
        grpo.GRPOConfig.preset("dapo", max_new_tokens=8, overlong_buffer=0)  # chosen explicitly
