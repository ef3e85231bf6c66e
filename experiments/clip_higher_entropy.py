"""Clip-higher (DAPO): a larger upper clip ε_high slows entropy collapse.

With a symmetric PPO clip (ε_low = ε_high = 0.2) a token with positive advantage can
raise its probability ratio only to 1.2 per batch: low-probability ("exploration")
tokens are capped far below what high-probability ones can gain, and the policy's
entropy collapses. DAPO decouples the bounds, ε_high = 0.28. Same GRPO setup (no KL,
token_mean) and warm start, several inner updates per batch (μ = 4) so that clipping is
actually active; the only change is clip_high.

Part B (mechanism, seconds): a tabular softmax bandit (4 positions × V = 50; token 0
dominant with reward 0.5, 2 rare "good" tokens with reward 1, the rest 0), GRPO groups,
μ = 8 Adam inner steps on the real ``ops.ppo_policy_loss`` with old log-probs fixed,
many seeds; compares the mass of the initially rare good tokens and the entropy.

Run:  python experiments/clip_higher_entropy.py [--quick] [--part {a,b,all}]
Writes results/clip_higher_entropy/{metrics.jsonl, summary.json, clip_higher_entropy.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import reasoning_common as rc
from common import ExperimentWriter, experiment_args

from jaxrl_llm import ops

ARMS = {"symmetric 0.2/0.2": 0.2, "clip-higher 0.2/0.28": 0.28}
SHARED = {"kl_coef": 0.0, "loss_agg": "token_mean", "num_inner_updates": 4, "clip_low": 0.2}


def make_bandit_run(clip_high: float, *, steps: int, groups: int = 8, group_size: int = 8, positions: int = 4,
                    vocab: int = 50, num_good: int = 2, inner: int = 8, lr: float = 0.1, clip_low: float = 0.2):
    """Jitted, seed-vmapped GRPO + PPO-clip run of a tabular softmax policy (logits [T, V]).

    Returns:
      fn(keys: [S, 2]) -> (entropy, good_mass): [S, steps] float32 mean token entropy and
      probability mass of the initially rare good tokens after each step.
    """
    init = jnp.zeros((positions, vocab)).at[:, 0].set(5.0)  # token 0 ≈ 75 %, good tokens ≈ 0.5 % each
    reward_table = jnp.zeros(vocab).at[0].set(0.5).at[1:1 + num_good].set(1.0)
    opt = optax.adam(lr)
    batch = groups * group_size
    mask = jnp.ones((batch, positions))

    def token_logp(logits, tokens):
        logq = jnp.broadcast_to(jax.nn.log_softmax(logits), (batch, positions, vocab))
        return jnp.take_along_axis(logq, tokens[..., None], -1)[..., 0]  # [B, T]

    def step(carry, key):
        logits, opt_state = carry
        # sample
        tokens = jax.random.categorical(key, jnp.broadcast_to(logits, (batch, positions, vocab)))  # [B, T]
        old_logp = token_logp(logits, tokens)
        # score + advantages
        adv = ops.group_advantages(reward_table[tokens].mean(-1), group_size)

        # update: μ inner steps against fixed old log-probs, so the ratio leaves 1 and the clip acts
        def inner_step(c, _):
            lg, st = c
            grad = jax.grad(lambda x: ops.ppo_policy_loss(token_logp(x, tokens), old_logp, adv, mask,
                                                          clip_low=clip_low, clip_high=clip_high)[0])(lg)
            updates, st = opt.update(grad, st, lg)
            return (optax.apply_updates(lg, updates), st), None

        (logits, opt_state), _ = jax.lax.scan(inner_step, (logits, opt_state), None, length=inner)
        p = jax.nn.softmax(logits)
        entropy = -(p * jax.nn.log_softmax(logits)).sum(-1).mean()
        return (logits, opt_state), (entropy, p[:, 1:1 + num_good].sum(-1).mean())

    def run(key):
        _, out = jax.lax.scan(step, (init, opt.init(init)), jax.random.split(key, steps))
        return out

    return jax.jit(jax.vmap(run))


def mechanism(writer, *, seed: int, quick: bool) -> dict:
    """Part B: entropy and good-token mass, symmetric vs clip-higher, same seeds (paired)."""
    steps, n_seeds = (50, 16) if quick else (100, 32)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_seeds)
    res = {arm: tuple(np.asarray(x, np.float64) for x in make_bandit_run(ch, steps=steps)(keys))
           for arm, ch in ARMS.items()}
    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(ARMS):
        for ax, y in zip(axes, res[arm]):
            ax.plot(y.mean(0), color=f"C{i}", label=arm)
            ax.fill_between(np.arange(steps), y.min(0), y.max(0), color=f"C{i}", alpha=0.12)
    axes[0].set(xlabel="step", ylabel="mean token entropy", title="bandit entropy (band: min–max over seeds)")
    axes[1].set(xlabel="step", ylabel="probability mass", title="mass of initially rare good tokens")
    rc.save_figure(fig, axes, writer.plot_path("clip_higher_entropy_mechanism.png"))
    sym, high = ARMS
    out = {"steps": steps, "num_seeds": n_seeds, "arms": {}}
    for j, key in enumerate(("entropy", "good_mass")):
        gap = res[high][j].mean(1) - res[sym][j].mean(1)  # [S] paired per-seed gap of the run mean
        out[f"{key}_gap_mean"], out[f"{key}_gap_positive_fraction"] = float(gap.mean()), float((gap > 0).mean())
        for arm in ARMS:
            out["arms"].setdefault(arm, {})[f"{key}_mean"] = rc.mean_std(res[arm][j].mean(1).tolist())
            out["arms"][arm][f"{key}_final"] = rc.mean_std(res[arm][j][:, -1].tolist())
        print(f"[B] {key}: clip-higher − symmetric = {gap.mean():+.4f} (positive in {(gap > 0).mean():.0%} of seeds)")
    return out


def main() -> None:
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all", help="a: LM run, b: mechanism")
    parser.add_argument("--inner-updates", type=int, default=SHARED["num_inner_updates"], help="μ per batch")
    parser.add_argument("--learning-rate", type=float, default=rc.LEARNING_RATE)
    parser.add_argument("--steps", type=int, default=None, help="RL steps (default 40, --quick 8)")
    args = parser.parse_args()
    rc.enable_compile_cache()
    writer = ExperimentWriter(args.out, "clip_higher_entropy")
    mech = mechanism(writer, seed=args.seed, quick=args.quick) if args.part in ("b", "all") else None
    if args.part == "b":
        print(f"wrote {writer.summary({'mechanism': mech})}")
        return
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    steps = args.steps or steps
    shared = {**SHARED, "num_inner_updates": args.inner_updates, "optim": rc.OptimConfig(learning_rate=args.learning_rate)}
    train_records, held_out = rc.make_task()
    t_start = time.perf_counter()

    runs: dict[str, list[list[dict]]] = {a: [] for a in ARMS}
    finals: dict[str, list[dict]] = {a: [] for a in ARMS}
    for seed in seeds:
        for arm, clip_high in ARMS.items():
            config = rc.base_config("grpo", steps=steps, seed=seed, clip_high=clip_high,
                                    out_dir=str(writer.dir / "runs" / f"ch{clip_high}_s{seed}"), **shared)
            res = rc.run_rl(config, rc.warm_start(seed, sft_steps=rc.SFT_STEPS), train_records, held_out)
            for row in res["rows"]:
                writer.log(arm=arm, seed=seed, **{k: row[k] for k in rc.LOG_KEYS if k in row})
            runs[arm].append(res["rows"])
            finals[arm].append(res["eval"])
            print(f"seed {seed} {arm}: held-out greedy {res['eval']['greedy_accuracy']:.3f}, "
                  f"mean entropy {np.mean([r['entropy'] for r in res['rows']]):.3f} ({res['seconds']:.0f} s)")

    def stat(arm, key):
        return np.array([[r[key] for r in run] for run in runs[arm]], np.float64)  # [seeds, steps]

    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    x = np.arange(steps)
    for i, arm in enumerate(ARMS):
        for ax, key in zip(axes, ("entropy", "sampled_accuracy", "clipfrac")):
            y = stat(arm, key)
            ax.plot(x, rc.smooth(y.mean(0)), color=f"C{i}", label=arm)
            if len(y) > 1:
                ax.fill_between(x, rc.smooth(y.min(0)), rc.smooth(y.max(0)), color=f"C{i}", alpha=0.12)
    axes[0].set(xlabel="RL step", ylabel="mean token entropy", title="policy entropy (band: min–max over seeds)")
    axes[1].set(xlabel="RL step", ylabel="sampled accuracy", title="accuracy")
    axes[2].set(xlabel="RL step", ylabel="clip fraction", title="fraction of clipped tokens")
    rc.save_figure(fig, axes, writer.plot_path("clip_higher_entropy.png"))

    sym, high = ARMS
    per_seed_gap = (stat(high, "entropy").mean(1) - stat(sym, "entropy").mean(1)).tolist()
    summary = {"steps": steps, "seeds": seeds, "num_inner_updates": args.inner_updates,
               "learning_rate": args.learning_rate, "mechanism": mech, "arms": {}, "entropy_gap_per_seed": per_seed_gap}
    for arm in ARMS:
        e = stat(arm, "entropy")
        summary["arms"][arm] = {
            "entropy_mean": float(e.mean()),
            "entropy_first5": float(e[:, :5].mean()),
            "entropy_last5": float(e[:, -5:].mean()),
            "clipfrac_mean": float(stat(arm, "clipfrac").mean()),
            "sampled_accuracy_last5": float(stat(arm, "sampled_accuracy")[:, -5:].mean()),
            "held_out_greedy": rc.mean_std([f["greedy_accuracy"] for f in finals[arm]]),
            "held_out_sampled": rc.mean_std([f["sampled_accuracy"] for f in finals[arm]]),
        }
    summary["entropy_gap_mean"] = float(np.mean(per_seed_gap))
    summary["seconds"] = time.perf_counter() - t_start
    path = writer.summary(summary)
    for arm, s in summary["arms"].items():
        print(f"{arm}: entropy mean {s['entropy_mean']:.3f} (first5 {s['entropy_first5']:.3f} → last5 {s['entropy_last5']:.3f}), "
              f"clipfrac {s['clipfrac_mean']:.3f}, held-out greedy {s['held_out_greedy'][0]:.3f}")
    print(f"wrote {path} and {writer.plot_path('clip_higher_entropy.png')}")


if __name__ == "__main__":
    main()
