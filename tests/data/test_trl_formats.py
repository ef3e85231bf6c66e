"""TRL dataset formats: every accepted shape gives the batch of its internal equivalent."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxrl_llm.data.formats import (
    check_formats,
    detect_format,
    extract_prompt,
    prompt_of,
    sft_parts,
)
from jaxrl_llm.data.preferences import PreferenceLoader, tokenize_preferences
from jaxrl_llm.data.prompts import PromptLoader
from jaxrl_llm.data.records import load_records, save_records
from jaxrl_llm.data.sft import SFTLoader, tokenize_sft
from jaxrl_llm.data.tokenization import encode_text

SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "Blue."}
GREY = {"role": "assistant", "content": "Grey, mostly."}


def _one_batch(loader_cls, records, tokenizer, **kwargs):
    n = len(records)
    return next(loader_cls(records, tokenizer, n, shuffle=False, drop_last=False, num_epochs=1, **kwargs))


def _assert_same_batch(got, want):
    """Every field equal: arrays exactly, lists / dicts / strings by ==."""
    assert type(got) is type(want)
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, np.ndarray) or hasattr(b, "shape"):
            assert np.shape(a) == np.shape(b), f.name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f.name)
        else:
            assert a == b, f.name


# --------------------------------------------------------------------------- SFT

SFT_EQUIVALENT = {
    "prompt_completion_text": ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "response": "4"}),
    "conversational_prompt_completion": ({"prompt": [SYS, USER], "completion": [BLUE]},
                                         {"messages": [SYS, USER, BLUE]}),
    "multi_turn_completion": ({"prompt": [USER], "completion": [BLUE, {"role": "user", "content": "Why?"}, GREY]},
                              {"messages": [USER, BLUE, {"role": "user", "content": "Why?"}, GREY]}),
    "chat_prompt_text_completion": ({"prompt": [USER], "completion": "Blue."},
                                    {"prompt": [USER], "response": [BLUE]}),
    "messages_wins_over_prompt": ({"prompt": USER["content"], "messages": [USER, BLUE]},  # UltraChat layout
                                  {"messages": [USER, BLUE]}),
    "none_columns_ignored": ({"prompt": None, "completion": None, "messages": None, "text": "abc def"},
                             {"text": "abc def"}),
}


@pytest.mark.parametrize("case", sorted(SFT_EQUIVALENT))
def test_sft_format_gives_tokens_and_mask_of_its_equivalent(tokenizer, case):
    trl, internal = SFT_EQUIVALENT[case]
    got, want = tokenize_sft([trl], tokenizer, max_len=256)[0], tokenize_sft([internal], tokenizer, max_len=256)[0]
    assert got == want
    _assert_same_batch(_one_batch(SFTLoader, [trl] * 2, tokenizer, max_len=256),
                       _one_batch(SFTLoader, [internal] * 2, tokenizer, max_len=256))


def test_sft_conversational_completion_prompt_is_rendered_context(tokenizer):
    rec = SFT_EQUIVALENT["multi_turn_completion"][0]
    prompt, response = sft_parts(rec)
    assert prompt == [USER, BLUE, {"role": "user", "content": "Why?"}] and response == GREY["content"]


@pytest.mark.parametrize("add_bos", [False, True])
def test_sft_text_is_language_modelling(tokenizer, add_bos):
    text = "The sky is blue."
    batch = _one_batch(SFTLoader, [{"text": text}], tokenizer, max_len=64, add_bos=add_bos, bucket=None)
    ids = encode_text(tokenizer, text, add_bos=add_bos, add_eos=True)
    np.testing.assert_array_equal(batch.tokens[0], ids)
    # the first token has nothing predicting it; every later one (eos included) is a target
    np.testing.assert_array_equal(batch.loss_mask[0], [0.0] + [1.0] * (len(ids) - 1))
    if add_bos:
        assert batch.tokens[0, 0] == tokenizer.bos_token_id  # so the text's first token is learned too
    else:  # byte-level tokenizers: the same as a one-character prompt
        same = _one_batch(SFTLoader, [{"prompt": text[0], "response": text[1:]}], tokenizer, max_len=64, bucket=None)
        _assert_same_batch(batch, same)


def test_sft_text_packed_targets_stay_in_their_example(char_tokenizer):
    records = [{"text": f"doc {i}: " + "x" * i} for i in range(8)]
    loader = SFTLoader(records, char_tokenizer, 2, max_len=40, pack=True, shuffle=False, drop_last=False,
                       num_epochs=1)
    batches = list(loader)
    assert max(int(batch.segment_ids.max()) for batch in batches) > 1  # really packed
    for batch in batches:
        b, t = np.nonzero(batch.loss_mask)
        np.testing.assert_array_equal(batch.segment_ids[b, t - 1], batch.segment_ids[b, t])
        starts = np.nonzero(batch.positions == 0)
        assert np.all(batch.loss_mask[starts] == 0)  # no example's first token is a target


def test_sft_text_too_short(char_tokenizer):
    with pytest.raises(ValueError, match=r"record 1: 'text' encodes to 1 token\(s\); language modelling needs at least 2"):
        tokenize_sft([{"text": "ab"}, {"text": "a"}], char_tokenizer, max_len=8, add_eos=False)
    ex, _ = tokenize_sft([{"text": "a"}], char_tokenizer, max_len=8)  # "a" + eos
    assert (ex[0].prompt_ids, ex[0].response_ids) == ((ord("a"),), (char_tokenizer.eos_token_id,))


def test_sft_mixed_formats_from_a_file(tmp_path, char_tokenizer):
    records = [{"text": "plain text"}, {"prompt": "p", "completion": "c"}, {"messages": [USER, BLUE]}]
    path = save_records(records, tmp_path / "mixed.jsonl")
    loaded = load_records(path, required=())
    assert check_formats(loaded, "sft") == ["text", "prompt_completion", "messages"]
    examples, stats = tokenize_sft(loaded, char_tokenizer, max_len=128)
    assert stats.kept == 3 and [e.index for e in examples] == [0, 1, 2]


@pytest.mark.parametrize("record,why", [
    ({"question": "q", "answer": "a"}, ""),
    ({"prompt": "q"}, " \\('prompt' without 'completion' or 'response'\\)"),
    ({"prompt": "q", "completion": "a", "response": "b"}, " \\(both 'completion' and 'response'\\)"),
])
def test_sft_unknown_shape_names_accepted_formats(char_tokenizer, record, why):
    fields = str(sorted(record)).replace("[", "\\[").replace("]", "\\]")
    pattern = (r"SFT records must be one of: \{prompt, completion\} \| \{prompt, response\} \| \{messages\} "
               rf"\| \{{text\}}; record 2 has fields {fields}{why}\.$")
    good = {"prompt": "p", "response": "r"}
    with pytest.raises(ValueError, match=pattern):
        tokenize_sft([good, good, record], char_tokenizer, max_len=16)
    with pytest.raises(ValueError, match=pattern):
        SFTLoader([good, good, record], char_tokenizer, 2, max_len=16)


# --------------------------------------------------------------------------- preferences


def test_extract_prompt_text_cuts_before_last_whitespace():
    assert extract_prompt("Q: sky?\nA: blue", "Q: sky?\nA: grey") == ("Q: sky?\nA:", " blue", " grey")
    # the raw common prefix "The sky is bl" would split a word
    assert extract_prompt("The sky is blue", "The sky is black") == ("The sky is", " blue", " black")
    assert extract_prompt("Say: yes", "Say: yes, surely") == ("Say:", " yes", " yes, surely")
    assert extract_prompt("天空是蓝色", "天空是灰色") == ("天空是", "蓝色", "灰色")  # no whitespace: raw prefix
    assert extract_prompt("Paris", "London") == ("", "Paris", "London")


def test_extract_prompt_conversational():
    prompt, chosen, rejected = extract_prompt([SYS, USER, BLUE], [SYS, USER, GREY])
    assert (prompt, chosen, rejected) == ([SYS, USER], [BLUE], [GREY])
    # identical final turns: still only the last turn is the response (DPO drops such pairs)
    assert extract_prompt([USER, BLUE], [USER, BLUE]) == ([USER], [BLUE], [BLUE])


@pytest.mark.parametrize("chosen,rejected,match", [
    ([USER, BLUE], [{"role": "user", "content": "Other?"}, GREY], "they differ at message 0"),
    ([USER, BLUE, USER, BLUE], [USER, GREY, USER, BLUE], "they differ at message 1"),
    ([USER, BLUE], [USER], "'rejected' must end with an assistant turn"),
    ([BLUE], [GREY], "hold only the assistant turn; no prompt"),
    ("Q: a", [USER, BLUE], "must both be strings or both chat messages"),
])
def test_extract_prompt_errors(chosen, rejected, match):
    with pytest.raises(ValueError, match=f"record 4: .*{match}"):
        extract_prompt(chosen, rejected, index=4)


PREFERENCE_EQUIVALENT = {
    "implicit_text": ({"chosen": "Q: sky?\nA: blue", "rejected": "Q: sky?\nA: grey"},
                      {"prompt": "Q: sky?\nA:", "chosen": " blue", "rejected": " grey"}),
    "implicit_conversational": ({"chosen": [SYS, USER, BLUE], "rejected": [SYS, USER, GREY]},
                                {"prompt": [SYS, USER], "chosen": [BLUE], "rejected": [GREY]}),
    "explicit_conversational": ({"prompt": [SYS, USER], "chosen": [BLUE], "rejected": [GREY]},
                                {"prompt": [SYS, USER], "chosen": "Blue.", "rejected": "Grey, mostly."}),
    # UltraFeedback layout: a bare-question prompt column, the chat prompt inside chosen/rejected
    "str_prompt_with_conversations": ({"prompt": USER["content"], "chosen": [USER, BLUE], "rejected": [USER, GREY]},
                                      {"prompt": [USER], "chosen": "Blue.", "rejected": "Grey, mostly."}),
    "implicit_with_label": ({"chosen": "x: ab", "rejected": "x: cd", "label": 0.5},
                            {"prompt": "x:", "chosen": " ab", "rejected": " cd", "label": 0.5}),
}


@pytest.mark.parametrize("case", sorted(PREFERENCE_EQUIVALENT))
def test_preference_format_gives_batch_of_explicit_prompt(tokenizer, case):
    trl, explicit = PREFERENCE_EQUIVALENT[case]
    got, _ = tokenize_preferences([trl], tokenizer, max_len=256)
    want, _ = tokenize_preferences([explicit], tokenizer, max_len=256)
    assert got == want
    loader = PreferenceLoader([trl] * 2, tokenizer, 2, max_len=256, shuffle=False, ties="half")
    _assert_same_batch(next(loader), _one_batch(PreferenceLoader, [explicit] * 2, tokenizer, max_len=256, ties="half"))
    assert all(r["prompt"] for r in loader.records)  # the loader's records carry the extracted prompt


def test_implicit_prompt_pairs_and_kwise_records_mix(char_tokenizer):
    kwise = {"prompt": "Q:", "responses": [" a", " b", " c"], "ranking": [1, 2, 3]}
    records = [{"chosen": "Q: a", "rejected": "Q: c"}, kwise]
    loader = PreferenceLoader(records, char_tokenizer, 4, max_len=16, shuffle=False, drop_last=False)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in loader.records] == [
        ("Q:", " a", " c"), ("Q:", " a", " b"), ("Q:", " a", " c"), ("Q:", " b", " c")]
    batch = next(loader)
    np.testing.assert_array_equal(batch.chosen_tokens[0], batch.chosen_tokens[2])
    np.testing.assert_array_equal(batch.rejected_mask[0], batch.rejected_mask[2])
    kw = next(PreferenceLoader([kwise], char_tokenizer, 1, max_len=16, kind="kwise", shuffle=False))
    assert kw.tokens.shape[:2] == (1, 3)


def test_preference_detect_format():
    assert [detect_format(r, "preference") for r in (
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": [USER], "chosen": [USER, BLUE], "rejected": [USER, GREY]},  # explicit chat prompt wins
        {"prompt": "p", "chosen": [BLUE], "rejected": [GREY]},  # the responses hold only the answer
        {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]},
    )] == ["explicit", "implicit", "explicit", "explicit", "kwise"]


@pytest.mark.parametrize("record,why", [
    ({"question": "q", "good": "a", "bad": "b"}, ""),
    ({"chosen": "a"}, " \\(missing field 'rejected'\\)"),
    ({"responses": ["a", "b"], "scores": [1, 0]}, " \\(k-wise 'responses' need a 'prompt'\\)"),
])
def test_preference_unknown_shape_names_accepted_formats(char_tokenizer, record, why):
    fields = str(sorted(record)).replace("[", "\\[").replace("]", "\\]")
    pattern = (r"preference records must be one of: \{prompt, chosen, rejected\} \| \{chosen, rejected\} "
               rf"\(implicit prompt\) \| \{{prompt, responses, ranking \| scores\}}; record 1 has fields {fields}{why}\.$")
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    with pytest.raises(ValueError, match=pattern):
        PreferenceLoader([good, record], char_tokenizer, 1, max_len=16)
    with pytest.raises(ValueError, match=pattern):
        tokenize_preferences([good, record], char_tokenizer, max_len=16)


# --------------------------------------------------------------------------- prompts

PROMPT_EQUIVALENT = {
    "messages_with_reference_answer": ({"messages": [SYS, USER, BLUE], "answer": "blue"},
                                       {"prompt": [SYS, USER], "answer": "blue"}),
    "messages_ending_with_user": ({"messages": [SYS, USER], "answer": "blue"},
                                  {"prompt": [SYS, USER], "answer": "blue"}),
    "multi_turn_messages": ({"messages": [USER, BLUE, {"role": "user", "content": "Sure?"}, GREY], "answer": "x"},
                           {"prompt": [USER, BLUE, {"role": "user", "content": "Sure?"}], "answer": "x"}),
    "null_prompt_column": ({"prompt": None, "messages": [USER], "answer": "x"}, {"prompt": [USER], "answer": "x"}),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", sorted(PROMPT_EQUIVALENT))
def test_messages_prompt_gives_batch_of_prompt_messages(tokenizer, case, side):
    trl, internal = PROMPT_EQUIVALENT[case]
    got = _one_batch(PromptLoader, [trl, {"prompt": "plain", "answer": "y"}], tokenizer, padding_side=side)
    want = _one_batch(PromptLoader, [internal, {"prompt": "plain", "answer": "y"}], tokenizer, padding_side=side)
    _assert_same_batch(got, want)
    assert got.prompts == [internal["prompt"], "plain"]  # raw messages, as reward functions get them
    assert got.columns == {"answer": [internal["answer"], "y"]}


def test_prompt_columns_reach_reward_functions(char_tokenizer):
    records = [{"messages": [USER, BLUE], "solution": "blue"},
               {"prompt": "2+2=", "messages": [USER], "solution": "4"}]  # prompt wins, messages is a column
    batch = _one_batch(PromptLoader, records, char_tokenizer)
    assert batch.prompts == [[USER], "2+2="]
    assert batch.columns == {"messages": [None, [USER]], "solution": ["blue", "4"]}

    def reward_fn(prompts, completions, solution, **kwargs):
        return [float(s in c) for s, c in zip(solution, completions)]

    assert reward_fn(batch.prompts, ["it is blue", "5"], **batch.columns) == [1.0, 0.0]
    assert prompt_of({"question": [USER], "messages": [USER, BLUE]}, prompt_field="question") == ([USER], "question")


@pytest.mark.parametrize("record,match", [
    ({"question": "q", "answer": "a"},
     r"RL prompt records must be one of: \{prompt\} \| \{messages\}; record 1 has fields \['answer', 'question'\]\.$"),
    ({"messages": [BLUE]}, r"record 1: 'messages' holds only an assistant turn; no prompt"),
])
def test_prompt_unknown_shape_names_accepted_formats(char_tokenizer, record, match):
    with pytest.raises(ValueError, match=match):
        PromptLoader([{"prompt": "ok"}, record], char_tokenizer, 1)
