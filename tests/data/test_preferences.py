"""Tests for jaxrl_llm.data.preferences: k-wise expansion, judge scores, κ, batches."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from jaxrl_llm.data.preferences import (
    PreferenceLoader,
    cohens_kappa,
    expand_kwise_to_pairs,
    preferences_from_scores,
    tokenize_preferences,
)
from jaxrl_llm.data.records import load_records, save_records
from jaxrl_llm.data.tokenization import decode_ids, render_prompt


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_kwise_expansion_count_and_direction(k):
    scores = np.random.default_rng(k).permutation(k).astype(float).tolist()  # no ties
    rec = {"prompt": "p", "responses": [f"r{i}" for i in range(k)], "scores": scores, "id": 7}
    pairs = expand_kwise_to_pairs(rec)
    assert len(pairs) == k * (k - 1) // 2
    for pair in pairs:
        c, r = int(pair["chosen"][1:]), int(pair["rejected"][1:])
        assert scores[c] > scores[r] and pair["label"] == 1.0
        assert pair["prompt"] == "p" and pair["id"] == 7 and "responses" not in pair
    assert {frozenset((p["chosen"], p["rejected"])) for p in pairs} == \
        {frozenset(x) for x in itertools.combinations(rec["responses"], 2)}


def test_ranking_means_lower_is_better_and_ties():
    rec = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 1, 1]}  # b, c tied best
    pairs = expand_kwise_to_pairs(rec)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("c", "a")]
    half = expand_kwise_to_pairs(rec, ties="half")
    assert [(p["chosen"], p["rejected"], p["label"]) for p in half] == \
        [("b", "a", 1.0), ("c", "a", 1.0), ("b", "c", 0.5)]
    near = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 1.05]}
    assert expand_kwise_to_pairs(near, tie_eps=0.1) == []
    assert len(expand_kwise_to_pairs(near, tie_eps=0.01)) == 1
    with pytest.raises(ValueError, match="ties='keep'"):
        expand_kwise_to_pairs(rec, ties="keep")
    with pytest.raises(ValueError, match="'ranking' has 2 entries but 'responses' has 3"):
        expand_kwise_to_pairs({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2]})
    with pytest.raises(ValueError, match="needs 'ranking' or 'scores'"):
        expand_kwise_to_pairs({"prompt": "p", "responses": ["a", "b"]})


def test_preferences_from_scores_modes():
    prompts = ["p0", "p1", "p2", "p3"]
    responses = [["a", "b", "c"], ["d", "e"], ["f", "g", "h"], ["i", "j"]]
    scores = [[0.1, 0.9, 0.5], [1.0, 1.0], [None, 0.2, 0.7], [0.3, None]]
    pw = preferences_from_scores(prompts, responses, scores, mode="pairwise")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pw] == [
        ("p0", "b", "a"), ("p0", "c", "a"), ("p0", "b", "c"), ("p2", "h", "g")]
    bw = preferences_from_scores(prompts, responses, scores, mode="best_worst")
    assert [(p["chosen"], p["rejected"], p["chosen_score"]) for p in bw] == [("b", "a", 0.9), ("h", "g", 0.7)]
    bw_half = preferences_from_scores(prompts, responses, scores, mode="best_worst", ties="half")
    assert [p["label"] for p in bw_half] == [1.0, 0.5, 1.0]
    kw = preferences_from_scores(prompts, responses, scores, mode="kwise")
    assert kw == [{"prompt": "p0", "responses": ["b", "c", "a"], "scores": [0.9, 0.5, 0.1]},
                  {"prompt": "p2", "responses": ["h", "g"], "scores": [0.7, 0.2]}]
    with pytest.raises(ValueError, match="mode='listwise'"):
        preferences_from_scores(prompts, responses, scores, mode="listwise")
    with pytest.raises(ValueError, match="prompt 1: 2 responses but 1 scores"):
        preferences_from_scores(["x", "y"], [["a", "b"], ["c", "d"]], [[1, 2], [1]])


def _kappa_reference(a, b):
    """Cohen's κ from the confusion matrix (independent of the implementation)."""
    cats = sorted(set(a) | set(b))
    idx = {c: i for i, c in enumerate(cats)}
    m = np.zeros((len(cats), len(cats)))
    for x, y in zip(a, b):
        m[idx[x], idx[y]] += 1
    m /= m.sum()
    p_o, p_e = np.trace(m), m.sum(1) @ m.sum(0)
    return (p_o - p_e) / (1 - p_e)


def test_cohens_kappa_worked_example():
    # 50 items: both "yes" 20, A yes/B no 5, A no/B yes 10, both "no" 15.
    # p_o = 35/50 = 0.7; p_yes = 0.5·0.6 = 0.3, p_no = 0.5·0.4 = 0.2 → p_e = 0.5; κ = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohens_kappa(a, b) == pytest.approx(0.4)
    assert cohens_kappa(b, a) == pytest.approx(0.4)
    assert cohens_kappa([0, 1, 0, 1], [0, 1, 0, 1]) == 1.0
    assert cohens_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert cohens_kappa([1, 1, 1], [1, 1, 1]) == 1.0  # p_e = 1: defined as 1, not NaN
    with pytest.raises(ValueError, match="labels_a has 2 labels but labels_b has 1"):
        cohens_kappa([0, 1], [0])


