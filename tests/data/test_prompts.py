"""Tests for jaxrl_llm.data.prompts (and the sampler/padding it uses)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.data.padding import bucket_length, pad_rows
from jaxrl_llm.data.prompts import PromptLoader, tokenize_prompts
from jaxrl_llm.data.sampler import EpochSampler
from jaxrl_llm.data.tokenization import decode_ids, encode_text, render_prompt

from .conftest import make_hf_tokenizer


def _records(n=10):
    return [{"prompt": "q" * (i + 1) + "?", "answer": str(i), **({"topic": "t"} if i % 2 else {})}
            for i in range(n)]


def test_bucket_length():
    assert [bucket_length(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 48]
    assert [bucket_length(n, "pow2") for n in (1, 3, 4, 5, 100)] == [1, 4, 4, 8, 128]
    assert bucket_length(5, None) == 5
    assert bucket_length(5, "max", max_len=40) == 40
    assert bucket_length(20, 16, max_len=24) == 24  # capped
    with pytest.raises(ValueError, match="bucket=0"):
        bucket_length(3, 0)


def test_pad_rows_sides():
    rows = [[1, 2, 3], [4]]
    tok, mask = pad_rows(rows, 5, pad_id=0, side="left")
    np.testing.assert_array_equal(tok, [[0, 0, 1, 2, 3], [0, 0, 0, 0, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    tok, mask = pad_rows(rows, 5, pad_id=9, side="right")
    np.testing.assert_array_equal(tok, [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]])
    with pytest.raises(ValueError, match="padding_side='middle'"):
        pad_rows(rows, 5, 0, side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_batch_padding_and_content(tokenizer, side):
    records = _records(6) + [{"prompt": [{"role": "user", "content": "hi"}], "answer": "x"}]
    loader = PromptLoader(records, tokenizer, batch_size=7, shuffle=False, padding_side=side, bucket=16)
    batch = next(loader)
    # longest prompt: "<|user|>\nhi\n<|assistant|>\n" = 26 byte tokens → bucket 32
    assert batch.tokens.shape == (7, 32) and batch.tokens.dtype == np.int32
    assert batch.mask.shape == (7, 32)
    for b in range(7):
        n = int(batch.mask[b].sum())
        real = batch.tokens[b][batch.mask[b] == 1]
        assert decode_ids(tokenizer, real) == batch.texts[b] == render_prompt(tokenizer, records[b]["prompt"])
        if side == "left":  # prompts end at the last column, contiguous
            np.testing.assert_array_equal(batch.mask[b, -n:], 1)
            np.testing.assert_array_equal(batch.mask[b, :-n], 0)
        else:
            np.testing.assert_array_equal(batch.mask[b, :n], 1)
            np.testing.assert_array_equal(batch.mask[b, n:], 0)
    assert batch.prompts == [r["prompt"] for r in records]
    assert batch.columns["answer"] == [r["answer"] for r in records]
    assert batch.columns["topic"] == [None, "t", None, "t", None, "t", None]
    np.testing.assert_array_equal(batch.lengths, [len(encode_text(tokenizer, t)) for t in batch.texts])


def test_overlong_prompt_policies(char_tokenizer):
    records = [{"prompt": "short"}, {"prompt": "x" * 30 + "END"}, {"prompt": "ok"}]
    with pytest.raises(ValueError, match="record 1: prompt has 33 tokens > max_prompt_len=10"):
        tokenize_prompts(records, char_tokenizer, max_prompt_len=10)
    items, stats = tokenize_prompts(records, char_tokenizer, max_prompt_len=10, overlong="drop")
    assert [it.index for it in items] == [0, 2] and (stats.dropped, stats.kept, stats.truncated) == (1, 2, 0)
    items, stats = tokenize_prompts(records, char_tokenizer, max_prompt_len=10, overlong="truncate_left")
    assert char_tokenizer.decode(items[1].ids) == "xxxxxxxEND" and stats.truncated == 1
    with pytest.raises(ValueError, match="overlong='cut'"):
        tokenize_prompts(records, char_tokenizer, overlong="cut")


def test_bucket_capped_at_max_prompt_len(char_tokenizer):
    loader = PromptLoader([{"prompt": "x" * 20}] * 4, char_tokenizer, 2, max_prompt_len=20, bucket=16)
    assert next(loader).tokens.shape == (2, 20)
    loader = PromptLoader([{"prompt": "x" * 3}] * 4, char_tokenizer, 2, max_prompt_len=20, bucket="max")
    assert next(loader).tokens.shape == (2, 20)


def test_tokenizer_without_pad_or_eos_fails_early():
    with pytest.raises(ValueError, match="no pad_token_id and no eos_token_id"):
        PromptLoader(_records(4), make_hf_tokenizer(specials=False), 2)


def _take(loader, k):
    return [next(loader) for _ in range(k)]


def test_loader_order_depends_only_on_seed_and_epoch(char_tokenizer):
    records = _records(10)
    a = _take(PromptLoader(records, char_tokenizer, 3, seed=7), 9)  # 3 batches/epoch → 3 epochs
    b = _take(PromptLoader(records, char_tokenizer, 3, seed=7), 9)
    c = _take(PromptLoader(records, char_tokenizer, 3, seed=8), 9)
    ia, ib, ic = ([x.indices.tolist() for x in run] for run in (a, b, c))
    assert ia == ib and ia != ic
    # drop_last: each epoch covers 9 distinct records, epochs are reshuffled
    epochs = [sum(ia[3 * e:3 * e + 3], []) for e in range(3)]
    assert all(len(set(e)) == 9 for e in epochs)
    assert epochs[0] != epochs[1]
    no_shuffle = PromptLoader(records, char_tokenizer, 3, shuffle=False, drop_last=False)
    assert [x.indices.tolist() for x in _take(no_shuffle, 5)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [0, 1, 2]]


@pytest.mark.parametrize("k", [0, 2, 3, 5])
def test_loader_resume_gives_same_batches(char_tokenizer, k):
    records = _records(10)
    ref = PromptLoader(records, char_tokenizer, 3, seed=3)
    expected = _take(ref, k + 4)
    first = PromptLoader(records, char_tokenizer, 3, seed=3)
    _take(first, k)
    state = first.state_dict()
    resumed = PromptLoader(records, char_tokenizer, 3, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected[k:], _take(resumed, 4)):
        np.testing.assert_array_equal(want.tokens, got.tokens)
        assert want.indices.tolist() == got.indices.tolist() and want.columns == got.columns
    with pytest.raises(ValueError, match="seed=3 does not match"):
        PromptLoader(records, char_tokenizer, 3, seed=4).load_state_dict(state)


def test_sampler_num_epochs_and_errors():
    s = EpochSampler(5, 2, num_epochs=2, shuffle=False)
    assert list(s) == [[0, 1], [2, 3], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="no full batch"):
        EpochSampler(3, 4)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0, 1)


def test_process_slices_share_order_and_shape(char_tokenizer):
    records = [{"prompt": "x" * (1 + 7 * i), "answer": i} for i in range(8)]  # lengths 1..50
    full = PromptLoader(records, char_tokenizer, 4, seed=2)
    parts = [PromptLoader(records, char_tokenizer, 4, seed=2, process_index=i, process_count=2)
             for i in range(2)]
    for _ in range(4):
        want = next(full)
        got = [next(p) for p in parts]
        assert got[0].tokens.shape == got[1].tokens.shape == (2, want.tokens.shape[1])
        np.testing.assert_array_equal(np.concatenate([g.tokens for g in got]), want.tokens)
        assert got[0].columns["answer"] + got[1].columns["answer"] == want.columns["answer"]
    with pytest.raises(ValueError, match="batch_size=3 .* divisible by process_count=2"):
        PromptLoader(records, char_tokenizer, 3, process_index=0, process_count=2)
