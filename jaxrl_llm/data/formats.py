"""Dataset formats: the record shapes each stage accepts, normalised to one internal shape.

The shapes follow TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats):
*standard* records hold strings, *conversational* ones chat messages
(``[{"role", "content"}, ...]``). A field that is None counts as absent (mixed-format
parquet files fill missing columns with None). Every other field is passed through.

SFT (``sft_parts`` → ``(prompt | None, response text)``):

- ``{"prompt", "completion"}`` (TRL prompt-completion) or ``{"prompt", "response"}`` (our
  original name): strings, or a messages prompt with a messages completion, which reads
  exactly as ``{"messages": prompt + completion}``;
- ``{"messages"}`` (TRL conversational language modelling): the prompt is every message
  before the LAST assistant turn, the response is that turn's content; it wins over a
  ``prompt`` field in the same record (e.g. UltraChat stores the first user turn there);
- ``{"text"}`` (TRL language modelling): no prompt (``None``); the loss covers every token
  but the first, which has nothing to predict it (see ``data.sft``).

Preferences (``preference_record`` → a record with an explicit prompt):

- ``{"prompt", "chosen", "rejected", "label"?}`` (explicit prompt);
- ``{"chosen", "rejected", "label"?}`` (implicit prompt): the prompt is extracted with
  ``extract_prompt``. So is a string ``prompt`` next to conversational chosen/rejected
  that carry the conversation (TRL's ``maybe_extract_prompt``: e.g. UltraFeedback's
  ``prompt`` column is the bare question, the chat prompt is in chosen/rejected);
- ``{"prompt", "responses", "ranking" | "scores"}`` (k-wise, see ``data.preferences``).

Prompts for RL (``prompt_of`` → ``(raw prompt, the field it came from)``):

- ``{"prompt"}``: a string or messages;
- ``{"messages"}``: the conversation minus its trailing assistant turn when it ends with
  one (that turn is a reference answer, not something to condition on), so an SFT-style
  conversation gives the prompt the policy must answer.

Anything else raises a ValueError naming the record index, its fields and the accepted
shapes of the stage.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from jaxrl_llm.data.records import validate_records
from jaxrl_llm.data.tokenization import Prompt, check_messages, is_chat, response_text

SFT_SHAPES = ("{prompt, completion}", "{prompt, response}", "{messages}", "{text}")
PREFERENCE_SHAPES = ("{prompt, chosen, rejected}", "{chosen, rejected} (implicit prompt)",
                     "{prompt, responses, ranking | scores}")
PROMPT_SHAPES = ("{prompt}", "{messages}")
STAGE_SHAPES = {"sft": SFT_SHAPES, "preference": PREFERENCE_SHAPES, "prompt": PROMPT_SHAPES}
_STAGE_NAMES = {"sft": "SFT", "preference": "preference", "prompt": "RL prompt"}


def _has(record: Mapping[str, Any], field: str) -> bool:
    return record.get(field) is not None


def format_error(stage: str, record: Mapping[str, Any], index: int, why: str = "") -> ValueError:
    """ValueError listing the accepted shapes of ``stage`` and the fields of the record."""
    detail = f" ({why})" if why else ""
    return ValueError(f"{_STAGE_NAMES[stage]} records must be one of: {' | '.join(STAGE_SHAPES[stage])}; "
                      f"record {index} has fields {sorted(record)}{detail}.")


def detect_format(record: Mapping[str, Any], stage: str, index: int = 0) -> str:
    """The format of ``record`` for ``stage``; ValueError (naming the shapes) if none fits.

    Returns:
      "sft": "messages" | "prompt_completion" | "text";
      "preference": "kwise" | "explicit" | "implicit";
      "prompt": "prompt" | "messages".
    """
    if stage == "sft":
        if _has(record, "messages"):
            return "messages"
        if _has(record, "prompt"):
            given = [f for f in ("completion", "response") if _has(record, f)]
            if len(given) != 1:
                why = "both 'completion' and 'response'" if given else "'prompt' without 'completion' or 'response'"
                raise format_error(stage, record, index, why)
            return "prompt_completion"
        if _has(record, "text"):
            return "text"
    elif stage == "preference":
        if _has(record, "responses"):
            if not _has(record, "prompt"):
                raise format_error(stage, record, index, "k-wise 'responses' need a 'prompt'")
            return "kwise"
        pair = [f for f in ("chosen", "rejected") if _has(record, f)]
        if len(pair) == 2:
            if not _has(record, "prompt") or _prompt_inside_responses(record):
                return "implicit"
            return "explicit"
        if pair:
            missing = "rejected" if pair == ["chosen"] else "chosen"
            raise format_error(stage, record, index, f"missing field {missing!r}")
    elif stage == "prompt":
        if _has(record, "prompt"):
            return "prompt"
        if _has(record, "messages"):
            return "messages"
    else:
        raise ValueError(f"stage={stage!r}; expected one of {tuple(STAGE_SHAPES)}.")
    raise format_error(stage, record, index)


def check_formats(records: Sequence[Mapping[str, Any]], stage: str) -> list[str]:
    """``detect_format`` of every record: fails on the first record that fits no shape (or
    is not a dict, or on an empty dataset)."""
    validate_records(records)
    return [detect_format(r, stage, i) for i, r in enumerate(records)]


# --------------------------------------------------------------------------- SFT


def split_conversation(messages: Any, what: str = "messages") -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content)."""
    messages = check_messages(messages, what)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError(f"{what} has no assistant turn to learn from.")
    if last == 0:
        raise ValueError(f"{what} starts with the assistant turn; no prompt.")
    return messages[:last], messages[last]["content"]


