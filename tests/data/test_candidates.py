"""Tests for jaxrl_llm.data.candidates: worked examples and hypothesis properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_llm.data.candidates import (
    CandidateStats,
    dedup_within_groups,
    filter_candidates,
    group_kept_counts,
)


def test_dedup_worked_example_strings():
    texts = ["a", "b", "a", "a", "a", "c", "c", ""]  # two groups of 4
    keep, counts = dedup_within_groups(texts, 4)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(counts, [3, 1, 0, 0, 1, 2, 0, 1])


def test_dedup_does_not_cross_groups_and_handles_tokens():
    toks = [[1, 2], (1, 2), np.array([1, 2]), [3], [1, 2], [1, 2, 0], [1, 2], [1, 2]]
    keep, counts = dedup_within_groups(toks, 4)
    np.testing.assert_array_equal(keep, [1, 0, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(counts, [3, 0, 0, 1, 3, 1, 0, 0])


def test_dedup_custom_key():
    keep, _ = dedup_within_groups(["x ", " x", "X"], 3, key=lambda s: s.strip().lower())
    np.testing.assert_array_equal(keep, [1, 0, 0])


def test_filter_worked_example():
    texts = ["", "ok", "ok", "toolongtext", "fine", "cut", "", "ok"]
    finished = [True, True, True, True, True, False, False, True]
    keep, stats = filter_candidates(
        texts, group_size=4, finished=finished, max_length=5, drop_unfinished=True
    )
    np.testing.assert_array_equal(keep, [0, 1, 0, 0, 1, 0, 0, 1])
    assert stats == CandidateStats(total=8, duplicates=1, empty=2, over_length=1, unfinished=1, kept=3)
    np.testing.assert_array_equal(group_kept_counts(keep, 4), [1, 2])


def test_filter_first_valid_occurrence_is_kept():
    # the first "aaaaaa" is over length under explicit lengths; the second copy is kept
    texts = ["aaaaaa", "aaaaaa", "b"]
    keep, stats = filter_candidates(texts, lengths=[9, 3, 1], max_length=5)
    np.testing.assert_array_equal(keep, [0, 1, 1])
    assert stats.over_length == 1 and stats.duplicates == 0 and stats.kept == 2


def test_filter_padded_token_rows_compare_real_tokens_only():
    tokens = np.array([[5, 6, 0, 0], [5, 6, 0, 0], [5, 6, 0, 9], [5, 0, 0, 0]])
    lengths = np.array([2, 3, 2, 0])  # row 1 has a real token 0; row 2 pads with 9
    keep, stats = filter_candidates(tokens, group_size=4, lengths=lengths, max_length=3)
    np.testing.assert_array_equal(keep, [1, 1, 0, 0])
    assert stats == CandidateStats(total=4, duplicates=1, empty=1, kept=2)


def test_filter_without_dedup_and_unfinished_kept_by_default():
    keep, stats = filter_candidates(["a", "a"], finished=[False, False], dedup=False)
    assert keep.all() and stats.kept == 2 and stats.unfinished == 0


def test_stats_helpers():
    a = CandidateStats(total=4, duplicates=1, empty=1, kept=2)
    b = CandidateStats(total=2, over_length=1, kept=1)
    s = a + b
    assert s == CandidateStats(total=6, duplicates=1, empty=1, over_length=1, kept=3)
    assert s.kept_fraction == 0.5
    assert s.as_dict("cand/")["cand/kept"] == 3
    with pytest.raises(ValueError, match="add up"):
        CandidateStats(total=3, kept=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(group_size=3), "group_size"),
        (dict(group_size=0), "group_size"),
        (dict(min_length=-1), "min_length"),
        (dict(max_length=0, min_length=1), "max_length"),
        (dict(drop_unfinished=True), "finished"),
        (dict(lengths=[1, 2]), "lengths"),
        (dict(finished=[True], drop_unfinished=True), "finished"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        filter_candidates(["a", "b", "c", "d"], **kwargs)


def test_bad_candidate_type():
    with pytest.raises(ValueError, match="candidates"):
        dedup_within_groups([1, 2], 1)


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

_texts = st.text(alphabet="ab ", max_size=4)


@st.composite
def _grouped(draw):
    g = draw(st.integers(1, 5))
    n_groups = draw(st.integers(0, 4))
    return draw(st.lists(_texts, min_size=g * n_groups, max_size=g * n_groups)), g


@settings(max_examples=150, deadline=None)
@given(_grouped())
def test_dedup_properties(data):
    texts, g = data
    keep, counts = dedup_within_groups(texts, g)
    for start in range(0, len(texts), g):
        group = texts[start : start + g]
        k = keep[start : start + g]
        kept = [t for t, flag in zip(group, k) if flag]
        # exactly the distinct elements, each once, in order of first occurrence
        assert kept == list(dict.fromkeys(group))
        # the first occurrence is the one kept
        for i, t in enumerate(group):
            assert k[i] == (group.index(t) == i)
        # multiplicities
        assert counts[start : start + g].sum() == g
        for i, t in enumerate(group):
            assert counts[start + i] == (group.count(t) if k[i] else 0)
        # idempotent: deduplicating the kept subset keeps everything
        again, _ = dedup_within_groups(kept, len(kept)) if kept else (np.ones(0, bool), None)
        assert again.all()


@settings(max_examples=150, deadline=None)
@given(_grouped(), st.integers(0, 3), st.one_of(st.none(), st.integers(3, 5)), st.data())
def test_filter_properties(data, min_length, max_length, draw):
    texts, g = data
    finished = draw.draw(st.lists(st.booleans(), min_size=len(texts), max_size=len(texts)))
    keep, stats = filter_candidates(
        texts, group_size=g, min_length=min_length, max_length=max_length, finished=finished, drop_unfinished=True
    )
    assert stats.kept == keep.sum() <= stats.total == len(texts)
    assert stats.kept + stats.duplicates + stats.empty + stats.over_length + stats.unfinished == stats.total
    for i in np.flatnonzero(keep):
        assert len(texts[i]) >= min_length and finished[i]
        assert max_length is None or len(texts[i]) <= max_length
    # kept set within each group has no duplicates; filtering it again is a no-op
    for start in range(0, len(texts), g):
        ks = [t for t, k in zip(texts[start : start + g], keep[start : start + g]) if k]
        assert len(ks) == len(set(ks))
        again, _ = filter_candidates(ks, min_length=min_length, max_length=max_length)
        assert again.all()
