"""Prompt datasets for RL (PPO, GRPO family, RFT): tokenized, bucketed prompt batches.

Records are ``{"prompt": str | messages, "answer": ..., <extra columns>}``, or
``{"messages": [...], ...}`` whose prompt is the conversation minus a trailing assistant
turn (see ``data.formats``). Prompts are rendered (chat messages go through the chat template with the generation prompt),
tokenized once, and checked against ``max_prompt_len`` with one policy:

- ``"error"``: raise, naming the record index and both lengths;
- ``"truncate_left"``: keep the last ``max_prompt_len`` tokens (the end of a prompt, where
  the question and the generation prompt sit, matters most);
- ``"drop"``: leave the record out and count it (``PromptStats.dropped``).

``PromptLoader`` yields ``PromptBatch``es in a deterministic, resumable order. Each
batch holds ``tokens [B, P] int32`` and ``mask [B, P] int32`` (left- or right-padded;
P rounded up to a bucket so shapes repeat), the raw prompts (messages stay messages) and
every extra column as lists, which is how reward functions receive them (TRL convention:
``reward_fn(prompts, completions, **columns)``). The field a prompt came from ("prompt",
or "messages" when it was the prompt) is not a column.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from jaxrl_llm.data.formats import prompt_of
from jaxrl_llm.data.padding import bucket_length, check_bucket, check_side, pad_rows
from jaxrl_llm.data.records import validate_records
from jaxrl_llm.data.sampler import BatchLoader
from jaxrl_llm.data.tokenization import encode_text, pad_id, render_prompt

OVERLONG_PROMPT_POLICIES = ("error", "truncate_left", "drop")


@flax.struct.dataclass
class PromptBatch:
    """A batch of prompts for generation.

    Attributes:
      tokens: [B, P] int32 prompt ids, padded with the pad id.
      mask: [B, P] int32, 1 on prompt tokens, 0 on padding.
      indices: [B] int32 record index of each row in the loader's record list.
      prompts: B raw prompts (str or chat messages; a ``messages`` record's prompt).
      texts: B rendered prompt strings (after the chat template).
      columns: {name: list of B values} for every other record field (e.g. "answer");
        a record without the field gives None. Never "prompt", nor "messages" where
        it was the prompt.
      padding_side: "left" (prompts end at column P-1) or "right" (start at column 0).
    """

    tokens: np.ndarray
    mask: np.ndarray
    indices: np.ndarray
    prompts: list = flax.struct.field(pytree_node=False)
    texts: list = flax.struct.field(pytree_node=False)
    columns: dict = flax.struct.field(pytree_node=False)
    padding_side: str = flax.struct.field(pytree_node=False, default="left")

    @property
    def lengths(self) -> np.ndarray:
        """[B] int32 number of prompt tokens per row."""
        return np.asarray(self.mask).sum(axis=1).astype(np.int32)

    def __len__(self) -> int:
        return int(np.shape(self.tokens)[0])


@dataclasses.dataclass(frozen=True)
class PromptStats:
    """What happened to over-long prompts: total = kept + dropped; truncated ⊆ kept."""

    total: int
    kept: int
    truncated: int
    dropped: int


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    """One prompt ready for batching: record index, ids, rendered text, the record, its raw
    prompt and its other fields (the columns)."""

    index: int
    ids: tuple[int, ...]
    text: str
    record: Mapping[str, Any]
    prompt: Any
    columns: Mapping[str, Any]


def tokenize_prompts(records: Sequence[Mapping[str, Any]], tokenizer, *,
                     max_prompt_len: int | None = None, overlong: str = "error",
                     add_bos: bool = False, prompt_field: str = "prompt",
                     ) -> tuple[list[TokenizedPrompt], PromptStats]:
    """Renders and tokenizes every record's prompt, applying the over-length policy.

    Args:
      records: dicts with ``prompt_field`` or ``messages`` (see ``formats.prompt_of``).
      tokenizer: HF tokenizer or CharTokenizer.
      max_prompt_len: longest prompt allowed in tokens (None: no limit).
      overlong: "error" | "truncate_left" | "drop".
      add_bos: prepend the bos id (for tokenizers/templates that do not add it).
      prompt_field: the field holding the prompt.

    Returns:
      (prompts kept, in record order; PromptStats).
    """
    if overlong not in OVERLONG_PROMPT_POLICIES:
        raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG_PROMPT_POLICIES}.")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len={max_prompt_len}; expected a positive int or None.")
    validate_records(records)
    prompts = [prompt_of(rec, i, prompt_field) for i, rec in enumerate(records)]  # shapes first
    out, truncated, dropped = [], 0, 0
    for i, (rec, (prompt, source)) in enumerate(zip(records, prompts)):
        text = render_prompt(tokenizer, prompt)
        ids = encode_text(tokenizer, text, add_bos=add_bos)
        if not ids:
            raise ValueError(f"record {i}: prompt encodes to 0 tokens; generation needs a non-empty prompt.")
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            if overlong == "error":
                raise ValueError(
                    f"record {i}: prompt has {len(ids)} tokens > max_prompt_len={max_prompt_len}; "
                    "raise max_prompt_len or set overlong='truncate_left' or 'drop'.")
            if overlong == "drop":
                dropped += 1
                continue
            ids, truncated = ids[-max_prompt_len:], truncated + 1
        # "prompt" is never a column: reward_fn(prompts, ..., prompt=...) would clash
        columns = {k: v for k, v in rec.items() if k not in (source, "prompt")}
        out.append(TokenizedPrompt(i, tuple(ids), text, rec, prompt, columns))
    stats = PromptStats(total=len(records), kept=len(out), truncated=truncated, dropped=dropped)
    if not out:
        raise ValueError(f"every prompt was dropped as longer than max_prompt_len={max_prompt_len}.")
    return out, stats


def collate_prompts(items: Sequence[TokenizedPrompt], *, pad_token_id: int,
                    padding_side: str = "left", bucket=16, max_prompt_len: int | None = None,
                    column_names: Sequence[str] = (), longest: int | None = None) -> PromptBatch:
    """Pads tokenized prompts into a ``PromptBatch``.

    P = the bucket of ``longest`` (default: the longest prompt in ``items``; loaders
    pass the global batch's longest so all processes agree).
    """
    check_side(padding_side)
    longest = max(len(it.ids) for it in items) if longest is None else longest
    length = bucket_length(longest, bucket, max_prompt_len)
    tokens, mask = pad_rows([it.ids for it in items], length, pad_token_id, padding_side)
    return PromptBatch(
        tokens=tokens, mask=mask,
        indices=np.asarray([it.index for it in items], np.int32),
        prompts=[it.prompt for it in items],
        texts=[it.text for it in items],
        columns={c: [it.columns.get(c) for it in items] for c in column_names},
        padding_side=padding_side)


class PromptLoader(BatchLoader):
    """Deterministic, resumable iterator of ``PromptBatch``es.

    The order depends only on (seed, epoch); ``state_dict()`` holds (epoch, position) and
    a new loader given it with ``load_state_dict`` yields exactly the same next batches.
    Iterates forever unless ``num_epochs`` is set.

    Args:
      records: list of dicts with "prompt" or "messages" (see ``load_records``).
      tokenizer: HF tokenizer or CharTokenizer.
      batch_size: B prompts per batch.
      seed: shuffle seed.
      shuffle: shuffle each epoch.
      drop_last: drop an epoch's incomplete last batch.
      max_prompt_len: token limit (None: none).
      overlong: "error" | "truncate_left" | "drop" for prompts over the limit.
      padding_side: "left" (default; prompts end at the last column) or "right".
      bucket: P rounding: int multiple, "pow2", "max" (always max_prompt_len) or None.
      add_bos: prepend the bos id to every prompt.
      num_epochs: stop after this many epochs (None: forever).

    Attributes:
      stats: PromptStats of the over-length policy.
      column_names: the extra fields passed through (union over kept records, sorted).
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer, batch_size: int, *,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 max_prompt_len: int | None = None, overlong: str = "error",
                 padding_side: str = "left", bucket=16, add_bos: bool = False,
                 num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        check_side(padding_side)
        check_bucket(bucket)
        if bucket == "max" and max_prompt_len is None:
            raise ValueError('bucket="max" needs max_prompt_len.')
        pad = pad_id(tokenizer)
        items, self.stats = tokenize_prompts(records, tokenizer, max_prompt_len=max_prompt_len,
                                             overlong=overlong, add_bos=add_bos)
        self.column_names = sorted({k for it in items for k in it.columns})
        self.padding_side = padding_side

        def collate(batch, longest):
            return collate_prompts(batch, pad_token_id=pad, padding_side=padding_side, bucket=bucket,
                                   max_prompt_len=max_prompt_len, column_names=self.column_names,
                                   longest=longest)

        super().__init__(items, collate, batch_size, row_length=lambda it: len(it.ids), seed=seed, shuffle=shuffle,
                         drop_last=drop_last, num_epochs=num_epochs,
                         process_index=process_index, process_count=process_count)
