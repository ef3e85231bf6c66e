"""Per-token vs sequence-level KL in PPO's reward: where GAE puts the credit.

Two placements of the KL penalty in the token rewards (same β, same score at the last
token, `PPOConfig.kl_reward_placement`):
  "token"     r_t = −β·KL_t,  r_T += score                    (InstructGPT)
  "sequence"  r_t = 0,        r_T = score − β·Σ_t KL_t
Every response gets the same total reward, so the return from the first token is the
same. They differ by the potential Φ_t = −β·Σ_{u<t} KL_u (the KL already spent), which
makes them potential-based shaping of each other (Ng et al. 1999): a critic that tracks
the spent KL gives exactly the same advantages under both. A critic that does not (it
would have to compute log π − log π_ref of the prefix) sees the KL of token t under
"sequence" only in the last token's δ, and GAE carries it back to t discounted by
λ^{T−1−t}.

Part A — known ground truth (no training). Episodes of T = 16 tokens over 4 actions; the
policy π_t at each position is fixed and random, π_ref is uniform, and the score is 1 iff
the token at position k = 2 is action 0. KL_t = log π_t(a_t) − log π_ref(a_t) (k1). The
true advantage of a_t (the same under both placements) is
  A*_t = [t = k]·(1[a_k = 0] − π_k(0)) − β·(KL_t − KL(π_t‖π_ref)).
Advantages Â come from `jaxrl_llm.train.ppo.compute_ppo_targets` (the trainer's own
targets, unwhitened) for λ ∈ {0.95, 1}, with three critics, each the exact conditional
mean of the return given what it sees:
  exact      — the whole prefix (so it knows the spent KL);
  blind      — position and whether the decisive token was right, not the spent KL
               (what a learned critic approximates when it cannot compute the KL);
  position   — the position only (nor the decisive token).
Per position t we regress Â_t on the two parts of A*_t: the slope on the KL part is the
"KL credit" of token t (1 = all of its own KL, 0 = none), the slope on the score part at
t = k the "score credit"; and corr(Â_t, A*_t) measures how well Â_t ranks actions.

Part B — a real tiny PPO run. A from-scratch tiny llama (D = 32, `CharTokenizer`),
prompts "q<i>:", T = 16, score = number of letters/digits among the FIRST 4 response
characters (0–4; the other 12 tokens are free), β = 0.05, λ = 0.95, both placements,
same seeds. Per step: reward and sequence KL; after training, on 256 fresh samples per
arm: the per-position KL profile, the per-position variance and KL credit of the arm's
own (unwhitened) advantages, and how much of the spent KL its critic tracks (slope of
V_t on −β·Σ_{u<t} KL_u; 1 = all of it).

Run:  python experiments/token_vs_sequence_reward.py [--quick]
Writes results/token_vs_sequence_reward/{metrics.jsonl, summary.json,
token_vs_sequence_reward.png}.
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
from flax import nnx

from jaxrl_llm.data.prompts import PromptLoader
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout import generate
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import response_logprobs
from jaxrl_llm.train.ppo import PPOConfig, compute_ppo_targets, train

PLACEMENTS = ("token", "sequence")
CRITICS = ("exact", "blind", "position")
LAMBDAS = (0.95, 1.0)

# part A
NUM_ACTIONS, HORIZON, DECISIVE, BETA_A = 4, 16, 2, 0.3

# part B
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
ALNUM = set("0123456789abcdefghijklmnopqrstuvwxyz")
SCORED_CHARS, MAX_NEW_TOKENS, PROMPT_LEN, BETA_B, LAM_B = 4, 16, 8, 0.05, 0.95
EVAL_SAMPLES = 32  # per prompt: 16 prompts × 32 = 512 rows
PROMPTS = [{"prompt": f"q{i}:"} for i in range(16)]
TOKENIZER = CharTokenizer()


def _clean(obj):
    """NaN → None (strict JSON), recursively through dicts and lists."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return None if isinstance(obj, float) and np.isnan(obj) else obj


def early_chars_reward(prompts, completions, **columns):
    """Score: letters / digits among the first SCORED_CHARS characters of the completion."""
    return [float(sum(ch in ALNUM for ch in c[:SCORED_CHARS])) for c in completions]


# ---------------------------------------------------------------------------- part A


