"""Rejection-sampling fine-tuning (RFT, a.k.a. expert iteration / ReST / STaR-style
filtering) and the best-of-N baseline.

Per iteration: sample K candidates for each of ``prompts_per_iteration`` prompts with
the current policy → score them with the reward function → drop empty / unfinished /
duplicate candidates (``data.candidates``) → keep the best of K per prompt (or every
candidate above a threshold, capped per prompt) → ``steps_per_iteration`` supervised
steps on the kept set (the SFT loss of ``train.sft``) → repeat with the improved policy.

Kept samples are trained on from their token ids (no decode → re-encode round trip), and
each iteration's kept set is written to ``output_dir/rft/iteration_<k>.jsonl`` (text,
reward and ids), which is also what a resumed run reads back mid-iteration.

Shapes: Q prompts per iteration, K samples per prompt, N = Q·K candidates, P prompt
length, T = max_new_tokens.

References:
  Yuan et al. 2023, Scaling relationship on learning mathematical reasoning with LLMs
  (RFT), https://arxiv.org/abs/2308.01825
  Gulcehre et al. 2023, ReST, https://arxiv.org/abs/2308.08998
  Dong et al. 2023, RAFT, https://arxiv.org/abs/2304.06767
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxrl_llm import ops
from jaxrl_llm.data.candidates import CandidateStats, filter_candidates
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.prompts import PromptLoader
from jaxrl_llm.data.records import load_records, read_jsonl
from jaxrl_llm.data.sampler import BatchLoader
from jaxrl_llm.data.sft import SFTExample, collate_sft
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.rewards.combine import safe_reward_fn
from jaxrl_llm.rollout.sampler import Rollout, generate
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.policy import as_model, check_tokenizer_fits, make_placement, placed_model, split_model
from jaxrl_llm.train.scoring import (
    RewardScorer,
    resolve_reward,
    reward_inputs,
    validate_reward_fields,
)
from jaxrl_llm.train.sft import batch_arrays, make_sft_update
from jaxrl_llm.train.validation import check_positive_ints, check_real, check_sampling

logger = logging.getLogger(__name__)

SELECTIONS = ("best", "threshold")
# An iteration where fewer prompts than this fraction keep an example is reported loudly.
STARVED_PROMPT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class RFTConfig:
    """Configuration of rejection-sampling fine-tuning.

    ``run.total_steps`` counts SFT optimizer steps; the run has
    ``num_iterations = ceil(total_steps / steps_per_iteration)`` sampling rounds.

    Attributes:
      run, optim: loop and optimizer settings.
      prompts_per_iteration: Q prompts sampled per iteration (from a shuffled, resumable
        prompt stream).
      samples_per_prompt: K candidates per prompt.
      sampling_batch_size: prompts per ``generate`` call (Q must be a multiple of it).
      steps_per_iteration: SFT steps on each iteration's kept set.
      batch_size: rows per SFT step.
      max_prompt_len: prompts are padded to this; longer prompts are an error.
      max_new_tokens: T, the response budget.
      temperature, top_k, top_p: sampling options.
      stop_token_ids: extra stop ids; the tokenizer's eos is always one.
      selection: "best" (the highest-reward candidate of each prompt, if it reaches
        ``reward_threshold``) or "threshold" (every candidate with reward ≥
        reward_threshold, best first, at most ``max_per_prompt`` per prompt).
      reward_threshold: minimum reward to keep a candidate. The default 0.5 keeps only
        the answers a 0/1 verifier accepts (a prompt whose every answer is wrong gives
        nothing to imitate); set your own for other reward scales, or None to keep the
        best candidate whatever its reward (RAFT / best-of-N distillation).
      max_per_prompt: cap on kept candidates per prompt ("threshold").
      dedup: drop identical candidates within a prompt's group before selecting.
      drop_unfinished: drop candidates cut at max_new_tokens (no stop token).
      loss_agg: ``aggregate_loss`` mode of the SFT loss.
      reward_funcs, reward_weights, max_unscored_frac: the reward functions by spec, their
        weights and the health limit, as in ``GRPOConfig`` (``train.scoring``).
      logprob_chunk_size: tokens per chunk of ``logprobs_from_hidden``.
      mesh: device mesh (data × fsdp × tensor). sampling_batch_size (prompts per
        ``generate`` call) and batch_size (SFT rows) must divide by data × fsdp; scoring,
        filtering and selection run on the host over whole groups.
    """

    run: RunConfig = RunConfig(output_dir="runs/rft")
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 8
    sampling_batch_size: int = 16
    steps_per_iteration: int = 16
    batch_size: int = 16
    max_prompt_len: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    selection: str = "best"
    reward_threshold: float | None = 0.5
    max_per_prompt: int = 1
    dedup: bool = True
    drop_unfinished: bool = True
    loss_agg: str = "token_mean"
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    max_unscored_frac: float = 0.5
    logprob_chunk_size: int = 1024
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("prompts_per_iteration", "samples_per_prompt", "sampling_batch_size",
                                   "steps_per_iteration", "batch_size", "max_prompt_len", "max_new_tokens",
                                   "max_per_prompt", "logprob_chunk_size"))
        if self.prompts_per_iteration % self.sampling_batch_size:
            raise ValueError(f"prompts_per_iteration={self.prompts_per_iteration} must be a multiple of "
                             f"sampling_batch_size={self.sampling_batch_size}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "threshold" and self.reward_threshold is None:
            raise ValueError('selection="threshold" needs reward_threshold')
        check_real("reward_threshold", self.reward_threshold, optional=True, finite=False,
                   why="the minimum reward of a kept candidate; None: no minimum")
        if self.selection == "best" and self.max_per_prompt != 1:
            raise ValueError(f'max_per_prompt={self.max_per_prompt} applies to selection="threshold" only; '
                             'selection="best" keeps one candidate per prompt (set max_per_prompt=1)')
        check_sampling(self)
        if self.loss_agg not in ops.AGGREGATION_MODES:
            raise ValueError(f"loss_agg must be one of {ops.AGGREGATION_MODES}, got {self.loss_agg!r}")
        validate_reward_fields(self.reward_funcs, self.reward_weights, self.max_unscored_frac)

    @property
    def num_iterations(self) -> int:
        return math.ceil(self.run.total_steps / self.steps_per_iteration)


# ---------------------------------------------------------------------------- select


def select_candidates(
    rewards: np.ndarray,
    valid: np.ndarray,
    group_size: int,
    *,
    selection: str = "best",
    threshold: float | None = None,
    max_per_prompt: int = 1,
) -> np.ndarray:
    """Which candidates to fine-tune on.

    Args:
      rewards: [N] float rewards in group layout (NaN where unscored).
      valid: [N] bool, candidates allowed at all (scored, not empty/unfinished/duplicate).
      group_size: K candidates per prompt.
      selection: "best" — the first highest-reward valid candidate of each group;
        "threshold" — valid candidates with reward ≥ threshold, highest first (ties in
        sampling order), at most ``max_per_prompt`` per group.
      threshold: minimum reward (None: no minimum, "best" only).
      max_per_prompt: cap per group ("threshold").

    Returns:
      [N] bool keep mask.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    rewards = np.asarray(rewards, np.float64)
    ok = np.asarray(valid, bool) & np.isfinite(rewards)
    if threshold is not None:
        ok &= rewards >= threshold
    cap = 1 if selection == "best" else max_per_prompt
    keep = np.zeros(len(rewards), bool)
    for start in range(0, len(rewards), group_size):
        idx = np.arange(start, start + group_size)[ok[start:start + group_size]]
        order = idx[np.argsort(-rewards[idx], kind="stable")]
        keep[order[:cap]] = True
    return keep


