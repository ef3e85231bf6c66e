"""CharTokenizer: a byte-level tokenizer for tiny models trained from scratch offline.

Ids 0..255 are the UTF-8 bytes; then pad (256), bos (257), eos (258); vocab_size 259
(= `tiny_config`'s vocab). Follows the parts of the Hugging Face tokenizer interface
the trainers use: `encode`, `decode`, `batch_decode`, `__call__` (batch encode with
padding, returns numpy `input_ids` / `attention_mask`), `apply_chat_template` (a plain
"<|role|>\\ncontent\\n" format), `pad_token_id`, `bos_token_id`, `eos_token_id`.

`to_hf()` / `save_pretrained(path)` give the same tokenizer as a Hugging Face one
(tokenizer.json + tokenizer_config.json + chat template): `AutoTokenizer.from_pretrained`
of the folder encodes and decodes the same ids. Differences: HF's
`add_special_tokens=True` (its default) adds nothing, as CharTokenizer's default does
(CharTokenizer's explicit `add_special_tokens=True` adds bos and eos); HF's `decode`
returns text for any id, CharTokenizer's raises on ids outside the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PADDING_SIDES = ("right", "left")

# The chat format of `CharTokenizer.apply_chat_template` as a Jinja chat template (HF).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of the `tokenizers`
    ByteLevel pre-tokenizer and decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


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
        tools: Sequence[dict] | None = None,
    ):
        """Formats [{"role", "content"}, ...] as "<|role|>\\ncontent\\n" turns (+
        "<|assistant|>\\n" when add_generation_prompt); token ids if tokenize. ``tools``
        (JSON-schema function descriptions) open the text as one line of tool names,
        "<|tools|>\\nname1, name2\\n": short, for character-level toy models."""
        parts = []
        if tools:
            names = [t.get("function", t).get("name", "?") for t in tools]
            parts.append("<|tools|>\n" + ", ".join(names) + "\n")
        for m in messages:
            if "role" not in m or "content" not in m:
                raise ValueError(f"each message needs 'role' and 'content', got {m!r}.")
            parts.append(f"<|{m['role']}|>\n{m['content']}\n")
        if add_generation_prompt:
            parts.append("<|assistant|>\n")
        text = "".join(parts)
        return self.encode(text) if tokenize else text

    def to_hf(self):
        """The same tokenizer as a `transformers.PreTrainedTokenizerFast`: byte-level with
        no merges (byte b → id b), pad/bos/eos added as special tokens with ids 256-258,
        the chat template of `apply_chat_template`. `split_special_tokens=True`: text
        such as "<eos>" encodes as its bytes, as here (special ids come only from
        add_bos / add_eos or the ids themselves)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        byte_chars = _bytes_to_unicode()
        backend = Tokenizer(models.BPE(vocab={byte_chars[b]: b for b in range(self.num_bytes)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(
            [AddedToken(self._special[i], special=True, normalized=False) for i in sorted(self._special)]
        )
        # pad / bos / eos roles for the ids this tokenizer has (a subclass may drop pad).
        roles = {
            role: self._special[token_id]
            for role, token_id in (("pad", self.pad_token_id), ("bos", self.bos_token_id), ("eos", self.eos_token_id))
            if token_id is not None
        }
        hf = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            **{f"{role}_token": token for role, token in roles.items()},
            padding_side=self.padding_side,
            split_special_tokens=True,
            clean_up_tokenization_spaces=False,  # decode must give the bytes back unchanged
        )
        hf.chat_template = CHAT_TEMPLATE
        for role in ("pad", "bos", "eos"):
            if getattr(hf, f"{role}_token_id") != getattr(self, f"{role}_token_id"):
                raise AssertionError(f"internal: the HF {role} id differs from CharTokenizer's")
        if len(hf) != self.vocab_size:
            raise AssertionError(f"internal: HF vocabulary size {len(hf)} != {self.vocab_size}")
        return hf

    def save_pretrained(self, path) -> list[str]:
        """Writes the Hugging Face form (`to_hf`) to `path`: tokenizer.json,
        tokenizer_config.json and the chat template, loadable with
        `AutoTokenizer.from_pretrained(path)`. Returns the written files."""
        import json
        import os

        files = list(self.to_hf().save_pretrained(str(path)))
        config_path = os.path.join(str(path), "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        # The class every transformers version has (4.x has no TokenizersBackend).
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)
        return files
