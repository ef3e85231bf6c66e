"""Zero-variance groups: plain GRPO wastes them, DAPO's dynamic sampling replaces them.

A group whose G rewards are all equal (all correct or all wrong) has zero advantage for
every sample: it costs generation and a forward/backward pass but moves nothing (except
through the KL term). Plain GRPO trains on whatever it sampled; dynamic sampling (DAPO)
keeps sampling rounds until B groups with unequal rewards are found (or
``max_sampling_rounds`` is hit), so every group in the update batch is informative — at
the cost of extra generations. Both runs use the GRPO preset; the only change is
``dynamic_sampling=True`` (max 4 rounds).

Run:  python experiments/zero_variance_groups.py [--quick]
Writes results/zero_variance_groups/{metrics.jsonl, summary.json, zero_variance_groups.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

ARMS = {"grpo": dict(), "grpo + dynamic sampling": dict(dynamic_sampling=True, max_sampling_rounds=4)}


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    rc.enable_compile_cache()
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    writer = ExperimentWriter(args.out, "zero_variance_groups")
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    runs: dict[str, list[list[dict]]] = {a: [] for a in ARMS}
    finals: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in seeds:
        for arm, overrides in ARMS.items():
            tag = "ds" if overrides else "plain"
            config = rc.base_config("grpo", steps=steps, seed=seed, out_dir=str(writer.dir / "runs" / f"{tag}_s{seed}"),
                                    **overrides)
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS), train_records, held_out)
            for row in res["rows"]:
                writer.log(arm=arm, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            runs[arm].append(res["rows"])
            finals[arm].append(res["eval"])
            print(f"seed {seed} {arm}: held-out greedy {res['eval']['greedy_accuracy']:.3f} ({res['seconds']:.0f} s)")

    def stat(arm, key):
        return np.array([[r[key] for r in run] for run in runs[arm]], np.float64)  # [seeds, steps]

    # plot
    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(steps)
    plain, ds = ARMS
    axes[0].plot(x, rc.smooth(stat(plain, "all_wrong_groups").mean(0)), color="C3", label="all wrong (sampled)")
    axes[0].plot(x, rc.smooth(stat(plain, "all_correct_groups").mean(0)), color="C2", label="all correct (sampled)")
    axes[0].plot(x, rc.smooth(1 - stat(plain, "informative_groups_after").mean(0)), color="k", ls="--",
                 label="zero-variance in update batch: grpo")
    axes[0].plot(x, 1 - stat(ds, "informative_groups_after").mean(0), color="C0", lw=2,
                 label="zero-variance in update batch: + dynamic sampling")
    axes[0].set(xlabel="RL step", ylabel="fraction of groups", title="groups with no gradient signal")
    for i, arm in enumerate(ARMS):
        axes[1].plot(x, stat(arm, "generations").mean(0), color=f"C{i}", label=arm)
        axes[2].plot(x, rc.smooth(stat(arm, "sampled_accuracy").mean(0)), color=f"C{i}", label=arm)
    axes[1].set(xlabel="RL step", ylabel="responses generated per step", title="generation cost")
    axes[2].set(xlabel="RL step", ylabel="sampled accuracy (first round)", title="accuracy")
    rc.save_figure(fig, axes, writer.plot_path("zero_variance_groups.png"))

    base = rc.base_config("grpo", steps=1, seed=0, out_dir=str(writer.dir))
    base_generations = base.prompts_per_step * base.group_size
    filled = stat(ds, "informative_groups_after") == 1.0
    summary = {"steps": steps, "seeds": seeds, "arms": {}}
    for arm in ARMS:
        summary["arms"][arm] = {
            "zero_variance_sampled": float(1 - stat(arm, "informative_groups_before").mean()),
            "all_correct_sampled": float(stat(arm, "all_correct_groups").mean()),
            "all_wrong_sampled": float(stat(arm, "all_wrong_groups").mean()),
            "zero_variance_in_update": float(1 - stat(arm, "informative_groups_after").mean()),
            "generations_per_step": float(stat(arm, "generations").mean()),
            "generation_cost_ratio": float(stat(arm, "generations").mean() / base_generations),
            "sampling_rounds_mean": float(stat(arm, "sampling_rounds").mean()),
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[arm]]),
            "held_out_sampled": rc.mean_std([f["sampled_accuracy"] for f in finals[arm]]),
        }
    summary["dynamic_sampling_filled_fraction"] = float(filled.mean())
    summary["dynamic_sampling_zero_variance_when_filled"] = float(
        (1 - stat(ds, "informative_groups_after"))[filled].max()) if filled.any() else None
    summary["seconds"] = time.perf_counter() - t_start
    path = writer.summary(summary)
    for arm, s in summary["arms"].items():
        print(f"{arm}: zero-variance sampled {s['zero_variance_sampled']:.3f}, in update {s['zero_variance_in_update']:.3f}, "
              f"generations/step {s['generations_per_step']:.0f}")
    print(f"wrote {path} and {writer.plot_path('zero_variance_groups.png')}")


if __name__ == "__main__":
    main()
