"""Online DPO: every step the current policy samples K answers per prompt, a judge scores
them, the best and the worst answer of each prompt form a preference pair, and one DPO
step is taken on those pairs against the frozen reference.

The judge is any of the preference-data stage's judges (``train.preference_data``):
``FunctionJudge`` (a reward function, TRL signature), ``RewardModelJudge`` (a reward
model) or ``AIFeedbackJudge`` (a local LM comparing two answers) — or a reward function /
spec, wrapped in a ``FunctionJudge``.

Pairs: a prompt gives a pair when its K scores are not all equal (a tie carries no
preference); when fewer than B prompts of a round do, more rounds are sampled
(``max_sampling_rounds``) and then kept pairs are repeated to fill the B rows (logged as
``repeated_pairs``); a step without any pair is skipped. The pairs keep the sampled token
ids (no decode → re-encode round trip).

Shapes: B prompts per step (pairs), K samples per prompt, P prompt width, T =
max_new_tokens, L = P + T; the DPO batch is [2B, L] (chosen rows first).

References:
  Guo et al. 2024, Direct Language Model Alignment from Online AI Feedback,
  https://arxiv.org/abs/2402.04792
  Rafailov et al. 2023, DPO, https://arxiv.org/abs/2305.18290
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import ops
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.prompts import PromptLoader
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.parallel.placement import MeshConfig
from jaxrl_llm.rollout.sampler import Rollout, generate
from jaxrl_llm.train.dpo import DPOConfig, _make_update
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.policy import check_tokenizer_fits, make_placement, placed_model, split_model
from jaxrl_llm.train.preference_data import FunctionJudge
from jaxrl_llm.train.scoring import resolve_reward, validate_reward_fields
from jaxrl_llm.train.validation import check_int_field, check_positive_ints, check_sampling

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig:
    """Configuration of online DPO.

    Attributes:
      run, optim: loop and optimizer settings.
      prompts_per_step: B prompts sampled per round, and pairs per DPO step.
      samples_per_prompt: K ≥ 2 answers per prompt; the pair is (best, worst).
      max_prompt_len, max_new_tokens: prompt width P and answer budget T.
      temperature, top_k, top_p, stop_token_ids: sampling options.
      beta, loss_kind, label_smoothing: the DPO loss (``ops.dpo_loss``; DPO kinds only).
      max_sampling_rounds: rounds sampled per step at most to find B prompts with a pair.
      reward_funcs, reward_weights: reward specs when ``train`` gets no judge / reward_fn.
      logprob_chunk_size: tokens per chunk of the log-prob head.
      lora: train low-rank adapters (rank 0: off); the frozen base is then the reference.
      mesh: device mesh; prompts_per_step and 2 · prompts_per_step must divide by
        data × fsdp.
    """

    run: RunConfig = RunConfig(output_dir="runs/online_dpo")
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_prompt_len: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    beta: float = 0.1
    loss_kind: str = "sigmoid"
    label_smoothing: float = 0.0
    max_sampling_rounds: int = 4
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    logprob_chunk_size: int = 1024
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("prompts_per_step", "max_prompt_len", "max_new_tokens", "max_sampling_rounds",
                                   "logprob_chunk_size"))
        check_int_field("samples_per_prompt", self.samples_per_prompt, 2, why="a pair needs two answers")
        check_sampling(self)
        if self.loss_kind not in ops.DPO_KINDS:
            raise ValueError(f"loss_kind must be one of {ops.DPO_KINDS} (online DPO keeps a reference), "
                             f"got {self.loss_kind!r}")
        self.dpo_config()  # beta / label_smoothing checks, with DPOConfig's messages
        validate_reward_fields(self.reward_funcs, self.reward_weights, 1.0)

    def dpo_config(self) -> DPOConfig:
        """The DPOConfig of the loss (beta, loss_kind, label_smoothing, chunking, LoRA)."""
        return DPOConfig(beta=self.beta, loss_kind=self.loss_kind, label_smoothing=self.label_smoothing,
                         logprob_chunk_size=self.logprob_chunk_size, lora=self.lora,
                         batch_size=self.prompts_per_step)


def best_worst_pairs(scores: np.ndarray) -> list[tuple[int, int, int]]:
    """(prompt, best sample, worst sample) for each prompt whose scores differ.

    Args:
      scores: [B, K] float, NaN where a sample could not be scored (ignored).
    """
    pairs = []
    for b, row in enumerate(np.asarray(scores, np.float64)):
        ok = np.where(np.isfinite(row))[0]
        if len(ok) < 2 or row[ok].max() == row[ok].min():
            continue
        pairs.append((b, int(ok[np.argmax(row[ok])]), int(ok[np.argmin(row[ok])])))
    return pairs


def pair_batch(rollout: Rollout | Sequence[Rollout], rows: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """The [2B, L] DPO batch of (chosen row, rejected row) pairs: tokens (prompt
    left-aligned + response), attention_mask, mask (1.0 on response tokens). Several
    rollouts of equal widths (sampling rounds) are indexed as their rows stacked in order."""
    rollouts = [rollout] if isinstance(rollout, Rollout) else list(rollout)
    tokens, full_mask, response = [], [], []
    for part in rollouts:
        t, m = (np.asarray(x) for x in part.full_tokens())
        tokens.append(t)
        full_mask.append(m)
        response.append(np.concatenate([np.zeros((t.shape[0], part.prompt_tokens.shape[1])), np.asarray(part.mask)], axis=1))
    order = [c for c, _ in rows] + [r for _, r in rows]
    return {"tokens": np.concatenate(tokens)[order].astype(np.int32),
            "attention_mask": np.concatenate(full_mask)[order].astype(np.int32),
            "mask": np.concatenate(response)[order].astype(np.float32)}


def _judge_of(judge: Any, reward_fn: Any, config: OnlineDPOConfig) -> Callable:
    if judge is not None and reward_fn is not None:
        raise ValueError("give either a judge or a reward_fn, not both")
    if judge is not None:
        if not callable(judge):
            raise TypeError(f"judge must be callable (records, tokenizer) -> scores, got {judge!r}")
        return judge
    return FunctionJudge(resolve_reward(reward_fn, config))


def train(
    config: OnlineDPOConfig,
    *,
    policy: Any,
    tokenizer: Any,
    prompts: Sequence[dict],
    judge: Callable | None = None,
    reward_fn: Callable | Sequence[Callable | str] | None = None,
    reference: Any = None,
) -> TrainResult:
    """Trains ``policy`` with online DPO (see the module docstring).

    Args:
      config: OnlineDPOConfig.
      policy: a CausalLM or a local HF checkpoint path.
      tokenizer: HF tokenizer or CharTokenizer.
      prompts: records with a ``prompt`` and extra columns (passed to the judge, e.g.
        ``answer`` for a reward function).
      judge: a preference-data judge ``judge(records, tokenizer) -> scores`` (records:
        ``{"prompt", "responses", **columns}``), e.g. ``RewardModelJudge(rm, tok)``.
      reward_fn: instead of a judge, a reward function / spec / list (TRL signature);
        None with no judge: ``config.reward_funcs``.
      reference: frozen reference model (default: the initial policy).

    Returns:
      TrainResult with the trained model and per-step metrics (DPO metrics, ``pairs``,
      ``repeated_pairs``, ``sampling_rounds``, ``reward_mean``, ``chosen_score_mean``, ...).
    """
    check_formats(prompts, "prompt")
    judge_fn = _judge_of(judge, reward_fn, config)
    check_tokenizer_fits(policy, tokenizer)
    check_tokenizer_fits(reference, tokenizer)
    b, k = config.prompts_per_step, config.samples_per_prompt
    placement = make_placement(config.mesh, policy, {"prompts_per_step": b, "2 * prompts_per_step": 2 * b})
    model = placed_model(policy, placement)
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    loader = PromptLoader(prompts, tokenizer, b, seed=config.run.seed, max_prompt_len=config.max_prompt_len,
                          padding_side="right", bucket="max")
    split = split_model(model)
    dpo_config = config.dpo_config()
    tx = make_optimizer(config.optim, config.run.total_steps)
    frozen = split.params if config.lora.enabled else None
    ref_split = split_model(placed_model(reference, placement)) if reference is not None else split
    ref_params = ref_split.params if (reference is not None or not frozen) else frozen
    update = _make_update(split, tx, dpo_config, ref_split, placement)
    trainable = init_lora(split.params, config.lora, jax.random.PRNGKey(config.run.seed + 1)) if frozen else split.params
    full_params = jax.jit(lambda a, base: apply_lora(base, a, config.lora)) if frozen else (lambda a, base: a)
    state = placement.place({"params": trainable, "opt_state": tx.init(trainable),
                             "rng": jax.random.key_data(jax.random.PRNGKey(config.run.seed))})
    loop = TrainLoop(config, config.run, desc="online_dpo")
    state, start = loop.start(state)
    if "prompt_loader" in loop.meta:
        loader.load_state_dict(loop.meta["prompt_loader"])

    for step in range(start, config.run.total_steps):
        t0 = time.perf_counter()
        rng, k_step = jax.random.split(jax.random.wrap_key_data(jnp.asarray(state["rng"])))
        current = split.merge(full_params(state["params"], frozen))
        chosen_rejected, batches, all_scores = [], [], []
        rounds = 0
        for round_ in range(config.max_sampling_rounds):
            rounds += 1
            prompt_batch = next(loader)
            with placement.context():
                rollout = generate(current, prompt_batch.tokens, prompt_batch.mask,
                                   max_new_tokens=config.max_new_tokens, num_samples=k,
                                   temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                   stop_token_ids=stop_ids, pad_token_id=pad, rng=jax.random.fold_in(k_step, round_),
                                   prompt_bucket=0, mesh=placement.mesh)
            rollout = placement.to_host(rollout)
            tokens, lengths = np.asarray(rollout.tokens), np.asarray(rollout.lengths)
            texts = [decode_ids(tokenizer, tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
                     for i in range(len(tokens))]
            records = [{**{c: v[j] for c, v in prompt_batch.columns.items()}, "prompt": prompt_batch.prompts[j],
                        "responses": texts[j * k:(j + 1) * k]} for j in range(b)]
            scores = np.array([[np.nan if s is None else float(s) for s in row]
                               for row in judge_fn(records, tokenizer)], np.float64)
            all_scores.append(scores)
            batches.append(rollout)
            chosen_rejected += [(len(batches) - 1, p * k + best, p * k + worst)
                                for p, best, worst in best_worst_pairs(scores)]
            if len(chosen_rejected) >= b:
                break
        found = len(chosen_rejected)
        t_sample = time.perf_counter() - t0
        metrics = {"pairs": float(min(found, b)), "repeated_pairs": float(max(b - found, 0) if found else 0),
                   "sampling_rounds": float(rounds)}
        scores = np.concatenate(all_scores)
        metrics["reward_mean"] = float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
        finite = True
        if found:
            picked = [chosen_rejected[i % found] for i in range(b)]  # repeat kept pairs to fill the B rows
            n = b * k  # rows per round: a round's row c is row r · n + c of the stacked rounds
            batch = pair_batch(batches, [(r * n + c, r * n + w) for r, c, w in picked])
            metrics["chosen_score_mean"] = float(np.mean([all_scores[r].reshape(-1)[c] for r, c, _ in picked]))
            metrics["rejected_score_mean"] = float(np.mean([all_scores[r].reshape(-1)[w] for r, _, w in picked]))
            metrics["response_length_mean"] = float(np.mean(batch["mask"].sum(axis=1)))
            with placement.context():
                params, opt_state, finite, m = update(state["params"], state["opt_state"], placement.rows(batch),
                                                      ref_params, frozen)
            finite, m = placement.to_host((finite, m))
            metrics.update({key: float(v) for key, v in m.items()})
            state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        else:
            logger.warning("online DPO step %d: no prompt's %d answers got different scores in %d rounds; "
                           "step skipped", step, k, rounds)
            state = {**state, "rng": jax.random.key_data(rng)}
        metrics["time_sampling"] = t_sample
        metrics["time_step"] = time.perf_counter() - t0
        loop.end_step(step, state, metrics, finite=bool(finite), meta={"prompt_loader": loader.state_dict()})

    return loop.finish(state, model=split.merge(full_params(state["params"], frozen)), tokenizer=tokenizer)
