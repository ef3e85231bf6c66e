"""Knowledge distillation into a student policy: on-policy (the student samples, the
teacher scores every token of the sample) and off-policy (dataset completions), mixed as
in GKD.

Per step: B prompts → with probability λ (``lmbda``) the student samples a completion for
each, else the records' ``completion`` is used → one forward of the student and one of
the frozen teacher over prompt + completion → a token-level divergence between their
next-token distributions on the completion tokens (``ops.distill_divergence``: forward
KL, reverse KL or the generalised Jensen–Shannon divergence JSD(β), computed from the
hidden states with a chunked head, so neither model's float32 [B, T, V] logits are
materialised whole) → one optimizer step on the student.

λ = 0 with ``divergence="forward_kl"`` is classic token-level KD on fixed data
(supervised KD); λ = 1 with ``"reverse_kl"`` is on-policy distillation (the student is
pulled towards the teacher where it actually goes); GKD interpolates both axes.

Shapes: B prompts per step, P prompt width, T = max_new_tokens, L = P + T, D hidden, V
vocabulary (shared by teacher and student: the same tokenizer).

References:
  Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD),
  https://arxiv.org/abs/2306.13649
  Gu et al. 2024, MiniLLM (reverse KL), https://arxiv.org/abs/2306.08543
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm import ops
from jaxrl_llm.data.formats import check_formats
from jaxrl_llm.data.prompts import PromptBatch, PromptLoader
from jaxrl_llm.data.tokenization import encode_text, eos_id, pad_id, response_text
from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.rollout.sampler import Rollout, generate
from jaxrl_llm.train.guard import apply_if_finite
from jaxrl_llm.train.loop import RunConfig, TrainLoop, TrainResult
from jaxrl_llm.train.lora import LoRAConfig, apply_lora, init_lora
from jaxrl_llm.train.optim import OptimConfig, make_optimizer
from jaxrl_llm.train.policy import check_tokenizer_fits, make_placement, placed_model, split_model
from jaxrl_llm.train.validation import check_int_field, check_positive_ints, check_real, check_sampling

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Configuration of (on-policy) distillation.

    Attributes:
      run, optim: loop and optimizer settings.
      prompts_per_step: B prompts per step.
      max_prompt_len: prompts are padded to this; longer ones are an error.
      max_new_tokens: T, the completion budget (student samples and dataset completions,
        which are cut to it).
      temperature, top_k, top_p, stop_token_ids: the student's sampling.
      lmbda: GKD's λ, the probability that a step trains on the student's own samples
        (1: on-policy only; 0: the records' ``completion`` only).
      divergence: "forward_kl" KL(teacher ‖ student), "reverse_kl" KL(student ‖ teacher)
        or "jsd" (generalised Jensen–Shannon with weight ``beta``).
      beta: JSD(β) interpolation weight (``ops.distill_divergence``).
      distill_temperature: both models' logits are divided by this before the divergence.
      teacher_top_k: keep only the teacher's top-k logits (None: the full vocabulary).
      loss_agg: ``aggregate_loss`` mode over completion tokens.
      logprob_chunk_size: tokens per chunk of the chunked divergence head.
      lora: train low-rank adapters of the student instead of all weights (rank 0: off).
      mesh: device mesh (data × fsdp × tensor) of student and teacher; prompts_per_step
        must divide by data × fsdp.
    """

    run: RunConfig = RunConfig(output_dir="runs/distill")
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    prompts_per_step: int = 8
    max_prompt_len: int = 64
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    lmbda: float = 1.0
    divergence: str = "reverse_kl"
    beta: float = 0.5
    distill_temperature: float = 1.0
    teacher_top_k: int | None = None
    loss_agg: str = "token_mean"
    logprob_chunk_size: int = 256
    lora: LoRAConfig = LoRAConfig()
    mesh: MeshConfig = MeshConfig()

    def __post_init__(self):
        check_positive_ints(self, ("prompts_per_step", "max_prompt_len", "max_new_tokens", "logprob_chunk_size"))
        check_sampling(self)
        check_real("lmbda", self.lmbda, low=0, high=1, why="the probability of an on-policy step")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        check_real("beta", self.beta, low=0, high=1, why="the JSD(β) interpolation weight")
        check_real("distill_temperature", self.distill_temperature, low=0, low_open=True,
                   why="both models' logits are divided by it")
        check_int_field("teacher_top_k", self.teacher_top_k, 1, optional=True, why="None: the full vocabulary")
        if self.loss_agg not in ops.AGGREGATION_MODES:
            raise ValueError(f"loss_agg must be one of {ops.AGGREGATION_MODES}, got {self.loss_agg!r}")


