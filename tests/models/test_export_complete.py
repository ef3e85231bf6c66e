"""The HF export of a run holds everything `from_pretrained` needs: weights, config.json,
generation_config.json and the tokenizer (HF tokenizer or the built-in CharTokenizer),
with the same ids and the same logits as the JAX model."""

import json
import logging
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import (
    CausalLM,
    CharTokenizer,
    RewardModel,
    load_tokenizer,
    save_hf,
    tiny_config,
)
from jaxrl_llm.models.hf_io import generation_config, save_tokenizer
from jaxrl_llm.train import dpo, reward_model, sft
from jaxrl_llm.train.loop import RunConfig
from tests.data.conftest import make_hf_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
TEXTS = ["2+3=5", "  hello world\n", "héllo ✓ 日本 🙂", "a<eos>b<pad>", "", "\t"]
MESSAGES = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]


def _tokenizer(kind: str):
    return CharTokenizer() if kind == "char" else make_hf_tokenizer()


def _ids(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def _sft_run(tmp_path, tokenizer):
    examples = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a in range(3) for b in range(3)]
    config = sft.SFTConfig(run=RunConfig(output_dir=str(tmp_path / "run"), total_steps=2, progress=False),
                           batch_size=4, max_len=16)
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    return sft.train(config, policy=model, tokenizer=tokenizer, examples=examples)


@pytest.mark.parametrize("kind", ["hf", "char"])
def test_sft_export_loads_with_auto_classes(kind, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = _tokenizer(kind)
    result = _sft_run(tmp_path, tok)
    export = result.output_dir / "export"

    loaded = AutoTokenizer.from_pretrained(export)
    for text in TEXTS:
        assert _ids(loaded, text) == _ids(tok, text), text
        assert loaded.decode(_ids(tok, text)) == text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert load_tokenizer(str(export)).eos_token_id == tok.eos_token_id
    for prompt in (True, False):
        assert loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt) == \
            tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=prompt)

    gen = GenerationConfig.from_pretrained(export)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert eos[0] == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    assert gen.bos_token_id == tok.bos_token_id

    hf = AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = np.array([[tok.bos_token_id, *_ids(loaded, "1+2=3"), tok.eos_token_id]])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(result.model(jnp.asarray(tokens))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_char_tokenizer_round_trips_through_hf(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer(padding_side="left")
    tok.save_pretrained(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(hf) == tok.vocab_size and hf.padding_side == "left"
    for text in TEXTS:
        assert hf.encode(text) == tok.encode(text)  # HF's default adds no specials, as here
    ids = [104, 105, tok.eos_token_id, 0xE6, 0x97, tok.pad_token_id, 0xE6, 0x97, 0xA5, 33]  # cut UTF-8
    for skip in (True, False):
        assert hf.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    batch = hf(["ab", "abcd"], padding=True)
    np.testing.assert_array_equal(batch["input_ids"], tok(["ab", "abcd"])["input_ids"])

    class NoPad(CharTokenizer):  # a variant without a pad token (eos pads in the trainers)
        def __init__(self):
            super().__init__()
            self.pad_token_id = None

    no_pad = NoPad().to_hf()
    assert no_pad.pad_token_id is None and no_pad.eos_token_id == 258 and no_pad.encode("a") == [97]


def test_generation_config_ids():
    config = tiny_config("llama", **TINY)  # bos 257, eos 258, pad 256
    assert generation_config(config)["eos_token_id"] == 258
    hf = make_hf_tokenizer()  # bos 256, eos 257, pad 258
    gen = generation_config(config, hf)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (256, [257, 258], 258)
    no_ids = tiny_config("llama", bos_token_id=None, eos_token_id=None, pad_token_id=None, **TINY)
    assert generation_config(no_ids) is None
    no_pad = SimpleNamespace(eos_token_id=5, pad_token_id=None)  # a tokenizer without pad (or bos)
    gen = generation_config(no_ids, no_pad)
    assert gen["eos_token_id"] == 5 == gen["pad_token_id"] and gen.get("bos_token_id") is None  # pad: eos


def test_reward_model_export_and_tokenizerless_objects(tmp_path, caplog):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = CharTokenizer()
    save_hf(RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), str(tmp_path / "rm"), tokenizer=tok)
    assert not (tmp_path / "rm" / "generation_config.json").exists()
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").encode("ab") == [97, 98]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert hf.config.pad_token_id == tok.pad_token_id
    with caplog.at_level(logging.WARNING):
        save_tokenizer(object(), tmp_path / "none")
    assert "no save_pretrained" in caplog.text


def test_trainers_pass_their_tokenizer_to_the_exports(tmp_path):
    tok = CharTokenizer()
    pairs = [{"prompt": f"q{i}:", "chosen": "abc"[: i % 3 + 1], "rejected": "XYZ"[: i % 3 + 1]} for i in range(8)]
    run = {"total_steps": 1, "progress": False}
    dpo_result = dpo.train(
        dpo.DPOConfig(run=RunConfig(output_dir=str(tmp_path / "dpo"), **run), batch_size=4, max_len=16),
        policy=CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=tok, preferences=pairs)
    assert (dpo_result.output_dir / "export" / "tokenizer.json").exists()
    rm_result = reward_model.train(
        reward_model.RewardConfig(run=RunConfig(output_dir=str(tmp_path / "rm"), **run), batch_size=4, max_len=16),
        model=RewardModel(tiny_config("llama", **TINY), rngs=nnx.Rngs(0)), tokenizer=tok, preferences=pairs)
    for folder in ("export", "reward_model"):
        assert (rm_result.output_dir / folder / "tokenizer.json").exists(), folder
        assert (rm_result.output_dir / folder / "tokenizer_config.json").exists(), folder