# ---------------------------------------------------------------------------- sample + score


@dataclasses.dataclass
class IterationData:
    """The kept set of one iteration and what was measured while building it.

    Attributes:
      examples: kept SFT examples (prompt ids, response ids incl. the stop token).
      metrics: per-iteration metrics (reward of all vs kept, kept fraction, ...); a mean
        over nothing (no scored / no kept candidate) is None.
      rows: one JSON-able dict per kept example (prompt, completion, reward, ids).
    """

    examples: list[SFTExample]
    metrics: dict[str, float]
    rows: list[dict]


def _sample(model, prompts, config: RFTConfig, rng, pad: int, stop_ids, placement: Placement) -> Rollout:
    """K samples of each prompt of a [B, P] batch, decoded on the mesh (prompt rows split
    over data × fsdp); the [B·K, ...] rollout comes back whole, as host arrays."""
    with placement.context():
        rollout = generate(model, prompts.tokens, prompts.mask, max_new_tokens=config.max_new_tokens,
                           num_samples=config.samples_per_prompt, temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p, stop_token_ids=stop_ids, pad_token_id=pad, rng=rng, prompt_bucket=0,
                           mesh=placement.mesh)
    return placement.to_host(rollout)


def _sample_iteration(model, loader, config: RFTConfig, tokenizer, scorer: RewardScorer, rng, stop_ids,
                      placement: Placement) -> IterationData:
    k = config.samples_per_prompt
    pad = pad_id(tokenizer)
    examples, rows = [], []
    all_rewards, kept_rewards, stats, below = [], [], CandidateStats(), 0
    pass_at_k, lengths_all, finished_all = [], [], []
    for round_ in range(config.prompts_per_iteration // config.sampling_batch_size):
        # sample
        prompts = next(loader)
        rollout = _sample(model, prompts, config, jax.random.fold_in(rng, round_), pad, stop_ids, placement)
        tokens, lengths, finished = rollout.tokens, rollout.lengths, rollout.finished
        completions = [decode_ids(tokenizer, tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                       for i in range(len(tokens))]
        # score
        rewards = scorer(prompts.prompts, completions, prompts.columns, k)
        # filter + select
        allowed, batch_stats = filter_candidates(list(tokens), group_size=k, lengths=lengths, finished=finished,
                                                 drop_unfinished=config.drop_unfinished, dedup=config.dedup)
        keep = select_candidates(rewards, allowed, k, selection=config.selection,
                                 threshold=config.reward_threshold, max_per_prompt=config.max_per_prompt)
        stats = stats + batch_stats
        if config.reward_threshold is not None:
            below += int((np.asarray(allowed) & np.isfinite(rewards) & (rewards < config.reward_threshold)).sum())
        all_rewards.append(rewards)
        kept_rewards.append(rewards[keep])
        pass_at_k.append(np.nanmax(np.where(np.isfinite(rewards), rewards, -np.inf).reshape(-1, k), axis=1))
        lengths_all.append(lengths)
        finished_all.append(finished)
        prompt_mask = np.asarray(prompts.mask)
        for i in np.where(keep)[0]:
            b = i // k
            p_ids = tuple(int(t) for t in np.asarray(prompts.tokens)[b][prompt_mask[b] > 0])
            r_ids = tuple(int(t) for t in tokens[i, :lengths[i]])
            examples.append(SFTExample(int(prompts.indices[b]), p_ids, r_ids))
            rows.append({"record": int(prompts.indices[b]), "prompt": prompts.texts[b], "completion": completions[i],
                         "reward": float(rewards[i]), "prompt_ids": list(p_ids), "response_ids": list(r_ids)})
    rewards = np.concatenate(all_rewards)
    kept = np.concatenate(kept_rewards)
    best = np.concatenate(pass_at_k)
    scored = np.isfinite(rewards)
    metrics = {
        "sample_reward_mean": float(np.mean(rewards[scored])) if scored.any() else None,
        "sample_accuracy": float(np.mean(rewards[scored] > 0.5)) if scored.any() else None,
        "best_of_k_reward": float(np.mean(best[np.isfinite(best)])) if np.isfinite(best).any() else None,
        "kept_reward_mean": float(np.mean(kept)) if len(kept) else None,
        "kept": len(kept),
        "kept_fraction": len(kept) / len(rewards),
        "prompts_with_kept": len({e.index for e in examples}) / config.prompts_per_iteration,
        "unscored": int((~scored).sum()),
        "candidates/below_threshold": below,
        "response_length_mean": float(np.mean(np.concatenate(lengths_all))),
        "truncated_fraction": float(np.mean(~np.concatenate(finished_all))),
        **{k_: float(v) for k_, v in stats.as_dict("candidates/").items()},
    }
    return IterationData(examples, metrics, rows)


def _warn_if_starved(metrics: dict, config: RFTConfig, iteration: int) -> None:
    """Says loudly why an iteration kept (almost) nothing: which filter took the candidates."""
    if metrics["prompts_with_kept"] >= STARVED_PROMPT_FRACTION:
        return
    total = int(metrics["candidates/total"])
    dropped = {
        f"cut at max_new_tokens={config.max_new_tokens} without a stop token (drop_unfinished=True)":
            metrics["candidates/unfinished"],
        "duplicates within their prompt's group (dedup=True)": metrics["candidates/duplicates"],
        "empty": metrics["candidates/empty"],
        "not scored by the reward function": metrics["unscored"],
        f"reward below reward_threshold={config.reward_threshold}": metrics["candidates/below_threshold"],
    }
    reasons = "; ".join(f"{int(n)} {why}" for why, n in dropped.items() if n)
    logger.warning(
        "RFT iteration %d kept %d of %d candidates: %d of %d prompts have an example to learn from. "
        "Dropped: %s. Raise max_new_tokens or set drop_unfinished=false if answers are cut, lower "
        "reward_threshold (None keeps each prompt's best), or start from a better policy (e.g. SFT first).",
        iteration, int(metrics["kept"]), total, round(metrics["prompts_with_kept"] * config.prompts_per_iteration),
        config.prompts_per_iteration, reasons or "nothing")


# ---------------------------------------------------------------------------- persistence


def _iteration_path(output_dir: Path, iteration: int) -> Path:
    return output_dir / "rft" / f"iteration_{iteration}.jsonl"


def _save_iteration(path: Path, data: IterationData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"metrics": data.metrics}) + "\n")
        for row in data.rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _load_iteration(path: Path) -> IterationData:
    """The kept set ``_save_iteration`` wrote; damage is an error naming the file and line
    (the set cannot be sampled again: the policy that sampled it is gone)."""
    why = (f"the kept set of this RFT iteration, needed to resume it, is damaged; restore {path.name} "
           "from a copy, or resume from an earlier checkpoint")
    try:
        lines = read_jsonl(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{err} ({why})") from err
    for i, line in enumerate(lines):
        fields = ("metrics",) if i == 0 else ("record", "prompt_ids", "response_ids")
        if not isinstance(line, dict) or any(f not in line for f in fields):
            raise ValueError(f"{path}: line {i + 1} does not hold the fields {list(fields)} ({why})")
    if not lines:
        raise ValueError(f"{path} is empty ({why})")
    metrics, rows = lines[0]["metrics"], lines[1:]
    examples = [SFTExample(r["record"], tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in rows]
    return IterationData(examples, metrics, rows)


def _sft_loader(examples: list[SFTExample], config: RFTConfig, pad: int, iteration: int) -> BatchLoader:
    """Shuffled batches of the kept set, one shape per run (rows padded to the max length).

    A kept set smaller than a batch is repeated to fill it.
    """
    items = examples * max(1, math.ceil(config.batch_size / len(examples)))
    max_len = config.max_prompt_len + config.max_new_tokens

    def collate(rows, longest):
        return collate_sft(rows, pad_token_id=pad, bucket="max", max_len=max_len, longest=longest)

    return BatchLoader(items, collate, config.batch_size, row_length=len,
                       seed=config.run.seed * 100_003 + iteration)


# ---------------------------------------------------------------------------- update




# ---------------------------------------------------------------------------- train


def train(
    config: RFTConfig,
    *,
    policy: Any,
    tokenizer: Any,
    prompts: Any,
    reward_fn: Callable | Sequence[Callable | str] | None = None,
) -> TrainResult:
    """Rejection-sampling fine-tuning of ``policy`` on prompts scored by ``reward_fn``.

    Args:
      config: RFTConfig.
      policy: CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer.
      prompts: records with a ``prompt`` (string or chat messages) and extra columns
        (e.g. ``answer``) passed to the reward function as keyword lists; a list of
        dicts or a local dataset path.
      reward_fn: ``reward_fn(prompts, completions, **columns) -> list[float | None]``
        (wrapped with ``safe_reward_fn``: exceptions / NaN make a sample unscored,
        and unscored samples are never kept), or a list of functions / specs weighted
        by ``config.reward_weights``; None: the config's ``reward_funcs``.

    Returns:
      TrainResult; every step's metrics include its ``iteration`` and that iteration's
      sampling metrics (``sample_reward_mean``, ``sample_accuracy``, ``best_of_k_reward``,
      ``kept_reward_mean``, ``kept_fraction``, candidate filter counts).
    """
    records = load_records(prompts, required=())
    check_formats(records, "prompt")
    check_tokenizer_fits(policy, tokenizer)
    placement = make_placement(config.mesh, policy, {"sampling_batch_size": config.sampling_batch_size,
                                                     "batch_size": config.batch_size})
    model = placed_model(policy, placement)
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    loader = PromptLoader(records, tokenizer, config.sampling_batch_size, seed=config.run.seed,
                          max_prompt_len=config.max_prompt_len, padding_side="right", bucket="max")
    scorer = RewardScorer(resolve_reward(reward_fn, config), default=None,
                          max_unscored_frac=config.max_unscored_frac)
    split = split_model(model)
    tx = make_optimizer(config.optim, config.run.total_steps)
    update = make_sft_update(split, tx, config.loss_agg, config.logprob_chunk_size, placement=placement)
    state = placement.place({"params": split.params, "opt_state": tx.init(split.params)})
    loop = TrainLoop(config, config.run, desc="rft")
    state, start = loop.start(state)
    if "prompt_loader" in loop.meta:
        loader.load_state_dict(loop.meta["prompt_loader"])
    base_key = jax.random.PRNGKey(config.run.seed)

    data: IterationData | None = None
    sft_loader: BatchLoader | None = None
    spi = config.steps_per_iteration
    if start % spi:  # resumed inside an iteration: its kept set and batch position
        iteration = start // spi
        data = _load_iteration(_iteration_path(loop.output_dir, iteration))
        if data.examples:
            sft_loader = _sft_loader(data.examples, config, pad, iteration)
            sft_loader.load_state_dict(loop.meta["sft_loader"])

    for step in range(start, config.run.total_steps):
        iteration = step // spi
        if step % spi == 0:
            # sample → score → select, with the current policy
            t0 = time.perf_counter()
            current = split.merge(state["params"])
            data = _sample_iteration(current, loader, config, tokenizer, scorer,
                                     jax.random.fold_in(base_key, iteration), stop_ids, placement)
            data.metrics.update(scorer.step_metrics())
            _warn_if_starved(data.metrics, config, iteration)
            data.metrics["time_sampling"] = time.perf_counter() - t0
            _save_iteration(_iteration_path(loop.output_dir, iteration), data)
            sft_loader = _sft_loader(data.examples, config, pad, iteration) if data.examples else None
        # fine-tune on the kept set
        t1 = time.perf_counter()
        finite, step_metrics = True, {"loss": 0.0, "skipped_no_data": 1}
        if sft_loader is not None:
            batch = placement.rows(batch_arrays(next(sft_loader)))
            with placement.context():
                params, opt_state, finite, m = update(state["params"], state["opt_state"], batch)
            state = {"params": params, "opt_state": opt_state}
            finite, m = placement.to_host((finite, m))  # replicated scalars, read on every process
            step_metrics = {**{k: float(v) for k, v in m.items()}, "skipped_no_data": 0}
        step_metrics["time_update"] = time.perf_counter() - t1
        meta = {"prompt_loader": loader.state_dict(),
                "sft_loader": sft_loader.state_dict() if sft_loader is not None else {}}
        loop.end_step(step, state, {"iteration": iteration, **data.metrics, **step_metrics},
                      finite=bool(finite), meta=meta)
    return loop.finish(state, model=split.merge(state["params"]), tokenizer=tokenizer)


# ---------------------------------------------------------------------------- best-of-N


def best_of_n_curve(
    model: Any,
    tokenizer: Any,
    prompts: Any,
    reward_fn: Callable,
    ns: Sequence[int] = (1, 2, 4, 8, 16),
    *,
    max_new_tokens: int = 64,
    max_prompt_len: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    reward_default: float = 0.0,
) -> dict[int, float]:
    """Expected reward of the best of N samples, for each N in ``ns``.

    Draws M = max(ns) samples per prompt once and, for every N, uses the unbiased
    estimator of E[max of N draws without replacement from the M]: with rewards sorted
    ascending r_(1) ≤ … ≤ r_(M),

      E[max_N] = Σ_{i=N..M} C(i − 1, N − 1) / C(M, N) · r_(i)

    (for 0/1 rewards this is the pass@k estimator of Chen et al. 2021), averaged over
    prompts. The curve is the baseline an RL method should beat at equal sample cost.

    References:
      Chen et al. 2021, Evaluating LLMs trained on code (pass@k),
      https://arxiv.org/abs/2107.03374

    Args:
      model: CausalLM or a local checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer.
      prompts: records with "prompt" (+ columns for the reward function).
      reward_fn: TRL-convention reward function (wrapped with ``safe_reward_fn``).
      ns: sample counts N ≥ 1.
      max_new_tokens, max_prompt_len, temperature, top_k, top_p: sampling options.
      batch_size: prompts per ``generate`` call.
      seed: sampling seed.
      reward_default: reward of samples that could not be scored.

    Returns:
      {N: mean over prompts of the expected best-of-N reward}.
    """
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"ns must be positive ints, got {ns}")
    m = ns[-1]
    records = load_records(prompts, required=())
    check_formats(records, "prompt")
    check_tokenizer_fits(model, tokenizer)
    model = as_model(model)
    loader = PromptLoader(records, tokenizer, min(batch_size, len(records)), shuffle=False, drop_last=False,
                          num_epochs=1, max_prompt_len=max_prompt_len, padding_side="right", bucket="max")
    safe = safe_reward_fn(reward_fn, default=reward_default)
    stop_ids = (eos_id(tokenizer),)
    key = jax.random.PRNGKey(seed)
    per_prompt = {n: [] for n in ns}
    for round_, batch in enumerate(loader):
        rollout = generate(model, batch.tokens, batch.mask, max_new_tokens=max_new_tokens, num_samples=m,
                           temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=stop_ids,
                           pad_token_id=pad_id(tokenizer), rng=jax.random.fold_in(key, round_), prompt_bucket=0)
        tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
        completions = [decode_ids(tokenizer, tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                       for i in range(len(tokens))]
        texts, completions = reward_inputs(batch.prompts, completions, m)
        columns = {c: [v for v in vals for _ in range(m)] for c, vals in batch.columns.items()}
        raw = safe(texts, completions, **columns)
        rewards = np.array([reward_default if r is None else float(r) for r in raw]).reshape(-1, m)
        for n in ns:
            per_prompt[n].append(expected_best_of_n(rewards, n))
    return {n: float(np.mean(np.concatenate(v))) for n, v in per_prompt.items()}


def expected_best_of_n(rewards: np.ndarray, n: int) -> np.ndarray:
    """Unbiased estimate of E[max of n draws] from M ≥ n samples per row.

      E[max_n] = Σ_{i=n..M} C(i − 1, n − 1) / C(M, n) · r_(i),  r_(1) ≤ … ≤ r_(M)

    i.e. the mean, over all C(M, n) subsets of size n, of the subset's maximum.

    Args:
      rewards: [P, M] float rewards of M samples for each of P prompts.
      n: subset size, 1 ≤ n ≤ M.

    Returns:
      [P] float64.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [P, M], got shape {rewards.shape}")
    m = rewards.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f"n must be in [1, M={m}], got {n}")
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], np.float64) / math.comb(m, n)
    return np.sort(rewards, axis=1) @ weights