def dataset_rollout(prompts: PromptBatch, records: Sequence[dict], tokenizer: Any, max_new_tokens: int,
                    pad: int) -> Rollout:
    """The records' ``completion`` (text or an assistant message) as a Rollout: ids +
    eos, cut to ``max_new_tokens`` (then not "finished"), right-padded.

    Raises:
      ValueError: a record of the batch has no ``completion`` (needed when lmbda < 1).
    """
    rows, finished = [], []
    for i in prompts.indices:
        record = records[int(i)]
        if record.get("completion") is None:
            raise ValueError(f"record {int(i)} has no 'completion': with lmbda < 1 the off-policy steps train on the "
                             f"records' completions (give one per record, or set lmbda=1); keys: {sorted(record)}")
        ids = encode_text(tokenizer, response_text(record["completion"], "completion"), add_eos=True)
        finished.append(len(ids) <= max_new_tokens)
        rows.append(ids[:max_new_tokens])
    tokens = np.full((len(rows), max_new_tokens), pad, np.int32)
    mask = np.zeros((len(rows), max_new_tokens), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)], mask[r, : len(ids)] = ids, 1
    return Rollout(prompt_tokens=np.asarray(prompts.tokens), prompt_mask=np.asarray(prompts.mask), tokens=tokens,
                   logprobs=np.zeros(tokens.shape, np.float32), mask=mask, lengths=mask.sum(axis=1).astype(np.int32),
                   finished=np.asarray(finished))


def distill_objective(student, teacher, tokens, full_mask, mask, prompt_len: int, config: DistillConfig):
    """(loss, metrics) of one batch: the divergence on the completion tokens.

    Args:
      student, teacher: CausalLMs sharing the vocabulary (the teacher gets no gradient).
      tokens, full_mask: [B, L] prompt (left-aligned) + completion, 1 on real tokens.
      mask: [B, T] 1 on completion tokens.
      prompt_len: P (static): the hidden state at column P − 1 + t predicts token t.
    """
    predicting = slice(prompt_len - 1, tokens.shape[1] - 1)
    hs = student.forward(tokens, attention_mask=full_mask, return_hidden=True).hidden[:, predicting]
    ht = jax.lax.stop_gradient(teacher.forward(tokens, attention_mask=full_mask, return_hidden=True).hidden[:, predicting])
    per_token = ops.distill_divergence(hs, student.unembed, ht, jax.lax.stop_gradient(teacher.unembed), mask,
                                       kind=config.divergence, beta=config.beta,
                                       temperature=config.distill_temperature, chunk_size=config.logprob_chunk_size,
                                       teacher_top_k=config.teacher_top_k)
    loss = ops.aggregate_loss(per_token, mask, config.loss_agg)
    return loss, {"divergence": ops.masked_mean(per_token, mask)}


def _make_update(split, teacher_split, tx, config: DistillConfig, placement: Placement, prompt_len: int):
    def update(params, opt_state, teacher_params, batch, frozen=None):
        teacher = teacher_split.merge(teacher_params)

        def loss_fn(p):
            full = apply_lora(frozen, p, config.lora) if config.lora.enabled else p
            return distill_objective(split.merge(full), teacher, batch["tokens"], batch["full_mask"], batch["mask"],
                                     prompt_len, config)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params, opt_state, finite = apply_if_finite(tx, params, opt_state, grads, loss)
        params, opt_state = placement.constrain((params, opt_state))
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return params, opt_state, finite, {"loss": loss, "grad_norm": grad_norm, **metrics}

    return jax.jit(update)


