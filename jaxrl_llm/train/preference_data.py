"""Preference data (RLHF stage 3): judge the candidates of each prompt and write pairwise
(``prompt/chosen/rejected``) or k-wise ranked (``prompt/responses/ranking``) records.

Judges score the K candidates of a prompt:

- ``FunctionJudge(fn)``: a reward function with the TRL signature
  ``fn(prompts, completions, **columns) -> list[float | None]`` (None: not scored);
- ``RewardModelJudge(model, tokenizer)``: a reward model's score at the last valid token
  of prompt + response (``train.reward_model``);
- ``AIFeedbackJudge(lm, tokenizer)``: RLAIF — a local causal LM is shown a comparison
  prompt with two answers and the probability that it prefers the first is
  σ(log p("A" | prompt) − log p("B" | prompt)); with ``swap=True`` the pair is also asked
  in the other order and the two are averaged (removes position bias). A prompt's K
  candidates are compared in every pair and scored by their mean win probability.

Model-based judges run on a device mesh (``mesh=MeshConfig(...)``, default: every device,
data parallel): the model is placed by the sharding rules once, and each scoring batch
(``batch_size`` rows, which must divide by data × fsdp) is split over the batch axes.

``build_preferences`` turns scores into records with ``data.preferences_from_scores``
(ties dropped or kept with label 0.5); ``judge_agreement`` measures how two judges agree
on every candidate pair (Cohen's κ, ``data.cohens_kappa``).

References:
  Bai et al. 2022, Constitutional AI, https://arxiv.org/abs/2212.08073
  Lee et al. 2023, RLAIF, https://arxiv.org/abs/2309.00267
  Cohen 1960, A coefficient of agreement for nominal scales.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.padding import bucket_length, pad_rows
from jaxrl_llm.data.preferences import SCORE_MODES, TIE_POLICIES, cohens_kappa, preferences_from_scores
from jaxrl_llm.data.records import save_records, validate_records
from jaxrl_llm.data.tokenization import encode_text, pad_id, render_prompt, response_text
from jaxrl_llm.parallel.placement import MeshConfig
from jaxrl_llm.rewards.combine import safe_reward_fn
from jaxrl_llm.train.policy import make_placement, placed_model, response_logprobs, split_model
from jaxrl_llm.train.reward_model import as_reward_model, score_sequences

DEFAULT_TEMPLATE = (
    "Which answer to the question is better?\nQuestion: {prompt}\nAnswer A: {first}\nAnswer B: {second}\n"
    "The better answer is"
)

Scores = list[list[float | None]]


def _check_candidates(records: Sequence[dict]) -> None:
    validate_records(records, required=("prompt", "responses"))
    for i, rec in enumerate(records):
        resp = rec["responses"]
        if isinstance(resp, str) or not isinstance(resp, Sequence):
            raise ValueError(f"record {i}: 'responses' must be a list of responses, got {type(resp).__name__}")


# ---------------------------------------------------------------------------- judges


class FunctionJudge:
    """Scores each candidate with a TRL-style reward function (exceptions / NaN → None)."""

    def __init__(self, fn: Callable):
        self.fn = safe_reward_fn(fn)

    def __call__(self, records: Sequence[dict], tokenizer: Any = None) -> Scores:
        _check_candidates(records)
        prompts, completions, owners = [], [], []
        columns: dict[str, list] = {k: [] for r in records for k in r if k not in ("prompt", "responses")}
        for i, rec in enumerate(records):
            for resp in rec["responses"]:
                prompts.append(rec["prompt"])
                completions.append(resp)
                owners.append(i)
                for key in columns:
                    columns[key].append(rec.get(key))
        flat = self.fn(prompts, completions, **columns) if completions else []
        out: Scores = [[] for _ in records]
        for owner, value in zip(owners, flat):
            out[owner].append(value)
        return out


class RewardModelJudge:
    """Scores prompt + response (+ eos, as in reward-model training) with a reward model.

    Args:
      model: RewardModel / ScalarHeadModel / CausalLM backbone / checkpoint path.
      tokenizer: the reward model's tokenizer.
      max_len: longest prompt + response; longer responses are cut at the end.
      batch_size: rows per forward (must divide by mesh.data × mesh.fsdp).
      add_eos: append eos to each response (match the reward model's training).
      mesh: device mesh the reward model is placed on (params sharded by the rules);
        each forward's rows are split over data × fsdp.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_len: int = 512, batch_size: int = 32, add_eos: bool = True,
                 mesh: MeshConfig = MeshConfig()):
        self.placement = make_placement(mesh, model, {"batch_size": batch_size})
        # placed by the rules; a checkpoint path is streamed straight into its sharding
        self.model = as_reward_model(model, placement=self.placement)
        self.tokenizer, self.max_len, self.batch_size, self.add_eos = tokenizer, max_len, batch_size, add_eos

    def __call__(self, records: Sequence[dict], tokenizer: Any = None) -> Scores:
        _check_candidates(records)
        tok = self.tokenizer
        rows, owners = [], []
        for i, rec in enumerate(records):
            p = encode_text(tok, render_prompt(tok, rec["prompt"]))
            if not p:
                raise ValueError(f"record {i}: prompt encodes to 0 tokens")
            if len(p) >= self.max_len:
                raise ValueError(f"record {i}: prompt has {len(p)} tokens, no room for a response within "
                                 f"max_len={self.max_len}")
            for resp in rec["responses"]:
                r = encode_text(tok, response_text(resp), add_eos=self.add_eos)
                rows.append((p + r)[: self.max_len])
                owners.append(i)
        out: Scores = [[] for _ in records]
        if not rows:
            return out
        tokens, mask = pad_rows(rows, bucket_length(max(len(r) for r in rows), 16, self.max_len), pad_id(tok))
        scores = score_sequences(self.model, tokens, mask, self.batch_size, placement=self.placement)
        for owner, value in zip(owners, scores):
            out[owner].append(float(value))
        return out