def sample_episodes(rng: np.random.Generator, num_episodes: int) -> dict:
    """Episodes, per-token KL, and the true advantage split into its score and KL parts [N, T]."""
    logits = rng.normal(0.0, 0.8, (HORIZON, NUM_ACTIONS))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # π_t [T, A]
    kl_true = np.sum(probs * np.log(probs * NUM_ACTIONS), axis=-1)  # KL(π_t‖uniform) [T]
    cum = np.cumsum(probs, axis=-1)
    u = rng.random((num_episodes, HORIZON, 1))
    actions = np.minimum((u > cum[None]).sum(-1), NUM_ACTIONS - 1)  # [N, T]
    logp = np.log(probs[np.arange(HORIZON)[None], actions])
    ref_logp = np.full_like(logp, -np.log(NUM_ACTIONS))
    kl = logp - ref_logp  # k1
    hit = (actions[:, DECISIVE] == 0).astype(np.float64)
    p_hit = probs[DECISIVE, 0]
    score_part = np.zeros_like(kl)
    score_part[:, DECISIVE] = hit - p_hit
    kl_part = -BETA_A * (kl - kl_true[None])
    return {"logp": logp, "ref_logp": ref_logp, "kl": kl, "kl_true": kl_true, "hit": hit, "p_hit": p_hit,
            "score": hit, "score_part": score_part, "kl_part": kl_part, "adv_true": score_part + kl_part}


def critic_values(ep: dict, critic: str, placement: str) -> np.ndarray:
    """E[return-to-go | what the critic sees] [N, T], γ = 1."""
    n = ep["kl"].shape[0]
    t = np.arange(HORIZON)
    future_kl = np.cumsum(ep["kl_true"][::-1])[::-1]  # Σ_{u≥t} KL̄_u [T]
    past_kl_mean = np.cumsum(ep["kl_true"]) - ep["kl_true"]  # Σ_{u<t} KL̄_u [T]
    past_kl = np.cumsum(ep["kl"], axis=1) - ep["kl"]  # Σ_{u<t} KL_u [N, T], the spent KL
    if critic == "position":
        score = np.full((n, HORIZON), ep["p_hit"])
    else:  # knows the decisive token once it is sampled
        score = np.where(t[None] > DECISIVE, ep["hit"][:, None], ep["p_hit"])
    values = score - BETA_A * future_kl[None]
    if placement == "sequence":  # the KL already spent is still to be paid at the last token
        values = values - BETA_A * (past_kl if critic == "exact" else past_kl_mean[None])
    return values


def credit(adv: np.ndarray, score_part: np.ndarray, kl_part: np.ndarray) -> dict:
    """Per position: OLS slopes of Â_t on the KL and score parts of A*_t, corr(Â_t, A*_t),
    Var(Â_t). Arrays [N, T] → lists of T."""
    kl_slope, score_slope, corr, var = [], [], [], []
    for t in range(adv.shape[1]):
        x = np.stack([np.ones(len(adv)), kl_part[:, t], score_part[:, t]], axis=1)
        cols = [0, 1, 2] if np.any(score_part[:, t]) else [0, 1]
        coef = np.linalg.lstsq(x[:, cols], adv[:, t], rcond=None)[0]
        kl_slope.append(float(coef[1]))
        score_slope.append(float(coef[2]) if len(cols) == 3 else float("nan"))
        corr.append(float(np.corrcoef(adv[:, t], score_part[:, t] + kl_part[:, t])[0, 1]))
        var.append(float(adv[:, t].var()))
    return {"kl_credit": kl_slope, "score_credit": score_slope, "corr": corr, "adv_var": var}


