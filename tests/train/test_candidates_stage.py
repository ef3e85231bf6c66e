"""Candidate generation (stage 2): K responses per prompt with log-probs and lengths,
filters with counts, stop strings, JSONL output, bad inputs."""

import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.data.records import load_records
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.train.candidates import CandidateConfig, generate_candidates, ngram_repetition

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
PROMPTS = [{"prompt": f"q{i}:", "answer": str(i)} for i in range(5)]


@pytest.fixture(scope="module")
def policy():
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))


def test_ngram_repetition():
    assert ngram_repetition("abcdef", 2) == 0.0
    np.testing.assert_allclose(ngram_repetition("abababab", 2), 1 - 2 / 7)
    np.testing.assert_allclose(ngram_repetition([1, 1, 1, 1], 1), 0.75)
    assert ngram_repetition("ab", 2) == 0.0  # a single n-gram cannot repeat
    with pytest.raises(ValueError, match="n must be"):
        ngram_repetition("abc", 0)


def test_sampled_candidates_with_counts_and_jsonl(tmp_path, policy):
    config = CandidateConfig(num_candidates=4, batch_size=4, max_prompt_len=8, max_new_tokens=6, top_p=0.95,
                             max_ngram_repetition=0.2, ngram_size=1, save_token_logprobs=True,
                             output_path=str(tmp_path / "cands.jsonl"))
    records, report = generate_candidates(config, policy=policy, tokenizer=CharTokenizer(), prompts=PROMPTS)
    f = report.filters
    assert report.num_prompts == 5 and f.total == 20  # the padded last batch adds nothing
    assert f.kept + f.duplicates + f.empty + f.over_length + f.unfinished == f.total
    assert report.kept == f.kept - report.repetitive == sum(len(r["responses"]) for r in records)
    assert len(records) + report.prompts_without_candidates == 5
    for rec in records:
        k = len(rec["responses"])
        assert rec["num_sampled"] == 4 and 1 <= k <= 4
        assert len(rec["logprobs"]) == len(rec["lengths"]) == len(rec["finished"]) == k
        assert rec["answer"] == rec["prompt"][1:-1]  # extra columns follow their prompt
        assert len(set(rec["responses"])) == k  # deduplicated
        for lp, tl, n in zip(rec["logprobs"], rec["token_logprobs"], rec["lengths"]):
            assert 1 <= n <= 6 and lp <= 0.0 and len(tl) == n
            np.testing.assert_allclose(sum(tl), lp, rtol=1e-5, atol=1e-5)
    assert load_records(tmp_path / "cands.jsonl") == records
    assert report.as_dict()["candidates/kept"] == report.kept


def test_greedy_duplicates_and_stop_strings(policy):
    tok = CharTokenizer()
    greedy = CandidateConfig(num_candidates=3, batch_size=4, max_prompt_len=8, max_new_tokens=6, top_k=1)
    records, report = generate_candidates(greedy, policy=policy, tokenizer=tok, prompts=PROMPTS[:4])
    # top_k=1 samples the same response K times: one kept per prompt, K − 1 duplicates
    assert report.filters.duplicates == 4 * 2 and all(len(r["responses"]) == 1 for r in records)
    first = records[0]["responses"][0]
    assert first  # non-empty greedy text
    # a stop string ends the response after the token that completes it
    cut = CandidateConfig(**{**greedy.__dict__, "stop_strings": (first[0],)})
    cut_records, _ = generate_candidates(cut, policy=policy, tokenizer=tok, prompts=PROMPTS[:4])
    assert cut_records[0]["responses"][0].endswith(first[0]) and cut_records[0]["finished"] == [True]
    assert cut_records[0]["lengths"][0] <= records[0]["lengths"][0]
    # min_length above the response budget: every candidate is "empty" → nothing to write
    strict = CandidateConfig(**{**greedy.__dict__, "min_length": 7, "output_path": "unused.jsonl"})
    with pytest.raises(ValueError, match="every candidate was filtered out"):
        generate_candidates(strict, policy=policy, tokenizer=tok, prompts=PROMPTS[:4])
    # over-long prompts can be dropped (and counted) instead of failing
    drop = CandidateConfig(**{**greedy.__dict__, "overlong_prompts": "drop"})
    kept, rep = generate_candidates(drop, policy=policy, tokenizer=tok, prompts=PROMPTS[:3] + [{"prompt": "x" * 20}])
    assert rep.prompts_dropped == 1 and rep.num_prompts == 3 and len(kept) == 3


def test_bad_inputs(policy):
    tok = CharTokenizer()
    config = CandidateConfig(num_candidates=2, batch_size=4, max_prompt_len=8, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"RL prompt records must be one of: \{prompt\} \| \{messages\}; record 1 has fields"):
        generate_candidates(config, policy=policy, tokenizer=tok, prompts=[{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match="0 tokens"):
        generate_candidates(config, policy=policy, tokenizer=tok, prompts=[{"prompt": ""}])
    with pytest.raises(ValueError, match="max_prompt_len"):
        generate_candidates(config, policy=policy, tokenizer=tok, prompts=[{"prompt": "x" * 20}])
    with pytest.raises(ValueError, match="max_ngram_repetition"):
        CandidateConfig(max_ngram_repetition=1.5)

    class NoEos(CharTokenizer):
        def __init__(self):
            super().__init__()
            self.eos_token_id = None

    with pytest.raises(ValueError, match="eos_token_id"):
        generate_candidates(config, policy=policy, tokenizer=NoEos(), prompts=PROMPTS)