@functools.partial(jax.jit, static_argnames=("graph", "prompt_len"))
def _label_logprobs(params, rest, tokens, full_mask, label_mask, *, graph, prompt_len):
    model = nnx.merge(graph, params, rest)
    logp = response_logprobs(model, tokens, full_mask, prompt_len).logprobs
    return ops.masked_sum(logp, label_mask, axis=-1)


class AIFeedbackJudge:
    """RLAIF pairwise judge: a local causal LM compares two answers.

      P(first preferred) = σ(log p(label_A | c(x, a, b)) − log p(label_B | c(x, a, b)))

    where c is ``template`` filled with the prompt and both answers and the labels are
    ``labels`` (e.g. " A" / " B"), scored by teacher forcing (sum of the label tokens'
    log-probs). ``swap=True`` also asks c(x, b, a) and averages
    ½·(P(a ≻ b | a first) + 1 − P(b ≻ a | b first)).

    Args:
      model: CausalLM or a local checkpoint path.
      tokenizer: the LM's tokenizer.
      template: str.format template with {prompt}, {first}, {second}.
      labels: texts naming the first / second answer.
      swap: ask both orders.
      max_prompt_len: longest comparison prompt in tokens (longer: ValueError).
      batch_size: comparisons per forward (must divide by mesh.data × mesh.fsdp).
      mesh: device mesh the LM is placed on (params sharded by the rules); each
        forward's comparisons are split over data × fsdp.
    """

    def __init__(self, model: Any, tokenizer: Any, *, template: str = DEFAULT_TEMPLATE,
                 labels: tuple[str, str] = (" A", " B"), swap: bool = True, max_prompt_len: int = 512,
                 batch_size: int = 16, mesh: MeshConfig = MeshConfig()):
        for key in ("{prompt}", "{first}", "{second}"):
            if key not in template:
                raise ValueError(f"template must contain {key}; got {template!r:.120}")
        if len(labels) != 2 or labels[0] == labels[1]:
            raise ValueError(f"labels must be two different strings, got {labels!r}")
        self.placement = make_placement(mesh, model, {"batch_size": batch_size})
        self.model = placed_model(model, self.placement)
        self.tokenizer, self.template, self.swap = tokenizer, template, swap
        self.max_prompt_len, self.batch_size = max_prompt_len, batch_size
        self.label_ids = [encode_text(tokenizer, label) for label in labels]
        if not all(self.label_ids):
            raise ValueError(f"labels {labels!r} must encode to at least one token each")

    def _prompt_text(self, prompt, first, second) -> str:
        question = prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt)
        return self.template.format(prompt=question, first=response_text(first), second=response_text(second))

    def prefer_first(self, comparisons: Sequence[tuple[Any, Any, Any]]) -> np.ndarray:
        """[C] P(first answer preferred) for (prompt, first, second) triples (one order)."""
        tok = self.tokenizer
        prompts = []
        for i, (prompt, first, second) in enumerate(comparisons):
            ids = encode_text(tok, self._prompt_text(prompt, first, second))
            if len(ids) > self.max_prompt_len:
                raise ValueError(f"comparison {i}: the judge prompt has {len(ids)} tokens > max_prompt_len="
                                 f"{self.max_prompt_len}; raise max_prompt_len or shorten the template")
            prompts.append(ids)
        if not prompts:
            return np.zeros((0,), np.float32)
        p_len = bucket_length(max(len(p) for p in prompts), 16, None)
        t_len = max(len(ids) for ids in self.label_ids)
        pad = pad_id(tok)
        prompt_tok, prompt_mask = pad_rows(prompts, p_len, pad, "left")
        split = split_model(self.model)
        label_logp = functools.partial(_label_logprobs, split.params, split.rest, graph=split.graphdef,
                                       prompt_len=p_len)
        logps = []
        for label in self.label_ids:
            lab_tok, lab_mask = pad_rows([label] * len(prompts), t_len, pad)
            tokens = np.concatenate([prompt_tok, lab_tok], 1)
            full = np.concatenate([prompt_mask, lab_mask], 1)
            logps.append(self.placement.forward_rows(label_logp, (tokens, full, lab_mask.astype(np.float32)),
                                                     self.batch_size))
        return np.asarray(jax.nn.sigmoid(jnp.asarray(logps[0] - logps[1])), np.float64)

    def compare(self, prompt, first, second) -> float:
        """P(first ≻ second) for one pair (both orders averaged when ``swap``)."""
        return float(self.compare_many([(prompt, first, second)])[0])

    def compare_many(self, comparisons: Sequence[tuple[Any, Any, Any]]) -> np.ndarray:
        p = self.prefer_first(comparisons)
        if self.swap:
            p = 0.5 * (p + 1.0 - self.prefer_first([(x, b, a) for x, a, b in comparisons]))
        return p

    def __call__(self, records: Sequence[dict], tokenizer: Any = None) -> Scores:
        """Mean win probability of each candidate against the prompt's other candidates."""
        _check_candidates(records)
        triples, where = [], []
        for i, rec in enumerate(records):
            for a, b in itertools.combinations(range(len(rec["responses"])), 2):
                triples.append((rec["prompt"], rec["responses"][a], rec["responses"][b]))
                where.append((i, a, b))
        probs = self.compare_many(triples)
        wins = [np.zeros(len(r["responses"])) for r in records]
        for (i, a, b), p in zip(where, probs):
            wins[i][a] += p
            wins[i][b] += 1.0 - p
        return [(w / max(len(w) - 1, 1)).tolist() for w in wins]