def part_a(rng: np.random.Generator, num_episodes: int, writer: ExperimentWriter) -> dict:
    ep = sample_episodes(rng, num_episodes)
    mask = jnp.ones(ep["kl"].shape, jnp.float32)
    targets = jax.jit(compute_ppo_targets, static_argnames=("lam", "whiten", "kl_reward_placement"))
    out, advs = {}, {}
    for placement in PLACEMENTS:
        for critic in CRITICS:
            values = critic_values(ep, critic, placement)
            for lam in LAMBDAS:
                tg = targets(jnp.asarray(ep["score"], jnp.float32), jnp.asarray(ep["logp"], jnp.float32),
                             jnp.asarray(ep["ref_logp"], jnp.float32), jnp.asarray(values, jnp.float32), mask,
                             beta=BETA_A, lam=lam, whiten=False, kl_reward_placement=placement)
                adv = np.asarray(tg["advantages"], np.float64)
                name = f"{placement}/{critic}/lam{lam}"
                advs[name] = adv
                out[name] = c = credit(adv, ep["score_part"], ep["kl_part"])
                out[name]["return_first_token"] = float(np.asarray(tg["returns"])[:, 0].mean())
                writer.log(**_clean({"part": "A", "placement": placement, "critic": critic, "lam": lam, **c}))
                print(f"A {name:28s} KL credit t=0 {c['kl_credit'][0]:.3f}  t=T-1 {c['kl_credit'][-1]:.3f}  "
                      f"score credit {c['score_credit'][DECISIVE]:.3f}  corr(Â,A*) mean "
                      f"{np.mean(c['corr']):.3f}")
    same = {f"{critic}/lam{lam}": float(np.abs(advs[f"token/{critic}/lam{lam}"]
                                                - advs[f"sequence/{critic}/lam{lam}"]).max())
            for critic in CRITICS for lam in LAMBDAS}
    return {"curves": out, "max_abs_adv_diff_token_vs_sequence": same, "p_hit": float(ep["p_hit"]),
            "kl_true_per_token": ep["kl_true"].tolist(),
            "adv_true_var": float(ep["adv_true"].var(axis=0).mean())}


# ---------------------------------------------------------------------------- part B


def ppo_config(placement: str, seed: int, steps: int, out_dir: Path) -> PPOConfig:
    return PPOConfig(
        run=RunConfig(output_dir=str(out_dir / f"{placement}_s{seed}"), total_steps=steps, seed=seed, progress=False,
                      overwrite=True),
        optim=OptimConfig(learning_rate=5e-3), prompts_per_step=16, samples_per_prompt=2, max_prompt_len=PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, ppo_epochs=2, minibatches=2, kl_coef=BETA_B, lam=LAM_B,
        kl_reward_placement=placement)


def tiny_policy(seed: int) -> CausalLM:
    return CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(seed))


def _ols(y: np.ndarray, *xs: np.ndarray) -> list[float]:
    """OLS coefficients of y [n] on the regressors xs (each [n]), with an intercept."""
    x = np.stack([np.ones_like(y), *xs], axis=1)
    return np.linalg.lstsq(x, y, rcond=None)[0][1:].tolist()


def profile(policy, reference, critic, placement: str, seed: int) -> dict:
    """Per-position KL, advantage variance and KL credit of a trained arm on fresh samples."""
    loader = PromptLoader(PROMPTS, TOKENIZER, len(PROMPTS), seed=seed + 100, max_prompt_len=PROMPT_LEN,
                          padding_side="right", bucket="max")
    batch = next(loader)
    ro = generate(policy, batch.tokens, batch.mask, max_new_tokens=MAX_NEW_TOKENS, num_samples=EVAL_SAMPLES,
                  temperature=1.0, stop_token_ids=(TOKENIZER.eos_token_id,), pad_token_id=TOKENIZER.pad_token_id,
                  rng=jax.random.PRNGKey(50_000 + seed), prompt_bucket=0)
    tokens, full_mask = ro.full_tokens()
    mask = np.asarray(ro.mask, np.float32)
    logp = response_logprobs(policy, tokens, full_mask, PROMPT_LEN).logprobs
    ref_logp = response_logprobs(reference, tokens, full_mask, PROMPT_LEN).logprobs
    values = critic.forward(tokens, attention_mask=full_mask).values[:, PROMPT_LEN - 1 : -1].astype(jnp.float32)
    toks, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
    comps = [TOKENIZER.decode(toks[i, : lengths[i]].tolist(), skip_special_tokens=True) for i in range(len(toks))]
    scores = np.asarray(early_chars_reward(None, comps), np.float32)
    tg = compute_ppo_targets(jnp.asarray(scores), logp, ref_logp, values, jnp.asarray(mask), beta=BETA_B, lam=LAM_B,
                             whiten=False, kl_reward_placement=placement)
    kl, adv, v = (np.asarray(tg["kl"], np.float64), np.asarray(tg["advantages"], np.float64),
                  np.asarray(values, np.float64))
    spent = -BETA_B * (np.cumsum(kl, axis=1) - kl)  # the KL penalty already incurred before t
    score = scores.astype(np.float64)
    out = {"kl_by_pos": [], "adv_var_by_pos": [], "kl_credit_by_pos": [], "critic_spent_kl_by_pos": []}
    for t in range(MAX_NEW_TOKENS):
        m = mask[:, t] > 0
        out["kl_by_pos"].append(float(kl[m, t].mean()))
        out["adv_var_by_pos"].append(float(adv[m, t].var()))
        # After the scored characters the score is known from the prefix, so it is held
        # fixed (a regressor): what is left of a token's KL in Â_t, and of the spent KL in V_t.
        free = t >= SCORED_CHARS
        out["kl_credit_by_pos"].append(_ols(adv[m, t], -BETA_B * kl[m, t], score[m])[0] if free else float("nan"))
        out["critic_spent_kl_by_pos"].append(_ols(v[m, t], spent[m, t], score[m])[0] if free else float("nan"))
    out["eval_score"] = float(scores.mean())
    out["eval_seq_kl"] = float(kl.sum(1).mean())
    out["eval_length"] = float(mask.sum(1).mean())
    return out