def train(
    config: DistillConfig,
    *,
    student: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[dict],
) -> TrainResult:
    """Distils ``teacher`` into ``student`` on the prompts (GKD; see the module docstring).

    Args:
      config: DistillConfig.
      student: the CausalLM (or local HF checkpoint path) to train.
      teacher: a frozen CausalLM (or path) of any size or family with the student's
        vocabulary (the same tokenizer).
      tokenizer: HF tokenizer or CharTokenizer.
      prompts: records with a ``prompt`` (string or chat messages) and, when lmbda < 1,
        a ``completion`` (TRL's prompt/completion format).

    Returns:
      TrainResult with the trained student and per-step metrics (``divergence``,
      ``on_policy``, ``response_length_mean``, ...).
    """
    check_formats(prompts, "prompt")
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            raise ValueError(f"{name} is required")
        check_tokenizer_fits(model, tokenizer)
    placement = make_placement(config.mesh, student, {"prompts_per_step": config.prompts_per_step})
    model = placed_model(student, placement)
    teacher_model = placed_model(teacher, placement)
    if teacher_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher vocab_size={teacher_model.config.vocab_size} != student vocab_size="
                         f"{model.config.vocab_size}: distillation compares next-token distributions over one "
                         "vocabulary (the same tokenizer, the same embedding rows)")
    pad = pad_id(tokenizer)
    stop_ids = tuple(dict.fromkeys((eos_id(tokenizer), *config.stop_token_ids)))
    loader = PromptLoader(prompts, tokenizer, config.prompts_per_step, seed=config.run.seed,
                          max_prompt_len=config.max_prompt_len, padding_side="right", bucket="max")
    split, teacher_split = split_model(model), split_model(teacher_model)
    tx = make_optimizer(config.optim, config.run.total_steps)
    update = _make_update(split, teacher_split, tx, config, placement, config.max_prompt_len)
    frozen = split.params if config.lora.enabled else None
    trainable = init_lora(split.params, config.lora, jax.random.PRNGKey(config.run.seed + 1)) if frozen else split.params
    full_params = jax.jit(lambda a, base: apply_lora(base, a, config.lora)) if frozen else (lambda a, base: a)
    state = placement.place({"params": trainable, "opt_state": tx.init(trainable),
                             "rng": jax.random.key_data(jax.random.PRNGKey(config.run.seed))})
    loop = TrainLoop(config, config.run, desc="distill")
    state, start = loop.start(state)
    if "prompt_loader" in loop.meta:
        loader.load_state_dict(loop.meta["prompt_loader"])

    for step in range(start, config.run.total_steps):
        t0 = time.perf_counter()
        rng, k_step = jax.random.split(jax.random.wrap_key_data(jnp.asarray(state["rng"])))
        prompt_batch = next(loader)
        # the step's data source is a function of (seed, step): a resumed run makes the same choice
        on_policy = bool(np.random.default_rng((config.run.seed, step, 30_000)).random() < config.lmbda)
        if on_policy:
            with placement.context():
                rollout = generate(
                    split.merge(full_params(state["params"], frozen)), prompt_batch.tokens, prompt_batch.mask,
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                    top_p=config.top_p, stop_token_ids=stop_ids, pad_token_id=pad, rng=k_step, prompt_bucket=0,
                    mesh=placement.mesh)
            rollout = placement.to_host(rollout)
        else:
            rollout = dataset_rollout(prompt_batch, prompts, tokenizer, config.max_new_tokens, pad)
        t_sample = time.perf_counter() - t0
        tokens, full_mask = placement.to_host(rollout.full_tokens())
        mask = np.asarray(rollout.mask, np.float32)
        batch = placement.rows({"tokens": np.asarray(tokens), "full_mask": np.asarray(full_mask), "mask": mask})
        with placement.context():
            params, opt_state, finite, metrics = update(state["params"], state["opt_state"], teacher_split.params,
                                                        batch, frozen)
        state = {"params": params, "opt_state": opt_state, "rng": jax.random.key_data(rng)}
        finite, metrics = placement.to_host((finite, metrics))
        lengths = np.asarray(rollout.lengths)
        metrics = {**{k: float(v) for k, v in metrics.items()}, "on_policy": float(on_policy),
                   "response_length_mean": float(lengths.mean()),
                   "truncated_fraction": float(np.mean(~np.asarray(rollout.finished))),
                   "time_sampling": t_sample, "time_step": time.perf_counter() - t0}
        loop.end_step(step, state, metrics, finite=bool(finite), meta={"prompt_loader": loader.state_dict()})

    return loop.finish(state, model=split.merge(full_params(state["params"], frozen)), tokenizer=tokenizer)
