"""Supervised fine-tuning examples: prompt + response rows with a response-only loss mask.

Record formats (TRL's standard and conversational formats; see ``data.formats``):

- ``{"prompt": str, "completion" | "response": str}`` (plain text);
- ``{"prompt": messages, "completion" | "response": str | [..., assistant message]}``;
  a messages completion reads as ``{"messages": prompt + completion}``;
- ``{"messages": [..., {"role": "assistant", ...}]}``: the prompt is every message before
  the LAST assistant turn, the response is that turn's content;
- ``{"text": str}`` (language modelling): no prompt; every token is a target except the
  first, which nothing predicts (it plays the prompt's part). With ``add_bos=True`` the
  bos is that first token, so every text token is learned.

Chat prompts are rendered with the chat template and the generation prompt; the response
is its text followed by eos. Prompt and response are tokenized separately and
concatenated, so ``loss_mask`` is 1 on exactly the response tokens (eos included).
(With SentencePiece-style tokenizers that prefix a word-boundary marker to every encoded
string, the response's first token carries that marker, as after a space.)

Every assistant turn (``assistant_turns="all"``; default ``"last"``): a ``messages``
conversation (or a conversational prompt + completion) is tokenized exactly like a
multi-turn rollout's episode (``rollout.multiturn``), so SFT on a tool-use conversation
trains the very token sequence the policy later samples and is trained on by RL:

- prompt: the messages before the FIRST assistant turn, rendered with the generation
  prompt (and the record's ``tools`` field, if any, as ``tools=`` of the template);
- for each assistant turn: its content ids + eos (loss mask 1), then the non-assistant
  messages up to the next assistant turn as ``observation_ids(tokenizer, messages,
  tools=..., stop_text=<decoded eos>)`` (loss mask 0; the function the rollout renders
  its observations with, in ``data.tokenization``): the template's
  end-of-turn text (minus the eos already there), the observation turns and the next
  assistant header;
- messages after the last assistant turn are dropped (nothing to learn after them).

The response then holds the assistant turns and the observations between them, and
``loss_mask`` is 1 on exactly the assistant tokens and their eos. Assistant ``content``
is the raw text the model writes (tool calls included as text, e.g. ``<tool_call>{...}
</tool_call>``), as in the conversations a rollout records. Records of other formats
(one response) tokenize as in ``"last"`` mode; ``"last"`` is unchanged (the record's
``tools`` field is not rendered there).

``SFTBatch`` convention (right padding): ``loss_mask[b, t] = 1`` when token t is a
response token, i.e. a target. A causal LM predicts token t from position t-1, so a
trainer uses ``logits[:, :-1]`` against ``tokens[:, 1:]`` with ``loss_mask[:, 1:]``.
The first token of every example is a prompt token, so a target never depends on a
previous example (examples must have a non-empty prompt, or ``add_bos=True``; a
``{"text"}`` example's first token is its prompt).

Over-length examples (prompt + response > ``max_len``) follow one policy:
``"truncate"`` (cut the response's end; an example whose prompt alone leaves no room
for a response token is dropped), ``"error"``, or ``"drop"``; ``SFTStats`` counts them.

Packing (``pack=True``) puts several examples in one row (next-fit, in the epoch's
order). ``positions`` restart at 0 for every example and ``segment_ids`` (1, 2, ... per
example in a row, 0 on padding) let attention be block-diagonal:
``allowed[q, k] = segment_ids[q] == segment_ids[k] != 0 and k <= q``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from jaxrl_llm.data.formats import check_formats, detect_format, sft_parts
from jaxrl_llm.data.padding import bucket_length, check_bucket
from jaxrl_llm.data.sampler import BatchLoader
from jaxrl_llm.data.tokenization import (
    check_messages,
    decode_ids,
    encode_text,
    eos_id,
    is_chat,
    observation_ids,  # the rollout's own rendering of observations (rollout.multiturn uses it)
    pad_id,
    render_prompt,
)

OVERLONG_SFT_POLICIES = ("truncate", "error", "drop")
ASSISTANT_TURNS = ("last", "all")


@flax.struct.dataclass
class SFTBatch:
    """A right-padded (possibly packed) batch for supervised fine-tuning.

    Attributes:
      tokens: [B, L] int32 token ids (pad id on padding).
      loss_mask: [B, L] float32, 1.0 where the token is a response token (a target).
      attention_mask: [B, L] int32, 1 on real tokens, 0 on padding.
      positions: [B, L] int32 position of each token within its example (0 on padding).
      segment_ids: [B, L] int32, 1..n numbering the examples of a row, 0 on padding.
    """

    tokens: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray


@dataclasses.dataclass(frozen=True)
class SFTStats:
    """Over-length policy counts: total = kept + dropped; truncated ⊆ kept."""

    total: int
    kept: int
    truncated: int
    dropped: int


@dataclasses.dataclass(frozen=True)
class SFTExample:
    """One tokenized example: record index, prompt ids and response ids (eos included).

    ``response_mask``: the loss mask over ``response_ids`` (1: a target, 0: e.g. an
    observation between assistant turns); None means every response token is a target.
    """

    index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    response_mask: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def split_sft_record(record: Mapping[str, Any], index: int = 0) -> tuple[Any, str]:
    """(prompt, response text) of an SFT record in any supported format (prompt None for
    ``{"text"}``)."""
    return sft_parts(record, index)


def encode_sft_record(record: Mapping[str, Any], tokenizer, index: int = 0, *, add_bos: bool = False,
                      add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one SFT record, before the over-length policy."""
    prompt, response = sft_parts(record, index)
    if prompt is None:  # {"text"}: the first token is the context, the rest are targets
        ids = encode_text(tokenizer, response, add_bos=add_bos, add_eos=add_eos)
        if len(ids) < 2:
            raise ValueError(f"record {index}: 'text' encodes to {len(ids)} token(s); language modelling "
                             "needs at least 2 (the first has nothing to predict it).")
        return ids[:1], ids[1:]
    p = encode_text(tokenizer, render_prompt(tokenizer, prompt), add_bos=add_bos)
    r = encode_text(tokenizer, response, add_eos=add_eos)
    if not p:
        raise ValueError(f"record {index}: prompt encodes to 0 tokens, so the first response token "
                         "has no context; pass add_bos=True or a non-empty prompt.")
    if not r:
        raise ValueError(f"record {index}: response encodes to 0 tokens; nothing to learn.")
    return p, r


