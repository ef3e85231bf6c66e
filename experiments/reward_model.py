"""Reward models from noisy preferences with a known gold score: Bradley–Terry pairs vs
Plackett–Luce rankings, what to do with ties, and how a length-biased labeller leaks into
the learned reward.

Items are "responses" described by d = 16 features x ~ N(0, I) plus a length ℓ
(standardised). The gold score s = w·x (|w| = 1) does not depend on length. Length is
correlated with the features through a direction u ⊥ w (ℓ = α·u·x + √(1−α²)·z), so a
model can read length off x even without the length feature, while gold stays
length-independent. Labellers see s_label = s + γ·ℓ (γ = 0 except in part 3) and answer:
  pairs:    P(a ≻ b) = σ(β·(s_a − s_b))                 (Bradley–Terry)
            (optionally flipped with probability --flip, default 0)
  rankings: a Plackett–Luce sample of K = 4 items with scores β·s (Gumbel-max); for
            K = 2 this is exactly the pair model above.
The reward model is linear in [x, ℓ] (the gold family, so results are about data and
loss, not capacity), trained full-batch with AdamW on
`jaxrl_llm.ops.bradley_terry_loss` / `plackett_luce_loss`; it is evaluated on fresh items
against the gold score: pairwise accuracy on random pairs, AUC of separating the gold top
half from the bottom half, and correlation with length.

Parts:
  1. data size: BT on n pairs vs PL on K = 4 rankings of the same comparison budget.
     A ranking of K items is charged K(K−1)/2 = 6 comparisons, the pairs it implies (how
     InstructGPT expanded its rankings into pairs), so PL gets n/6 rankings. We also show
     the K−1 = 3 accounting (a ranking as the K−1 adjacent choices a labeller makes when
     sorting, n/3 rankings) and BT on the 6 pairs expanded from the same n/6 rankings
     (same data, other loss).
  2. ties: labellers answer "tie" when their perceived difference is below τ (≈ 30% of
     pairs). Dropping ties vs keeping them with label ½ in a soft BT loss
     −y·logσ(Δ) − (1−y)·logσ(−Δ), against forced-choice labels on the same pairs.
  3. length bias: labels from s + γ·ℓ. The plain RM learns to like length; fixes:
     regress length out of the trained RM's score, an ODIN-style length head plus a
     decorrelation penalty, and (to show it is not enough) dropping the length feature.

Run:  python experiments/reward_model.py [--quick]
Writes results/reward_model/{metrics.jsonl, summary.json, reward_model.png}.
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
from common import ExperimentWriter, experiment_args

from jaxrl_llm.ops import bradley_terry_loss, plackett_luce_loss

DIM = 16  # quality features; the model sees DIM + 1 inputs (x, ℓ)
K = 4
BETA = 1.0  # labeller's inverse temperature on a gold score with unit std
LENGTH_CORR = 0.6  # α: how much of ℓ is predictable from x (through u ⊥ w)
LENGTH_BIAS = 0.5  # γ in part 3
TIE_FRACTION = 0.3
LR, STEPS, WEIGHT_DECAY = 5e-2, 200, 1e-3
DECORR_COEF = 10.0


# ---------------------------------------------------------------- items and labels


class World:
    """Gold direction w, length direction u ⊥ w, and an item sampler."""

    def __init__(self, rng: np.random.Generator):
        w = rng.normal(size=DIM)
        self.w = w / np.linalg.norm(w)
        u = rng.normal(size=DIM)
        u -= (u @ self.w) * self.w
        self.u = u / np.linalg.norm(u)

    def items(self, rng, shape):
        """Features [..., DIM + 1] (x then ℓ) and gold scores [...]."""
        x = rng.normal(size=(*shape, DIM))
        length = LENGTH_CORR * (x @ self.u) + np.sqrt(1 - LENGTH_CORR**2) * rng.normal(size=shape)
        return np.concatenate([x, length[..., None]], axis=-1), x @ self.w


def label_score(feats, gold, length_bias):
    return gold + length_bias * feats[..., -1]


def sample_pairs(world, rng, n, length_bias=0.0, flip=0.0):
    """n BT comparisons → (chosen [n, F], rejected [n, F])."""
    feats, gold = world.items(rng, (n, 2))
    s = BETA * label_score(feats, gold, length_bias)
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(s[:, 0] - s[:, 1])))
    a_wins ^= rng.random(n) < flip
    chosen = np.where(a_wins[:, None], feats[:, 0], feats[:, 1])
    rejected = np.where(a_wins[:, None], feats[:, 1], feats[:, 0])
    return chosen, rejected


def sample_rankings(world, rng, m, length_bias=0.0):
    """m Plackett–Luce rankings of K items (Gumbel-max sampling) → [m, K, F] best first."""
    feats, gold = world.items(rng, (m, K))
    perturbed = BETA * label_score(feats, gold, length_bias) + rng.gumbel(size=(m, K))
    order = np.argsort(-perturbed, axis=1)
    return np.take_along_axis(feats, order[:, :, None], axis=1)


def expand_to_pairs(rankings):
    """[m, K, F] rankings → the K(K−1)/2 implied (chosen, rejected) pairs each."""
    idx = [(i, j) for i in range(K) for j in range(i + 1, K)]
    chosen = np.concatenate([rankings[:, i] for i, _ in idx])
    rejected = np.concatenate([rankings[:, j] for _, j in idx])
    return chosen, rejected


def sample_pairs_with_ties(world, rng, n, tau):
    """Pairs with the labeller's perceived difference Δ' = β(s_a − s_b) + logistic noise.

    Returns (a, b, forced [n] ∈ {0, 1}, soft [n] ∈ {0, ½, 1}, is_tie [n]); forced = 1{Δ' > 0}
    is the forced-choice label (an exact BT sample), soft is ½ where |Δ'| < τ.
    """
    feats, gold = world.items(rng, (n, 2))
    perceived = BETA * (gold[:, 0] - gold[:, 1]) + rng.logistic(size=n)
    forced = (perceived > 0).astype(np.float32)
    is_tie = np.abs(perceived) < tau
    soft = np.where(is_tie, 0.5, forced).astype(np.float32)
    return feats[:, 0], feats[:, 1], forced, soft, is_tie


# ---------------------------------------------------------------- reward model


def init_params(key, in_dim=DIM + 1):
    return {
        "w": 0.01 * jax.random.normal(key, (in_dim,)),
        "b": jnp.zeros(()),
        "length_coef": jnp.zeros(()),  # only used by the ODIN-style length head
    }


def reward(params, feats):
    """[..., F] → [...] scalar reward (linear: the gold family, so capacity is not the issue)."""
    return feats @ params["w"] + params["b"]


def bt_loss(params, data):
    return bradley_terry_loss(reward(params, data["chosen"]), reward(params, data["rejected"]))[0]


def pl_loss(params, data):
    return plackett_luce_loss(reward(params, data["rankings"]))[0]


def soft_bt_loss(params, data):
    """−y·logσ(r_a − r_b) − (1−y)·logσ(r_b − r_a), averaged over pairs with weight 1
    (y = ½ for kept ties; a dropped pair has weight 0, which keeps shapes equal)."""
    diff = reward(params, data["a"]) - reward(params, data["b"])
    y, weight = data["y"], data["weight"]
    per_pair = -(y * jax.nn.log_sigmoid(diff) + (1 - y) * jax.nn.log_sigmoid(-diff))
    return jnp.sum(weight * per_pair) / jnp.sum(weight)


def decorrelated_bt_loss(params, data):
    """ODIN-style: labels explained by quality q plus a linear length head c·ℓ, with a
    penalty on corr(q, ℓ)² over the batch's items; only q is used as the reward."""
    qc, qr = reward(params, data["chosen"]), reward(params, data["rejected"])
    lc, lr = data["chosen"][:, -1], data["rejected"][:, -1]
    c = params["length_coef"]
    loss, _ = bradley_terry_loss(qc + c * lc, qr + c * lr)
    q, length = jnp.concatenate([qc, qr]), jnp.concatenate([lc, lr])
    qz = (q - q.mean()) / (q.std() + 1e-6)
    lz = (length - length.mean()) / (length.std() + 1e-6)
    return loss + DECORR_COEF * jnp.mean(qz * lz) ** 2


def train(key, loss_fn, data, in_dim=DIM + 1, steps=STEPS):
    """Full-batch AdamW; returns the trained params."""
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, weight_decay=WEIGHT_DECAY))
    params = init_params(key, in_dim)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, data)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


