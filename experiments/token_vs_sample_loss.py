"""Loss aggregation: per-sequence token means bias response length; token sums do not.

GRPO's ``seq_mean_token_mean`` divides each response's token losses by its own length,
so a token of a long response weighs less than a token of a short one: for a wrong
answer (negative advantage) a long response is penalised less per token, for a right
one rewarded less (Dr. GRPO §3.1). ``token_mean`` (DAPO) weighs every token of the batch
the same; ``seq_mean_token_sum_norm`` (Dr. GRPO) divides by a constant.

Worked example (``jax.grad`` through ``ops.aggregate_loss``): a batch of one 200-token
and one 10-token response, per-token loss 1 → per-token gradient weights.

Training: the SFT data writes the answer, a newline, then 0–4 filler dots; the reward
reads only the first line, so response length is free and its drift under RL comes
from the loss alone. Same GRPO setup (group-std advantages, no KL, T = 12) for the three
aggregation modes.

Run:  python experiments/token_vs_sample_loss.py [--quick]
Writes results/token_vs_sample_loss/{metrics.jsonl, summary.json, token_vs_sample_loss.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

from jaxrl_llm import ops

MODES = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
FILLER_MAX = 4
MAX_NEW_TOKENS = 12


def worked_example() -> dict:
    """Per-token gradient weights of each mode for responses of 200 and 10 tokens."""
    mask = jnp.zeros((2, 200)).at[0, :200].set(1.0).at[1, :10].set(1.0)
    out = {}
    for mode in MODES:
        grad = jax.grad(lambda l, m=mode: ops.aggregate_loss(l, mask, m, norm_length=200))(jnp.ones((2, 200)))
        out[mode] = {"long_200": float(grad[0, 0]), "short_10": float(grad[1, 0]),
                     "long_total": float(grad[0].sum()), "short_total": float(grad[1].sum())}
        print(f"{mode:24s} per-token weight: 200-token response {grad[0, 0]:.6f} (1/{1 / grad[0, 0]:.0f}), "
              f"10-token response {grad[1, 0]:.6f} (1/{1 / grad[1, 0]:.0f})")
    return out


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    rc.enable_compile_cache()
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    writer = ExperimentWriter(args.out, "token_vs_sample_loss")
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()
    example = worked_example()

    runs: dict[str, list[list[dict]]] = {m: [] for m in MODES}
    finals: dict[str, list[dict]] = {m: [] for m in MODES}
    before = []
    for seed in seeds:
        warm = rc.warm_start(seed, sft_steps=rc.SFT_STEPS, filler_max=FILLER_MAX)
        before.append(rc.evaluate(warm, held_out, max_new_tokens=MAX_NEW_TOKENS, seed=seed))
        for mode in MODES:
            config = rc.base_config("grpo", steps=steps, seed=seed, loss_agg=mode, kl_coef=0.0,
                                    max_new_tokens=MAX_NEW_TOKENS, out_dir=str(writer.dir / "runs" / f"{mode}_s{seed}"))
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS, filler_max=FILLER_MAX),
                            train_records, held_out)
            for row in res["rows"]:
                writer.log(mode=mode, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            runs[mode].append(res["rows"])
            finals[mode].append(res["eval"])
            print(f"seed {seed} {mode}: length {res['rows'][0]['response_length_mean']:.2f} → "
                  f"{res['rows'][-1]['response_length_mean']:.2f}, held-out sampled length "
                  f"{res['eval']['sampled_length_mean']:.2f} ({res['seconds']:.0f} s)")

    def stat(mode, key):
        return np.array([[r[key] for r in run] for run in runs[mode]], np.float64)  # [seeds, steps]

    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(steps)
    for i, mode in enumerate(MODES):
        axes[0].plot(x, rc.smooth(stat(mode, "response_length_mean").mean(0)), color=f"C{i}", label=mode)
        axes[1].plot(x, rc.smooth(np.nanmean(stat(mode, "chars_wrong"), 0)), color=f"C{i}", label=f"{mode}: wrong")
        axes[1].plot(x, rc.smooth(np.nanmean(stat(mode, "chars_correct"), 0)), color=f"C{i}", ls="--", label=f"{mode}: right")
        axes[2].plot(x, rc.smooth(stat(mode, "sampled_accuracy").mean(0)), color=f"C{i}", label=mode)
    axes[0].set(xlabel="RL step", ylabel="response length (tokens)", title="mean response length")
    axes[1].set(xlabel="RL step", ylabel="completion length (chars)", title="length of right (--) and wrong (—) answers")
    axes[2].set(xlabel="RL step", ylabel="sampled accuracy", title="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(writer.plot_path("token_vs_sample_loss.png"), dpi=110)

    summary = {"steps": steps, "seeds": seeds, "worked_example": example,
               "held_out_length_after_sft": float(np.mean([b["sampled_length_mean"] for b in before])), "modes": {}}
    for mode in MODES:
        length = stat(mode, "response_length_mean")
        summary["modes"][mode] = {
            "length_first5": float(length[:, :5].mean()),
            "length_last5": float(length[:, -5:].mean()),
            "length_drift": float(length[:, -5:].mean() - length[:, :5].mean()),
            "wrong_chars_last5": float(np.nanmean(stat(mode, "chars_wrong")[:, -5:])),
            "correct_chars_last5": float(np.nanmean(stat(mode, "chars_correct")[:, -5:])),
            "truncated_last5": float(stat(mode, "truncated_fraction")[:, -5:].mean()),
            "sampled_accuracy_last5": float(stat(mode, "sampled_accuracy")[:, -5:].mean()),
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[mode]]),
            "held_out_sampled": rc.mean_std([f["sampled_accuracy"] for f in finals[mode]]),
            "held_out_length": rc.mean_std([f["sampled_length_mean"] for f in finals[mode]]),
        }
    summary["seconds"] = time.perf_counter() - t_start
    path = writer.summary(summary)
    for mode, s in summary["modes"].items():
        print(f"{mode:24s} length {s['length_first5']:.2f} → {s['length_last5']:.2f}, wrong {s['wrong_chars_last5']:.2f} "
              f"chars, right {s['correct_chars_last5']:.2f} chars, acc {s['sampled_accuracy_last5']:.3f}")
    print(f"wrote {path} and {writer.plot_path('token_vs_sample_loss.png')}")


if __name__ == "__main__":
    main()
