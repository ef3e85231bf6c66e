"""CharTokenizer: a byte-level tokenizer for tiny models trained from scratch offline.

Ids 0..255 are the UTF-8 bytes; then pad (256), bos (257), eos (258); vocab_size 259
(= `tiny_config`'s vocab). Follows the parts of the Hugging Face tokenizer interface
the trainers use: `encode`, `decode`, `batch_decode`, `__call__` (batch encode with
padding, returns numpy `input_ids` / `attention_mask`), `apply_chat_template` (a plain
"<|role|>\\ncontent\\n" format), `pad_token_id`, `bos_token_id`, `eos_token_id`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PADDING_SIDES = ("right", "left")


class CharTokenizer:
    """Byte-level tokenizer with pad/bos/eos special ids."""

    num_bytes = 256

    def __init__(self, *, padding_side: str = "right"):
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side={padding_side!r}; expected one of {PADDING_SIDES}.")
        self.padding_side = padding_side
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.vocab_size = 259
        self.pad_token, self.bos_token, self.eos_token = "<pad>", "<bos>", "<eos>"
        self._special = {
            self.pad_token_id: self.pad_token,
            self.bos_token_id: self.bos_token,
            self.eos_token_id: self.eos_token,
        }

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special)

    def encode(
        self,
        text: str,
        *,
        add_bos: bool = False,
        add_eos: bool = False,
        add_special_tokens: bool | None = None,
    ) -> list[int]:
        """UTF-8 bytes of `text` (optionally with bos/eos; `add_special_tokens` sets both)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text)}.")
        if add_special_tokens is not None:
            add_bos = add_eos = add_special_tokens
        ids = list(text.encode("utf-8"))
        return (
            ([self.bos_token_id] if add_bos else [])
            + ids
            + ([self.eos_token_id] if add_eos else [])
        )

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special ids are dropped (or written as <pad>/<bos>/<eos>)."""
        out, pending = [], bytearray()
        for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            if 0 <= i < self.num_bytes:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if i not in self._special:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
            if not skip_special_tokens:
                out.append(self._special[i])
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(
        self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def __call__(
        self,
        texts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding_side: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        truncation: bool = False,
    ) -> dict[str, np.ndarray]:
        """Batch encode with padding to the longest (or `max_length`).

        Returns:
          {"input_ids": [B, L] int32, "attention_mask": [B, L] int32}.
        """
        if isinstance(texts, str):
            texts = [texts]
        side = padding_side or self.padding_side
        if side not in PADDING_SIDES:
            raise ValueError(f"padding_side={side!r}; expected one of {PADDING_SIDES}.")
        rows = [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]
        length = max([len(r) for r in rows] + [1]) if max_length is None else max_length
        if truncation:
            rows = [r[:length] for r in rows]
        too_long = [len(r) for r in rows if len(r) > length]
        if too_long:
            raise ValueError(
                f"a text encodes to {max(too_long)} tokens > max_length={length}; pass "
                "truncation=True or a larger max_length."
            )
        ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for b, r in enumerate(rows):
            if side == "right":
                ids[b, : len(r)], mask[b, : len(r)] = r, 1
            elif r:
                ids[b, -len(r) :], mask[b, -len(r) :] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ):
        """Formats [{"role", "content"}, ...] as "<|role|>\\ncontent\\n" turns (+
        "<|assistant|>\\n" when add_generation_prompt); token ids if tokenize."""
        parts = []
        for m in messages:
            if "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}.")
            parts.append(f"<|{m['role']}|>\n{m['content']}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text
