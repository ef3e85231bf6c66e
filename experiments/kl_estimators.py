"""KL estimators k1, k2, k3 of KL(π‖π_ref): bias and spread as the true KL grows, and
what each one's gradient does when used as a loss term.

Claims shown (Schulman 2020, and the "k3 in the loss" discussion of GRPO follow-ups):
  1. k1 and k3 are unbiased estimates of KL(π‖π_ref); k2 is biased, increasingly so as
     the KL grows; k3 has far lower spread than k1 when π is close to π_ref.
  2. As a *loss* (samples from π held fixed, as in GRPO's KL term), the expected gradient
     of k2 equals the true ∇KL(π‖π_ref); k1's expected gradient is 0 (a score-function
     term) and k3's is ∇KL(π_ref‖π), the *forward* KL — biased for the reverse KL.

Run:  python experiments/kl_estimators.py [--quick]
Writes results/kl_estimators/{metrics.jsonl, summary.json, kl_estimators.png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from common import ExperimentWriter, experiment_args

from jaxrl_llm.ops import kl_penalty

KINDS = ("k1", "k2", "k3")


def exact_kl(logits, ref_logits):
    """KL(softmax(logits) ‖ softmax(ref_logits)) in closed form."""
    logp, logq = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
    return jnp.sum(jnp.exp(logp) * (logp - logq))


def estimator_samples(rng, logits, ref_logits, kind, num_samples):
    """Per-sample estimates kind(x), x ~ π.  → [num_samples]"""
    x = jax.random.categorical(rng, logits, shape=(num_samples,))
    logp = jax.nn.log_softmax(logits)[x]
    logq = jax.nn.log_softmax(ref_logits)[x]
    return kl_penalty(logp[None], logq[None], kind, clamp=None)[0]


def expected_loss_gradient(logits, ref_logits, kind):
    """E_{x~π}[∇_θ k(x)] with the samples held fixed (no gradient through sampling).

    Computed exactly by weighting every token's per-sample gradient by π(x).
    """
    vocab = logits.shape[0]
    probs = jax.lax.stop_gradient(jax.nn.softmax(logits))

    def loss(theta):
        logp = jax.nn.log_softmax(theta)
        logq = jax.nn.log_softmax(ref_logits)
        per_token = kl_penalty(logp[None], logq[None], kind, clamp=None)[0]  # k(x) for every x
        return jnp.sum(probs * per_token)

    del vocab
    return jax.grad(loss)(logits)


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    num_samples = 2_000 if args.quick else 50_000
    scales = np.linspace(0.0, 3.0, 7 if args.quick else 16)[1:]
    vocab = 64
    writer = ExperimentWriter(args.out, "kl_estimators")
    key = jax.random.PRNGKey(args.seed)
    k_ref, k_dir, k_samples = jax.random.split(key, 3)
    ref_logits = jax.random.normal(k_ref, (vocab,))
    direction = jax.random.normal(k_dir, (vocab,))

    rows = []
    for i, scale in enumerate(scales):
        logits = ref_logits + scale * direction
        true_kl = float(exact_kl(logits, ref_logits))
        true_grad = jax.grad(exact_kl)(logits, ref_logits)
        forward_grad = jax.grad(lambda th: exact_kl(ref_logits, th))(logits)
        row = {"scale": float(scale), "true_kl": true_kl}
        for kind in KINDS:
            est = np.asarray(estimator_samples(jax.random.fold_in(k_samples, i), logits, ref_logits, kind, num_samples))
            g = expected_loss_gradient(logits, ref_logits, kind)
            row[f"{kind}_bias"] = float(est.mean() - true_kl)
            row[f"{kind}_rel_bias"] = float((est.mean() - true_kl) / true_kl)
            row[f"{kind}_std"] = float(est.std())
            row[f"{kind}_stderr"] = float(est.std() / np.sqrt(num_samples))
            row[f"{kind}_grad_rel_err"] = float(jnp.linalg.norm(g - true_grad) / jnp.linalg.norm(true_grad))
            row[f"{kind}_grad_rel_err_vs_forward_kl"] = float(
                jnp.linalg.norm(g - forward_grad) / jnp.linalg.norm(forward_grad)
            )
        writer.log(**row)
        rows.append(row)
        print(f"KL={true_kl:6.3f}  " + "  ".join(f"{k}: bias={row[f'{k}_bias']:+.4f} std={row[f'{k}_std']:.3f}" for k in KINDS))

    # plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = [r["true_kl"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for kind in KINDS:
        axes[0].errorbar(kl, [r[f"{kind}_bias"] for r in rows], yerr=[2 * r[f"{kind}_stderr"] for r in rows], label=kind, marker="o", capsize=3)
        axes[1].plot(kl, [r[f"{kind}_std"] for r in rows], label=kind, marker="o")
        axes[2].plot(kl, [r[f"{kind}_grad_rel_err"] for r in rows], label=kind, marker="o")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set(xlabel="true KL(π‖π_ref)", ylabel="bias of the mean (±2 s.e.)", title="estimator bias")
    axes[1].set(xlabel="true KL(π‖π_ref)", ylabel="std of a single-sample estimate", title="estimator spread", yscale="log")
    axes[2].set(xlabel="true KL(π‖π_ref)", ylabel="‖E∇k − ∇KL‖ / ‖∇KL‖", title="gradient when used as a loss")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(writer.plot_path("kl_estimators.png"), dpi=110)

    last = rows[-1]
    first = rows[0]
    summary = {
        "num_samples": num_samples,
        "max_true_kl": last["true_kl"],
        "k1_unbiased": all(abs(r["k1_bias"]) < 4 * r["k1_stderr"] + 1e-3 for r in rows),
        "k3_unbiased": all(abs(r["k3_bias"]) < 4 * r["k3_stderr"] + 1e-3 for r in rows),
        "k2_rel_bias_at_max_kl": last["k2_rel_bias"],
        "k3_over_k1_std_at_min_kl": first["k3_std"] / first["k1_std"],
        "grad_rel_err_at_max_kl": {k: last[f"{k}_grad_rel_err"] for k in KINDS},
        "k3_grad_rel_err_vs_forward_kl": last["k3_grad_rel_err_vs_forward_kl"],
    }
    path = writer.summary(summary)
    print(f"wrote {path} and {writer.plot_path('kl_estimators.png')}")


if __name__ == "__main__":
    main()
