"""Preference data: pairwise and k-wise records, judge scores → pairs, and batches.

Record formats (prompt and responses are strings or chat messages; a response given as
messages must end with an assistant turn; see ``data.formats``):

- pairwise: ``{"prompt", "chosen", "rejected", "label"?}``; ``label`` is the probability
  that ``chosen`` is preferred (1.0 by default, 0.5 for a tie kept as such);
- pairwise with an implicit prompt (TRL): ``{"chosen", "rejected", "label"?}`` whose
  chosen/rejected hold prompt + response; the prompt is their shared beginning
  (``formats.extract_prompt``: the messages before the final assistant turn, or the
  common text prefix cut before its last whitespace);
- k-wise: ``{"prompt", "responses": [K], "ranking": [K]}`` where ``ranking[i]`` is the
  rank of ``responses[i]`` (lower is better, equal ranks are ties), or
  ``{"prompt", "responses": [K], "scores": [K]}`` (higher is better).

- unpaired (KTO, TRL's format): ``{"prompt", "completion", "label": bool}``, ``label``
  True for a desirable completion; loaded by ``UnpairedLoader`` into ``UnpairedBatch``.

``expand_kwise_to_pairs`` turns a k-wise record into all pairs (better one as chosen;
K responses without ties give K(K-1)/2 pairs). ``preferences_from_scores`` builds records
from a judge's scores. ``cohens_kappa`` measures agreement between two judges.

Batches are right-padded. ``PreferenceBatch`` holds chosen and rejected rows padded to a
common length ``[B, L]`` (so they can run as one ``[2B, L]`` forward) and response masks
(prompt and padding masked, eos included). ``KwiseBatch`` holds ``[B, K, L]`` with the K
responses ordered best → worst, as ``plackett_luce_loss`` expects. Masks follow the
``SFTBatch`` convention: ``mask[b, t] = 1`` when token t is a response token.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from jaxrl_llm.data.formats import check_formats, preference_record
from jaxrl_llm.data.padding import bucket_length, check_bucket, pad_rows
from jaxrl_llm.data.sampler import BatchLoader
from jaxrl_llm.data.tokenization import (
    encode_text,
    eos_id,
    pad_id,
    render_prompt,
    response_text,
)

TIE_POLICIES = ("drop", "half")
SCORE_MODES = ("pairwise", "best_worst", "kwise")
OVERLONG_PREFERENCE_POLICIES = ("truncate", "error", "drop")
PREFERENCE_KINDS = ("pairwise", "kwise")
_KWISE_FIELDS = ("responses", "ranking", "scores")


def _check_option(value, valid, name):
    if value not in valid:
        raise ValueError(f"{name}={value!r}; expected one of {valid}.")


# --------------------------------------------------------------------------- records


def is_kwise(record: Mapping[str, Any]) -> bool:
    """True for a k-wise record (has "responses")."""
    return record.get("responses") is not None


def kwise_scores(record: Mapping[str, Any], index: int = 0) -> np.ndarray:
    """[K] float64 scores of a k-wise record, higher = better (``-ranking`` for ranks)."""
    responses = record.get("responses")
    if not isinstance(responses, Sequence) or isinstance(responses, str) or len(responses) < 2:
        raise ValueError(f"record {index}: 'responses' must be a list of at least 2 responses, "
                         f"got {responses!r:.80}.")
    if record.get("scores") is not None:
        values, sign, field = record["scores"], 1.0, "scores"
    elif record.get("ranking") is not None:
        values, sign, field = record["ranking"], -1.0, "ranking"
    else:
        raise ValueError(f"record {index}: a k-wise record needs 'ranking' or 'scores'; "
                         f"fields present: {sorted(record)}.")
    if len(values) != len(responses):
        raise ValueError(f"record {index}: {field!r} has {len(values)} entries but 'responses' "
                         f"has {len(responses)}.")
    scores = sign * np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"record {index}: {field!r} must be finite numbers, got {values!r}.")
    return scores


def expand_kwise_to_pairs(record: Mapping[str, Any], *, ties: str = "drop",
                          tie_eps: float = 0.0, index: int = 0) -> list[dict[str, Any]]:
    """All pairs of a k-wise record as pairwise records.

    For every unordered pair {i, j} (i < j) the better response is ``chosen``. A pair with
    |s_i − s_j| <= tie_eps is a tie: dropped (``ties="drop"``) or kept with
    ``label=0.5`` and responses in their original order (``ties="half"``).
    K responses without ties give K(K−1)/2 pairs. Other fields are copied.

    Returns:
      list of {"prompt", "chosen", "rejected", "label", "chosen_score",
      "rejected_score", <other fields>}.
    """
    _check_option(ties, TIE_POLICIES, "ties")
    scores = kwise_scores(record, index)
    responses = record["responses"]
    extra = {k: v for k, v in record.items() if k not in _KWISE_FIELDS}
    pairs = []
    for i, j in itertools.combinations(range(len(responses)), 2):
        tie = abs(scores[i] - scores[j]) <= tie_eps
        if tie and ties == "drop":
            continue
        c, r = (i, j) if tie or scores[i] > scores[j] else (j, i)
        pairs.append({**extra, "chosen": responses[c], "rejected": responses[r],
                      "label": 0.5 if tie else 1.0,
                      "chosen_score": float(scores[c]), "rejected_score": float(scores[r])})
    return pairs


def preferences_from_scores(prompts: Sequence[Any], responses_per_prompt: Sequence[Sequence[Any]],
                            scores: Sequence[Sequence[float | None]], *, mode: str = "pairwise",
                            tie_eps: float = 0.0, ties: str = "drop") -> list[dict[str, Any]]:
    """Preference records from a judge's (or reward model's) scores.

    Responses scored ``None`` (the judge could not score) are left out first.

    Args:
      prompts: N prompts.
      responses_per_prompt: N lists of responses.
      scores: N lists of scores (higher = better), aligned with the responses.
      mode: "pairwise" (all pairs, see ``expand_kwise_to_pairs``), "best_worst" (one
        pair per prompt: highest vs lowest score), or "kwise" (one record per prompt
        with responses and scores sorted best → worst).
      tie_eps: scores closer than this are a tie.
      ties: "drop" or "half" (keep tied pairs with label 0.5); in "best_worst" a tie
        means all responses are equally good; in "kwise" a prompt whose scores are all
        tied is dropped (it carries no ranking).

    Returns:
      list of pairwise records ({"prompt", "chosen", "rejected", "label", ...}) or, for
      "kwise", {"prompt", "responses", "scores"}.
    """
    _check_option(mode, SCORE_MODES, "mode")
    _check_option(ties, TIE_POLICIES, "ties")
    if not len(prompts) == len(responses_per_prompt) == len(scores):
        raise ValueError(f"prompts ({len(prompts)}), responses_per_prompt "
                         f"({len(responses_per_prompt)}) and scores ({len(scores)}) must have equal length.")
    out = []
    for n, (prompt, resp, sc) in enumerate(zip(prompts, responses_per_prompt, scores)):
        if len(resp) != len(sc):
            raise ValueError(f"prompt {n}: {len(resp)} responses but {len(sc)} scores.")
        kept = [(r, float(s)) for r, s in zip(resp, sc) if s is not None]
        if len(kept) < 2:
            continue
        rs, ss = [r for r, _ in kept], np.asarray([s for _, s in kept])
        if mode == "pairwise":
            out += expand_kwise_to_pairs({"prompt": prompt, "responses": rs, "scores": ss.tolist()},
                                         ties=ties, tie_eps=tie_eps, index=n)
            continue
        order = np.argsort(-ss, kind="stable")
        tied = ss[order[0]] - ss[order[-1]] <= tie_eps
        if mode == "kwise":
            if not tied:
                out.append({"prompt": prompt, "responses": [rs[i] for i in order],
                            "scores": ss[order].tolist()})
        elif not tied or ties == "half":
            best, worst = int(order[0]), int(order[-1])
            out.append({"prompt": prompt, "chosen": rs[best], "rejected": rs[worst],
                        "label": 0.5 if tied else 1.0,
                        "chosen_score": float(ss[best]), "rejected_score": float(ss[worst])})
    return out


def cohens_kappa(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Cohen's κ between two raters' labels of the same items.

      κ = (p_o − p_e) / (1 − p_e),  p_o = observed agreement,
      p_e = Σ_c p_a(c)·p_b(c) (agreement expected by chance from each rater's marginals).

    When both raters give one and the same label to every item (p_e = 1), κ is 0/0;
    this returns 1.0 (perfect agreement) there instead of NaN.

    References:
      Cohen (1960), "A coefficient of agreement for nominal scales".

    Args:
      labels_a, labels_b: N hashable labels each (e.g. 0/1 "first response preferred").

    Returns:
      κ as a float in [−1, 1].
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b):
        raise ValueError(f"labels_a has {len(a)} labels but labels_b has {len(b)}.")
    if not a:
        raise ValueError("labels_a and labels_b are empty.")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    cats = set(a) | set(b)
    p_e = sum((a.count(c) / n) * (b.count(c) / n) for c in cats)
    if p_e >= 1.0:
        return 1.0
    return float((p_o - p_e) / (1.0 - p_e))


# --------------------------------------------------------------------------- tokenize


@dataclasses.dataclass(frozen=True)
class PreferenceStats:
    """Over-length policy counts: total = kept + dropped; truncated ⊆ kept."""

    total: int
    kept: int
    truncated: int
    dropped: int


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """A tokenized prompt with K >= 2 responses ordered best → worst (pairs: K = 2)."""

    index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[tuple[int, ...], ...]
    label: float = 1.0
    scores: tuple[float, ...] = ()


def _responses_in_order(record: Mapping[str, Any], index: int) -> tuple[list, float, tuple]:
    """(responses best → worst, label, scores) of a pairwise or k-wise record."""
    if is_kwise(record):
        scores = kwise_scores(record, index)
        order = np.argsort(-scores, kind="stable")
        return [record["responses"][i] for i in order], 1.0, tuple(float(s) for s in scores[order])
    for field in ("chosen", "rejected"):
        if record.get(field) is None:
            raise ValueError(f"record {index} is missing field {field!r} (or use 'responses' with "
                             f"'ranking'/'scores'); fields present: {sorted(record)}.")
    return [record["chosen"], record["rejected"]], preference_label(record, index), ()


def preference_label(record: Mapping[str, Any], index: int) -> float:
    """The ``label`` of pairwise record ``index`` as a float in [0, 1] (1.0 when absent):
    the probability that ``chosen`` is preferred (0.5: a tie).

    Raises:
      ValueError: a label that is not a number in [0, 1] (a string such as "yes", a
        bool, NaN), naming the record index and the value.
    """
    value = record.get("label")
    if value is None:
        return 1.0
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(  # noqa: TRY004 - bad data, shown as a user error
            f"record {index}: label={value!r} ({type(value).__name__}) is not a number; expected "
            "a number in [0, 1], the probability that 'chosen' is preferred (1.0, or 0.5 for a tie)."
        )
    label = float(value)
    if not 0.0 <= label <= 1.0:
        raise ValueError(f"record {index}: label={label} must be in [0, 1].")
    return label


def tokenize_preferences(records: Sequence[Mapping[str, Any]], tokenizer, *, max_len: int,
                         overlong: str = "truncate", add_bos: bool = False,
                         add_eos: bool = True) -> tuple[list[PreferenceExample], PreferenceStats]:
    """Tokenizes pairwise or k-wise records (responses ordered best → worst).

    Args:
      records: pairwise (explicit or implicit prompt) or k-wise records (not mixed within
        a batch).
      tokenizer: HF tokenizer or CharTokenizer.
      max_len: longest prompt + response in tokens.
      overlong: "truncate" (cut every too-long response's end; drop a record whose
        prompt leaves no room for a response token), "error", or "drop" (the record).
      add_bos: prepend bos to the prompt; add_eos: append eos to each response.

    Returns:
      (examples kept, in record order; PreferenceStats).
    """
    _check_option(overlong, OVERLONG_PREFERENCE_POLICIES, "overlong")
    check_formats(records, "preference")
    if add_eos:
        eos_id(tokenizer)
    out, truncated, dropped = [], 0, 0
    for i, rec in enumerate(records):
        rec = preference_record(rec, i)  # an implicit prompt made explicit
        responses, label, scores = _responses_in_order(rec, i)
        p = encode_text(tokenizer, render_prompt(tokenizer, rec["prompt"]), add_bos=add_bos)
        if not p:
            raise ValueError(f"record {i}: prompt encodes to 0 tokens; pass add_bos=True or a non-empty prompt.")
        rs = [encode_text(tokenizer, response_text(r, f"record {i} response"), add_eos=add_eos)
              for r in responses]
        longest = max(len(r) for r in rs)
        if len(p) + longest > max_len:
            if overlong == "error":
                raise ValueError(f"record {i}: prompt ({len(p)}) + longest response ({longest}) = "
                                 f"{len(p) + longest} tokens > max_len={max_len}; set "
                                 "overlong='truncate' or 'drop'.")
            if overlong == "drop" or len(p) >= max_len:
                dropped += 1
                continue
            rs, truncated = [r[:max_len - len(p)] for r in rs], truncated + 1
        out.append(PreferenceExample(i, tuple(p), tuple(tuple(r) for r in rs), label, scores))
    if not out:
        raise ValueError(f"every preference record was dropped as longer than max_len={max_len}.")
    return out, PreferenceStats(len(records), len(out), truncated, dropped)


# --------------------------------------------------------------------------- batches


@flax.struct.dataclass
class PreferenceBatch:
    """Right-padded chosen/rejected pairs sharing one length L.

    Attributes:
      chosen_tokens: [B, L] int32 prompt + chosen response ids.
      chosen_mask: [B, L] float32, 1.0 on chosen-response tokens (eos included).
      chosen_attention_mask: [B, L] int32, 1 on real tokens.
      rejected_tokens, rejected_mask, rejected_attention_mask: the same for rejected.
      labels: [B] float32 probability that chosen is preferred (1.0, or 0.5 for ties).
    """

    chosen_tokens: np.ndarray
    chosen_mask: np.ndarray
    chosen_attention_mask: np.ndarray
    rejected_tokens: np.ndarray
    rejected_mask: np.ndarray
    rejected_attention_mask: np.ndarray
    labels: np.ndarray

    def concatenated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, mask, attention_mask) [2B, L]: chosen rows then rejected rows."""
        return (np.concatenate([self.chosen_tokens, self.rejected_tokens]),
                np.concatenate([self.chosen_mask, self.rejected_mask]),
                np.concatenate([self.chosen_attention_mask, self.rejected_attention_mask]))