# ---------------------------------------------------------------------------- records


def ranking_from_scores(scores: Sequence[float], tie_eps: float = 0.0) -> list[int]:
    """Ranks of scores (higher is better): rank = 1 + the number of scores higher by more
    than tie_eps, so 1 is best and tied scores share a rank ([3, 1, 3] → [1, 3, 1])."""
    s = np.asarray(scores, np.float64)
    return [int(1 + np.sum(s > x + tie_eps)) for x in s]


def build_preferences(
    candidates: Sequence[dict],
    judge: Callable[..., Scores],
    *,
    mode: str = "pairwise",
    ties: str = "drop",
    tie_eps: float = 0.0,
    output_path: str | Path | None = None,
) -> list[dict]:
    """Judges each prompt's candidates and builds preference records.

    Args:
      candidates: records {prompt, responses: [K], <columns>} (stage 2's output).
      judge: ``judge(candidates) -> [[score | None] * K] * prompts`` (FunctionJudge,
        RewardModelJudge, AIFeedbackJudge, or any callable alike).
      mode: "pairwise" (every pair, better one chosen), "best_worst" (one pair per
        prompt), or "kwise" (one ranked record per prompt).
      ties: "drop" or "half" (tied pairs kept with label 0.5); see
        ``data.preferences_from_scores``.
      tie_eps: scores closer than this are ties.
      output_path: write the records (.jsonl / .json / .parquet).

    Returns:
      pairwise: {"prompt", "chosen", "rejected", "label", "chosen_score",
      "rejected_score"}; kwise: {"prompt", "responses" (best → worst), "ranking" (1 =
      best, ties share a rank), "scores"}. Candidates the judge could not score are left
      out; prompts with fewer than 2 scored candidates give no record.
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode must be one of {SCORE_MODES}, got {mode!r}")
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {TIE_POLICIES}, got {ties!r}")
    _check_candidates(candidates)
    scores = judge(candidates)
    if len(scores) != len(candidates):
        raise ValueError(f"judge returned scores for {len(scores)} prompts, expected {len(candidates)}")
    records = preferences_from_scores([c["prompt"] for c in candidates], [c["responses"] for c in candidates],
                                      scores, mode=mode, tie_eps=tie_eps, ties=ties)
    if mode == "kwise":
        records = [{"prompt": r["prompt"], "responses": r["responses"],
                    "ranking": ranking_from_scores(r["scores"], tie_eps), "scores": r["scores"]} for r in records]
    if output_path is not None:
        if not records:
            raise ValueError(f"no preference records to write to {str(output_path)!r}: every prompt had fewer than "
                             "2 scored candidates or only ties")
        save_records(records, output_path)
    return records


def pair_labels(scores: Scores, tie_eps: float = 0.0) -> list[float]:
    """For every prompt and candidate pair (i < j): 1.0 (i better), 0.0 (j better) or 0.5
    (tie within tie_eps); pairs with an unscored candidate give None."""
    out = []
    for row in scores:
        for i, j in itertools.combinations(range(len(row)), 2):
            a, b = row[i], row[j]
            if a is None or b is None:
                out.append(None)
            elif abs(a - b) <= tie_eps:
                out.append(0.5)
            else:
                out.append(1.0 if a > b else 0.0)
    return out


def judge_agreement(candidates: Sequence[dict], judge_a: Callable[..., Scores], judge_b: Callable[..., Scores],
                    *, tie_eps: float = 0.0) -> dict[str, float]:
    """Agreement of two judges on every candidate pair (pairs either could not score are
    left out).

    Returns:
      {"kappa": Cohen's κ over the labels {better, worse, tie}, "agreement": raw
      fraction of equal labels, "num_pairs": pairs compared}.
    """
    la = pair_labels(judge_a(candidates), tie_eps)
    lb = pair_labels(judge_b(candidates), tie_eps)
    both = [(x, y) for x, y in zip(la, lb) if x is not None and y is not None]
    if not both:
        raise ValueError("no candidate pair was scored by both judges")
    a, b = zip(*both)
    return {"kappa": cohens_kappa(a, b), "agreement": float(np.mean([x == y for x, y in both])),
            "num_pairs": len(both)}
