"""Shared setup of the reasoning-RL experiments (GRPO family on a verifiable task).

Task: single-digit addition "a+b=" (100 problems, 30 held out). The reward reads only the
FIRST LINE of the completion (1.0 iff it is exactly the answer). A short SFT warm start
(60 steps) leaves held-out accuracy well below 1, so RL has room to improve. For the
length experiments the SFT targets are "answer\n" followed by 0..filler_max filler dots
and eos: the warm-started policy has varied response lengths, and since the reward
ignores everything after the first line, how lengths drift under RL is decided by the
loss (aggregation, overlong penalty), not by the task reward.

Pieces:
  make_task()            train / held-out prompt records
  warm_start(...)        tiny CausalLM after SFT, cached on disk (safetensors) per settings
  RewardRecorder         wraps the reward function and keeps every sampling round's rewards,
                         so per-step statistics are available before any filtering (DAPO)
  base_config(...)       the shared RL budget for a preset
  run_rl(...)            grpo.train + per-step rows (history + recorder) + held-out eval
  evaluate(...)          held-out greedy accuracy and sampled (T = 1) accuracy / lengths
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxrl_llm.data.tokenization import decode_ids
from jaxrl_llm.models import CausalLM, CharTokenizer, load_hf, save_hf, tiny_config
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset, make_arithmetic_reward
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import grpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig

MAX_OPERAND = 9
OPS = "+"
HELD_OUT = 30
PROMPT_LEN = 8
SFT_STEPS = 60
MAX_NEW_TOKENS = 6
LEARNING_RATE = 1e-3
LOG_KEYS = ("step", "sampled_accuracy", "accuracy", "reward_mean", "entropy", "response_length_mean", "sampled_chars",
            "truncated_fraction", "clipfrac", "approx_kl", "ratio_mean", "routing_change", "grad_norm", "loss",
            "informative_groups_before", "informative_groups_after", "all_correct_groups", "all_wrong_groups",
            "generations", "sampling_rounds", "skipped_no_signal", "chars_correct", "chars_wrong")
MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
MOE_MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)

# Reward: the first line must be exactly the integer answer (eos is stripped on decode).
reward_fn = make_arithmetic_reward(end_marker="\n", name="first_line_answer")
TOKENIZER = CharTokenizer()


def enable_compile_cache() -> None:
    """Persistent XLA cache shared by the experiment processes (same shapes → no recompiles)."""
    path = os.environ.get("JAXRL_EXPERIMENT_JAX_CACHE", str(Path(tempfile.gettempdir()) / "jaxrl_llm_jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def make_task(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train records, held-out records): all distinct problems, a fixed held-out split
    (the same for every seed; seeds change init, data order and sampling)."""
    data = make_arithmetic_dataset(4000, 1234, max_operand=MAX_OPERAND, ops=OPS)
    unique = sorted({d["prompt"]: d for d in data}.values(), key=lambda d: d["prompt"])
    rng = np.random.default_rng(1234)
    rng.shuffle(unique)
    del seed
    return unique[HELD_OUT:], unique[:HELD_OUT]


def _sft_examples(records: list[dict], seed: int, filler_max: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(3):
        for r in records:
            tail = "\n" + "." * int(rng.integers(0, filler_max + 1)) if filler_max else ""
            out.append({"prompt": r["prompt"], "response": r["answer"] + tail})
    return out


def warm_start(seed: int, *, sft_steps: int = 150, family: str = "llama", filler_max: int = 0,
               cache_dir: str | None = None) -> CausalLM:
    """Tiny model after a short SFT on the task, cached on disk (safetensors) per settings."""
    model_kw = MOE_MODEL if family == "qwen3_moe" else MODEL
    key = json.dumps(dict(seed=seed, sft_steps=sft_steps, family=family, model=model_kw, task=(MAX_OPERAND, OPS, filler_max),
                          v=2), sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("JAXRL_EXPERIMENT_CACHE", Path(tempfile.gettempdir()) / "jaxrl_llm_warm_start"))
    path = root / f"{family}_seed{seed}_sft{sft_steps}_{digest}"
    if (path / "config.json").exists():
        model, _ = load_hf(str(path))
        return model
    train_records, _ = make_task(seed)
    model = CausalLM(tiny_config(family, **model_kw), rngs=nnx.Rngs(seed))
    config = sft.SFTConfig(
        run=RunConfig(output_dir=f"{path}.run{os.getpid()}", total_steps=sft_steps, seed=seed, progress=False,
                      overwrite=True),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10), batch_size=32, max_len=24)
    model = sft.train(config, policy=model, tokenizer=TOKENIZER, examples=_sft_examples(train_records, seed, filler_max)).model
    shutil.rmtree(config.run.output_dir, ignore_errors=True)  # only the exported model is cached
    tmp = Path(str(path) + f".tmp{os.getpid()}")
    save_hf(model, str(tmp))
    if path.exists():  # another process cached the same warm start meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return model


