"""Asynchronous GRPO: does sampling staleness cost learning, and do off-policy corrections recover it?

With ``max_staleness = k`` a sampler thread runs up to k policy versions ahead of the
trainer: once the pipeline has filled (step ≥ k), every batch was sampled by the policy
of k updates ago. The clipped ratio is decoupled (taken against the trainer's current
policy, recomputed each step), so without a correction the stale samples are trained on
as if they were on-policy; the behaviour (sampler) log-probs enter only through the
rollout correction (``ops.rollout_correction``):

  none  tis_cap=None                       stale samples used as they are
  TIS   tis_cap=2, token level, truncate   weights min(π_train / π_sampler, 2) per token
  MIS   tis_cap=2, geometric, mask         responses whose per-token geometric-mean
                                           ratio leaves [1/2, 2] drop out of the loss

Conditions: k = 0 (synchronous), and k = 1, 2, 4 each with none / TIS / MIS. Same task,
warm start and RL budget as the other reasoning experiments (``reasoning_common``: GRPO
preset, 16 prompts × 8 samples, AdamW lr 1e-3); every condition of a seed starts from the
same SFT policy with the same seed. lr 1e-3 moves this tiny policy noticeably per step:
with TIS on, the batch's sampler-to-trainer KL averages 0.015 / 0.04 / 0.10 nats per
token at k = 1 / 2 / 4 (≈ 0.1 already at k = 1 in the first steps), so staleness has
something to cost. Per step: reward (sampled accuracy), staleness, the trainer's step
time (``time_sampling + time_logprobs + time_update``; step 0, which compiles, is left
out of the wall-clock axis), and the IS statistics where a correction is on. Measured
(3 seeds × 100 steps) in experiments/README.md: uncorrected staleness costs most of the
learning even at k = 1; token-level TIS recovers all of it, geometric MIS only part.

Run:  python experiments/async_staleness.py [--quick] [--seed N] [--seeds K] [--steps S]
Writes results/async_staleness/{metrics.jsonl, summary.json, async_staleness.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

NAME = "async_staleness"
CORRECTIONS = {
    "": {},
    " + TIS": {"tis_cap": 2.0, "tis_level": "token", "tis_mode": "truncate"},
    " + MIS": {"tis_cap": 2.0, "tis_level": "geometric", "tis_mode": "mask"},
}
STEP_KEYS = ("sampled_accuracy", "reward_mean", "entropy", "staleness", "time_sampling", "time_sampler",
             "time_logprobs", "time_update", "response_length_mean", "grad_norm", "loss")
IS_KEYS = ("is_mean", "is_std", "is_max", "is_ess", "is_frac_high", "is_frac_low", "is_masked_fraction",
           "is_seq_masked_fraction", "mismatch_kl", "rollout_mismatch_abs")
STALENESS = {"full": (0, 1, 2, 4), "quick": (0, 2)}


def conditions(staleness: tuple[int, ...]) -> dict[str, dict]:
    """name -> GRPOConfig overrides: k = 0 alone, every k > 0 with each correction."""
    out = {}
    for k in staleness:
        for suffix, fix in CORRECTIONS.items():
            if k or not fix:
                out[f"k={k}{suffix}"] = dict(max_staleness=k, **fix)
    return out


def step_seconds(row: dict) -> float:
    """The trainer's own timers of one step (≈ 90–95% of its wall time; the rest is
    advantages, host copies and metrics, alike in every condition)."""
    return row["time_sampling"] + row["time_logprobs"] + row["time_update"]


def plot(path: Path, conds: dict[str, dict], runs: dict[str, list[list[dict]]]) -> None:
    """Reward vs step and vs wall-clock, entropy, and the sampler-to-trainer KL (mean over seeds)."""
    plt = rc.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.4))
    ks = sorted({c["max_staleness"] for c in conds.values()})
    color = {k: ("k" if k == 0 else f"C{i}") for i, k in enumerate(ks)}
    style = {"truncate": "--", "mask": ":"}
    width = 9 if len(next(iter(runs.values()))[0]) >= 50 else 3  # smoothing window (steps)
    for name, over in conds.items():
        y = np.array([[r["sampled_accuracy"] for r in run] for run in runs[name]])  # [seeds, steps]
        secs = np.array([[step_seconds(r) for r in run[1:]] for run in runs[name]])
        wall = np.concatenate([[0.0], np.cumsum(secs.mean(0))])  # from the end of step 0 (compilation)
        kw = {"color": color[over["max_staleness"]], "ls": style.get(over.get("tis_mode"), "-"), "label": name, "lw": 1.4}
        acc = rc.smooth(y.mean(0), width)
        axes[0, 0].plot(np.arange(len(acc)), acc, **kw)
        axes[0, 1].plot(wall, acc, **kw)
        axes[1, 0].plot(rc.smooth(np.array([[r["entropy"] for r in run] for run in runs[name]]).mean(0), width), **kw)
        if "mismatch_kl" in runs[name][0][0]:
            kl = np.array([[r["mismatch_kl"] for r in run] for run in runs[name]]).mean(0)
            axes[1, 1].plot(rc.smooth(kl, width), **kw)
    axes[0, 0].set(xlabel="RL step", ylabel="sampled accuracy (reward)", title="reward vs step (mean over seeds)")
    axes[0, 1].set(xlabel="trainer wall-clock after step 0 (s)", ylabel="sampled accuracy (reward)",
                   title="reward vs wall-clock (mean over seeds)")
    axes[1, 0].set(xlabel="RL step", ylabel="mean token entropy", title="policy entropy")
    axes[1, 1].set(xlabel="RL step", ylabel="nats per token", title="KL(sampler ‖ trainer) of the batch (corrected runs)")
    rc.save_figure(fig, axes.ravel(), path, legend_size=7)
    plt.close(fig)


def summarize(conds: dict[str, dict], runs: dict[str, list[list[dict]]], finals: dict[str, list[dict]],
              last: int) -> dict:
    out = {}
    for name, over in conds.items():
        k = over["max_staleness"]

        def stat(key, rows_from=0, seed_runs=runs[name]):  # [seeds, steps from rows_from]
            return np.array([[r[key] for r in run[rows_from:]] for run in seed_runs], np.float64)

        acc = stat("sampled_accuracy")
        final = acc[:, -last:].mean(1)
        filled = stat("staleness", k)
        entry = {
            "max_staleness": k,
            "correction": {key: over[key] for key in ("tis_cap", "tis_level", "tis_mode") if key in over} or None,
            "final_reward_per_seed": final.tolist(),
            "final_reward": rc.mean_std(final),
            "final_reward_range": [float(final.min()), float(final.max())],
            "first_reward": rc.mean_std(acc[:, :last].mean(1)),
            "staleness_after_fill": sorted({int(s) for s in filled.ravel()}),
            "staleness_ok": bool((filled == k).all()),
            "entropy_last": float(stat("entropy")[:, -last:].mean()),
            "step_seconds": float(np.mean([[step_seconds(r) for r in run[1:]] for run in runs[name]])),
            "step_seconds_per_seed": [float(np.mean([step_seconds(r) for r in run[1:]])) for run in runs[name]],
            **{key: float(stat(key, 1).mean()) for key in ("time_sampling", "time_sampler", "time_logprobs", "time_update")},
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[name]]),
            "held_out_sampled": rc.mean_std([f["sampled_accuracy"] for f in finals[name]]),
            "is": ({key: float(stat(key, max(k, 1)).mean()) for key in IS_KEYS if key in runs[name][0][0]}
                   if over.get("tis_cap") else None),
        }
        out[name] = entry
    return out


def main() -> None:
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, --quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default 100, --quick 12)")
    parser.add_argument("--last", type=int, default=None, help="final reward = mean of the last N steps (20, --quick 4)")
    parser.add_argument("--learning-rate", type=float, default=rc.LEARNING_RATE)
    args = parser.parse_args()
    rc.enable_compile_cache()
    steps = args.steps or (12 if args.quick else 100)
    last = args.last or (4 if args.quick else 20)
    seeds = list(range(args.seed, args.seed + (args.seeds or (1 if args.quick else 3))))
    conds = conditions(STALENESS["quick" if args.quick else "full"])
    writer = ExperimentWriter(args.out, NAME)
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    runs: dict[str, list[list[dict]]] = {c: [] for c in conds}
    finals: dict[str, list[dict]] = {c: [] for c in conds}
    for seed in seeds:
        for name, over in conds.items():
            tag = name.replace("=", "").replace(" + ", "_").lower()
            config = rc.base_config("grpo", steps=steps, seed=seed, out_dir=str(writer.dir / "runs" / f"{tag}_s{seed}"),
                                    optim=rc.OptimConfig(learning_rate=args.learning_rate), **over)
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS), train_records, held_out)
            wall = 0.0
            for i, row in enumerate(res["rows"]):
                wall += step_seconds(row) if i else 0.0
                writer.log(condition=name, seed=seed, step=row["step"], step_seconds=step_seconds(row), wall_clock=wall,
                           **{k: row[k] for k in STEP_KEYS + IS_KEYS if k in row})
            runs[name].append(res["rows"])
            finals[name].append(res["eval"])
            rows = res["rows"]
            is_note = (f", mismatch KL {np.mean([r['mismatch_kl'] for r in rows[1:]]):.3f}, masked "
                       f"{np.mean([r['is_masked_fraction'] for r in rows[1:]]):.3f}") if "mismatch_kl" in rows[0] else ""
            print(f"seed {seed} {name}: reward last {last} {np.mean([r['sampled_accuracy'] for r in rows[-last:]]):.3f}, "
                  f"staleness {rows[-1]['staleness']}, {np.mean([step_seconds(r) for r in rows[1:]]) * 1e3:.0f} ms/step"
                  f"{is_note} ({res['seconds']:.0f} s, total {time.perf_counter() - t_start:.0f} s)", flush=True)

    plot(writer.plot_path(f"{NAME}.png"), conds, runs)
    summary = {"steps": steps, "seeds": seeds, "last": last, "learning_rate": args.learning_rate,
               "conditions": summarize(conds, runs, finals, last), "seconds": time.perf_counter() - t_start}
    path = writer.summary(summary)
    for name, s in summary["conditions"].items():
        is_note = f", mismatch KL {s['is']['mismatch_kl']:.3f}" if s["is"] else ""
        print(f"{name:10s} final reward {s['final_reward'][0]:.3f} ± {s['final_reward'][1]:.3f} "
              f"(first {s['first_reward'][0]:.3f}), {s['step_seconds'] * 1e3:.0f} ms/step, "
              f"staleness after fill {s['staleness_after_fill']}{is_note}")
    print(f"wrote {path} and {writer.plot_path(f'{NAME}.png')} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
