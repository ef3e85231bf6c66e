"""DAPO soft overlong punishment: a length penalty inside a buffer before the cap keeps
responses from rambling into truncation.

The reward reads only the first line (the answer); the SFT warm start writes the
answer, a newline and 0–4 filler dots, so everything after the answer is free text that
the task reward ignores, and lengths random-walk under RL. T = 12 new tokens. Two GRPO
runs from the same warm start: without a length penalty, and with ``overlong_buffer=4``
(penalty 0 up to 8 tokens, falling linearly to −1 at 12, ``ops.overlong_penalty``).

Run:  python experiments/overlong_penalty.py [--quick]
Writes results/overlong_penalty/{metrics.jsonl, summary.json, overlong_penalty.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

FILLER_MAX = 4
MAX_NEW_TOKENS = 12
BUFFER = 4
ARMS = {"no length penalty": 0, f"soft overlong punishment (buffer {BUFFER})": BUFFER}


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    rc.enable_compile_cache()
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    writer = ExperimentWriter(args.out, "overlong_penalty")
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    runs: dict[str, list[list[dict]]] = {a: [] for a in ARMS}
    finals: dict[str, list[dict]] = {a: [] for a in ARMS}
    before = []
    for seed in seeds:
        warm = rc.warm_start(seed, sft_steps=rc.SFT_STEPS, filler_max=FILLER_MAX)
        before.append(rc.evaluate(warm, held_out, max_new_tokens=MAX_NEW_TOKENS, seed=seed))
        for arm, buffer in ARMS.items():
            config = rc.base_config("grpo", steps=steps, seed=seed, max_new_tokens=MAX_NEW_TOKENS, overlong_buffer=buffer,
                                    out_dir=str(writer.dir / "runs" / f"buf{buffer}_s{seed}"))
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS, filler_max=FILLER_MAX),
                            train_records, held_out)
            for row in res["rows"]:
                writer.log(arm=arm, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            runs[arm].append(res["rows"])
            finals[arm].append(res["eval"])
            print(f"seed {seed} {arm}: held-out length {res['eval']['sampled_length_mean']:.2f}, truncated "
                  f"{res['eval']['sampled_truncated']:.3f} ({res['seconds']:.0f} s)")

    def stat(arm, key):
        return np.array([[r[key] for r in run] for run in runs[arm]], np.float64)  # [seeds, steps]

    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    x = np.arange(steps)
    bins = np.arange(1, MAX_NEW_TOKENS + 2) - 0.5
    axes[0].hist(np.concatenate([b["sampled_lengths"] for b in before]), bins=bins, density=True, histtype="step",
                 color="gray", ls="--", lw=1.5, label="after SFT")
    for i, arm in enumerate(ARMS):
        axes[0].hist(np.concatenate([f["sampled_lengths"] for f in finals[arm]]), bins=bins, density=True,
                     histtype="step", lw=2, color=f"C{i}", label=arm)
        axes[1].plot(x, rc.smooth(stat(arm, "response_length_mean").mean(0)), color=f"C{i}", label=arm)
        axes[2].plot(x, rc.smooth(stat(arm, "truncated_fraction").mean(0)), color=f"C{i}", label=arm)
        axes[3].plot(x, rc.smooth(stat(arm, "sampled_accuracy").mean(0)), color=f"C{i}", label=arm)
    axes[0].axvline(MAX_NEW_TOKENS - BUFFER + 0.5, color="k", lw=0.8, ls=":")
    axes[0].set(xlabel="response length (tokens, held-out, after RL)", ylabel="density", title="length distribution")
    axes[1].set(xlabel="RL step", ylabel="mean response length", title="length during training")
    axes[2].set(xlabel="RL step", ylabel="fraction cut at max_new_tokens", title="truncation rate")
    axes[3].set(xlabel="RL step", ylabel="sampled accuracy", title="accuracy")
    rc.save_figure(fig, axes, writer.plot_path("overlong_penalty.png"))

    summary = {"steps": steps, "seeds": seeds, "max_new_tokens": MAX_NEW_TOKENS, "buffer": BUFFER,
               "held_out_length_after_sft": float(np.mean([b["sampled_length_mean"] for b in before])),
               "held_out_truncated_after_sft": float(np.mean([b["sampled_truncated"] for b in before])), "arms": {}}
    for arm in ARMS:
        lengths = np.concatenate([f["sampled_lengths"] for f in finals[arm]])
        summary["arms"][arm] = {
            "train_length_last5": float(stat(arm, "response_length_mean")[:, -5:].mean()),
            "train_truncated_mean": float(stat(arm, "truncated_fraction").mean()),
            "train_truncated_last5": float(stat(arm, "truncated_fraction")[:, -5:].mean()),
            "held_out_length": float(lengths.mean()),
            "held_out_length_p90": float(np.percentile(lengths, 90)),
            "held_out_in_buffer_or_cut": float(np.mean(lengths > MAX_NEW_TOKENS - BUFFER)),
            "held_out_truncated": float(np.mean([f["sampled_truncated"] for f in finals[arm]])),
            "held_out_truncated_per_seed": [f["sampled_truncated"] for f in finals[arm]],
            "sampled_accuracy_last5": float(stat(arm, "sampled_accuracy")[:, -5:].mean()),
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[arm]]),
        }
    summary["seconds"] = time.perf_counter() - t_start
    path = writer.summary(summary)
    for arm, s in summary["arms"].items():
        print(f"{arm}: held-out length {s['held_out_length']:.2f} (p90 {s['held_out_length_p90']:.0f}), truncated "
              f"{s['held_out_truncated']:.3f}, train truncated {s['train_truncated_mean']:.3f}, acc {s['sampled_accuracy_last5']:.3f}")
    print(f"wrote {path} and {writer.plot_path('overlong_penalty.png')}")


if __name__ == "__main__":
    main()