def conversation_of(record: Mapping[str, Any], index: int = 0) -> list[dict] | None:
    """The whole conversation of a ``messages`` record (or a conversational prompt +
    completion, read as ``prompt + completion``), or None for the other formats."""
    fmt = detect_format(record, "sft", index)
    if fmt == "messages":
        return check_messages(record["messages"], f"record {index} 'messages'")
    if fmt == "prompt_completion":
        field = "completion" if record.get("completion") is not None else "response"
        prompt, completion = record["prompt"], record[field]
        if is_chat(prompt) and is_chat(completion):
            return check_messages(list(prompt) + list(completion), f"record {index} 'prompt' + {field!r}")
    return None


def encode_sft_episode(record: Mapping[str, Any], tokenizer, index: int = 0, *, add_bos: bool = False,
                       add_eos: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response loss mask) of a conversation tokenized like a
    multi-turn rollout's episode (``assistant_turns="all"``, see the module docstring).

    Raises:
      ValueError: the record is not a conversation, has no assistant turn, or opens with one.
    """
    messages = conversation_of(record, index)
    if messages is None:
        raise ValueError(f"record {index}: assistant_turns='all' needs chat messages "
                         "('messages', or a conversational prompt + completion).")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"record {index} has no assistant turn to learn from.")
    if turns[0] == 0:
        raise ValueError(f"record {index} starts with the assistant turn; no prompt.")
    tools = record.get("tools") or None
    p = encode_text(tokenizer, render_prompt(tokenizer, messages[:turns[0]], tools=tools), add_bos=add_bos)
    if not p:
        raise ValueError(f"record {index}: prompt encodes to 0 tokens, so the first response token "
                         "has no context; pass add_bos=True or a non-empty prompt.")
    stop_text = decode_ids(tokenizer, [eos_id(tokenizer)]) if add_eos else ""
    ids: list[int] = []
    mask: list[int] = []
    for k, start in enumerate(turns):
        own = encode_text(tokenizer, messages[start]["content"], add_eos=add_eos)
        ids += own
        mask += [1] * len(own)
        if k + 1 < len(turns):  # the observation between this assistant turn and the next
            obs = observation_ids(tokenizer, messages[start + 1:turns[k + 1]], tools=tools, stop_text=stop_text)
            ids += obs
            mask += [0] * len(obs)
    if not any(mask):
        raise ValueError(f"record {index}: the assistant turns encode to 0 tokens; nothing to learn.")
    return p, ids, mask


def tokenize_sft(records: Sequence[Mapping[str, Any]], tokenizer, *, max_len: int,
                 overlong: str = "truncate", add_bos: bool = False,
                 add_eos: bool = True, assistant_turns: str = "last") -> tuple[list[SFTExample], SFTStats]:
    """Tokenizes SFT records and applies the over-length policy.

    Args:
      records: SFT records (see module docstring).
      tokenizer: HF tokenizer or CharTokenizer.
      max_len: longest example (prompt + response) in tokens.
      overlong: "truncate" (cut the response end; drop if the prompt alone leaves no
        room for a response token), "error", or "drop".
      add_bos: prepend bos to the prompt (to the text of a ``{"text"}`` record).
      add_eos: append eos to the response (so the model learns to stop).
      assistant_turns: "last" (the loss covers the last assistant turn; earlier turns
        are prompt text) or "all" (conversations tokenized like a multi-turn rollout,
        the loss on every assistant turn; see the module docstring).

    Returns:
      (examples kept, in record order; SFTStats).
    """
    if overlong not in OVERLONG_SFT_POLICIES:
        raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG_SFT_POLICIES}.")
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns={assistant_turns!r}; expected one of {ASSISTANT_TURNS}.")
    if max_len < 2:
        raise ValueError(f"max_len={max_len}; expected at least 2 (a prompt and a response token).")
    check_formats(records, "sft")  # every record's shape, before any tokenizing
    if add_eos:
        eos_id(tokenizer)  # fail early with a clear message
    out, truncated, dropped = [], 0, 0
    for i, rec in enumerate(records):
        m = None
        if assistant_turns == "all" and conversation_of(rec, i) is not None:
            p, r, m = encode_sft_episode(rec, tokenizer, i, add_bos=add_bos, add_eos=add_eos)
        else:
            p, r = encode_sft_record(rec, tokenizer, i, add_bos=add_bos, add_eos=add_eos)
        if len(p) + len(r) > max_len:
            if overlong == "error":
                raise ValueError(
                    f"record {i}: prompt ({len(p)}) + response ({len(r)}) = {len(p) + len(r)} "
                    f"tokens > max_len={max_len}; set overlong='truncate' or 'drop'.")
            if overlong == "drop" or len(p) >= max_len:
                dropped += 1
                continue
            r, truncated = r[:max_len - len(p)], truncated + 1
            m = None if m is None else m[:len(r)]
        out.append(SFTExample(i, tuple(p), tuple(r), None if m is None else tuple(m)))
    if not out:
        raise ValueError(f"every SFT example was dropped as longer than max_len={max_len}.")
    return out, SFTStats(total=len(records), kept=len(out), truncated=truncated, dropped=dropped)


def pack_examples(order: Sequence[int], lengths: Sequence[int], row_len: int) -> list[tuple[int, ...]]:
    """Next-fit packing: examples in ``order`` fill a row until the next does not fit.

    Args:
      order: example indices in the order to pack.
      lengths: length of every example (each <= row_len).
      row_len: tokens per row.

    Returns:
      list of rows, each a tuple of example indices (order preserved).
    """
    rows, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens > row_len={row_len}.")
        if current and used + n > row_len:
            rows.append(tuple(current))
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(tuple(current))
    return rows


def _row_length(row) -> int:
    """Tokens in a row: one example, or the packed examples of a list."""
    return len(row) if isinstance(row, SFTExample) else sum(len(e) for e in row)


def collate_sft(rows: Sequence[SFTExample | Sequence[SFTExample]], *, pad_token_id: int,
                bucket=16, max_len: int | None = None, longest: int | None = None) -> SFTBatch:
    """Builds an ``SFTBatch``; each row is one example or a list of examples (packed).

    Returns:
      SFTBatch with arrays [B, L], L = bucket of ``longest`` (default: the longest row)
      capped at max_len.
    """
    rows = [[r] if isinstance(r, SFTExample) else list(r) for r in rows]
    longest = max(_row_length(row) for row in rows) if longest is None else longest
    length = bucket_length(longest, bucket, max_len)
    shape = (len(rows), length)
    tokens = np.full(shape, pad_token_id, np.int32)
    loss_mask = np.zeros(shape, np.float32)
    positions = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    for b, row in enumerate(rows):
        start = 0
        for seg, ex in enumerate(row, start=1):
            n, np_ = len(ex), len(ex.prompt_ids)
            if start + n > length:
                raise ValueError(f"row {b} holds {start + n} tokens > length {length}.")
            sl = slice(start, start + n)
            tokens[b, sl] = ex.prompt_ids + ex.response_ids
            loss_mask[b, start + np_:start + n] = 1.0 if ex.response_mask is None else ex.response_mask
            positions[b, sl] = np.arange(n)
            segment_ids[b, sl] = seg
            start += n
    return SFTBatch(tokens=tokens, loss_mask=loss_mask,
                    attention_mask=(segment_ids > 0).astype(np.int32),
                    positions=positions, segment_ids=segment_ids)


class SFTLoader(BatchLoader):
    """Deterministic, resumable iterator of ``SFTBatch``es (optionally packed).

    Args:
      records: SFT records.
      tokenizer: HF tokenizer or CharTokenizer.
      batch_size: B rows per batch.
      max_len: tokens per example (and per packed row).
      seed, shuffle, drop_last, num_epochs: see ``EpochSampler``.
      overlong: "truncate" | "error" | "drop".
      pack: several examples per row (next-fit in the epoch order; with packing the
        number of rows, hence batches, can differ between epochs).
      bucket: L rounding (int multiple, "pow2", "max" = always max_len, None).
      add_bos, add_eos: special tokens around prompt / response.
      assistant_turns: "last" or "all" (every assistant turn of a conversation, tokenized
        like a multi-turn rollout; see the module docstring).

    Attributes:
      stats: SFTStats of the over-length policy.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer, batch_size: int, *,
                 max_len: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 overlong: str = "truncate", pack: bool = False, bucket=16,
                 add_bos: bool = False, add_eos: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, assistant_turns: str = "last"):
        check_bucket(bucket)
        pad = pad_id(tokenizer)
        examples, self.stats = tokenize_sft(records, tokenizer, max_len=max_len, overlong=overlong,
                                            add_bos=add_bos, add_eos=add_eos, assistant_turns=assistant_turns)
        lengths = [len(e) for e in examples]
        group_fn = (lambda order: pack_examples(order, lengths, max_len)) if pack else None

        def collate(batch, longest):
            return collate_sft(batch, pad_token_id=pad, bucket=bucket, max_len=max_len, longest=longest)

        super().__init__(examples, collate, batch_size, row_length=_row_length, seed=seed, shuffle=shuffle,
                         drop_last=drop_last, num_epochs=num_epochs,
                         process_index=process_index, process_count=process_count, group_fn=group_fn)
