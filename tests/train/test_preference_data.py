"""Preference data (stage 3): judges (function, reward model, AI feedback), pairwise and
k-wise records with ties, Cohen's κ between judges, JSONL/parquet output, bad inputs."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.data.records import load_records
from jaxrl_llm.models import CausalLM, CharTokenizer, RewardModel, tiny_config
from jaxrl_llm.train.preference_data import (
    AIFeedbackJudge,
    FunctionJudge,
    RewardModelJudge,
    build_preferences,
    judge_agreement,
    pair_labels,
    ranking_from_scores,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
CANDIDATES = [
    {"prompt": "q1:", "responses": ["aaa", "ab", "b"], "answer": "x"},
    {"prompt": "q2:", "responses": ["a", "b"], "answer": "y"},  # counts 1 vs 0
    {"prompt": "q3:", "responses": ["ba", "ab", "bb"], "answer": "z"},  # a tie (1, 1)
]


def count_a(prompts, completions, **columns):
    return [float(c.count("a")) for c in completions]


def test_ranking_and_pair_labels():
    assert ranking_from_scores([3.0, 1.0, 3.0]) == [1, 3, 1]
    assert ranking_from_scores([1.0, 1.05, 0.0], tie_eps=0.1) == [1, 1, 3]
    assert pair_labels([[2.0, 1.0, 2.0], [None, 1.0]]) == [1.0, 0.5, 0.0, None]


def test_function_judge_pairwise_kwise_and_ties(tmp_path):
    judge = FunctionJudge(count_a)
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(columns)
        return count_a(prompts, completions)

    FunctionJudge(spy)(CANDIDATES)
    assert seen["answer"] == ["x"] * 3 + ["y"] * 2 + ["z"] * 3  # extra columns as keyword lists
    pairs = build_preferences(CANDIDATES, judge, mode="pairwise", ties="drop", output_path=tmp_path / "p.jsonl")
    assert len(pairs) == 3 + 1 + 2  # q3's tied pair is dropped
    assert all(p["chosen"].count("a") > p["rejected"].count("a") and p["label"] == 1.0 for p in pairs)
    assert load_records(tmp_path / "p.jsonl") == pairs
    half = build_preferences(CANDIDATES, judge, ties="half")
    assert len(half) == 7 and sum(p["label"] == 0.5 for p in half) == 1
    best_worst = build_preferences(CANDIDATES, judge, mode="best_worst")
    assert [(p["chosen"], p["rejected"]) for p in best_worst] == [("aaa", "b"), ("a", "b"), ("ba", "bb")]
    kwise = build_preferences(CANDIDATES, judge, mode="kwise", output_path=tmp_path / "k.parquet")
    assert kwise[0]["responses"] == ["aaa", "ab", "b"] and kwise[0]["ranking"] == [1, 2, 3]
    assert kwise[2]["ranking"] == [1, 1, 3]  # tied responses share a rank
    assert load_records(tmp_path / "k.parquet") == kwise


def test_unscored_candidates_are_left_out():
    def flaky(prompts, completions, **columns):
        return [None if c == "ab" else float(c.count("a")) for c in completions]

    pairs = build_preferences(CANDIDATES, FunctionJudge(flaky))
    assert all("ab" not in (p["chosen"], p["rejected"]) for p in pairs) and len(pairs) == 1 + 1 + 1


def test_reward_model_judge_and_agreement_with_function_judge():
    tok = CharTokenizer()
    rm = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    judge = RewardModelJudge(rm, tok, max_len=16, batch_size=8)
    scores = judge(CANDIDATES)
    assert [len(s) for s in scores] == [3, 2, 3] and all(np.isfinite(x) for s in scores for x in s)
    # the judge scores exactly what the reward model gives prompt + response + eos
    row = tok(["q1:aaa"], add_eos=True)
    np.testing.assert_allclose(scores[0][0], float(rm(row["input_ids"], attention_mask=row["attention_mask"])[0]),
                               rtol=1e-5)
    same = judge_agreement(CANDIDATES, FunctionJudge(count_a), FunctionJudge(count_a))
    assert same["kappa"] == 1.0 and same["agreement"] == 1.0 and same["num_pairs"] == 7
    flipped = judge_agreement(CANDIDATES, FunctionJudge(count_a),
                              FunctionJudge(lambda p, c, **k: [-x for x in count_a(p, c)]))
    # only the tied pair agrees: p_o = 1/7; judge a says "first better" on the 6 others and
    # judge b "second better", so p_e = (1/7)² and κ = (1/7 − 1/49) / (1 − 1/49) = 1/8
    assert flipped["agreement"] == pytest.approx(1 / 7) and flipped["kappa"] == pytest.approx(0.125)
    mixed = judge_agreement(CANDIDATES, FunctionJudge(count_a), judge)
    assert -1.0 <= mixed["kappa"] <= 1.0


def test_ai_feedback_judge_matches_lm_logprobs():
    tok = CharTokenizer()
    lm = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(1))
    template = "Q:{prompt} A:{first} B:{second} Best:"
    judge = AIFeedbackJudge(lm, tok, template=template, labels=("A", "B"), swap=False, max_prompt_len=64, batch_size=4)

    def direct(prompt, first, second):  # teacher-forced next-token log-probs of "A" and "B"
        ids = tok.encode(template.format(prompt=prompt, first=first, second=second))
        logits, _ = lm(np.asarray([ids]))
        logp = jax.nn.log_softmax(logits[0, -1])
        return 1.0 / (1.0 + math.exp(-(float(logp[ord("A")]) - float(logp[ord("B")]))))

    np.testing.assert_allclose(judge.compare("q2:", "a", "b"), direct("q2:", "a", "b"), rtol=1e-4)
    swapped = AIFeedbackJudge(lm, tok, template=template, labels=("A", "B"), swap=True, max_prompt_len=64, batch_size=4)
    expected = 0.5 * (direct("q2:", "a", "b") + 1.0 - direct("q2:", "b", "a"))
    np.testing.assert_allclose(swapped.compare("q2:", "a", "b"), expected, rtol=1e-4)
    np.testing.assert_allclose(swapped.compare("q2:", "a", "b") + swapped.compare("q2:", "b", "a"), 1.0, rtol=1e-5)
    scores = swapped(CANDIDATES)  # mean win probability per candidate
    for s in scores:
        np.testing.assert_allclose(sum(s), len(s) / 2, rtol=1e-5)  # win probabilities of a prompt sum to K/2
    records = build_preferences(CANDIDATES, swapped, mode="kwise")
    assert len(records) == 3 and all(sorted(r["ranking"]) == r["ranking"] for r in records)


def test_bad_inputs():
    tok = CharTokenizer()
    judge = FunctionJudge(count_a)
    with pytest.raises(ValueError, match="missing required field 'responses'"):
        build_preferences([{"prompt": "q"}], judge)
    with pytest.raises(ValueError, match="must be a list"):
        build_preferences([{"prompt": "q", "responses": "ab"}], judge)
    with pytest.raises(ValueError, match="mode must be one of"):
        build_preferences(CANDIDATES, judge, mode="listwise")
    with pytest.raises(ValueError, match="no preference records"):
        build_preferences([{"prompt": "q", "responses": ["a", "b"]}], FunctionJudge(lambda p, c, **k: [1.0, 1.0]),
                          output_path="unused.jsonl")
    lm = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="template must contain"):
        AIFeedbackJudge(lm, tok, template="{prompt} {first}")
    with pytest.raises(ValueError, match="max_prompt_len"):
        AIFeedbackJudge(lm, tok, max_prompt_len=8).compare("q", "a", "b")
    rm = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="0 tokens"):
        RewardModelJudge(rm, tok)([{"prompt": "", "responses": ["a", "b"]}])
    with pytest.raises(ValueError, match="no room"):
        RewardModelJudge(rm, tok, max_len=4)([{"prompt": "a long prompt", "responses": ["a", "b"]}])