def sft_parts(record: Mapping[str, Any], index: int = 0) -> tuple[Prompt | None, str]:
    """(prompt, response text) of an SFT record; the prompt is None for ``{"text"}``."""
    fmt = detect_format(record, "sft", index)
    if fmt == "messages":
        return split_conversation(record["messages"], f"record {index} 'messages'")
    if fmt == "text":
        text = record["text"]
        if not isinstance(text, str):
            raise ValueError(f"record {index}: 'text' must be a str, got {type(text).__name__}.")
        return None, text
    field = "completion" if _has(record, "completion") else "response"
    prompt, completion = record["prompt"], record[field]
    response = response_text(completion, f"record {index} {field!r}")  # ends with an assistant turn
    if is_chat(prompt) and is_chat(completion) and len(completion) > 1:
        # conversational prompt-completion reads as {"messages": prompt + completion}: the
        # earlier turns of a multi-turn completion stay in the context instead of vanishing
        return split_conversation(list(prompt) + list(completion), f"record {index} 'prompt' + {field!r}")
    return prompt, response


# --------------------------------------------------------------------------- preferences


def _prompt_inside_responses(record: Mapping[str, Any]) -> bool:
    """A str prompt next to conversational chosen/rejected holding more than the answer:
    the chat prompt is inside chosen/rejected (TRL extracts it there too)."""
    return (isinstance(record["prompt"], str)
            and all(is_chat(record[f]) and len(record[f]) > 1 for f in ("chosen", "rejected")))


def _text_prompt_end(chosen: str, rejected: str) -> int:
    """Where the implicit text prompt ends: before the last whitespace of the common prefix.

    Cutting at the raw common prefix would split a word ("... is bl" + "ue" / "ack") and
    tokenize it unlike the full text; a word-initial space belongs to the word's token in
    BPE/SentencePiece vocabularies, so it goes to the responses (as TRL moves a trailing
    space). A prefix without whitespace (e.g. unspaced scripts) is cut as it is.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    spaces = [i for i in range(common) if chosen[i].isspace()]
    return spaces[-1] if spaces else common


def extract_prompt(chosen: Any, rejected: Any, index: int = 0) -> tuple[Prompt, Any, Any]:
    """(prompt, chosen, rejected) of an implicit-prompt pair.

    Conversational: both must end with an assistant turn and share every message before
    it; the prompt is those messages and each response its final turn (``[message]``).
    TRL takes the longest common leading messages; that is the same on well-formed pairs,
    and a pair that already differs earlier (different user turns) is an error here rather
    than a response spanning several turns.

    Text: the common prefix, cut before its last whitespace (see ``_text_prompt_end``):
    ``"Q: sky?\\nA: blue"`` / ``"Q: sky?\\nA: grey"`` → ``"Q: sky?\\nA:"``, ``" blue"``,
    ``" grey"``.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        end = _text_prompt_end(chosen, rejected)
        return chosen[:end], chosen[end:], rejected[end:]
    what = f"record {index}"
    if not (is_chat(chosen) and is_chat(rejected)):
        raise ValueError(f"{what}: without a prompt, 'chosen' and 'rejected' must both be strings or both "
                         f"chat messages, got {type(chosen).__name__} and {type(rejected).__name__}.")
    chosen, rejected = check_messages(chosen, f"{what} 'chosen'"), check_messages(rejected, f"{what} 'rejected'")
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise ValueError(f"{what}: {name!r} must end with an assistant turn, got role {msgs[-1]['role']!r}.")
    prompt = chosen[:-1]
    if prompt != rejected[:-1]:
        differ = next((j for j, (c, r) in enumerate(zip(chosen, rejected)) if c != r), len(prompt))
        raise ValueError(f"{what}: 'chosen' and 'rejected' must share every message before their final "
                         f"assistant turn (the implicit prompt); they differ at message {differ}.")
    if not prompt:
        raise ValueError(f"{what}: 'chosen' and 'rejected' hold only the assistant turn; no prompt to extract.")
    return prompt, chosen[-1:], rejected[-1:]


def preference_record(record: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """A copy of a preference record with an explicit prompt (extracted when implicit)."""
    out = dict(record)
    if detect_format(record, "preference", index) == "implicit":
        out["prompt"], out["chosen"], out["rejected"] = extract_prompt(record["chosen"], record["rejected"], index)
    return out


# --------------------------------------------------------------------------- prompts


def prompt_of(record: Mapping[str, Any], index: int = 0, prompt_field: str = "prompt") -> tuple[Prompt, str]:
    """(raw prompt, the field it came from) of an RL prompt record.

    ``prompt_field`` (default "prompt") wins; else ``messages`` minus a trailing assistant
    turn. Messages stay messages: reward functions receive the raw conversational prompt.
    """
    if _has(record, prompt_field):
        return record[prompt_field], prompt_field
    if not _has(record, "messages"):
        why = "" if prompt_field == "prompt" else f"prompt_field={prompt_field!r} is missing"
        raise format_error("prompt", record, index, why)
    messages = check_messages(record["messages"], f"record {index} 'messages'")
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError(f"record {index}: 'messages' holds only an assistant turn; no prompt.")
    return messages, "messages"
