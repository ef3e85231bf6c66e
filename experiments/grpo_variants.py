"""GRPO, Dr. GRPO, DAPO, GSPO and RLOO on the same task, budget and warm start.

Each preset (``GRPOConfig.preset``, nothing else changed) trains the same SFT-warm-started
tiny model on single-digit addition with a first-line exact-answer reward, for the same
number of steps (16 prompts × 8 samples each), over several seeds. Curves: sampled
accuracy (first sampling round, so DAPO's filtered batch does not bias it), response
length and policy entropy per step; table: held-out accuracy after training, mean ± std.

Run:  python experiments/grpo_variants.py [--quick]
Writes results/grpo_variants/{metrics.jsonl, summary.json, grpo_variants.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

PRESETS = ("grpo", "dr_grpo", "dapo", "gspo", "rloo")


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    rc.enable_compile_cache()
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    writer = ExperimentWriter(args.out, "grpo_variants")
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    curves: dict[str, list[list[dict]]] = {p: [] for p in PRESETS}
    finals: dict[str, list[dict]] = {p: [] for p in PRESETS}
    before = []
    for seed in seeds:
        warm = rc.warm_start(seed, sft_steps=rc.SFT_STEPS)
        before.append(rc.evaluate(warm, held_out, max_new_tokens=rc.MAX_NEW_TOKENS, seed=seed))
        for preset in PRESETS:
            config = rc.base_config(preset, steps=steps, seed=seed, out_dir=str(writer.dir / "runs" / f"{preset}_s{seed}"))
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS), train_records, held_out)
            for row in res["rows"]:
                writer.log(preset=preset, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            curves[preset].append(res["rows"])
            finals[preset].append(res["eval"])
            print(f"seed {seed} {preset:8s} held-out greedy {res['eval']['greedy_accuracy']:.3f} "
                  f"sampled {res['eval']['sampled_accuracy']:.3f} ({res['seconds']:.0f} s)")

    # plot
    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("sampled_accuracy", "sampled accuracy (first round, T=1)"),
              ("response_length_mean", "response length (tokens)"), ("entropy", "mean token entropy"))
    for ax, (key, label) in zip(axes, panels):
        for i, preset in enumerate(PRESETS):
            y = np.array([[r[key] for r in run] for run in curves[preset]])
            m = rc.smooth(y.mean(0))
            ax.plot(np.arange(len(m)), m, color=f"C{i}", label=preset)
            if len(y) > 1:
                s = rc.smooth(y.std(0))
                ax.fill_between(np.arange(len(m)), m - s, m + s, color=f"C{i}", alpha=0.12)
        ax.set(xlabel="RL step", ylabel=label, title=f"{label} ({len(seeds)} seeds, 5-step smoothing)")
        ax.grid(alpha=0.3)
    axes[0].axhline(np.mean([b["sampled_accuracy"] for b in before]), color="gray", ls="--", lw=1,
                    label="held-out, after SFT")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(writer.plot_path("grpo_variants.png"), dpi=110)

    table = {}
    for preset in PRESETS:
        g = rc.mean_std([f["greedy_accuracy"] for f in finals[preset]])
        s = rc.mean_std([f["sampled_accuracy"] for f in finals[preset]])
        last = [np.mean([r["sampled_accuracy"] for r in run[-5:]]) for run in curves[preset]]
        table[preset] = {
            "held_out_greedy_mean": g[0], "held_out_greedy_std": g[1],
            "held_out_sampled_mean": s[0], "held_out_sampled_std": s[1],
            "train_sampled_last5_mean": float(np.mean(last)),
            "entropy_mean": float(np.mean([[r["entropy"] for r in run] for run in curves[preset]])),
            "length_last5_mean": float(np.mean([[r["response_length_mean"] for r in run[-5:]] for run in curves[preset]])),
            "generations_per_step": float(np.mean([[r["generations"] for r in run] for run in curves[preset]])),
            "all_finite": bool(all(np.isfinite(r["loss"]) for run in curves[preset] for r in run)),
        }
    summary = {
        "steps": steps, "seeds": seeds,
        "held_out_greedy_after_sft": rc.mean_std([b["greedy_accuracy"] for b in before]),
        "held_out_sampled_after_sft": rc.mean_std([b["sampled_accuracy"] for b in before]),
        "presets": table,
        "seconds": time.perf_counter() - t_start,
    }
    path = writer.summary(summary)
    for preset, t in table.items():
        print(f"{preset:8s} held-out greedy {t['held_out_greedy_mean']:.3f} ± {t['held_out_greedy_std']:.3f}  "
              f"sampled {t['held_out_sampled_mean']:.3f} ± {t['held_out_sampled_std']:.3f}  entropy {t['entropy_mean']:.3f}")
    print(f"wrote {path} and {writer.plot_path('grpo_variants.png')}")


if __name__ == "__main__":
    main()
