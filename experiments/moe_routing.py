"""MoE routing under RL: routing drift between rollout and training forward, and fixes.

In a mixture-of-experts policy the training forward may send a token to different
experts than the rollout did (the router's inputs and weights change over the μ inner
updates, and inference/training kernels differ), so the token-level importance ratio
mixes policy change with routing noise. Four arms on a tiny qwen3_moe policy (4 experts,
top-2, SFT-warm-started on the task), μ = 4 inner updates per batch so old and new
policies differ:
  - grpo                 routing_replay=False: the training forward routes afresh;
  - grpo + replay        the rollout's expert choices are replayed in every training forward;
  - gspo                 sequence-level ratio (GSPO preset), no replay;
  - frozen router        freeze_router=True, no replay (experts and attention still train).
Measured per step: fraction of (token, layer) expert sets that changed between rollout
and training forward, mean importance ratio, clip fraction, approx KL, grad norm,
accuracy.

Run:  python experiments/moe_routing.py [--quick]
Writes results/moe_routing/{metrics.jsonl, summary.json, moe_routing.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

ARMS = {
    "grpo (no replay)": ("grpo", dict(routing_replay=False)),
    "grpo + routing replay": ("grpo", dict(routing_replay=True)),
    "gspo (no replay)": ("gspo", dict(routing_replay=False)),
    "grpo + frozen router": ("grpo", dict(routing_replay=False, freeze_router=True)),
}
# max_prompt_len=4: every prompt "a+b=" is 4 characters, so no prompt padding (see the README
# note on the recorded routing of padded prompts).
SHARED = dict(num_inner_updates=4, max_prompt_len=4)


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    rc.enable_compile_cache()
    steps, seeds = (6, [args.seed]) if args.quick else (30, [args.seed + i for i in range(2)])
    writer = ExperimentWriter(args.out, "moe_routing")
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    runs: dict[str, list[list[dict]]] = {a: [] for a in ARMS}
    finals: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in seeds:
        for i, (arm, (preset, overrides)) in enumerate(ARMS.items()):
            config = rc.base_config(preset, steps=steps, seed=seed, out_dir=str(writer.dir / "runs" / f"arm{i}_s{seed}"),
                                    **SHARED, **overrides)
            model = rc.warm_start(seed, sft_steps=rc.SFT_STEPS, family="qwen3_moe")
            res = rc.run_rl(config, model, train_records, held_out)
            for row in res["rows"]:
                writer.log(arm=arm, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            runs[arm].append(res["rows"])
            finals[arm].append(res["eval"])
            print(f"seed {seed} {arm}: routing change {np.mean([r['routing_change'] for r in res['rows']]):.4f}, "
                  f"clipfrac {np.mean([r['clipfrac'] for r in res['rows']]):.4f} ({res['seconds']:.0f} s)")

    def stat(arm, key):
        return np.array([[r[key] for r in run] for run in runs[arm]], np.float64)  # [seeds, steps]

    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    x = np.arange(steps)
    panels = (("routing_change", "expert set changed (fraction)", "routing change: rollout vs training"),
              ("ratio_mean", "mean token ratio π/π_old", "importance ratio"),
              ("clipfrac", "clip fraction", "clipped tokens"),
              ("sampled_accuracy", "sampled accuracy", "accuracy"))
    for ax, (key, ylabel, title) in zip(axes, panels):
        for i, arm in enumerate(ARMS):
            ax.plot(x, rc.smooth(stat(arm, key).mean(0), 3), color=f"C{i}", label=arm)
        ax.set(xlabel="RL step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(writer.plot_path("moe_routing.png"), dpi=110)

    summary = {"steps": steps, "seeds": seeds, "num_inner_updates": SHARED["num_inner_updates"], "arms": {}}
    for arm in ARMS:
        ratio = stat(arm, "ratio_mean")
        summary["arms"][arm] = {
            "routing_change_mean": float(stat(arm, "routing_change").mean()),
            "routing_change_max": float(stat(arm, "routing_change").max()),
            "ratio_mean": float(ratio.mean()),
            "ratio_abs_dev_max": float(np.abs(ratio - 1).max()),
            "clipfrac_mean": float(stat(arm, "clipfrac").mean()),
            "approx_kl_mean": float(stat(arm, "approx_kl").mean()),
            "grad_norm_mean": float(stat(arm, "grad_norm").mean()),
            "grad_norm_max": float(stat(arm, "grad_norm").max()),
            "all_finite": bool(np.isfinite(stat(arm, "loss")).all()),
            "sampled_accuracy_first5": float(stat(arm, "sampled_accuracy")[:, :5].mean()),
            "sampled_accuracy_last5": float(stat(arm, "sampled_accuracy")[:, -5:].mean()),
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[arm]]),
        }
    summary["seconds"] = time.perf_counter() - t_start
    path = writer.summary(summary)
    for arm, s in summary["arms"].items():
        print(f"{arm:24s} routing change {s['routing_change_mean']:.4f}  ratio {s['ratio_mean']:.4f}  "
              f"clipfrac {s['clipfrac_mean']:.4f}  approx_kl {s['approx_kl_mean']:.5f}  grad {s['grad_norm_mean']:.3f}")
    print(f"wrote {path} and {writer.plot_path('moe_routing.png')}")


if __name__ == "__main__":
    main()
