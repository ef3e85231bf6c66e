"""Tokenizer adapter: one small interface over HF tokenizers and the built-in CharTokenizer.

The data pipeline accepts either a Hugging Face tokenizer (``transformers``
``PreTrainedTokenizerBase``, loaded from a local path) or
``jaxrl_llm.models.tokenizer.CharTokenizer``. The two differ in how special tokens are
requested (``add_special_tokens`` vs ``add_bos``/``add_eos``) and in how a missing chat
template shows up; the functions here hide those differences:

- ``encode_text(tokenizer, text)``: token ids with NO special tokens unless asked.
- ``eos_id`` / ``pad_id`` / ``bos_id``: special ids, with clear errors when absent
  (``pad_id`` falls back to eos, the usual convention for decoder-only LMs).
- ``render_prompt(tokenizer, prompt)``: a prompt string, or chat messages rendered with
  the tokenizer's chat template and the generation prompt appended.
- ``response_text(response)``: the text of a response given as a string or as chat
  messages ending with an assistant turn.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

Prompt = Any  # str | list[{"role": str, "content": str}]


def _uses_add_bos(tokenizer) -> bool:
    """True when ``tokenizer.encode`` takes ``add_bos`` (CharTokenizer style)."""
    try:
        return "add_bos" in inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        return False


def bos_id(tokenizer) -> int:
    """The tokenizer's beginning-of-sequence id; ValueError if it has none."""
    value = getattr(tokenizer, "bos_token_id", None)
    if value is None:
        raise ValueError("tokenizer has no bos_token_id; set one or pass add_bos=False.")
    return int(value)


def eos_id(tokenizer) -> int:
    """The tokenizer's end-of-sequence id; ValueError if it has none."""
    value = getattr(tokenizer, "eos_token_id", None)
    if value is None:
        raise ValueError("tokenizer has no eos_token_id; set one (e.g. tokenizer.eos_token = ...).")
    return int(value)


def pad_id(tokenizer) -> int:
    """The padding id: ``pad_token_id``, else ``eos_token_id`` (padding is always masked)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer has no pad_token_id and no eos_token_id; set one.")


def encode_text(tokenizer, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``; no special tokens are added unless asked.

    Args:
      tokenizer: an HF tokenizer or a CharTokenizer.
      text: the string to encode.
      add_bos: prepend ``bos_id(tokenizer)``.
      add_eos: append ``eos_id(tokenizer)``.

    Returns:
      list[int] of token ids.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}: {text!r:.80}.")
    if _uses_add_bos(tokenizer):
        ids = tokenizer.encode(text, add_bos=False, add_eos=False)
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    ids = [int(i) for i in ids]
    if add_bos:
        ids = [bos_id(tokenizer)] + ids
    if add_eos:
        ids = ids + [eos_id(tokenizer)]
    return ids


def decode_ids(tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Text of ``ids`` (special tokens kept by default, so eos shows up)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def is_chat(value: Any) -> bool:
    """True when ``value`` looks like a list of chat messages ({role, content} dicts)."""
    return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(m, Mapping) for m in value))


def check_messages(messages: Any, what: str = "prompt") -> list[dict]:
    """Validates chat messages: a non-empty list of dicts with str ``role`` and ``content``."""
    if not is_chat(messages):
        raise ValueError(
            f"{what} must be a str or a non-empty list of {{'role', 'content'}} messages, "
            f"got {type(messages).__name__}: {messages!r:.120}.")
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{what} message {i} needs str 'role' and 'content', got keys {sorted(m)}: {m!r:.120}.")
    return [dict(m) for m in messages]


def has_chat_template(tokenizer) -> bool:
    """True when ``tokenizer.apply_chat_template`` can render messages.

    HF tokenizers need a non-empty ``chat_template``; tokenizers without that attribute
    (CharTokenizer) are trusted to carry their own fixed template.
    """
    if not callable(getattr(tokenizer, "apply_chat_template", None)):
        return False
    if hasattr(tokenizer, "chat_template"):
        return bool(tokenizer.chat_template)
    return True


def render_prompt(tokenizer, prompt: Prompt, *, tools: Sequence[dict] | None = None) -> str:
    """The prompt as text, ready to encode with ``encode_text``.

    A string is returned unchanged. Chat messages ([{"role", "content"}, ...]) are rendered
    with ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``, so the text ends where the assistant's answer starts;
    ``tools`` (JSON-schema tool descriptions) are passed on as ``tools=`` when given.

    Raises:
      ValueError: the prompt is neither a str nor messages, or the tokenizer has no chat
        template.
    """
    if isinstance(prompt, str):
        return prompt
    messages = check_messages(prompt, "prompt")
    if not has_chat_template(tokenizer):
        raise ValueError(
            "prompt is a list of chat messages but the tokenizer has no chat template; set "
            "tokenizer.chat_template or pass prompts as plain strings.")
    extra = {"tools": list(tools)} if tools else {}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str.")
    return text


def response_text(response: Any, what: str = "response") -> str:
    """Text of a response: a str, or messages whose last turn is the assistant's."""
    if isinstance(response, str):
        return response
    messages = check_messages(response, what)
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{what} given as messages must end with an assistant turn, got role "
            f"{messages[-1]['role']!r}.")
    return messages[-1]["content"]


_SENTINEL = "\u2063jaxrl-llm-turn-end\u2063"  # marks where the assistant's text ends in a rendering


def observation_ids(tokenizer: Any, observation: Sequence[dict], *, tools: Sequence[dict] | None = None,
                    stop_text: str = "") -> list[int]:
    """Token ids the chat template puts between the end of an assistant message and the
    start of the next one, with ``observation`` in between.

    Rendered as a difference of two renderings of a stand-in conversation (user,
    assistant), with and without the observation (and the generation prompt), so the ids
    are exactly what the template would write after any assistant message. When the
    policy's message ended with a stop token whose text opens the difference (e.g. Qwen's
    "<|im_end|>"), that text is dropped: the stop token is already in the sequence.

    Args:
      tokenizer: an HF tokenizer with a chat template, or a CharTokenizer.
      observation: chat messages to append (e.g. ``{"role": "tool", "content": ...}``).
      tools: the environment's tool schemas (rendered the same way in both texts).
      stop_text: decoded text of the policy's stop token ("" if none).

    Returns:
      list[int] token ids (the end-of-turn text, the observation turns, the header of
      the next assistant turn).
    """
    if observation:
        check_messages(list(observation), "observation")
    stand_in = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    extra = {"tools": list(tools)} if tools else {}
    before = tokenizer.apply_chat_template(stand_in, tokenize=False, add_generation_prompt=False, **extra)
    after = tokenizer.apply_chat_template(stand_in + list(observation), tokenize=False,
                                          add_generation_prompt=True, **extra)
    cut = before.rfind(_SENTINEL)
    if cut < 0 or after[: cut + len(_SENTINEL)] != before[: cut + len(_SENTINEL)]:
        raise ValueError("the chat template renders an assistant message differently when messages follow it; "
                         "observation tokens cannot be appended to a multi-turn rollout with this template")
    delta = after[cut + len(_SENTINEL):]
    if stop_text and delta.startswith(stop_text):
        delta = delta[len(stop_text):]
    return encode_text(tokenizer, delta)
