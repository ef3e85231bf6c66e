"""GRPO quick-start: imitation copies a demonstrator's mistakes; RL with a verifier removes them.

The task is single-digit addition ("3+5=" → "8") for a tiny character-level transformer
(2 layers, width 64) trained from scratch, on CPU in about a minute (2 cores):

1. SFT on demonstrations that are right only half of the time: every training problem
   has 8 demonstrations, 4 with the sum and 4 with the sum plus one ("3+5=" → "9").
   Imitation learns the demonstrator, mistakes included, so its held-out accuracy stays
   near the demonstrator's 50%.
2. GRPO on the training prompts alone (no demonstrations), with the verifier as reward:
   1 if the answer is exactly right, else 0. It lifts held-out accuracy far above what
   imitation reached: measured 0.44–0.53 → 0.93–0.98 sampled over seeds 0–4 (greedy
   0.33–0.67 → 0.93–1.00); seed 0 with AVX2-only kernels 0.42 → 0.96, and with the other
   presets 0.92 (dr_grpo) to 0.96 (dapo, gspo).

Held out: 30 problems never seen in training, each digit the first operand of 3 and the
second of 3; the mirror of each ("5+3=" for "3+5=") is one of the 70 training problems,
so every held-out answer is a number the model has written before. Accuracy is measured
two ways: the mean reward of 32 T = 1 samples per held-out prompt (what GRPO optimises;
960 answers, so it moves little by chance) and greedy accuracy (one answer per prompt).

Run:  jaxrl-llm grpo [--preset grpo|dr_grpo|dapo|gspo|rloo] [--quick]
  or  python experiments/grpo_quickstart.py [--seed N] [...]
Writes <out>/grpo_quickstart/{metrics.jsonl, summary.json, grpo_quickstart.png} and the
SFT/GRPO run folders (config.yaml, metrics.jsonl, checkpoints/) under it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.data.tokenization import decode_ids
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rewards.arithmetic import arithmetic_reward, parse_integer_answer
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

TASK = "single-digit addition, e.g. '3+5=' → '8'"
REWARD = "reward 1 if the answer is exactly right, else 0"
DEMOS_PER_PROMPT = 8  # half of them right, half the sum plus one
DEMO_ACCURACY = 0.5
EVAL_SAMPLES = 32
# full run / --quick (a smoke test of the plumbing: too short to learn the task)
SFT_STEPS, RL_STEPS = 1000, 600
QUICK_SFT_STEPS, QUICK_RL_STEPS = 40, 8


def addition_problems() -> list[dict[str, str]]:
    """All 100 single-digit sums ``{"prompt": "a+b=", "answer": str(a + b)}``."""
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def split_problems(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): 30 held-out problems a+b, a ≠ b, whose mirror b+a is a training
    problem, every digit the first operand of 3 of them and the second of 3 (π a random
    permutation of the digits: the problems π(i)+π(i+k mod 10) for k = 1, 2, 3); the other
    70 problems (all a+a among them) are the training problems."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(10)
    held = {f"{perm[i]}+{perm[(i + k) % 10]}=" for i in range(10) for k in (1, 2, 3)}
    problems = addition_problems()
    held_out = [p for p in problems if p["prompt"] in held]
    train = [p for p in problems if p["prompt"] not in held]
    rng.shuffle(held_out)
    rng.shuffle(train)
    return train, held_out


def half_wrong_demonstrations(problems, seed: int, per_prompt: int = DEMOS_PER_PROMPT) -> list[dict[str, str]]:
    """SFT records ``{prompt, response}``: for each problem, ``per_prompt`` demonstrations,
    the first half with the right sum, the other half with the sum plus one (shuffled)."""
    if per_prompt < 2 or per_prompt % 2:
        raise ValueError(f"per_prompt must be an even number >= 2, got {per_prompt}")
    demos = [{"prompt": p["prompt"], "response": str(int(p["answer"]) + (k >= per_prompt // 2))}
             for p in problems for k in range(per_prompt)]
    order = np.random.default_rng(seed).permutation(len(demos))
    return [demos[i] for i in order]


def sample_answers(model, tokenizer, records, num_samples: int = 1, temperature: float = 0.0,
                   seed: int = 0) -> list[str]:
    """``num_samples`` completions per record (greedy when temperature is 0), record-major."""
    enc = tokenizer([r["prompt"] for r in records], padding_side="left")
    out = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=4, temperature=temperature,
                   num_samples=num_samples, stop_token_ids=(tokenizer.eos_token_id,),
                   pad_token_id=tokenizer.pad_token_id, rng=jax.random.PRNGKey(seed))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [decode_ids(tokenizer, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
            for i in range(len(tokens))]


def answer_breakdown(records, completions, num_samples: int) -> dict[str, float]:
    """Fractions of completions that are right, the sum plus one (the demonstrator's
    mistake), or anything else; ``completions`` as returned by ``sample_answers``."""
    answers = [int(r["answer"]) for r in records for _ in range(num_samples)]
    given = [parse_integer_answer(c) for c in completions]
    right = np.mean([g == a for g, a in zip(given, answers)])
    plus_one = np.mean([g == a + 1 for g, a in zip(given, answers)])
    return {"right": float(right), "plus_one": float(plus_one), "other": float(1.0 - right - plus_one)}


def heldout_accuracy(model, tokenizer, records, num_samples: int = 1, temperature: float = 0.0,
                     seed: int = 0) -> float:
    """Fraction of exactly right answers over ``records`` × ``num_samples`` responses
    (greedy when temperature is 0), scored by ``arithmetic_reward``."""
    completions = sample_answers(model, tokenizer, records, num_samples, temperature, seed)
    prompts = [r["prompt"] for r in records for _ in range(num_samples)]
    answers = [r["answer"] for r in records for _ in range(num_samples)]
    return float(np.mean(arithmetic_reward(prompts, completions, answer=answers)))


def greedy_accuracy(model, tokenizer, records) -> float:
    """Fraction of prompts whose greedy answer is exactly right."""
    return heldout_accuracy(model, tokenizer, records)


def _evaluate(model, tokenizer, held_out, seed: int) -> dict[str, float]:
    completions = sample_answers(model, tokenizer, held_out, EVAL_SAMPLES, temperature=1.0, seed=seed)
    breakdown = answer_breakdown(held_out, completions, EVAL_SAMPLES)
    return {"sampled": breakdown["right"], "greedy": greedy_accuracy(model, tokenizer, held_out), **breakdown}


def _plot(path: Path, preset: str, history: list[dict], before: dict, after: dict, n_train: int, n_held: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.5, 1]})
    fig.suptitle(
        f"GRPO quick-start — task: {TASK}\n"
        f"1) SFT imitates demonstrations that are right only half of the time (else one too many: '3+5=' → '9')\n"
        f"2) {preset} on the {n_train} training prompts, {REWARD}; "
        f"evaluated on {n_held} held-out problems never seen in training",
        fontsize=10.5)

    steps = np.array([r["step"] for r in history]) + 1
    acc = np.array([r["accuracy"] for r in history], float)
    k = max(1, min(10, len(acc) // 10))
    smooth = np.convolve(acc, np.ones(k) / k, mode="valid")
    a = ax[0]
    a.plot(steps, acc, color="C0", alpha=0.25, lw=0.8)
    a.plot(steps[k - 1:], smooth, color="C0", label=f"training prompts: reward of the sampled answers ({k}-step mean)")
    a.axhline(DEMO_ACCURACY, color="gray", ls=":", label=f"demonstrations: right {DEMO_ACCURACY:.0%} of the time")
    a.axhline(before["sampled"], color="C3", ls="--",
              label=f"held-out after SFT (imitation): {before['sampled']:.2f} (greedy {before['greedy']:.2f})")
    a.axhline(after["sampled"], color="C2", ls="--",
              label=f"held-out after {preset} (verifier): {after['sampled']:.2f} (greedy {after['greedy']:.2f})")
    a.set(xlabel=f"{preset} step (starts from the SFT model)", ylabel="accuracy (fraction exactly right)",
          ylim=(0, 1.02), title=f"{preset} on the training prompts: sampled answers, T = 1")
    a.legend(fontsize=8, loc="lower right")
    a.grid(alpha=0.3)

    b = ax[1]
    names = ["after SFT\n(imitation)", f"after {preset}\n(verifier reward)"]
    x = np.arange(2)
    bottom = np.zeros(2)
    for key, label, color in (("right", "right", "C2"), ("plus_one", "one too many (the demonstrator's mistake)", "C1"),
                              ("other", "other wrong answer", "lightgray")):
        values = np.array([before[key], after[key]])
        b.bar(x, values, 0.55, bottom=bottom, color=color, label=label)
        for xi, v, y0 in zip(x, values, bottom):
            if v >= 0.06:
                b.text(xi, y0 + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=9)
        bottom += values
    for xi, res in zip(x, (before, after)):
        b.text(xi, 1.02, f"greedy: {res['greedy']:.2f}", ha="center", va="bottom", fontsize=9)
    b.set_xticks(x, names)
    b.set(ylim=(0, 1.4), yticks=np.linspace(0, 1, 6), ylabel="fraction of held-out answers (T = 1)",
          title=f"held-out: {n_held} problems × {EVAL_SAMPLES} sampled answers")
    b.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(preset: str = "grpo", out: str = "results", quick: bool = False, seed: int = 0, *,
        sft_steps: int | None = None, rl_steps: int | None = None) -> dict:
    """SFT on half-wrong demonstrations, then GRPO-family RL with the exact-answer reward,
    on single-digit addition; prints and returns the summary (``sft_steps`` /
    ``rl_steps`` override the step counts, e.g. for a shorter test run)."""
    t0 = time.perf_counter()
    sft_steps = sft_steps or (QUICK_SFT_STEPS if quick else SFT_STEPS)
    rl_steps = rl_steps or (QUICK_RL_STEPS if quick else RL_STEPS)
    out_dir = Path(out) / "grpo_quickstart"
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = CharTokenizer()
    train_problems, held_out = split_problems(seed)
    demos = half_wrong_demonstrations(train_problems, seed)
    print(f"task: {TASK}; {len(train_problems)} training problems, {len(held_out)} held-out problems "
          f"never seen in training")

    # 1) SFT: imitate demonstrations that are right only half of the time
    model = CausalLM(tiny_config("llama", hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                 num_kv_heads=2, head_dim=16), rngs=nnx.Rngs(seed))
    sft_config = sft.SFTConfig(
        run=RunConfig(output_dir=str(out_dir / "sft"), total_steps=sft_steps, seed=seed, progress=not quick,
                      overwrite=True),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.05),
        batch_size=32, max_len=16)
    model = sft.train(sft_config, policy=model, tokenizer=tokenizer, examples=demos).model
    before = _evaluate(model, tokenizer, held_out, seed)
    print(f"after SFT on half-wrong demonstrations ({sft_steps} steps): held-out accuracy {before['sampled']:.2f} "
          f"(greedy {before['greedy']:.2f}); {before['plus_one']:.2f} of its answers are one too many, "
          f"the demonstrator's mistake")

    # 2) GRPO-family RL on the training prompts, scored by the verifier (no demonstrations)
    rl_config = grpo.GRPOConfig.preset(
        preset,
        run=RunConfig(output_dir=str(out_dir / preset), total_steps=rl_steps, seed=seed, progress=not quick,
                      overwrite=True),
        optim=OptimConfig(learning_rate=1e-3, schedule="cosine", min_lr_ratio=0.1),
        prompts_per_step=16, group_size=8, max_prompt_len=8, max_new_tokens=4, temperature=1.0)
    result = grpo.train(rl_config, policy=model, tokenizer=tokenizer, prompts=train_problems,
                        reward_fn=arithmetic_reward)
    after = _evaluate(result.model, tokenizer, held_out, seed)
    print(f"after {preset} with the verifier ({rl_steps} steps, {REWARD}): held-out accuracy "
          f"{after['sampled']:.2f} (greedy {after['greedy']:.2f}); one too many: {after['plus_one']:.2f}")

    with open(out_dir / "metrics.jsonl", "w") as f:
        for row in result.history:
            keys = ("step", "reward_mean", "accuracy", "entropy", "response_length_mean")
            f.write(json.dumps({k: row[k] for k in keys if k in row}) + "\n")
    plot_path = out_dir / "grpo_quickstart.png"
    _plot(plot_path, preset, result.history, before, after, len(train_problems), len(held_out))

    summary = {
        "preset": preset,
        "seed": seed,
        "task": TASK,
        "reward": REWARD,
        "sft_steps": sft_steps,
        "rl_steps": rl_steps,
        "train_prompts": len(train_problems),
        "held_out_prompts": len(held_out),
        "demonstration_accuracy": DEMO_ACCURACY,
        "held_out_accuracy_after_sft": before["greedy"],
        "held_out_accuracy_after_rl": after["greedy"],
        "held_out_sampled_accuracy_after_sft": before["sampled"],
        "held_out_sampled_accuracy_after_rl": after["sampled"],
        "held_out_plus_one_after_sft": before["plus_one"],
        "held_out_plus_one_after_rl": after["plus_one"],
        "train_accuracy_first_steps": float(np.mean([r["accuracy"] for r in result.history[:3]])),
        "train_accuracy_last_steps": float(np.mean([r["accuracy"] for r in result.history[-3:]])),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out_dir / "summary.json")
    print(f"held-out accuracy: {before['sampled']:.2f} after SFT → {after['sampled']:.2f} after {preset} "
          f"(greedy {before['greedy']:.2f} → {after['greedy']:.2f}) in {summary['seconds']:.0f} s")
    print(f"wrote {out_dir / 'summary.json'} and {plot_path}")
    return summary
