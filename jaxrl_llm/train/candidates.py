"""Candidate generation (RLHF stage 2): K sampled responses per prompt from a policy,
with their log-probs and lengths, filtered and deduplicated, written as JSONL.

Pipeline: prompts → ``PromptLoader`` (fixed width, resumable order) → ``rollout.generate``
(K samples per prompt; temperature / top-p / top-k / max length / stop token ids) →
``apply_stop_strings`` → decode → filters. Filters, each dropped candidate counted once:
empty / over-length / unfinished / duplicate within the prompt's group
(``data.filter_candidates``), then repeated n-grams (``ngram_repetition`` above
``max_ngram_repetition``, counted as ``repetitive``).

Output records: ``{"prompt", "responses": [k], "logprobs": [k] (sum of the sampled
tokens' log-probs under the sampling distribution), "lengths": [k] (tokens),
"finished": [k] (ended by a stop token / string), "num_sampled": K, <extra prompt
columns>}``; prompts left with no candidate are dropped and counted.

Shapes: B prompts per generation batch, K candidates per prompt, T = max_new_tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxrl_llm.data.candidates import CandidateStats, filter_candidates
from jaxrl_llm.data.formats import check_formats, prompt_of
from jaxrl_llm.data.prompts import OVERLONG_PROMPT_POLICIES, PromptLoader
from jaxrl_llm.data.records import save_records
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.parallel.placement import MeshConfig
from jaxrl_llm.rollout.sampler import apply_stop_strings, generate
from jaxrl_llm.train.policy import make_placement, placed_model
from jaxrl_llm.train.validation import check_int_field, check_positive_ints, check_real, check_sampling


@dataclasses.dataclass(frozen=True)
class CandidateConfig:
    """Settings of candidate generation.

    Attributes:
      num_candidates: K responses sampled per prompt.
      batch_size: prompts per generation call (the last batch is padded: one compile).
      max_prompt_len: prompt width in tokens; longer prompts follow ``overlong_prompts``.
      overlong_prompts: "error" | "truncate_left" | "drop".
      max_new_tokens: response budget T.
      temperature, top_k, top_p, min_p: sampling options (temperature 0: greedy).
      stop_token_ids: extra stop ids; the tokenizer's eos is always one.
      stop_strings: a response ends after the token completing any of these strings.
      seed: sampling seed (batch i uses fold_in(seed, i)).
      min_length: candidates with fewer content tokens (stop token excluded) are "empty".
      max_length: candidates with more tokens are "over_length" (None: no limit).
      drop_unfinished: drop candidates cut at max_new_tokens without a stop.
      dedup: drop exact duplicate texts within a prompt's candidates.
      ngram_size: n of the repetition filter.
      max_ngram_repetition: drop candidates whose repeated-n-gram fraction exceeds this
        (None: off).
      save_token_logprobs: also store per-token log-probs ("token_logprobs").
      output_path: write the records here (.jsonl / .json / .parquet; None: not written).
      mesh: device mesh (data × fsdp × tensor) the policy samples on; batch_size must
        divide by data × fsdp (each device decodes its share of the prompts).
    """

    num_candidates: int = 4
    batch_size: int = 8
    max_prompt_len: int = 128
    overlong_prompts: str = "error"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    min_length: int = 1
    max_length: int | None = None
    drop_unfinished: bool = False
    dedup: bool = True
    ngram_size: int = 4
    max_ngram_repetition: float | None = None
    save_token_logprobs: bool = False
    output_path: str | None = None
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("num_candidates", "batch_size", "max_prompt_len", "max_new_tokens", "ngram_size"))
        if self.overlong_prompts not in OVERLONG_PROMPT_POLICIES:
            raise ValueError(f"overlong_prompts must be one of {OVERLONG_PROMPT_POLICIES}, got {self.overlong_prompts!r}")
        check_sampling(self, greedy_ok=True)
        check_int_field("seed", self.seed, why="the sampling seed")
        check_int_field("min_length", self.min_length, 0)
        check_int_field("max_length", self.max_length, optional=True)
        if self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length must be None or >= min_length={self.min_length}, got {self.max_length}")
        check_real("max_ngram_repetition", self.max_ngram_repetition, low=0, high=1, high_open=True, optional=True,
                   why="the repeated-n-gram fraction above which a candidate is dropped")


def ngram_repetition(tokens: Sequence[Any], n: int) -> float:
    """Fraction of the n-grams of ``tokens`` that repeat an earlier one:
    1 − (distinct n-grams) / (n-grams). 0 for sequences shorter than n + 1.

    "abababab" with n = 2 → 1 − 2/7 ≈ 0.71; a sequence without repeats → 0.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = list(tokens)
    count = len(tokens) - n + 1
    if count < 2:
        return 0.0
    grams = {tuple(tokens[i : i + n]) for i in range(count)}
    return 1.0 - len(grams) / count


