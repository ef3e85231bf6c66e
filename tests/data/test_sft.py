"""Tests for jaxrl_llm.data.sft: response-only loss masks, truncation, packing, resume."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrl_llm.data.sft import (
    SFTLoader,
    collate_sft,
    pack_examples,
    split_sft_record,
    tokenize_sft,
)
from jaxrl_llm.data.tokenization import decode_ids, render_prompt


def _records(n=12):
    return [{"prompt": f"Q{i}: " + "a" * (i % 5), "response": f"answer {i}" + "!" * (i % 3)}
            for i in range(n)]


CHAT = {"messages": [
    {"role": "system", "content": "sys"},
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "final answer"},
]}


def _check_rows(tokenizer, batch, examples_text):
    """Each segment decodes to prompt + response, and its masked part to response + eos."""
    seen = []
    for b in range(batch.tokens.shape[0]):
        for seg in range(1, batch.segment_ids[b].max() + 1):
            cols = np.flatnonzero(batch.segment_ids[b] == seg)
            assert np.all(np.diff(cols) == 1)  # contiguous
            np.testing.assert_array_equal(batch.positions[b, cols], np.arange(len(cols)))
            resp = cols[batch.loss_mask[b, cols] == 1]
            prompt = cols[batch.loss_mask[b, cols] == 0]
            assert prompt.max() < resp.min()  # prompt then response
            pair = (decode_ids(tokenizer, batch.tokens[b, prompt]), decode_ids(tokenizer, batch.tokens[b, resp]))
            assert pair in examples_text
            seen.append(pair)
    return seen


def test_loss_mask_is_exactly_the_response(tokenizer):
    records = _records(4) + [CHAT, {"prompt": [{"role": "user", "content": "hi"}],
                                    "response": [{"role": "assistant", "content": "hello"}]}]
    batch = next(SFTLoader(records, tokenizer, 6, max_len=128, shuffle=False))
    longest = batch.attention_mask.sum(1).max()  # the multi-turn chat: 83 byte tokens
    assert batch.tokens.shape == (6, 96) and longest == 83 and batch.loss_mask.dtype == np.float32
    texts = {(render_prompt(tokenizer, p), r + tokenizer.eos_token)
             for p, r in (split_sft_record(rec) for rec in records)}
    seen = _check_rows(tokenizer, batch, texts)
    assert set(seen) == texts
    # right padding, one example per row; padding has no loss and segment 0
    np.testing.assert_array_equal(batch.segment_ids, batch.attention_mask)
    assert np.all(batch.loss_mask[batch.attention_mask == 0] == 0)
    assert ("<|system|>\nsys\n<|user|>\nu1\n<|assistant|>\na1\n<|user|>\nu2\n<|assistant|>\n",
            "final answer" + tokenizer.eos_token) in seen


def test_truncation_policies(char_tokenizer):
    records = [{"prompt": "p" * 4, "response": "r" * 10}, {"prompt": "p" * 12, "response": "r"},
               {"prompt": "p", "response": "r"}]
    with pytest.raises(ValueError, match=r"record 0: prompt \(4\) \+ response \(11\) = 15 tokens > max_len=10"):
        tokenize_sft(records, char_tokenizer, max_len=10, overlong="error")
    ex, stats = tokenize_sft(records, char_tokenizer, max_len=10, overlong="drop")
    assert [e.index for e in ex] == [2] and stats.dropped == 2
    ex, stats = tokenize_sft(records, char_tokenizer, max_len=10, overlong="truncate")
    assert [e.index for e in ex] == [0, 2]  # record 1's prompt alone does not fit
    assert (stats.total, stats.kept, stats.truncated, stats.dropped) == (3, 2, 1, 1)
    assert ex[0].response_ids == (ord("r"),) * 6 and len(ex[0]) == 10  # eos cut off


def test_bad_records(char_tokenizer):
    with pytest.raises(ValueError, match=r"record 0 has fields \['prompt'\] \('prompt' without 'completion' or 'response'\)"):
        tokenize_sft([{"prompt": "a"}], char_tokenizer, max_len=10)
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_sft([{"messages": [{"role": "user", "content": "a"}]}], char_tokenizer, max_len=10)
    with pytest.raises(ValueError, match="prompt encodes to 0 tokens"):
        tokenize_sft([{"prompt": "", "response": "a"}], char_tokenizer, max_len=10)
    ex, _ = tokenize_sft([{"prompt": "", "response": "a"}], char_tokenizer, max_len=10, add_bos=True)
    assert ex[0].prompt_ids == (char_tokenizer.bos_token_id,)


def test_pack_examples_next_fit():
    assert pack_examples([0, 1, 2, 3, 4], [3, 4, 2, 5, 1], row_len=7) == [(0, 1), (2, 3), (4,)]
    with pytest.raises(ValueError, match="example 0 has 9 tokens > row_len=7"):
        pack_examples([0], [9], 7)


def test_packing_never_crosses_examples(tokenizer):
    records = _records(12)
    loader = SFTLoader(records, tokenizer, 2, max_len=40, pack=True, seed=1, drop_last=False, num_epochs=1)
    texts = {(p, r + tokenizer.eos_token) for p, r in (split_sft_record(rec) for rec in records)}
    seen = []
    for batch in loader:
        assert batch.tokens.shape[1] <= 40
        assert batch.segment_ids.max() > 1  # really packed
        seen += _check_rows(tokenizer, batch, texts)
        # every target's predecessor (the position predicting it) lies in the same example
        b, t = np.nonzero(batch.loss_mask)
        assert np.all(t > 0)
        np.testing.assert_array_equal(batch.segment_ids[b, t - 1], batch.segment_ids[b, t])
        np.testing.assert_array_equal(batch.positions[b, t - 1] + 1, batch.positions[b, t])
        assert np.all(batch.positions[batch.segment_ids == 0] == 0)
    assert sorted(seen) == sorted(texts)  # each example exactly once in the epoch


def test_packed_loader_resume(char_tokenizer):
    records = _records(20)
    make = lambda: SFTLoader(records, char_tokenizer, 2, max_len=32, pack=True, seed=5)
    ref = make()
    expected = [next(ref) for _ in range(12)]  # spans several epochs
    run = make()
    for _ in range(7):
        next(run)
    resumed = make()
    resumed.load_state_dict(run.state_dict())
    for want in expected[7:]:
        got = next(resumed)
        np.testing.assert_array_equal(want.tokens, got.tokens)
        np.testing.assert_array_equal(want.segment_ids, got.segment_ids)


def test_collate_sft_unpacked_positions(char_tokenizer):
    ex, _ = tokenize_sft([{"prompt": "ab", "response": "c"}, {"prompt": "a", "response": "bcd"}],
                         char_tokenizer, max_len=16)
    batch = collate_sft(ex, pad_token_id=char_tokenizer.pad_token_id, bucket=8)
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 0, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]])
    assert batch.tokens[0, 4] == char_tokenizer.pad_token_id


def test_packed_process_slices_share_shape(char_tokenizer):
    records = _records(30)
    full = SFTLoader(records, char_tokenizer, 4, max_len=48, pack=True, seed=0, bucket=8)
    parts = [SFTLoader(records, char_tokenizer, 4, max_len=48, pack=True, seed=0, bucket=8,
                       process_index=i, process_count=2) for i in range(2)]
    for _ in range(3):
        want = next(full)
        got = [next(p) for p in parts]
        for field in ("tokens", "loss_mask", "positions", "segment_ids"):
            np.testing.assert_array_equal(np.concatenate([getattr(g, field) for g in got]), getattr(want, field))