# seeds train side by side: vmap over (key, data); one compile per data shape
train_seeds = jax.jit(jax.vmap(train, in_axes=(0, None, 0)), static_argnums=(1,))
train_seeds_nolen = jax.jit(jax.vmap(lambda k, f, d: train(k, f, d, in_dim=DIM), in_axes=(0, None, 0)),
                            static_argnums=(1,))


# ---------------------------------------------------------------- evaluation


def evaluate(scores, gold, length, pair_idx):
    """Accuracy vs gold on fixed random test pairs, gold top-half AUC, corr with length."""
    i, j = pair_idx
    acc = np.mean((scores[i] > scores[j]) == (gold[i] > gold[j]))
    longer = length[i] > length[j]
    longer_wins = np.mean((scores[i] > scores[j]) == longer)
    pos = gold > np.median(gold)
    ranks = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    auc = (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {
        "acc": float(acc),
        "auc": float(auc),
        "corr_gold": float(np.corrcoef(scores, gold)[0, 1]),
        "corr_length": float(np.corrcoef(scores, length)[0, 1]),
        "longer_wins": float(longer_wins),
    }


def eval_seeds(params, test, feats=None):
    feats = test["feats"] if feats is None else feats
    scores = np.asarray(jax.vmap(reward, in_axes=(0, None))(params, jnp.asarray(feats)))
    per_seed = [evaluate(s, test["gold"], test["length"], test["pairs"]) for s in scores]
    return {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]} | {
        f"{k}_sd": float(np.std([m[k] for m in per_seed])) for k in ("acc", "auc", "corr_length")
    } | {"acc_per_seed": [m["acc"] for m in per_seed]}, scores


