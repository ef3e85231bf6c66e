"""Tests for jaxrl_llm.data.records and the tokenizer adapter: loading, saving, errors."""

from __future__ import annotations

import json
import os

import pytest

from jaxrl_llm.data.records import load_records, rename_columns, save_records
from jaxrl_llm.data.tokenization import (
    decode_ids,
    encode_text,
    eos_id,
    pad_id,
    render_prompt,
    response_text,
)

from .conftest import make_hf_tokenizer

RECORDS = [
    {"prompt": "What is 2+2?", "answer": "4", "level": 1},
    {"prompt": [{"role": "user", "content": "Say hi"}], "answer": "hi", "level": 2},
    {"prompt": "ünïcode ✓", "answer": "x", "level": 3},
]


CHAT_RECORDS = [
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
     "answer": "4"},
    {"prompt": [{"role": "user", "content": "Say hi"}], "answer": "hi"},
]


@pytest.mark.parametrize("suffix,records", [
    ("jsonl", RECORDS), ("json", RECORDS), ("jsonl", CHAT_RECORDS), ("parquet", CHAT_RECORDS),
])  # parquet holds one type per column: see test_parquet_mixed_types_error
def test_file_round_trip(tmp_path, suffix, records):
    path = save_records(records, tmp_path / f"data.{suffix}")
    assert load_records(path) == records
    assert [p.name for p in tmp_path.iterdir()] == [f"data.{suffix}"]  # no temp file left


def test_parquet_round_trip_plain(tmp_path):
    records = [{"prompt": "a", "answer": "1", "score": 0.5}, {"prompt": "b", "answer": None, "score": 1.0}]
    assert load_records(save_records(records, tmp_path / "p.parquet")) == records


def test_parquet_mixed_types_error(tmp_path):
    with pytest.raises(ValueError, match=r"mixed types \{'prompt': \['list', 'str'\]\}"):
        save_records(RECORDS, tmp_path / "d.parquet")
    assert list(tmp_path.iterdir()) == []


def test_load_from_disk_round_trip_and_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    flat = [{"question": f"q{i}", "answer": str(i)} for i in range(5)]
    ds = datasets.Dataset.from_list(flat)
    ds.save_to_disk(str(tmp_path / "single"))
    got = load_records(tmp_path / "single", columns={"question": "prompt"})
    assert got == [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict", required=("question",), split="test")) == 2
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]"):
        load_records(tmp_path / "dict", required=("question",))
    with pytest.raises(ValueError, match="split='valid' not found"):
        load_records(tmp_path / "dict", required=("question",), split="valid")
    # a Dataset object is accepted directly
    assert load_records(ds, required=("question", "answer")) == flat


def test_json_with_splits(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": RECORDS, "test": RECORDS[:1]}))
    assert load_records(path, split="test") == RECORDS[:1]


def test_missing_field_names_index_field_and_present_fields():
    records = [{"prompt": "a"}, {"prompt": "b"}, {"question": "c", "answer": "1"}]
    with pytest.raises(ValueError, match=r"record 2 is missing required field 'prompt'.*\['answer', 'question'\]"):
        load_records(records)
    with pytest.raises(ValueError, match="record 1 is missing required field 'answer'"):
        load_records([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}],
                     required=("prompt", "answer"))


def test_column_mapping_and_conflict():
    got = load_records([{"question": "q", "solution": "s"}],
                       columns={"question": "prompt", "solution": "answer"})
    assert got == [{"prompt": "q", "answer": "s"}]
    with pytest.raises(ValueError, match="cannot rename field 'question' to 'prompt'"):
        rename_columns({"question": "q", "prompt": "p"}, {"question": "prompt"})


def test_empty_and_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_records([])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_records(empty)
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_records(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_records(broken)
    with pytest.raises(ValueError, match="record 1 must be a dict"):
        load_records([{"prompt": "a"}, "b"])


def test_save_is_atomic_on_failure(tmp_path):
    path = save_records(RECORDS, tmp_path / "d.jsonl")
    before = path.read_text()
    with pytest.raises(TypeError):
        save_records([{"prompt": object()}], path)
    assert path.read_text() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


# ------------------------------------------------------------------ tokenizer adapter


def test_encode_adds_no_special_tokens_unless_asked(tokenizer):
    ids = encode_text(tokenizer, "abc")
    assert eos_id(tokenizer) not in ids and tokenizer.bos_token_id not in ids
    assert len(ids) == 3
    full = encode_text(tokenizer, "abc", add_bos=True, add_eos=True)
    assert full == [tokenizer.bos_token_id] + ids + [eos_id(tokenizer)]
    assert decode_ids(tokenizer, ids) == "abc"


def test_pad_falls_back_to_eos_and_errors_without_either():
    hf = make_hf_tokenizer(specials=False)
    with pytest.raises(ValueError, match="tokenizer has no pad_token_id and no eos_token_id; set one"):
        pad_id(hf)
    with pytest.raises(ValueError, match="no eos_token_id"):
        eos_id(hf)
    hf.add_special_tokens({"eos_token": "<eos>"})
    assert pad_id(hf) == eos_id(hf)


def test_render_prompt(tokenizer):
    assert render_prompt(tokenizer, "plain") == "plain"
    text = render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi\n<|assistant|>\n"  # both tokenizers use this format
    with pytest.raises(ValueError, match="message 0 needs str 'role' and 'content'"):
        render_prompt(tokenizer, [{"content": "hi"}])
    with pytest.raises(ValueError, match="prompt must be a str or a non-empty list"):
        render_prompt(tokenizer, 3)


def test_render_prompt_without_chat_template():
    hf = make_hf_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(hf, [{"role": "user", "content": "hi"}])
    assert render_prompt(hf, "still fine") == "still fine"


def test_response_text():
    assert response_text("x") == "x"
    assert response_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        response_text([{"role": "user", "content": "q"}])
