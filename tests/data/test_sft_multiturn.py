"""SFT on every assistant turn (``assistant_turns="all"``): a conversation is tokenized
exactly like the multi-turn rollout's episode it came from, the loss on the assistant
tokens and their eos only; ``"last"`` mode is unchanged."""

import jax
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.data.sft import (
    SFTLoader,
    encode_sft_episode,
    encode_sft_record,
    tokenize_sft,
)
from jaxrl_llm.envs import StepResult
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout.multiturn import generate_episodes, observation_ids
from jaxrl_llm.train.sft import SFTConfig
from tests.data.conftest import make_hf_tokenizer

TOK = CharTokenizer()
LETTERS = list(range(ord("a"), ord("z") + 1))
TOOLS = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object", "properties": {}}}}]


class ScriptedEnv:
    """Answers the first ``turns`` messages with tool observations (two messages on the
    second turn), then ends the episode on the next message (observation None)."""

    tools = TOOLS

    def __init__(self, turns=2):
        self.turns = turns

    def reset(self, record, *, seed):
        self.rng, self.count = np.random.default_rng(seed), 0
        return [{"role": "system", "content": "be brief"}, {"role": "user", "content": record["prompt"]}]

    def step(self, text):
        self.count += 1
        if self.count > self.turns:
            return StepResult(None, 1.0, True, {})
        obs = [{"role": "tool", "name": "echo", "content": f"{text[::-1]}|{self.rng.integers(100)}"}]
        if self.count == 2:
            obs.append({"role": "user", "content": "go on"})
        return StepResult(obs, 0.0, False, {})


@pytest.fixture(scope="module")
def letter_model():
    """A tiny untied model whose output distribution is (almost) independent of the input:
    lower-case letters and eos only, so decoded messages re-encode to the sampled ids and
    messages end after a few tokens."""
    model = CausalLM(tiny_config("llama", tie_word_embeddings=False), rngs=nnx.Rngs(0))
    embed = np.asarray(model.model.embed[...]).copy()
    embed[:, 0] += 30.0  # a large shared direction dominates the final (normalised) hidden state
    model.model.embed[...] = embed
    head = np.asarray(model.lm_head[...]).copy()
    head[0, :] = -2.0
    head[0, LETTERS] = 0.3
    head[0, TOK.eos_token_id] = 0.55
    model.lm_head[...] = head
    return model


def _episodes(model, tokenizer, max_new_tokens=24):
    records = [{"prompt": "hi"}, {"prompt": "a longer question"}]
    return generate_episodes(model, tokenizer, records, ScriptedEnv, max_turns=4, max_new_tokens=max_new_tokens,
                             max_total_tokens=160, num_samples=4, stop_token_ids=(TOK.eos_token_id,),
                             pad_token_id=TOK.pad_token_id, rng=jax.random.PRNGKey(3), seed=5)


@pytest.mark.parametrize("hf", [False, True], ids=["CharTokenizer", "hf"])
def test_conversations_tokenize_exactly_like_the_rollout(letter_model, hf):
    tokenizer = TOK.to_hf() if hf else TOK
    ep = _episodes(letter_model, tokenizer)
    r = ep.rollout
    prompt_tokens, prompt_mask = np.asarray(r.prompt_tokens), np.asarray(r.prompt_mask)
    tokens, mask, seq = np.asarray(r.tokens), np.asarray(r.mask), np.asarray(r.sequence_mask)
    checked = 0
    for i, reason in enumerate(ep.finish_reasons):
        if reason == "length":  # a message cut at its budget has no eos: not a finished conversation
            continue
        record = {"messages": ep.conversations[i], "tools": TOOLS}
        [ex], _ = tokenize_sft([record], tokenizer, max_len=512, assistant_turns="all")
        assert list(ex.prompt_ids) == prompt_tokens[i][prompt_mask[i] > 0].tolist()
        n = int(seq[i].sum())
        assert list(ex.response_ids) == tokens[i, :n].tolist()
        assert list(ex.response_mask) == mask[i, :n].tolist()
        checked += 1
    assert checked >= 4, ep.finish_reasons
    assert max(ep.turns) >= 3  # two observations, one of them two messages long