@flax.struct.dataclass
class KwiseBatch:
    """Right-padded K responses per prompt, ordered best → worst (Plackett–Luce).

    Attributes:
      tokens: [B, K, L] int32 prompt + response ids.
      mask: [B, K, L] float32, 1.0 on response tokens.
      attention_mask: [B, K, L] int32, 1 on real tokens.
      scores: [B, K] float32 scores in the same order (higher = better; −rank for
        ranked records).
    """

    tokens: np.ndarray
    mask: np.ndarray
    attention_mask: np.ndarray
    scores: np.ndarray


def _rows(examples: Sequence[PreferenceExample], k: int):
    """Flattened rows (prompt + response k) and prompt lengths."""
    return ([ex.prompt_ids + ex.response_ids[k] for ex in examples],
            [len(ex.prompt_ids) for ex in examples])


def _response_mask(attention: np.ndarray, prompt_lens: Sequence[int]) -> np.ndarray:
    mask = attention.astype(np.float32)
    for b, n in enumerate(prompt_lens):
        mask[b, :n] = 0.0
    return mask


def _example_length(ex: PreferenceExample) -> int:
    """Longest prompt + response row of an example."""
    return len(ex.prompt_ids) + max(len(r) for r in ex.response_ids)


def _padded_len(examples, bucket, max_len, longest):
    longest = max(_example_length(ex) for ex in examples) if longest is None else longest
    return bucket_length(longest, bucket, max_len)