def part_b(seeds, steps: int, writer: ExperimentWriter) -> dict:
    runs = {p: [] for p in PLACEMENTS}
    for seed in seeds:
        for placement in PLACEMENTS:
            t0 = time.perf_counter()
            result = train(ppo_config(placement, seed, steps, writer.dir / "runs"), policy=tiny_policy(seed),
                           tokenizer=TOKENIZER, prompts=PROMPTS, reward_fn=early_chars_reward)
            prof = profile(result.model, tiny_policy(seed), result.critic, placement, seed)
            hist = [{k: float(h[k]) for k in ("reward", "kl", "explained_variance", "rollout_entropy")}
                    for h in result.history]
            for i, h in enumerate(hist):
                writer.log(part="B", placement=placement, seed=seed, step=i, **h)
            writer.log(**_clean({"part": "B_profile", "placement": placement, "seed": seed, **prof}))
            runs[placement].append({"history": hist, "profile": prof})
            print(f"B seed {seed} {placement:8s} reward {np.mean([h['reward'] for h in hist[:5]]):.2f} → "
                  f"{np.mean([h['reward'] for h in hist[-10:]]):.2f}, KL (last 10) "
                  f"{np.mean([h['kl'] for h in hist[-10:]]):.2f}, eval KL {prof['eval_seq_kl']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)")
    return runs