@pytest.mark.parametrize("seed", range(5))
def test_cohens_kappa_matches_references(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, 40).tolist()
    b = [x if rng.random() < 0.6 else int(rng.integers(0, 3)) for x in a]
    assert cohens_kappa(a, b) == pytest.approx(_kappa_reference(a, b))
    try:
        from sklearn.metrics import cohen_kappa_score
    except ImportError:
        return
    assert cohens_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b))


def test_preference_batch_masks(tokenizer):
    records = [
        {"prompt": "Q: 1+1?", "chosen": "2", "rejected": "eleven"},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello!"}], "rejected": "go away", "label": 0.5},
    ]
    batch = next(PreferenceLoader(records, tokenizer, 2, max_len=64, shuffle=False, bucket=8))
    eos = tokenizer.eos_token
    L = batch.chosen_tokens.shape[1]
    assert L % 8 == 0 and batch.rejected_tokens.shape == (2, L)
    assert batch.chosen_mask.dtype == np.float32
    np.testing.assert_array_equal(batch.labels, [1.0, 0.5])
    for b, rec in enumerate(records):
        for side, want in (("chosen", rec["chosen"]), ("rejected", rec["rejected"])):
            tok, mask, att = (getattr(batch, f"{side}{s}") for s in ("_tokens", "_mask", "_attention_mask"))
            want = want if isinstance(want, str) else want[-1]["content"]
            assert decode_ids(tokenizer, tok[b][mask[b] == 1]) == want + eos
            prompt = tok[b][(att[b] == 1) & (mask[b] == 0)]
            assert decode_ids(tokenizer, prompt) == render_prompt(tokenizer, rec["prompt"])
            n = att[b].sum()
            assert att[b, :n].all() and not att[b, n:].any()  # right padded
    tokens, mask, _ = batch.concatenated()
    assert tokens.shape == (4, L) and mask.shape == (4, L)


def test_kwise_batch_is_ordered_best_to_worst(char_tokenizer):
    records = [{"prompt": "p", "responses": ["mid", "best", "worst"], "scores": [0.5, 0.9, 0.1]},
               {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [3, 1, 2]}]
    batch = next(PreferenceLoader(records, char_tokenizer, 2, max_len=32, kind="kwise", shuffle=False))
    assert batch.tokens.shape[:2] == (2, 3) and batch.mask.shape == batch.tokens.shape
    decoded = [[char_tokenizer.decode(batch.tokens[b, k][batch.mask[b, k] == 1]) for k in range(3)]
               for b in range(2)]
    assert decoded == [["best", "mid", "worst"], ["y", "z", "x"]]
    np.testing.assert_allclose(batch.scores, [[0.9, 0.5, 0.1], [-1, -2, -3]])
    with pytest.raises(ValueError, match="same number of responses"):
        next(PreferenceLoader(records + [{"prompt": "r", "responses": ["a", "b"], "scores": [1, 0]}],
                              char_tokenizer, 3, max_len=32, kind="kwise", shuffle=False))


def test_pairwise_loader_expands_kwise_records(char_tokenizer):
    records = [{"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [4, 3, 2, 1]},
               {"prompt": "q", "chosen": "x", "rejected": "y"}]
    loader = PreferenceLoader(records, char_tokenizer, 7, max_len=16, shuffle=False)
    assert len(loader.records) == 7
    assert next(loader).chosen_tokens.shape[0] == 7


def test_preference_overlong_policies(char_tokenizer):
    records = [{"prompt": "pp", "chosen": "c" * 10, "rejected": "r"},
               {"prompt": "p" * 9, "chosen": "c", "rejected": "r"}]
    with pytest.raises(ValueError, match=r"record 0: prompt \(2\) \+ longest response \(11\) = 13 tokens > max_len=8"):
        tokenize_preferences(records, char_tokenizer, max_len=8, overlong="error")
    ex, stats = tokenize_preferences(records, char_tokenizer, max_len=8)
    assert (stats.kept, stats.truncated, stats.dropped) == (1, 1, 1)
    assert [len(r) for r in ex[0].response_ids] == [6, 2]  # "r" + eos untouched
    with pytest.raises(ValueError, match="every preference record was dropped"):
        tokenize_preferences(records[1:], char_tokenizer, max_len=8, overlong="drop")
    with pytest.raises(ValueError, match=r"record 0 has fields \['chosen', 'prompt'\] \(missing field 'rejected'\)"):
        tokenize_preferences([{"prompt": "p", "chosen": "c"}], char_tokenizer, max_len=8)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_preference_records_round_trip(tmp_path, suffix, char_tokenizer):
    recs = preferences_from_scores(["p0", "p1"], [["a", "bb", "c"], ["d", "e"]],
                                   [[0.0, 1.0, 0.5], [0.2, 0.1]], mode="pairwise")
    path = save_records(recs, tmp_path / f"prefs.{suffix}")
    loaded = load_records(path, required=("prompt", "chosen", "rejected"))
    assert loaded == recs
    loader = PreferenceLoader(loaded, char_tokenizer, 2, max_len=16, seed=0)
    assert next(loader).labels.tolist() == [1.0, 1.0]
