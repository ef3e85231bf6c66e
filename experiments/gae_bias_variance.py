"""GAE's λ trades bias from an inaccurate critic against variance from sampled returns.

Setting: an episodic Markov reward process over S states whose "action" at token t is the
sampled next state s_{t+1} (a policy over next states). Rewards are stochastic,
r_t = R(s_t, s_{t+1}) + σ_r·noise, and episodes have ragged lengths L ∈ [T/2, T] (right
padding, handled by `mask`). Because the process is known, the true values are exact:

  V_h(s)      = Σ_{s'} P(s'|s) · (R(s, s') + γ·V_{h−1}(s')),   V_0 = 0
  Q_h(s, s')  = R(s, s') + γ·V_{h−1}(s')
  A_h(s, s')  = Q_h(s, s') − V_h(s)

(h = tokens left in the episode, including this one). The critic is what a learned one
looks like: V̂_t = V_h(s_t) + b(s_t) + σ_v·ε_t, a fixed per-state bias b plus fresh noise.
Advantages Â^λ come from `jaxrl_llm.ops.gae` on the whole ragged batch.

Since Â^λ_t = G^λ_t − V̂_t, its error splits into
  Â^λ − A = (G^λ − Q) − (V̂_t − V_t)
The second part is the critic's error at s_t: it depends on the state only, so it drops
out of the policy gradient (it is a baseline). The first part, the error of the λ-return
as an estimate of Q(s_t, a_t), is what biases the gradient; it is what "bias" means below.
At λ = 1 the λ-return is the Monte-Carlo return, so this bias is exactly 0 whatever the
critic; at λ = 0 it is γ·b(s_{t+1}), the critic's bias at the next state.

Per cell c = (h, s_t, a_t) we take the conditional mean of the error (bias) and the
conditional variance of Â (estimator variance), over many episodes, and report
  bias_rms  = sqrt(Σ_c w_c · (mean_c² − s.e._c²))   (visit-weighted, sampling floor removed)
  variance  = pooled within-cell variance of Â
  bias_mean = the signed token-mean error with its standard error over episodes.

Claims: bias falls and variance rises monotonically with λ; at λ = 1 the bias is zero
within its standard error (signed mean within 3 s.e., cell χ²/dof ≈ 1); at λ = 0 it is
many standard errors away.

Run:  python experiments/gae_bias_variance.py [--quick]
Writes results/gae_bias_variance/{metrics.jsonl, summary.json, gae_bias_variance.png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from common import ExperimentWriter, experiment_args

from jaxrl_llm.ops import gae

LAMBDAS = (0.0, 0.5, 0.9, 0.95, 1.0)
MIN_CELL_COUNT = 20  # cells seen fewer times are left out of the per-cell statistics


def make_process(rng: np.random.Generator, num_states: int):
    """Transition matrix P [S, S], mean rewards R [S, S], critic bias b [S]."""
    P = rng.dirichlet(np.full(num_states, 0.7), size=num_states)
    R = rng.normal(0.0, 0.3, size=(num_states, num_states))
    b = rng.normal(0.4, 0.6, size=num_states)  # an optimistic, uneven critic
    return P, R, b


def true_values(P, R, gamma, horizon):
    """V [horizon + 1, S] (V[0] = 0) and Q [horizon + 1, S, S] (Q[0] unused) by backward DP."""
    num_states = P.shape[0]
    V = np.zeros((horizon + 1, num_states))
    Q = np.zeros((horizon + 1, num_states, num_states))
    for h in range(1, horizon + 1):
        Q[h] = R + gamma * V[h - 1][None, :]
        V[h] = np.sum(P * Q[h], axis=1)
    return V, Q


def sample_episodes(rng, P, R, b, V, Q, *, num_episodes, horizon, reward_noise, value_noise):
    """Right-padded batch of episodes with ragged lengths.  All arrays [N, T]."""
    num_states = P.shape[0]
    lengths = rng.integers(horizon // 2, horizon + 1, size=num_episodes)
    t = np.arange(horizon)[None, :]
    mask = (t < lengths[:, None]).astype(np.float32)
    h = np.maximum(lengths[:, None] - t, 0)  # tokens left, including this one (0 on padding)

    # sample: the state path s_0..s_T; the action at t is s_{t+1}
    states = np.zeros((num_episodes, horizon + 1), np.int64)
    states[:, 0] = rng.integers(num_states, size=num_episodes)
    cum = np.cumsum(P, axis=1)
    for k in range(horizon):
        u = rng.random(num_episodes)[:, None]
        states[:, k + 1] = np.minimum(np.sum(u > cum[states[:, k]], axis=1), num_states - 1)
    s, a = states[:, :-1], states[:, 1:]

    # score: stochastic token rewards, the critic's values, and the exact targets
    rewards = R[s, a] + reward_noise * rng.normal(size=s.shape)
    values = V[h, s] + b[s] + value_noise * rng.normal(size=s.shape)
    q_true = Q[h, s, a]
    adv_true = q_true - V[h, s]
    cell = (h * num_states + s) * num_states + a
    return dict(
        rewards=rewards * mask, values=values * mask, mask=mask, q_true=q_true,
        v_true=V[h, s], adv_true=adv_true, cell=cell, lengths=lengths,
    )


def cell_stats(x, cell, valid, num_cells):
    """Per-cell count, mean and (unbiased) variance of x over the valid tokens."""
    c, xv = cell[valid], x[valid]
    n = np.bincount(c, minlength=num_cells).astype(np.float64)
    s1 = np.bincount(c, weights=xv, minlength=num_cells)
    s2 = np.bincount(c, weights=xv * xv, minlength=num_cells)
    mean = s1 / np.maximum(n, 1)
    var = (s2 - n * mean**2) / np.maximum(n - 1, 1)
    return n, mean, np.maximum(var, 0.0)


def estimator_stats(adv, ep, num_cells):
    """Bias (of the λ-return as an estimate of Q) and variance of Â, per the module doc."""
    valid = ep["mask"] > 0
    ret_err = (adv + ep["values"]) - ep["q_true"]  # G^λ − Q(s_t, a_t)
    n, m_err, v_err = cell_stats(ret_err, ep["cell"], valid, num_cells)
    _, _, v_adv = cell_stats(adv, ep["cell"], valid, num_cells)
    keep = n >= MIN_CELL_COUNT
    w = n[keep] / n[keep].sum()
    se2 = v_err[keep] / n[keep]
    bias_ms = float(np.sum(w * (m_err[keep] ** 2 - se2)))
    chi2_per_dof = float(np.mean(m_err[keep] ** 2 / np.maximum(se2, 1e-12)))
    variance = float(np.sum((n[keep] - 1) * v_adv[keep]) / np.sum(n[keep] - 1))
    # signed mean over tokens, standard error from independent episodes
    per_episode = np.sum(ret_err * ep["mask"], axis=1) / ep["lengths"]
    raw_err = adv - ep["adv_true"]  # includes the critic's own error at s_t (a baseline)
    return dict(
        bias_rms=float(np.sqrt(max(bias_ms, 0.0))),
        bias_ms=bias_ms,
        bias_mean=float(per_episode.mean()),
        bias_mean_stderr=float(per_episode.std(ddof=1) / np.sqrt(len(per_episode))),
        chi2_per_dof=chi2_per_dof,
        num_cells=int(keep.sum()),
        variance=variance,
        mse=float(np.sum(w * m_err[keep] ** 2) - np.sum(w * se2) + variance),
        raw_adv_bias_mean=float(raw_err[valid].mean()),
        raw_adv_rmse=float(np.sqrt(np.mean(raw_err[valid] ** 2))),
    )


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    num_episodes = 4_000 if args.quick else 40_000
    horizon = 32 if args.quick else 128
    num_states, gamma = 4, 1.0
    reward_noise, value_noise = 0.5, 0.3
    writer = ExperimentWriter(args.out, "gae_bias_variance")
    rng = np.random.default_rng(args.seed)
    start = time.time()

    P, R, b = make_process(rng, num_states)
    V, Q = true_values(P, R, gamma, horizon)
    ep = sample_episodes(
        rng, P, R, b, V, Q, num_episodes=num_episodes, horizon=horizon,
        reward_noise=reward_noise, value_noise=value_noise,
    )
    num_cells = (horizon + 1) * num_states * num_states
    print(f"{num_episodes} episodes, lengths {ep['lengths'].min()}..{ep['lengths'].max()}, "
          f"{int(ep['mask'].sum())} tokens, critic bias b = {np.round(b, 2).tolist()}")

    # advantages: the library's masked GAE on the whole ragged batch, one jit per λ
    gae_jit = jax.jit(gae, static_argnames=("gamma", "lam"))
    rewards, values, mask = (jnp.asarray(ep[k], jnp.float32) for k in ("rewards", "values", "mask"))
    rows = []
    for lam in LAMBDAS:
        adv, _ = gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
        stats = estimator_stats(np.asarray(adv, np.float64), ep, num_cells)
        row = {"lam": lam, **stats}
        writer.log(**row)
        rows.append(row)
        print(f"λ={lam:4.2f}  bias_rms={stats['bias_rms']:.4f}  bias_mean={stats['bias_mean']:+.4f}"
              f"±{stats['bias_mean_stderr']:.4f}  χ²/dof={stats['chi2_per_dof']:8.2f}"
              f"  var={stats['variance']:.3f}  mse={stats['mse']:.3f}")

    # plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["lam"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(lams, [r["bias_rms"] for r in rows], marker="o", label="RMS bias over (h, s, a) cells")
    axes[0].errorbar(lams, [r["bias_mean"] for r in rows], yerr=[2 * r["bias_mean_stderr"] for r in rows],
                     marker="s", capsize=3, label="signed mean bias (±2 s.e.)")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(xlabel="λ", ylabel="E[G^λ − Q(s,a)]", title="bias (critic error leaking into Â)")
    axes[1].plot(lams, [r["variance"] for r in rows], marker="o", color="C2")
    axes[1].set(xlabel="λ", ylabel="Var[Â | h, s, a] (pooled)", title="variance", yscale="log")
    axes[2].plot(lams, [r["mse"] for r in rows], marker="o", color="C3", label="bias² + variance")
    axes[2].set(xlabel="λ", ylabel="mean squared error", title="MSE of the λ-return vs Q")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"GAE on a {num_states}-state MRP, T≤{horizon}, γ={gamma}, critic = V + b(s) + {value_noise}·ε",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(writer.plot_path("gae_bias_variance.png"), dpi=110)

    first, last = rows[0], rows[-1]
    bias = [r["bias_rms"] for r in rows]
    var = [r["variance"] for r in rows]
    summary = {
        "num_episodes": num_episodes,
        "horizon": horizon,
        "gamma": gamma,
        "lambdas": list(LAMBDAS),
        "bias_rms": bias,
        "variance": var,
        "mse": [r["mse"] for r in rows],
        "best_mse_lambda": lams[int(np.argmin([r["mse"] for r in rows]))],
        "bias_decreases_with_lambda": all(x > y for x, y in zip(bias, bias[1:])),
        "variance_increases_with_lambda": all(x < y for x, y in zip(var, var[1:])),
        "bias_mean_lam0": first["bias_mean"],
        "bias_mean_lam0_z": first["bias_mean"] / first["bias_mean_stderr"],
        "bias_mean_lam1": last["bias_mean"],
        "bias_mean_lam1_stderr": last["bias_mean_stderr"],
        "lam1_unbiased": abs(last["bias_mean"]) < 3 * last["bias_mean_stderr"],
        "chi2_per_dof_lam0": first["chi2_per_dof"],
        "chi2_per_dof_lam1": last["chi2_per_dof"],
        "num_cells": last["num_cells"],
        "variance_ratio_lam1_over_lam0": last["variance"] / first["variance"],
        "seconds": time.time() - start,
    }
    path = writer.summary(summary)
    print(f"wrote {path} and {writer.plot_path('gae_bias_variance.png')}")


if __name__ == "__main__":
    main()