def stack(datasets):
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs), jnp.float32), *datasets)


def main() -> None:
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--flip", type=float, default=0.0,
                        help="extra label-flip probability on pairwise labels (parts 1 and 3; default 0)")
    args = parser.parse_args()
    sizes = (120, 480, 1920) if args.quick else (60, 120, 240, 480, 960, 1920, 3840)
    tie_sizes = (480,) if args.quick else (240, 960, 3840)
    length_size = 1920 if args.quick else 3840
    num_seeds = 3 if args.quick else 8
    writer = ExperimentWriter(args.out, "reward_model")
    rng = np.random.default_rng(args.seed)
    start = time.time()
    world = World(rng)
    test_feats, test_gold = world.items(rng, (4000,))
    test = {"feats": test_feats, "gold": test_gold, "length": test_feats[:, -1],
            "pairs": (rng.integers(0, 4000, 20000), rng.integers(0, 4000, 20000))}
    keys = jax.random.split(jax.random.PRNGKey(args.seed), num_seeds)
    summary: dict = {"sizes": list(sizes), "num_seeds": num_seeds, "K": K, "beta": BETA, "flip": args.flip}

    # ---- part 1: BT pairs vs PL rankings at equal comparison budgets
    curves: dict[str, list[dict]] = {m: [] for m in ("bt", "pl_k4_pairs_budget", "pl_k4_edges_budget", "bt_expanded_rankings")}
    for n in sizes:
        pairs = [sample_pairs(world, rng, n, flip=args.flip) for _ in range(num_seeds)]
        rank6 = [sample_rankings(world, rng, n // 6) for _ in range(num_seeds)]
        rank3 = [sample_rankings(world, rng, n // 3) for _ in range(num_seeds)]
        runs = {
            "bt": (bt_loss, stack([{"chosen": c, "rejected": r} for c, r in pairs])),
            "pl_k4_pairs_budget": (pl_loss, stack([{"rankings": r} for r in rank6])),
            "pl_k4_edges_budget": (pl_loss, stack([{"rankings": r} for r in rank3])),
            "bt_expanded_rankings": (bt_loss, stack([dict(zip(("chosen", "rejected"), expand_to_pairs(r))) for r in rank6])),
        }
        for method, (loss_fn, data) in runs.items():
            metrics, _ = eval_seeds(train_seeds(keys, loss_fn, data), test)
            row = {"part": "size", "method": method, "comparisons": n, **metrics}
            writer.log(**row)
            curves[method].append(row)
            print(f"n={n:5d} {method:22s} acc={metrics['acc']:.4f}±{metrics['acc_sd']:.4f} auc={metrics['auc']:.4f}")
    summary["size_acc"] = {m: [r["acc"] for r in rows] for m, rows in curves.items()}
    summary["size_auc"] = {m: [r["auc"] for r in rows] for m, rows in curves.items()}

    # ---- part 2: ties — drop them, or keep them at label ½
    probe = rng.logistic(size=200_000) + BETA * (world.items(rng, (200_000, 2))[1] @ np.array([1.0, -1.0]))
    tau = float(np.quantile(np.abs(probe), TIE_FRACTION))
    tie_rows = []
    for n in tie_sizes:
        sets = [sample_pairs_with_ties(world, rng, n, tau) for _ in range(num_seeds)]
        tie_frac = float(np.mean([s[4].mean() for s in sets]))
        one = np.ones(n, np.float32)
        forced = stack([{"a": a, "b": b, "y": y, "weight": one} for a, b, y, _, _ in sets])
        kept = stack([{"a": a, "b": b, "y": y, "weight": one} for a, b, _, y, _ in sets])
        dropped = stack([{"a": a, "b": b, "y": y, "weight": (~t).astype(np.float32)} for a, b, y, _, t in sets])
        for method, params in (("forced_choice", train_seeds(keys, soft_bt_loss, forced)),
                               ("ties_dropped", train_seeds(keys, soft_bt_loss, dropped)),
                               ("ties_half_label", train_seeds(keys, soft_bt_loss, kept))):
            metrics, _ = eval_seeds(params, test)
            row = {"part": "ties", "method": method, "pairs": n, "tie_fraction": tie_frac, "tau": tau, **metrics}
            writer.log(**row)
            tie_rows.append(row)
            print(f"n={n:5d} ties={tie_frac:.2f} {method:16s} acc={metrics['acc']:.4f}±{metrics['acc_sd']:.4f} auc={metrics['auc']:.4f}")
    by = {m: [r for r in tie_rows if r["method"] == m] for m in ("forced_choice", "ties_dropped", "ties_half_label")}
    # paired by seed (same pairs, different treatment of the ties): mean ± s.e. of the difference
    paired = [np.subtract(h["acc_per_seed"], d["acc_per_seed"]) for h, d in zip(by["ties_half_label"], by["ties_dropped"])]
    summary["ties"] = {
        "tau": tau,
        "tie_fraction": [r["tie_fraction"] for r in by["ties_dropped"]],
        "sizes": list(tie_sizes),
        **{m: [r["acc"] for r in rows] for m, rows in by.items()},
        "half_minus_dropped_acc": [float(d.mean()) for d in paired],
        "half_minus_dropped_acc_stderr": [float(d.std(ddof=1) / np.sqrt(len(d))) for d in paired],
    }

    # ---- part 3: length-biased labels, gold independent of length
    biased = [sample_pairs(world, rng, length_size, length_bias=LENGTH_BIAS, flip=args.flip) for _ in range(num_seeds)]
    clean = [sample_pairs(world, rng, length_size, flip=args.flip) for _ in range(num_seeds)]
    biased_data = stack([{"chosen": c, "rejected": r} for c, r in biased])
    clean_data = stack([{"chosen": c, "rejected": r} for c, r in clean])
    plain = train_seeds(keys, bt_loss, biased_data)
    length_rows = []

    def log_length(method, metrics):
        row = {"part": "length", "method": method, "pairs": length_size, "length_bias": LENGTH_BIAS, **metrics}
        writer.log(**row)
        length_rows.append(row)
        print(f"length: {method:22s} acc={metrics['acc']:.4f} corr(r, ℓ)={metrics['corr_length']:+.3f} "
              f"longer wins={metrics['longer_wins']:.3f}")

    log_length("unbiased_labels", eval_seeds(train_seeds(keys, bt_loss, clean_data), test)[0])
    log_length("plain", eval_seeds(plain, test)[0])
    # regress out: fit r ≈ a + c·ℓ on each seed's training items, subtract c·ℓ
    test_scores = np.asarray(jax.vmap(reward, in_axes=(0, None))(plain, jnp.asarray(test["feats"])))
    fixed = []
    for seed in range(num_seeds):
        items = np.concatenate(biased[seed])
        r_train = np.asarray(reward(jax.tree.map(lambda x: x[seed], plain), jnp.asarray(items)))
        slope = np.polyfit(items[:, -1], r_train, 1)[0]
        fixed.append(evaluate(test_scores[seed] - slope * test["length"], test["gold"], test["length"], test["pairs"]))
    log_length("regress_out_length", {k: float(np.mean([m[k] for m in fixed])) for k in fixed[0]})
    log_length("length_head_decorrelation", eval_seeds(train_seeds(keys, decorrelated_bt_loss, biased_data), test)[0])
    no_len = {k: v[..., :DIM] for k, v in biased_data.items()}
    nolen_params = train_seeds_nolen(keys, bt_loss, no_len)
    log_length("drop_length_feature", eval_seeds(nolen_params, test, test["feats"][:, :DIM])[0])
    summary["length"] = {r["method"]: {k: r[k] for k in ("acc", "auc", "corr_length", "longer_wins")} for r in length_rows}
    summary["length"]["gold_corr_length"] = float(np.corrcoef(test["gold"], test["length"])[0, 1])

    # ---- plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    labels = {"bt": "BT, n pairs", "pl_k4_pairs_budget": "PL K=4, n/6 rankings (ranking = 6 pairs)",
              "pl_k4_edges_budget": "PL K=4, n/3 rankings (ranking = 3 choices)",
              "bt_expanded_rankings": "BT on the 6 pairs of n/6 rankings"}
    for method, rows in curves.items():
        axes[0].errorbar([r["comparisons"] for r in rows], [r["acc"] for r in rows],
                         yerr=[r["acc_sd"] for r in rows], marker="o", capsize=3, label=labels[method])
    axes[0].set(xscale="log", xlabel="comparison budget n", ylabel="held-out pairwise accuracy vs gold",
                title="data size: Bradley–Terry vs Plackett–Luce")
    width = 0.25
    for k, method in enumerate(("forced_choice", "ties_dropped", "ties_half_label")):
        rows = [r for r in tie_rows if r["method"] == method]
        axes[1].bar(np.arange(len(rows)) + (k - 1) * width, [r["acc"] for r in rows], width,
                    yerr=[r["acc_sd"] for r in rows], capsize=3, label=method.replace("_", " "))
    axes[1].set_xticks(np.arange(len(tie_sizes)), [f"{n} pairs" for n in tie_sizes])
    lo = min(r["acc"] for r in tie_rows)
    axes[1].set(ylim=(lo - 0.05, 1.0), ylabel="held-out pairwise accuracy vs gold",
                title=f"ties ({TIE_FRACTION:.0%} of pairs): drop vs label ½")
    names = [r["method"].replace("_", "\n") for r in length_rows]
    x = np.arange(len(length_rows))
    axes[2].bar(x - 0.2, [r["corr_length"] for r in length_rows], 0.4, label="corr(RM score, length)")
    axes[2].bar(x + 0.2, [r["acc"] - 0.5 for r in length_rows], 0.4, bottom=0.5, label="accuracy vs gold")
    axes[2].set_xticks(x, names, fontsize=7)
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set(ylabel="corr(RM, length) | accuracy vs gold", title=f"length-biased labels (γ={LENGTH_BIAS}), gold independent of length")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(writer.plot_path("reward_model.png"), dpi=110)

    # ---- claims
    bt, pl6 = summary["size_acc"]["bt"], summary["size_acc"]["pl_k4_pairs_budget"]
    L = summary["length"]
    summary.update({
        "bt_acc_increases_with_size": bt[-1] > bt[0] + 0.05,
        "pl_acc_increases_with_size": pl6[-1] > pl6[0] + 0.05,
        "bt_acc_largest": bt[-1],
        "pl_pairs_budget_acc_largest": pl6[-1],
        "pl_edges_budget_acc_largest": summary["size_acc"]["pl_k4_edges_budget"][-1],
        "plain_corr_length": L["plain"]["corr_length"],
        "regress_out_corr_length": L["regress_out_length"]["corr_length"],
        "decorrelation_corr_length": L["length_head_decorrelation"]["corr_length"],
        "drop_feature_corr_length": L["drop_length_feature"]["corr_length"],
        "seconds": time.time() - start,
    })
    path = writer.summary(summary)
    print(f"wrote {path} and {writer.plot_path('reward_model.png')}  ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
