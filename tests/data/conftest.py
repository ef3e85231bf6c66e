"""Offline tokenizers for the data tests: a byte-level HF tokenizer and CharTokenizer."""

from __future__ import annotations

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_hf_tokenizer(*, specials: bool = True, chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE (no merges) PreTrainedTokenizerFast: decode(encode(s)) == s."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kwargs = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>") if specials else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def hf_tokenizer():
    return make_hf_tokenizer()


@pytest.fixture(scope="session")
def char_tokenizer():
    from jaxrl_llm.models.tokenizer import CharTokenizer

    return CharTokenizer()


@pytest.fixture(params=["hf", "char"])
def tokenizer(request, hf_tokenizer, char_tokenizer):
    return hf_tokenizer if request.param == "hf" else char_tokenizer