def _moving_average(x: np.ndarray, k: int = 5) -> np.ndarray:
    """Trailing k-step mean along the last axis ([..., steps] → [..., steps − k + 1])."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    return (c[..., k:] - c[..., :-k]) / k


def summarise_b(runs: dict) -> dict:
    out = {}
    for placement, rs in runs.items():
        reward = np.array([[h["reward"] for h in r["history"]] for r in rs])  # [seeds, steps]
        kl = np.array([[h["kl"] for h in r["history"]] for r in rs])
        prof = {k: np.array([r["profile"][k] for r in rs]) for k in rs[0]["profile"]}
        scored = slice(0, SCORED_CHARS)
        free = slice(SCORED_CHARS, MAX_NEW_TOKENS)
        smooth_reward, smooth_kl = _moving_average(reward), _moving_average(kl)
        reached = smooth_reward >= 3.5
        half = reward.shape[1] // 2
        out[placement] = {
            # first step whose trailing 5-step mean reward is ≥ 3.5 (of 4); steps if never
            "steps_to_reward_3p5_per_seed": [int(np.argmax(r)) + 4 if r.any() else reward.shape[1] for r in reached],
            "peak_kl_per_seed": smooth_kl.max(1).tolist(),
            "peak_kl": float(smooth_kl.max(1).mean()),
            "late_dip_steps_per_seed": (reward[:, half:] < 3.5).sum(1).tolist(),
            "reward_first5": float(reward[:, :5].mean()),
            "reward_last10": float(reward[:, -10:].mean()),
            "reward_last10_per_seed": reward[:, -10:].mean(1).tolist(),
            "kl_last10": float(kl[:, -10:].mean()),
            "kl_last10_per_seed": kl[:, -10:].mean(1).tolist(),
            "kl_mean": float(kl.mean()),
            "eval_score": float(prof["eval_score"].mean()),
            "eval_seq_kl": float(prof["eval_seq_kl"].mean()),
            "eval_seq_kl_per_seed": prof["eval_seq_kl"].tolist(),
            "kl_by_pos": prof["kl_by_pos"].mean(0).tolist(),
            "kl_scored_positions": float(prof["kl_by_pos"][:, scored].sum(1).mean()),
            "kl_free_positions": float(prof["kl_by_pos"][:, free].sum(1).mean()),
            "kl_free_positions_per_seed": prof["kl_by_pos"][:, free].sum(1).tolist(),
            "kl_scored_positions_per_seed": prof["kl_by_pos"][:, scored].sum(1).tolist(),
            "adv_var_by_pos": prof["adv_var_by_pos"].mean(0).tolist(),
            "adv_var_first4": float(prof["adv_var_by_pos"][:, scored].mean()),
            "adv_var_first4_per_seed": prof["adv_var_by_pos"][:, scored].mean(1).tolist(),
            "adv_var_free": float(prof["adv_var_by_pos"][:, free].mean()),
            "kl_credit_by_pos": prof["kl_credit_by_pos"].mean(0).tolist(),
            "kl_credit_free": float(prof["kl_credit_by_pos"][:, free].mean()),
            "kl_credit_free_first4": float(prof["kl_credit_by_pos"][:, SCORED_CHARS : 2 * SCORED_CHARS].mean()),
            "kl_credit_free_last4": float(prof["kl_credit_by_pos"][:, -4:].mean()),
            "critic_spent_kl_by_pos": prof["critic_spent_kl_by_pos"].mean(0).tolist(),
            "critic_spent_kl_free": float(prof["critic_spent_kl_by_pos"][:, free].mean()),
            "eval_length": float(prof["eval_length"].mean()),
            "curves": {"reward": reward.mean(0).tolist(), "kl": kl.mean(0).tolist()},
        }
    return out


# ---------------------------------------------------------------------------- plot


def plot(a: dict, b: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    t = np.arange(HORIZON)
    ax = axes[0, 0]
    for i, lam in enumerate(LAMBDAS):
        for placement, ls in (("token", "-"), ("sequence", "--")):
            ax.plot(t, a["curves"][f"{placement}/blind/lam{lam}"]["kl_credit"], ls=ls, color=f"C{i}", marker=".",
                    label=f"{placement}, λ={lam}")
        ax.plot(t, lam ** (HORIZON - 1 - t), color=f"C{i}", lw=4, alpha=0.2, label=f"λ^(T−1−t), λ={lam}")
    ax.set(xlabel="position t", ylabel="slope of Â_t on its own KL term", ylim=(0, 1.1),
           title="A: KL credit, critic blind to the spent KL")
    ax = axes[0, 1]
    for i, lam in enumerate(LAMBDAS):
        for placement, ls in (("token", "-"), ("sequence", "--")):
            ax.plot(t, a["curves"][f"{placement}/blind/lam{lam}"]["corr"], ls=ls, color=f"C{i}", marker=".",
                    label=f"{placement}, λ={lam}")
    ax.plot(t, a["curves"]["token/exact/lam0.95"]["corr"], color="k", lw=1, label="exact critic (both), λ=0.95")
    ax.axvline(DECISIVE, color="gray", lw=0.5)
    ax.set(xlabel="position t", ylabel="corr(Â_t, A*_t)", title="A: how well Â ranks actions (k = 2 decisive)")
    ax = axes[0, 2]
    x = np.arange(len(CRITICS))
    for j, (placement, lam) in enumerate([(p, lam) for p in PLACEMENTS for lam in LAMBDAS]):
        ax.bar(x + 0.2 * j - 0.3, [a["curves"][f"{placement}/{c}/lam{lam}"]["score_credit"][DECISIVE] for c in CRITICS],
               width=0.2, label=f"{placement}, λ={lam}")
    ax.axhline(LAMBDAS[0] ** (HORIZON - 1 - DECISIVE), color="k", ls=":", label=f"λ^(T−1−k), λ={LAMBDAS[0]}")
    ax.set_xticks(x, CRITICS)
    ax.set(ylabel="slope of Â_k on 1[a_k = 0] − π_k(0)", title="A: score credit at the decisive token")

    steps = np.arange(len(b["token"]["curves"]["reward"]))
    for placement, ls in (("token", "-"), ("sequence", "--")):
        axes[1, 0].plot(steps, b[placement]["curves"]["reward"], ls=ls, label=placement)
        axes[1, 1].plot(steps, b[placement]["curves"]["kl"], ls=ls, label=placement)
        pos = np.arange(MAX_NEW_TOKENS)
        axes[1, 2].plot(pos, b[placement]["kl_by_pos"], ls=ls, marker="o", label=f"{placement}: KL_t")
        axes[1, 2].plot(pos, b[placement]["kl_credit_by_pos"], ls=ls, marker="x", label=f"{placement}: KL credit")
    axes[1, 0].set(xlabel="PPO step", ylabel=f"score (letters/digits in first {SCORED_CHARS})",
                   title="B: reward (mean over seeds)")
    axes[1, 1].set(xlabel="PPO step", ylabel="Σ_t KL_t (k1)", title=f"B: sequence KL, β={BETA_B}")
    axes[1, 2].axvspan(-0.5, SCORED_CHARS - 0.5, color="gray", alpha=0.1)
    axes[1, 2].set(xlabel="response position t (shaded: scored)", ylabel="nats / slope",
                   title="B: after training — KL by position, KL credit of Â")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------- main


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    num_episodes = 20_000 if args.quick else 200_000
    seeds = [args.seed] if args.quick else [args.seed + i for i in range(5)]
    steps = 80 if args.quick else 200
    writer = ExperimentWriter(args.out, "token_vs_sequence_reward")
    start = time.time()

    a = part_a(np.random.default_rng(args.seed), num_episodes, writer)
    b = summarise_b(part_b(seeds, steps, writer))
    plot(a, b, writer.plot_path("token_vs_sequence_reward.png"))

    c = a["curves"]
    theory = {str(lam): [lam ** (HORIZON - 1 - t) for t in range(HORIZON)] for lam in LAMBDAS}
    blind_seq = c["sequence/blind/lam0.95"]["kl_credit"]
    summary = {
        "num_episodes": num_episodes,
        "horizon": HORIZON,
        "decisive_position": DECISIVE,
        "beta_a": BETA_A,
        "lambdas": list(LAMBDAS),
        "seeds": seeds,
        "steps": steps,
        "beta_b": BETA_B,
        "a": {
            "max_abs_adv_diff_token_vs_sequence": a["max_abs_adv_diff_token_vs_sequence"],
            "return_first_token": {k: v["return_first_token"] for k, v in c.items()},
            "kl_credit_t0": {k: v["kl_credit"][0] for k, v in c.items()},
            "kl_credit_last": {k: v["kl_credit"][-1] for k, v in c.items()},
            "score_credit": {k: v["score_credit"][DECISIVE] for k, v in c.items()},
            "corr_mean": {k: float(np.mean(v["corr"])) for k, v in c.items()},
            "corr_first_half": {k: float(np.mean(v["corr"][: HORIZON // 2])) for k, v in c.items()},
            "corr_second_half": {k: float(np.mean(v["corr"][HORIZON // 2 :])) for k, v in c.items()},
            "adv_var_mean": {k: float(np.mean(v["adv_var"])) for k, v in c.items()},
            "adv_var_first4": {k: float(np.mean(v["adv_var"][:4])) for k, v in c.items()},
            "kl_credit_theory": theory,
            "blind_sequence_lam095_kl_credit_max_dev_from_theory": float(
                np.max(np.abs(np.array(blind_seq) - np.array(theory["0.95"])))),
            "blind_sequence_lam095_kl_credit_mean_dev_from_theory": float(
                np.mean(np.abs(np.array(blind_seq) - np.array(theory["0.95"])))),
            "curves": c,
        },
        "b": b,
        # what a critic blind to the spent KL predicts for the KL credit of the first 4 free tokens
        "b_kl_credit_free_first4_theory_blind": float(np.mean(
            [LAM_B ** (MAX_NEW_TOKENS - 1 - t) for t in range(SCORED_CHARS, 2 * SCORED_CHARS)])),
        "seconds": time.time() - start,
    }
    path = writer.summary(_clean(summary))
    print(f"wrote {path} and {writer.plot_path('token_vs_sequence_reward.png')} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