def collate_pairs(examples: Sequence[PreferenceExample], *, pad_token_id: int, bucket=16,
                  max_len: int | None = None, longest: int | None = None) -> PreferenceBatch:
    """Builds a ``PreferenceBatch`` from 2-response examples (chosen first).

    L = bucket of ``longest`` (default: the longest row of ``examples``), capped at max_len.
    """
    if any(len(ex.response_ids) != 2 for ex in examples):
        raise ValueError("collate_pairs needs examples with exactly 2 responses (chosen, rejected); "
                         "expand k-wise records with expand_kwise_to_pairs first.")
    chosen, plens = _rows(examples, 0)
    rejected, _ = _rows(examples, 1)
    length = _padded_len(examples, bucket, max_len, longest)
    c_tok, c_att = pad_rows(chosen, length, pad_token_id)
    r_tok, r_att = pad_rows(rejected, length, pad_token_id)
    return PreferenceBatch(
        chosen_tokens=c_tok, chosen_mask=_response_mask(c_att, plens), chosen_attention_mask=c_att,
        rejected_tokens=r_tok, rejected_mask=_response_mask(r_att, plens),
        rejected_attention_mask=r_att,
        labels=np.asarray([ex.label for ex in examples], np.float32))


def collate_kwise(examples: Sequence[PreferenceExample], *, pad_token_id: int, bucket=16,
                  max_len: int | None = None, longest: int | None = None) -> KwiseBatch:
    """Builds a ``KwiseBatch``; every example must have the same K (L as in collate_pairs)."""
    ks = {len(ex.response_ids) for ex in examples}
    if len(ks) != 1:
        raise ValueError(f"a k-wise batch needs the same number of responses per prompt, got K in {sorted(ks)}.")
    k = ks.pop()
    per_k = [_rows(examples, j) for j in range(k)]
    length = _padded_len(examples, bucket, max_len, longest)
    toks, masks, atts = [], [], []
    for rows, plens in per_k:
        tok, att = pad_rows(rows, length, pad_token_id)
        toks.append(tok)
        atts.append(att)
        masks.append(_response_mask(att, plens))
    scores = np.asarray([ex.scores or tuple(-float(j) for j in range(k)) for ex in examples], np.float32)
    return KwiseBatch(tokens=np.stack(toks, 1), mask=np.stack(masks, 1),
                      attention_mask=np.stack(atts, 1), scores=scores)