def _nanmean(x) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


class RewardRecorder:
    """The task reward, recording every call: rewards [N] and completion lengths [N]."""

    def __init__(self, group_size: int):
        self.group_size = group_size
        self.calls: list[dict] = []
        self.__name__ = reward_fn.__name__

    def __call__(self, prompts, completions, **columns):
        scores = reward_fn(prompts, completions, **columns)
        r = np.array([0.0 if s is None else s for s in scores], np.float32)
        self.calls.append({"rewards": r, "chars": np.array([len(c) for c in completions])})
        return scores

    def per_step(self, history: list[dict]) -> list[dict]:
        """Per-step stats of the FIRST sampling round (before any dynamic-sampling filter),
        mapping calls to steps with the history's ``sampling_rounds``."""
        rows, i = [], 0
        for h in history:
            first = self.calls[i]
            i += int(h.get("sampling_rounds", 1))
            g = first["rewards"].reshape(-1, self.group_size)
            rows.append({
                "sampled_accuracy": float(first["rewards"].mean()),
                "all_correct_groups": float(np.mean(g.min(axis=1) == 1.0)),
                "all_wrong_groups": float(np.mean(g.max(axis=1) == 0.0)),
                "sampled_chars": float(first["chars"].mean()),
                "chars_correct": _nanmean(first["chars"][first["rewards"] == 1.0]),
                "chars_wrong": _nanmean(first["chars"][first["rewards"] != 1.0]),
            })
        return rows


def evaluate(model, records: list[dict], *, max_new_tokens: int, samples: int = 4, seed: int = 0) -> dict:
    """Held-out greedy accuracy, and sampled (T = 1) accuracy, length, truncation."""
    enc = TOKENIZER([r["prompt"] for r in records], padding_side="left")
    answers = [r["answer"] for r in records]
    out = {}
    for name, temp, g in (("greedy", 0.0, 1), ("sampled", 1.0, samples)):
        ro = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens, num_samples=g,
                      temperature=temp, stop_token_ids=(TOKENIZER.eos_token_id,), pad_token_id=TOKENIZER.pad_token_id,
                      rng=jax.random.PRNGKey(10_000 + seed))
        tokens, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
        comps = [decode_ids(TOKENIZER, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(len(tokens))]
        prompts = [r["prompt"] for r in records for _ in range(g)]
        scores = reward_fn(prompts, comps, answer=[a for a in answers for _ in range(g)])
        out[f"{name}_accuracy"] = float(np.mean(scores))
        if name == "sampled":
            out["sampled_length_mean"] = float(lengths.mean())
            out["sampled_truncated"] = float(np.mean(~np.asarray(ro.finished)))
            out["sampled_lengths"] = lengths.tolist()
    return out


def base_config(preset: str, *, steps: int, seed: int, out_dir: str, max_new_tokens: int = MAX_NEW_TOKENS,
                **overrides) -> grpo.GRPOConfig:
    """The shared RL budget: 16 prompts × 8 samples per step, AdamW at LEARNING_RATE."""
    fields = dict(
        run=RunConfig(output_dir=out_dir, total_steps=steps, seed=seed, progress=False, overwrite=True),
        optim=OptimConfig(learning_rate=LEARNING_RATE), prompts_per_step=16, group_size=8, max_prompt_len=PROMPT_LEN,
        max_new_tokens=max_new_tokens, temperature=1.0)
    fields.update(overrides)
    return grpo.GRPOConfig.preset(preset, **fields)


def run_rl(config: grpo.GRPOConfig, model, train_records, held_out, *, eval_samples: int = 4) -> dict:
    """Trains and returns {"rows": per-step dicts, "eval": held-out metrics, "seconds"}."""
    t0 = time.perf_counter()
    recorder = RewardRecorder(config.group_size)
    result = grpo.train(config, policy=model, tokenizer=TOKENIZER, prompts=train_records, reward_fn=recorder)
    first = recorder.per_step(result.history)
    rows = [{**h, **f} for h, f in zip(result.history, first)]
    ev = evaluate(result.model, held_out, max_new_tokens=config.max_new_tokens, samples=eval_samples, seed=config.run.seed)
    return {"rows": rows, "eval": ev, "seconds": time.perf_counter() - t0, "model": result.model}


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def smooth(y, k: int = 5) -> np.ndarray:
    y = np.asarray(y, np.float64)
    if len(y) < k:
        return y
    pad = np.concatenate([np.full(k // 2, y[0]), y, np.full(k - 1 - k // 2, y[-1])])
    return np.convolve(pad, np.ones(k) / k, mode="valid")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, axes, path, legend_size: int = 8) -> None:
    """Grid and legend on every panel, tight layout, saved as a PNG at the experiments' dpi."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
