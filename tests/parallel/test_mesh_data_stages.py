"""RLHF data stages on one device and on 2×2×2 / 1×4×2 meshes: the candidates stage samples
the same candidates, and the reward-model and LM judges give the same scores and the same
preferences, with their models really split over the mesh."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, CharTokenizer, RewardModel, tiny_config
from jaxrl_llm.parallel import MeshConfig
from jaxrl_llm.train.candidates import CandidateConfig, generate_candidates
from jaxrl_llm.train.preference_data import AIFeedbackJudge, RewardModelJudge, build_preferences

from .mesh_runs import MESHES, assert_sharded

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
# 6 prompts in batches of 4: the last batch is padded
PROMPTS = [{"prompt": f"q{i}:", "answer": str(i)} for i in range(6)]
CANDIDATES = [
    {"prompt": "q1:", "responses": ["aaa", "ab", "b"]},
    {"prompt": "q2:", "responses": ["a", "b", "ba"]},
    {"prompt": "q3:", "responses": ["ba", "abc", "bb"]},
]


def _lm():
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))


def test_candidates_same_on_every_mesh():
    config = CandidateConfig(num_candidates=4, batch_size=4, max_prompt_len=8, max_new_tokens=6,
                             save_token_logprobs=True)
    runs = {}
    for name, mesh in MESHES.items():
        policy = _lm()
        runs[name] = generate_candidates(dataclasses.replace(config, mesh=mesh), policy=policy,
                                         tokenizer=CharTokenizer(), prompts=PROMPTS)
        if mesh.num_devices != 1:
            assert_sharded(policy, mesh)  # sampled from weights split over the mesh
    base_records, base_report = runs["1x1x1"]
    assert base_report.num_prompts == 6 and base_report.kept > 6  # several distinct samples per prompt
    for name, (records, report) in runs.items():
        assert report == base_report, name
        assert [(r["prompt"], r["responses"], r["lengths"], r["finished"]) for r in records] == [
            (r["prompt"], r["responses"], r["lengths"], r["finished"]) for r in base_records], name
        for rec, ref in zip(records, base_records):
            np.testing.assert_allclose(rec["logprobs"], ref["logprobs"], rtol=1e-5, atol=1e-5, err_msg=name)


def _judges(mesh):
    tok = CharTokenizer()
    rm = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    return {
        "reward_model": RewardModelJudge(rm, tok, max_len=16, batch_size=4, mesh=mesh),
        "lm": AIFeedbackJudge(CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(1)), tok,
                              template="Q:{prompt} A:{first} B:{second} Best:", labels=("A", "B"),
                              max_prompt_len=64, batch_size=4, mesh=mesh),
    }


@pytest.mark.parametrize("kind", ["reward_model", "lm"])
def test_judges_same_on_every_mesh(kind):
    scores, prefs = {}, {}
    for name, mesh in MESHES.items():
        judge = _judges(mesh)[kind]
        if mesh.num_devices != 1:
            assert_sharded(judge.model, mesh)
        scores[name] = np.asarray(judge(CANDIDATES))  # 8 RM rows / 18 LM comparisons: last batch padded
        prefs[name] = build_preferences(CANDIDATES, judge, mode="kwise")
    base = scores["1x1x1"]
    assert np.std(base) > 0  # the judge tells candidates apart
    for name in scores:
        np.testing.assert_allclose(scores[name], base, rtol=1e-5, atol=1e-6, err_msg=name)
        assert [r["ranking"] for r in prefs[name]] == [r["ranking"] for r in prefs["1x1x1"]], name


def test_batches_that_do_not_split_fail_naming_the_field(tmp_path):
    mesh = MeshConfig(2, 2, 2)
    with pytest.raises(ValueError, match="^batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"):
        generate_candidates(CandidateConfig(batch_size=6, max_prompt_len=8, max_new_tokens=4, mesh=mesh),
                            policy=_lm(), tokenizer=CharTokenizer(), prompts=PROMPTS)
    rm = RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^batch_size=6 is not divisible"):
        RewardModelJudge(rm, CharTokenizer(), batch_size=6, mesh=mesh)
    with pytest.raises(ValueError, match="^batch_size=6 is not divisible"):
        AIFeedbackJudge(_lm(), CharTokenizer(), batch_size=6, mesh=mesh)
