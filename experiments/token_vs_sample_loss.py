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

Part B (mechanism, seconds): a tabular stop-hazard policy π(stop at t | right/wrong)
whose correctness is exogenous (p = 0.5, independent of length), trained with the real
``ops.group_advantages`` + ``ops.ppo_policy_loss(agg=mode)`` over many seeds. Only the
per-token weights of the aggregation can move length: under ``seq_mean_token_mean`` a
wrong response's negative advantage is divided by its length, so long wrong responses
are pushed down less and wrong answers drift long (right ones short).

Run:  python experiments/token_vs_sample_loss.py [--quick] [--part {a,b,all}]
Writes results/token_vs_sample_loss/{metrics.jsonl, summary.json, token_vs_sample_loss.png,
token_vs_sample_loss_mechanism.png}.
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


def make_length_run(mode: str, *, steps: int, groups: int = 8, group_size: int = 8, max_len: int = 12,
                    lr: float = 0.05, p_right: float = 0.5, init_stop: float = 0.3):
    """Jitted, seed-vmapped GRPO run of a tabular length policy under aggregation ``mode``.

    Response = answer token (right with fixed prob ``p_right``, not learned) then a
    stop/continue decision per position from stop logits [2, T] indexed by correctness.

    Returns:
      fn(keys: [S, 2] PRNG keys) -> (right_len, wrong_len): [S, steps] float32 mean
      length (tokens, answer + EOS included) of right / wrong responses per step.
    """
    batch, t_max = groups * group_size, max_len
    init = jnp.full((2, t_max), jnp.log(init_stop / (1 - init_stop)))
    opt = optax.adam(lr)

    def token_logp(stop_logits, correct, stops, mask):
        s = stop_logits[correct]  # [B, T]
        lp = jnp.where(stops, jax.nn.log_sigmoid(s), jax.nn.log_sigmoid(-s))
        lp = lp.at[:, 0].set(jnp.log(p_right))  # the answer token is exogenous: constant log-prob
        return jnp.where(mask > 0, lp, 0.0)

    def step(carry, key):
        params, opt_state = carry
        # sample
        k_right, k_stop = jax.random.split(key)
        correct = (jax.random.uniform(k_right, (batch,)) < p_right).astype(jnp.int32)
        u = jax.random.uniform(k_stop, (batch, t_max))
        stops = (u < jax.nn.sigmoid(params[correct])).at[:, 0].set(False).at[:, -1].set(True)
        length = jnp.argmax(stops, axis=1) + 1  # [B]
        mask = (jnp.arange(t_max)[None] < length[:, None]).astype(jnp.float32)
        # score + advantages: the reward is correctness only, independent of length
        adv = ops.group_advantages(correct.astype(jnp.float32), group_size)
        old_logp = token_logp(params, correct, stops, mask)

        # update: one PPO step (ratio 1) so only the aggregation weights differ between modes
        def loss(p):
            return ops.ppo_policy_loss(token_logp(p, correct, stops, mask), old_logp, adv, mask,
                                       agg=mode, norm_length=t_max)[0]

        updates, opt_state = opt.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        n_len = length.astype(jnp.float32)
        wrong = jnp.sum(n_len * (1 - correct)) / jnp.maximum(jnp.sum(1 - correct), 1)
        right = jnp.sum(n_len * correct) / jnp.maximum(jnp.sum(correct), 1)
        return (params, opt_state), (right, wrong)

    def run(key):
        _, out = jax.lax.scan(step, (init, opt.init(init)), jax.random.split(key, steps))
        return out

    return jax.jit(jax.vmap(run))


def mechanism(writer, *, seed: int, quick: bool) -> dict:
    """Part B: final right/wrong lengths per mode over many seeds, plus a plot."""
    steps, n_seeds = (60, 8) if quick else (200, 32)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_seeds)
    plt = rc.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    out = {"steps": steps, "num_seeds": n_seeds, "initial_length": 1 + 1 / 0.3, "modes": {}}
    last = max(1, steps // 10)
    for i, mode in enumerate(MODES):
        right, wrong = (np.asarray(x, np.float64) for x in make_length_run(mode, steps=steps)(keys))
        for ax, y in zip(axes, (wrong, right)):
            ax.plot(rc.smooth(y.mean(0)), color=f"C{i}", label=mode)
            ax.fill_between(np.arange(steps), rc.smooth(y.min(0)), rc.smooth(y.max(0)), color=f"C{i}", alpha=0.12)
        w_seed, r_seed = wrong[:, -last:].mean(1), right[:, -last:].mean(1)
        out["modes"][mode] = {"wrong_length_final": rc.mean_std(w_seed.tolist()),
                              "right_length_final": rc.mean_std(r_seed.tolist()),
                              "wrong_length_per_seed": w_seed.tolist()}
        print(f"[B] {mode:24s} final length wrong {w_seed.mean():.2f} ± {w_seed.std():.2f}, "
              f"right {r_seed.mean():.2f} ± {r_seed.std():.2f}")
    axes[0].set(xlabel="step", ylabel="length (tokens)", title="wrong responses (band: min–max over seeds)")
    axes[1].set(xlabel="step", ylabel="length (tokens)", title="right responses")
    rc.save_figure(fig, axes, writer.plot_path("token_vs_sample_loss_mechanism.png"))
    return out


def main() -> None:
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all", help="a: LM run, b: mechanism")
    args = parser.parse_args()
    rc.enable_compile_cache()
    writer = ExperimentWriter(args.out, "token_vs_sample_loss")
    t_start = time.perf_counter()
    example = worked_example()
    mech = mechanism(writer, seed=args.seed, quick=args.quick) if args.part in ("b", "all") else None
    if args.part == "b":
        path = writer.summary({"worked_example": example, "mechanism": mech,
                               "seconds": time.perf_counter() - t_start})
        print(f"wrote {path}")
        return
    steps, seeds = (8, [args.seed]) if args.quick else (40, [args.seed + i for i in range(3)])
    train_records, held_out = rc.make_task()

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
    rc.save_figure(fig, axes, writer.plot_path("token_vs_sample_loss.png"), legend_size=7)

    summary = {"steps": steps, "seeds": seeds, "worked_example": example, "mechanism": mech,
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
