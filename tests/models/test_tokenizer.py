"""CharTokenizer: byte-level encode/decode round trip, padding, chat template."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrl_llm.models import CharTokenizer, tiny_config


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_round_trip_any_text(text):
    tok = CharTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_batch_padding_both_sides():
    tok = CharTokenizer()
    right = tok(["ab", "xyz1"], add_eos=True)
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert right["input_ids"][0, 3] == tok.pad_token_id and right["input_ids"].dtype == np.int32
    left = tok(["ab", "xyz1"], padding_side="left", max_length=6)
    np.testing.assert_array_equal(left["attention_mask"][0], [0, 0, 0, 0, 1, 1])
    assert tok.batch_decode(left["input_ids"]) == ["ab", "xyz1"]
    assert tok.decode(right["input_ids"][0], skip_special_tokens=False) == "ab<eos><pad><pad>"
    with pytest.raises(ValueError, match="max_length"):
        tok(["abcdef"], max_length=3)
    assert tok(["abcdef"], max_length=3, truncation=True)["input_ids"].tolist() == [[97, 98, 99]]
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding_side="middle")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([999])


def test_chat_template_and_preset_vocab():
    tok = CharTokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert text == "<|user|>\n2+2?\n<|assistant|>\n"
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=False
    ) == tok.encode("<|user|>\nhi\n")
    cfg = tiny_config("llama")
    assert cfg.vocab_size == tok.vocab_size and cfg.pad_token_id == tok.pad_token_id
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