class PreferenceLoader(BatchLoader):
    """Deterministic, resumable iterator of ``PreferenceBatch`` or ``KwiseBatch``.

    Args:
      records: pairwise (explicit or implicit prompt) and/or k-wise records.
      tokenizer: HF tokenizer or CharTokenizer.
      batch_size: B pairs (or prompts, for "kwise") per batch.
      max_len: longest prompt + response.
      kind: "pairwise" (k-wise records are expanded into pairs with ``ties``/``tie_eps``)
        or "kwise" (all records k-wise with the same K; batches [B, K, L]).
      seed, shuffle, drop_last, num_epochs: see ``EpochSampler``.
      overlong: "truncate" | "error" | "drop".
      bucket: L rounding. add_bos / add_eos: special tokens.

    Attributes:
      records: the (expanded) records the loader iterates over, each with an explicit
        prompt.
      stats: PreferenceStats of the over-length policy.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer, batch_size: int, *,
                 max_len: int, kind: str = "pairwise", seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, overlong: str = "truncate", ties: str = "drop",
                 tie_eps: float = 0.0, bucket=16, add_bos: bool = False, add_eos: bool = True,
                 num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        _check_option(kind, PREFERENCE_KINDS, "kind")
        check_bucket(bucket)
        check_formats(records, "preference")
        records = [preference_record(r, i) for i, r in enumerate(records)]
        pad = pad_id(tokenizer)
        if kind == "pairwise":
            expanded = []
            for i, r in enumerate(records):
                expanded += (expand_kwise_to_pairs(r, ties=ties, tie_eps=tie_eps, index=i)
                             if is_kwise(r) else [dict(r)])
            if not expanded:
                raise ValueError("no preference pairs: every k-wise record was all ties.")
            records = expanded
        elif not all(is_kwise(r) for r in records):
            raise ValueError('kind="kwise" needs k-wise records ({"prompt", "responses", '
                             '"ranking"|"scores"}) only.')
        self.records = list(records)
        examples, self.stats = tokenize_preferences(self.records, tokenizer, max_len=max_len,
                                                    overlong=overlong, add_bos=add_bos,
                                                    add_eos=add_eos)
        collate_fn = collate_pairs if kind == "pairwise" else collate_kwise

        def collate(batch, longest):
            return collate_fn(batch, pad_token_id=pad, bucket=bucket, max_len=max_len, longest=longest)

        super().__init__(examples, collate, batch_size, row_length=_example_length, seed=seed, shuffle=shuffle,
                         drop_last=drop_last, num_epochs=num_epochs,
                         process_index=process_index, process_count=process_count)


# --------------------------------------------------------------------------- unpaired (KTO)


def unpaired_label(record: Mapping[str, Any], index: int) -> bool:
    """The ``label`` of unpaired (KTO) record ``index``: True for a desirable completion.

    Raises:
      ValueError: a missing label, or one that is not a bool (or 0 / 1), naming the record.
    """
    value = record.get("label")
    if value is None:
        raise ValueError(f"record {index} has no 'label': unpaired (KTO) records are "
                         f"{{'prompt', 'completion', 'label': bool}}; fields present: {sorted(record)}.")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"record {index}: label={value!r} must be a bool (True: desirable completion).")


def tokenize_unpaired(records: Sequence[Mapping[str, Any]], tokenizer, *, max_len: int,
                      overlong: str = "truncate", add_bos: bool = False,
                      add_eos: bool = True) -> tuple[list[PreferenceExample], PreferenceStats]:
    """Tokenizes unpaired records ``{"prompt", "completion", "label": bool}``.

    Each becomes a ``PreferenceExample`` with one response (the completion) and
    ``label`` 1.0 (desirable) or 0.0; over-length handling as ``tokenize_preferences``.
    """
    as_pairs = []
    for i, rec in enumerate(records):
        for field in ("prompt", "completion"):
            if rec.get(field) is None:
                raise ValueError(f"record {i} is missing field {field!r}: unpaired (KTO) records are "
                                 f"{{'prompt', 'completion', 'label': bool}}; fields present: {sorted(rec)}.")
        unpaired_label(rec, i)
        as_pairs.append({"prompt": rec["prompt"], "chosen": rec["completion"], "rejected": rec["completion"]})
    examples, stats = tokenize_preferences(as_pairs, tokenizer, max_len=max_len, overlong=overlong,
                                           add_bos=add_bos, add_eos=add_eos)
    examples = [dataclasses.replace(ex, response_ids=ex.response_ids[:1],
                                    label=float(unpaired_label(records[ex.index], ex.index)))
                for ex in examples]
    return examples, stats


@flax.struct.dataclass
class UnpairedBatch:
    """B unpaired completions and B mismatched (prompt, completion) rows for KTO's KL term.

    Attributes:
      tokens: [2B, L] int32: rows 0..B−1 are prompt_i + completion_i; rows B..2B−1 are
        prompt_i + completion_{(i − 1) mod B} (completion cut at L − len(prompt_i)).
      mask: [2B, L] float32, 1.0 on completion tokens.
      attention_mask: [2B, L] int32, 1 on real tokens.
      labels: [B] float32, 1.0 for a desirable completion, 0.0 for an undesirable one.
    """

    tokens: np.ndarray
    mask: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray


def collate_unpaired(examples: Sequence[PreferenceExample], *, pad_token_id: int, bucket=16,
                     max_len: int | None = None, longest: int | None = None) -> UnpairedBatch:
    """Builds an ``UnpairedBatch``; the mismatched rows pair prompt i with completion i − 1
    (mod B) of this batch (TRL's ``KTOTrainer`` shifts completions by one the same way).

    L = bucket of the longest row, the mismatched ones included (at least ``longest``),
    capped at max_len.
    """
    b = len(examples)
    rows = [ex.prompt_ids + ex.response_ids[0] for ex in examples]
    kl_rows = [(ex.prompt_ids + examples[(i - 1) % b].response_ids[0])[:max_len] for i, ex in enumerate(examples)]
    plens = [len(ex.prompt_ids) for ex in examples] * 2
    length = bucket_length(max([len(r) for r in rows + kl_rows] + [longest or 0]), bucket, max_len)
    tokens, attention = pad_rows(rows + kl_rows, length, pad_token_id)
    return UnpairedBatch(tokens=tokens, mask=_response_mask(attention, plens), attention_mask=attention,
                         labels=np.asarray([ex.label for ex in examples], np.float32))


class UnpairedLoader(BatchLoader):
    """Deterministic, resumable iterator of ``UnpairedBatch`` (KTO).

    Args:
      records: unpaired records ``{"prompt", "completion", "label": bool}``.
      tokenizer, batch_size, max_len, seed, shuffle, drop_last, overlong, bucket,
      add_bos, add_eos, num_epochs, process_index, process_count: as ``PreferenceLoader``
      (batch_size ≥ 2: the mismatched rows need another completion; with several
      processes the mismatched pairs are formed within each process's slice, and
      bucket="max" keeps every process at the same L).

    Attributes:
      records: the records; stats: PreferenceStats of the over-length policy.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer, batch_size: int, *,
                 max_len: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 overlong: str = "truncate", bucket=16, add_bos: bool = False, add_eos: bool = True,
                 num_epochs: int | None = None, process_index: int = 0, process_count: int = 1):
        check_bucket(bucket)
        if batch_size < 2:
            raise ValueError(f"batch_size={batch_size}; unpaired (KTO) batches need >= 2 records "
                             "(the KL term pairs each prompt with another record's completion).")
        self.records = [dict(r) for r in records]
        examples, self.stats = tokenize_unpaired(self.records, tokenizer, max_len=max_len, overlong=overlong,
                                                 add_bos=add_bos, add_eos=add_eos)
        pad = pad_id(tokenizer)

        def collate(batch, longest):
            return collate_unpaired(batch, pad_token_id=pad, bucket=bucket, max_len=max_len, longest=longest)

        super().__init__(examples, collate, batch_size, row_length=_example_length, seed=seed, shuffle=shuffle,
                         drop_last=drop_last, num_epochs=num_epochs,
                         process_index=process_index, process_count=process_count)