def test_mask_covers_exactly_the_assistant_tokens_and_eos():
    msgs = [{"role": "user", "content": "3*4"}, {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "12"}, {"role": "assistant", "content": "12"}]
    [ex], _ = tokenize_sft([{"messages": msgs}], TOK, max_len=256, assistant_turns="all")
    eos = TOK.eos_token_id
    obs = observation_ids(TOK, msgs[2:3], stop_text="<eos>")
    assert list(ex.prompt_ids) == TOK.encode("<|user|>\n3*4\n<|assistant|>\n")
    assert list(ex.response_ids) == TOK.encode("call") + [eos] + obs + TOK.encode("12") + [eos]
    assert TOK.decode(obs, skip_special_tokens=False) == "\n<|tool|>\n12\n<|assistant|>\n"
    assert list(ex.response_mask) == [1] * 5 + [0] * len(obs) + [1] * 3
    # the batch's loss mask: 1 on "call", its eos, "12" and its eos; 0 on prompt, observation and padding
    batch = next(SFTLoader([{"messages": msgs}], TOK, 1, max_len=64, shuffle=False, assistant_turns="all"))
    targets = batch.tokens[0][batch.loss_mask[0] > 0].tolist()
    assert targets == TOK.encode("call") + [eos] + TOK.encode("12") + [eos]
    assert batch.attention_mask[0].sum() == len(ex)
    # truncation cuts the mask with the ids
    [cut], stats = tokenize_sft([{"messages": msgs}], TOK, max_len=len(ex.prompt_ids) + 8, assistant_turns="all")
    assert stats.truncated == 1 and cut.response_mask == ex.response_mask[:8]


def test_template_whose_eos_text_opens_the_observation():
    """Qwen-style turns end with the eos text: it is not repeated after the sampled eos, so
    the ids are those of the whole rendered conversation (up to the last eos)."""
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tok = make_hf_tokenizer(chat_template=template)
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a2"},
            {"role": "tool", "content": "s"}]  # a trailing observation is dropped
    p, r, m = encode_sft_episode({"messages": msgs}, tok)
    full = tok.apply_chat_template(msgs[:4], tokenize=False, add_generation_prompt=False)
    assert full.endswith("<eos>\n")
    assert p + r == tok.encode(full[:-1], add_special_tokens=False)
    assert tok.decode(r, skip_special_tokens=False) == "a1<eos>\n<|tool|>\nr<eos>\n<|assistant|>\na2<eos>"
    eos = tok.eos_token_id
    assert [t for t, k in zip(r, m) if k] == tok.encode("a1", add_special_tokens=False) + [eos] + \
        tok.encode("a2", add_special_tokens=False) + [eos]


def test_last_mode_is_unchanged_and_other_formats_read_the_same_in_all_mode():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "a2"}]
    records = [{"messages": msgs, "tools": TOOLS}, {"prompt": "1+1=", "response": "2"}, {"text": "abc"},
               {"prompt": msgs[:1], "completion": msgs[1:2]}]
    last, _ = tokenize_sft(records, TOK, max_len=256)
    # "last": the earlier turns are prompt text rendered by the template (no tools), the response the last turn
    assert list(last[0].prompt_ids) == TOK.encode("<|user|>\nq\n<|assistant|>\na1\n<|tool|>\nr\n<|assistant|>\n")
    assert list(last[0].response_ids) == TOK.encode("a2") + [TOK.eos_token_id]
    assert all(ex.response_mask is None for ex in last)
    for i, (rec, ex) in enumerate(zip(records, last)):
        assert (list(ex.prompt_ids), list(ex.response_ids)) == encode_sft_record(rec, TOK, i)
    every, _ = tokenize_sft(records, TOK, max_len=256, assistant_turns="all")
    assert every[1:3] == last[1:3]  # one response: nothing changes
    # a one-turn conversation: the same ids in both modes (mask all ones)
    assert (every[3].prompt_ids, every[3].response_ids) == (last[3].prompt_ids, last[3].response_ids)
    assert set(every[3].response_mask) == {1}
    # the tools field is rendered in "all" mode, as the rollout renders an environment's tools
    assert TOK.decode(list(every[0].prompt_ids)).startswith("<|tools|>\necho\n<|user|>\nq\n")


def test_bad_values():
    with pytest.raises(ValueError, match="assistant_turns"):
        tokenize_sft([{"text": "abc"}], TOK, max_len=16, assistant_turns="every")
    with pytest.raises(ValueError, match="assistant_turns"):
        SFTConfig(assistant_turns="first")
    with pytest.raises(ValueError, match="starts with the assistant"):
        tokenize_sft([{"messages": [{"role": "assistant", "content": "a"}]}], TOK, max_len=16,
                     assistant_turns="all")