@dataclasses.dataclass(frozen=True)
class CandidateReport:
    """Counts of a candidate-generation run.

    Attributes:
      filters: ``CandidateStats`` of the length / finish / dedup filters (its ``kept``
        counts candidates before the repetition filter).
      repetitive: candidates dropped by the n-gram repetition filter.
      kept: candidates written (filters.kept − repetitive).
      num_prompts: prompts sampled.
      prompts_without_candidates: prompts whose candidates were all dropped (not written).
      prompts_dropped: over-long prompts dropped by ``overlong_prompts="drop"``.
    """

    filters: CandidateStats
    repetitive: int
    kept: int
    num_prompts: int
    prompts_without_candidates: int
    prompts_dropped: int = 0

    def as_dict(self, prefix: str = "candidates/") -> dict[str, float]:
        out = self.filters.as_dict(prefix)
        out.update({prefix + "repetitive": self.repetitive, prefix + "kept": self.kept,
                    prefix + "kept_fraction": self.kept / self.filters.total if self.filters.total else 0.0,
                    prefix + "num_prompts": self.num_prompts,
                    prefix + "prompts_without_candidates": self.prompts_without_candidates,
                    prefix + "prompts_dropped": self.prompts_dropped})
        return out


def generate_candidates(
    config: CandidateConfig,
    *,
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[dict],
) -> tuple[list[dict], CandidateReport]:
    """Samples ``num_candidates`` responses per prompt and filters them.

    Args:
      config: CandidateConfig.
      policy: a CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer (no pad token: eos pads; no eos: error).
      prompts: records with a ``prompt`` (string or chat messages); other fields are
        copied into the output records.

    Returns:
      (records, report): one record per prompt with at least one kept candidate (see the
      module docstring), in prompt order; the counts. Written to ``config.output_path``
      when set.
    """
    check_formats(prompts, "prompt")
    placement = make_placement(config.mesh, policy, {"batch_size": config.batch_size})
    model = placed_model(policy, placement)
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    loader = PromptLoader(prompts, tokenizer, config.batch_size, shuffle=False, drop_last=False, num_epochs=1,
                          max_prompt_len=config.max_prompt_len, overlong=config.overlong_prompts,
                          padding_side="right", bucket="max")
    k = config.num_candidates
    base_key = jax.random.PRNGKey(config.seed)
    records: list[dict] = []
    stats = CandidateStats()
    repetitive = num_prompts = empty_prompts = 0
    for batch_index, batch in enumerate(loader):
        b = len(batch)
        tokens, mask = np.asarray(batch.tokens), np.asarray(batch.mask)
        if b < config.batch_size:  # pad with copies of the first prompt: one compiled shape
            extra = config.batch_size - b
            tokens = np.concatenate([tokens, np.repeat(tokens[:1], extra, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], extra, 0)])
        with placement.context():
            rollout = generate(model, tokens, mask, max_new_tokens=config.max_new_tokens, num_samples=k,
                               temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                               min_p=config.min_p, stop_token_ids=stop_ids, pad_token_id=pad,
                               rng=jax.random.fold_in(base_key, batch_index), prompt_bucket=0, mesh=placement.mesh)
        # stop strings, decoding and filters work on whole groups on the host
        rollout = apply_stop_strings(placement.to_host(rollout), tokenizer, config.stop_strings)
        n = b * k
        out_tokens = np.asarray(rollout.tokens)[:n]
        lengths = np.asarray(rollout.lengths)[:n]
        finished = np.asarray(rollout.finished)[:n]
        token_logp = np.asarray(rollout.logprobs)[:n]
        # content = response tokens without a trailing stop token id
        ends_with_stop = np.array([lengths[i] > 0 and int(out_tokens[i, lengths[i] - 1]) in stop_ids for i in range(n)])
        content_len = lengths - ends_with_stop.astype(lengths.dtype)
        texts = [decode_ids(tokenizer, out_tokens[i, : content_len[i]].tolist(), skip_special_tokens=True)
                 for i in range(n)]
        keep, batch_stats = filter_candidates(texts, group_size=k, lengths=content_len, finished=finished,
                                              min_length=config.min_length, max_length=config.max_length,
                                              drop_unfinished=config.drop_unfinished, dedup=config.dedup)
        if config.max_ngram_repetition is not None:
            for i in np.where(keep)[0]:
                if ngram_repetition(out_tokens[i, : content_len[i]].tolist(), config.ngram_size) > config.max_ngram_repetition:
                    keep[i] = False
                    repetitive += 1
        stats = stats + batch_stats
        for row in range(b):
            num_prompts += 1
            idx = [i for i in range(row * k, (row + 1) * k) if keep[i]]
            if not idx:
                empty_prompts += 1
                continue
            source = prompts[int(batch.indices[row])]
            prompt, field = prompt_of(source, int(batch.indices[row]))
            record = {**{key: v for key, v in source.items() if key not in ("prompt", field)}, "prompt": prompt,
                      "responses": [texts[i] for i in idx],
                      "logprobs": [float(token_logp[i, : lengths[i]].sum()) for i in idx],
                      "lengths": [int(lengths[i]) for i in idx],
                      "finished": [bool(finished[i]) for i in idx],
                      "num_sampled": k}
            if config.save_token_logprobs:
                record["token_logprobs"] = [token_logp[i, : lengths[i]].astype(float).tolist() for i in idx]
            records.append(record)
    report = CandidateReport(filters=stats, repetitive=repetitive, kept=stats.kept - repetitive,
                             num_prompts=num_prompts, prompts_without_candidates=empty_prompts,
                             prompts_dropped=loader.stats.dropped)
    if config.output_path is not None:
        if not records:
            raise ValueError("every candidate was filtered out; nothing to write to "
                             f"{config.output_path!r} (see the report: {report.as_dict()})")
        save_records(records, Path(config.output_path))
    return records, report

