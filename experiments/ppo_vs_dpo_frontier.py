"""PPO vs DPO on the reward–KL frontier, reward over-optimisation, and adaptive vs fixed β.

Task: prompts "p00:" … "p63:" (the prompt carries no information); responses are 8 letters
over "abcd". The gold score likes the letter "a" up to a cap and punishes spam past it:

    gold(y) = min(n_a, 4) − 1.5·max(n_a − 4, 0)          (n_a = number of "a" in y)

so the best responses have exactly four "a" (gold 4) and "aaaaaaaa" scores −2. The SFT
policy is trained on uniform random letters (n_a ~ Binomial(8, ¼): mean 2, and only ≈ 3%
of its samples have more than 4 "a"), so the labelled data barely see the turn-down.

Pipeline (every stage uses the library trainers):
  1. SFT (`train.sft`) of a tiny llama on uniform random responses → π_ref (entropic).
  2. Preference pairs: two samples of π_ref per prompt, labelled by a noisy gold judge
     P(a ≻ b) = σ(gold(a) − gold(b)) (Bradley–Terry with unit temperature).
  3. A proxy reward model (`train.reward_model`, BT loss, initialised from π_ref's
     backbone) learned on those pairs: it sees "more a is better" and little else.
  4. PPO (`train.ppo`) against the proxy RM at several fixed β, and with the adaptive
     controller (Ziegler et al.) toward a KL target; DPO (`train.dpo`) at several β on the
     same pairs.
  5. Every final policy is evaluated on held-out prompts with fresh samples: gold mean,
     proxy mean, and KL(π‖π_ref) = E_{y∼π}[Σ_t log π(y_t) − log π_ref(y_t)] (k1, summed
     over the response, mean over samples). PPO's per-step rollouts also give proxy, gold
     and KL along training (gold recorded by a zero-valued reward_fn).

The full run repeats the pipeline for 5 seeds (seed, seed + 1, ...) and reports means
(and sd over seeds); --quick runs one seed at smaller sizes. PPO and DPO each see the same
π_ref and the same preference pairs within a seed.

Claims checked by the test (quick mode): PPO beats π_ref on gold; KL to π_ref falls as β
rises, for PPO and for DPO; at small β PPO over-optimises (the proxy keeps rising while
gold stalls or falls), and DPO at small β ends below π_ref on gold; the adaptive controller
keeps KL nearer its target than fixed β with the same starting β.

Run:  python experiments/ppo_vs_dpo_frontier.py [--quick] [--seed N]
Writes results/ppo_vs_dpo_frontier/{metrics.jsonl, summary.json, ppo_vs_dpo_frontier.png}
(and the trainers' run folders under runs/seed<N>/).
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np
from common import ExperimentWriter, experiment_args
from flax import nnx
from reasoning_common import enable_compile_cache, pyplot, smooth

from jaxrl_llm import ops
from jaxrl_llm.data.tokenization import decode_ids
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import dpo, ppo, reward_model, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import response_logprobs, split_model

NAME = "ppo_vs_dpo_frontier"
ALPHABET = "abcd"
TARGET = "a"
RESP_LEN = 8
CAP, SPAM_SLOPE = 4, 1.5  # gold = min(n_a, CAP) − SPAM_SLOPE·max(n_a − CAP, 0)
NUM_PROMPTS, HELD_OUT = 64, 16
PROMPT_LEN = 4  # "p00:"
MAX_NEW_TOKENS = RESP_LEN + 1  # 8 letters and eos
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
TOKENIZER = CharTokenizer()

MAX_LEN = 16  # prompt + response + eos rows of the SFT / RM / DPO loaders
PRESETS = {
    "quick": {"num_seeds": 1, "sft_steps": 80, "pairs_per_prompt": 6, "rm_steps": 150, "ppo_steps": 40,
              "dpo_steps": 60, "eval_samples": 16, "ppo_betas": (0.01, 0.3, 3.0),
              "dpo_betas": (0.03, 0.1, 0.3, 1.0, 3.0)},
    "full": {"num_seeds": 5, "sft_steps": 150, "pairs_per_prompt": 16, "rm_steps": 300, "ppo_steps": 100,
             "dpo_steps": 150, "eval_samples": 32, "ppo_betas": (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
             "dpo_betas": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)},
}
# Ziegler et al. controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·N/horizon), N = 32 rows per
# step, so β moves by at most ±20% a step. It starts at the smallest β of the fixed sweep,
# whose KL overshoots the target: the fixed run with the same start is the comparison.
ADAPTIVE = {"kl_coef": 0.01, "kl_target": 2.0, "kl_horizon": 32.0}
PROBES = {"spam": "aaaaaaaa", "best": "abacadab", "none": "bcdbcdbc"}  # RM extrapolation probes


# ---------------------------------------------------------------- task


def gold_score(response: str) -> float:
    """The hidden labeller's score of one response (see the module docstring)."""
    n = response.count(TARGET)
    return float(min(n, CAP) - SPAM_SLOPE * max(n - CAP, 0))


def make_prompts() -> tuple[list[dict], list[dict]]:
    """(train prompt records, held-out prompt records); prompts are all PROMPT_LEN chars."""
    records = [{"prompt": f"p{i:02d}:"} for i in range(NUM_PROMPTS)]
    return records[HELD_OUT:], records[:HELD_OUT]


def sft_examples(prompts: list[dict], rng: np.random.Generator, copies: int = 8) -> list[dict]:
    """Uniform random responses: π_ref ends up with high entropy over the alphabet."""
    letters = np.array(list(ALPHABET))
    return [{"prompt": p["prompt"], "response": "".join(rng.choice(letters, RESP_LEN))}
            for _ in range(copies) for p in prompts]


# ---------------------------------------------------------------- sampling and evaluation


@functools.partial(jax.jit, static_argnames=("graph", "prompt_len"))
def _sequence_logp(params, rest, tokens, full_mask, resp_mask, *, graph, prompt_len):
    """Σ_t log π(y_t) over each response: [N] float32."""
    logp = response_logprobs(nnx.merge(graph, params, rest), tokens, full_mask, prompt_len).logprobs
    return ops.masked_sum(logp, resp_mask, axis=-1)


def sequence_logp(model, tokens, full_mask, resp_mask) -> np.ndarray:
    split = split_model(model)
    return np.asarray(_sequence_logp(split.params, split.rest, tokens, full_mask, resp_mask, graph=split.graphdef,
                                     prompt_len=tokens.shape[1] - resp_mask.shape[1]))


def sample(model, prompts: list[dict], num_samples: int, seed: int):
    """num_samples responses per prompt → (rollout, decoded completions [N])."""
    enc = TOKENIZER([p["prompt"] for p in prompts], padding_side="left")
    ro = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=MAX_NEW_TOKENS,
                  num_samples=num_samples, temperature=1.0, stop_token_ids=(TOKENIZER.eos_token_id,),
                  pad_token_id=TOKENIZER.pad_token_id, rng=jax.random.PRNGKey(seed), prompt_bucket=0)
    tokens, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
    texts = [decode_ids(TOKENIZER, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
             for i in range(len(tokens))]
    return ro, texts


def evaluate(model, reference, rm, prompts: list[dict], num_samples: int, seed: int) -> dict:
    """Fresh samples of ``model`` on ``prompts``: gold and proxy means, KL(π‖π_ref).

    KL = mean over samples of Σ_t (log π(y_t) − log π_ref(y_t)), y ∼ π: the k1 estimate of
    the sequence-level KL, unbiased since the samples come from π.
    """
    ro, texts = sample(model, prompts, num_samples, seed)
    tokens, full_mask = ro.full_tokens()
    resp_mask = jnp.asarray(ro.mask, jnp.float32)
    log_ratio = sequence_logp(model, tokens, full_mask, resp_mask) - sequence_logp(reference, tokens, full_mask, resp_mask)
    gold = np.array([gold_score(t) for t in texts])
    proxy = reward_model.score_sequences(rm, np.asarray(tokens), np.asarray(full_mask), batch_size=64)
    counts = np.array([t.count(TARGET) for t in texts])
    return {"gold": float(gold.mean()), "gold_se": float(gold.std() / np.sqrt(len(gold))),
            "proxy": float(proxy.mean()), "kl": float(log_ratio.mean()),
            "kl_se": float(log_ratio.std() / np.sqrt(len(log_ratio))),
            "n_a": float(counts.mean()), "spam_fraction": float(np.mean(counts > CAP))}


# ---------------------------------------------------------------- stages


def train_sft(seed: int, steps: int, train_prompts: list[dict], out: Path) -> CausalLM:
    model = CausalLM(tiny_config("llama", **MODEL), rngs=nnx.Rngs(seed))
    config = sft.SFTConfig(run=RunConfig(output_dir=str(out / "sft"), total_steps=steps, seed=seed, progress=False, overwrite=True,
                                         export_hf=False),
                           optim=OptimConfig(learning_rate=3e-3, warmup_steps=10), batch_size=32,
                           max_len=MAX_LEN)
    examples = sft_examples(train_prompts, np.random.default_rng(seed))
    return sft.train(config, policy=model, tokenizer=TOKENIZER, examples=examples).model


def make_preferences(policy, prompts: list[dict], pairs_per_prompt: int, seed: int) -> list[dict]:
    """Pairs of π_ref samples labelled by the noisy gold judge P(a ≻ b) = σ(gold_a − gold_b)."""
    _, texts = sample(policy, prompts, 2 * pairs_per_prompt, seed)
    rng = np.random.default_rng(seed + 1)
    records = []
    for i, p in enumerate(prompts):
        mine = texts[i * 2 * pairs_per_prompt: (i + 1) * 2 * pairs_per_prompt]
        for a, b in zip(mine[0::2], mine[1::2]):
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(gold_score(b) - gold_score(a)))
            chosen, rejected = (a, b) if a_wins else (b, a)
            records.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected,
                            "chosen_gold": gold_score(chosen), "rejected_gold": gold_score(rejected)})
    return records


def train_rm(policy, preferences: list[dict], eval_preferences: list[dict], seed: int, steps: int, out: Path):
    config = reward_model.RewardConfig(
        run=RunConfig(output_dir=str(out / "reward_model"), total_steps=steps, seed=seed, progress=False, overwrite=True,
                      export_hf=False),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10), batch_size=32, max_len=MAX_LEN,
        save_hf=False)
    result = reward_model.train(config, model=policy, tokenizer=TOKENIZER, preferences=preferences,
                                eval_preferences=eval_preferences)
    return result.model, result.eval


def probe_scores(rm) -> dict[str, float]:
    """Proxy scores of hand-written responses (prompt "p00:"): does the RM prefer spam?"""
    enc = TOKENIZER(["p00:" + r for r in PROBES.values()])
    eos = np.full((len(PROBES), 1), TOKENIZER.eos_token_id)
    tokens = np.concatenate([enc["input_ids"], eos], axis=1)
    scores = reward_model.score_sequences(rm, tokens, np.ones_like(tokens), batch_size=len(PROBES))
    return {name: float(v) for name, v in zip(PROBES, scores)}


class GoldRecorder:
    """A PPO reward_fn that adds 0 to the proxy score but records the gold mean of every
    rollout, so the per-step history has gold next to proxy and KL."""

    __name__ = "gold_recorder"

    def __init__(self):
        self.gold: list[float] = []

    def __call__(self, prompts, completions, **columns):
        self.gold.append(float(np.mean([gold_score(c) for c in completions])))
        return [0.0] * len(completions)


def ppo_config(out: Path, name: str, seed: int, steps: int, **kl) -> ppo.PPOConfig:
    return ppo.PPOConfig(
        run=RunConfig(output_dir=str(out / name), total_steps=steps, seed=seed, progress=False, export_hf=False,
                      overwrite=True),
        optim=OptimConfig(learning_rate=3e-3), prompts_per_step=8, samples_per_prompt=4, max_prompt_len=PROMPT_LEN,
        max_new_tokens=MAX_NEW_TOKENS, ppo_epochs=2, minibatches=2, **kl)


def run_ppo(config: ppo.PPOConfig, policy, rm, train_prompts: list[dict]):
    recorder = GoldRecorder()
    result = ppo.train(config, policy=policy, tokenizer=TOKENIZER, prompts=train_prompts, reward_model=rm,
                       reward_fn=recorder)
    curve = [{"step": h.get("step", i), "proxy": h["reward"], "gold": g, "kl": h["kl"],
              "kl_coef": h["kl_coef"]} for i, (h, g) in enumerate(zip(result.history, recorder.gold))]
    return result.model, curve


def run_dpo(beta: float, policy, preferences: list[dict], seed: int, steps: int, out: Path):
    config = dpo.DPOConfig(
        run=RunConfig(output_dir=str(out / f"dpo_beta{beta}"), total_steps=steps, seed=seed, progress=False, overwrite=True,
                      export_hf=False),
        optim=OptimConfig(learning_rate=1e-3), beta=beta, batch_size=16, max_len=MAX_LEN)
    return dpo.train(config, policy=policy, tokenizer=TOKENIZER, preferences=preferences).model


# ---------------------------------------------------------------- main


def run_seed(seed: int, preset: dict, writer: ExperimentWriter, start: float) -> dict:
    """The whole pipeline for one seed (SFT, data, RM, PPO sweep + adaptive, DPO sweep);
    returns its summary (``summarise``) with the PPO curves under "curves"."""
    runs = writer.dir / "runs" / f"seed{seed}"
    train_prompts, held_out = make_prompts()
    ev = functools.partial(evaluate, prompts=held_out, num_samples=preset["eval_samples"], seed=10_000 + seed)

    # 1. SFT → π_ref
    ref = train_sft(seed, preset["sft_steps"], train_prompts, runs)
    # 2. preferences from π_ref samples; held-out pairs for the RM's accuracy
    prefs = make_preferences(ref, train_prompts, preset["pairs_per_prompt"], seed)
    eval_prefs = make_preferences(ref, held_out, 8, seed + 7)
    # 3. proxy reward model
    rm, rm_eval = train_rm(ref, prefs, eval_prefs, seed, preset["rm_steps"], runs)
    sft_eval = ev(ref, ref, rm)
    rm_eval = {**rm_eval, "probes": probe_scores(rm)}
    writer.log(seed=seed, method="sft", beta=None, **sft_eval)
    print(f"[seed {seed}] SFT: gold={sft_eval['gold']:.3f} proxy={sft_eval['proxy']:.3f} n_a={sft_eval['n_a']:.2f} "
          f"RM held-out acc={rm_eval['accuracy']:.3f} ({time.time() - start:.0f} s)")

    # 4a. PPO at fixed β, and adaptive
    ppo_runs = {}
    specs = [(f"fixed_{b}", {"kl_coef": b}) for b in preset["ppo_betas"]]
    specs.append(("adaptive", dict(kl_schedule="adaptive", **ADAPTIVE)))
    for name, kl in specs:
        model, curve = run_ppo(ppo_config(runs, f"ppo_{name}", seed, preset["ppo_steps"], **kl), ref, rm, train_prompts)
        final = ev(model, ref, rm)
        ppo_runs[name] = {"kl_config": kl, "final": final, "curve": curve}
        for row in curve:
            writer.log(seed=seed, method="ppo", run=name, **row)
        writer.log(seed=seed, method="ppo", run=name, beta=kl["kl_coef"], final=True, **final)
        print(f"[seed {seed}] PPO {name:12s} gold={final['gold']:.3f} proxy={final['proxy']:.3f} "
              f"kl={final['kl']:.3f} n_a={final['n_a']:.2f} ({time.time() - start:.0f} s)")

    # 4b. DPO at several β on the same pairs
    dpo_runs = {}
    for beta in preset["dpo_betas"]:
        final = ev(run_dpo(beta, ref, prefs, seed, preset["dpo_steps"], runs), ref, rm)
        dpo_runs[beta] = final
        writer.log(seed=seed, method="dpo", beta=beta, final=True, **final)
        print(f"[seed {seed}] DPO β={beta:<6} gold={final['gold']:.3f} proxy={final['proxy']:.3f} "
              f"kl={final['kl']:.3f} n_a={final['n_a']:.2f} ({time.time() - start:.0f} s)")

    summary = summarise(preset, sft_eval, rm_eval, ppo_runs, dpo_runs, len(prefs))
    summary["curves"] = {name: run["curve"] for name, run in ppo_runs.items()}
    return summary


def mean_over_seeds(per_seed: list):
    """Element-wise mean of same-shaped summaries (dicts / lists of numbers); other leaves
    (strings, None, bools) are taken from the first seed."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: mean_over_seeds([s[k] for s in per_seed]) for k in first}
    if isinstance(first, list):
        return [mean_over_seeds(list(xs)) for xs in zip(*per_seed)]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return float(np.mean(per_seed))
    return first


def sd_over_seeds(per_seed: list[dict], method: str, key: str, betas) -> list[float]:
    return [float(np.std([s[method][str(b)][key] for s in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
            for b in betas]


def main() -> None:
    args = experiment_args(__doc__.splitlines()[0]).parse_args()
    preset = PRESETS["quick" if args.quick else "full"]
    enable_compile_cache()
    writer = ExperimentWriter(args.out, NAME)
    start = time.time()
    seeds = [args.seed + i for i in range(preset["num_seeds"])]
    per_seed = [run_seed(seed, preset, writer, start) for seed in seeds]

    # headline numbers: means over seeds (one seed in --quick: that seed's numbers)
    curves = [s.pop("curves") for s in per_seed]
    summary = mean_over_seeds(per_seed)
    summary.update(seeds=seeds, num_seeds=len(seeds), per_seed=per_seed,
                   ppo_kl_sd=sd_over_seeds(per_seed, "ppo", "kl", preset["ppo_betas"]),
                   ppo_gold_sd=sd_over_seeds(per_seed, "ppo", "gold", preset["ppo_betas"]),
                   dpo_kl_sd=sd_over_seeds(per_seed, "dpo", "kl", preset["dpo_betas"]),
                   dpo_gold_sd=sd_over_seeds(per_seed, "dpo", "gold", preset["dpo_betas"]))
    plot(writer.plot_path(f"{NAME}.png"), summary, per_seed, curves)
    summary["seconds"] = time.time() - start
    path = writer.summary(summary)
    print(f"wrote {path} and {writer.plot_path(f'{NAME}.png')}  ({summary['seconds']:.0f} s)")


def summarise(preset, sft_eval, rm_eval, ppo_runs, dpo_runs, num_pairs) -> dict:
    fixed = list(preset["ppo_betas"])
    ppo_final = {str(b): ppo_runs[f"fixed_{b}"]["final"] for b in fixed}
    small = ppo_runs[f"fixed_{fixed[0]}"]["curve"]
    k = max(len(small) // 5, 1)  # windows of a fifth of the run on the (noisy) per-step rollouts
    gold_s, proxy_s = smooth([r["gold"] for r in small], k), smooth([r["proxy"] for r in small], k)
    target = ADAPTIVE["kl_target"]
    half = len(small) // 2

    def kl_gap(curve):
        """Mean |KL − target| over the second half of training (per-step rollout KL)."""
        return float(np.mean([abs(r["kl"] - target) for r in curve[half:]]))

    same_beta = ppo_runs[f"fixed_{ADAPTIVE['kl_coef']}"]["curve"] if ADAPTIVE["kl_coef"] in fixed else None
    return {
        "num_pairs": num_pairs,
        "rm_heldout_accuracy": rm_eval["accuracy"],  # vs the noisy labels of held-out pairs
        "rm_probes": rm_eval["probes"],
        "sft": sft_eval,
        "ppo_betas": list(fixed),
        "dpo_betas": list(preset["dpo_betas"]),
        "ppo": ppo_final,
        "dpo": {str(b): v for b, v in dpo_runs.items()},
        "ppo_kl": [ppo_final[str(b)]["kl"] for b in fixed],
        "ppo_gold": [ppo_final[str(b)]["gold"] for b in fixed],
        "dpo_kl": [dpo_runs[b]["kl"] for b in preset["dpo_betas"]],
        "dpo_gold": [dpo_runs[b]["gold"] for b in preset["dpo_betas"]],
        "best_ppo_gold": max(v["gold"] for v in ppo_final.values()),
        "best_dpo_gold": max(v["gold"] for v in dpo_runs.values()),
        "overopt": {  # smallest-β PPO run, smoothed per-step rollout means
            "beta": fixed[0],
            "proxy_start": float(proxy_s[0]), "proxy_end": float(proxy_s[-1]),
            "gold_start": float(gold_s[0]), "gold_peak": float(gold_s.max()), "gold_end": float(gold_s[-1]),
            "gold_peak_step": int(np.argmax(gold_s)),
        },
        "adaptive": {
            **ADAPTIVE,
            "final_kl_coef": ppo_runs["adaptive"]["curve"][-1]["kl_coef"],
            "kl_gap_adaptive": kl_gap(ppo_runs["adaptive"]["curve"]),
            "kl_gap_fixed_same_start": kl_gap(same_beta) if same_beta else None,
            "kl_gap_fixed": {str(b): kl_gap(ppo_runs[f"fixed_{b}"]["curve"]) for b in fixed},
            "final": ppo_runs["adaptive"]["final"],
        },
    }


def mean_curves(curves: list[dict], name: str, key: str) -> np.ndarray:
    """[steps] per-step rollout metric of PPO run ``name``, averaged over seeds."""
    return np.mean([[r[key] for r in c[name]] for c in curves], axis=0)


def plot(path, summary, per_seed, curves) -> None:
    """Frontier (means ± sd over seeds, seeds faint), proxy vs gold along PPO training, and
    the KL of adaptive vs fixed β along training (both averaged over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    n = summary["num_seeds"]
    ax = axes[0]
    for method, color, marker, label in (("ppo", "C0", "o", "PPO (fixed β) vs proxy RM"),
                                         ("dpo", "C1", "s", "DPO on the RM's preference pairs")):
        betas = summary[f"{method}_betas"]
        for s in per_seed:
            ax.plot(s[f"{method}_kl"], s[f"{method}_gold"], marker, color=color, ms=3, alpha=0.25)
        # y error bars only: the KL spread over seeds shows in the faint per-seed points
        ax.errorbar(summary[f"{method}_kl"], summary[f"{method}_gold"], yerr=summary[f"{method}_gold_sd"],
                    fmt=marker + "-", color=color, capsize=2, label=label)
        for b, x, y in zip(betas, summary[f"{method}_kl"], summary[f"{method}_gold"]):
            ax.annotate(f"β={b}", (x, y), fontsize=7, xytext=(3, 3 if method == "ppo" else -9),
                        textcoords="offset points", color=color)
    a = summary["adaptive"]["final"]
    ax.plot([a["kl"]], [a["gold"]], "*", ms=13, color="C2", label="PPO adaptive β")
    ax.plot([0], [summary["sft"]["gold"]], "kD", label="SFT (π_ref)")
    ax.axhline(CAP, color="gray", ls=":", lw=1, label="best possible gold")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(left=-0.02)
    ax.set(xlabel="KL(π‖π_ref), nats per response (held-out samples; symlog)",
           ylabel="gold reward (held-out)", title=f"reward–KL frontier (mean ± sd of {n} seed(s))")
    ax = axes[1]
    for b in summary["ppo_betas"]:
        name = f"fixed_{b}"
        proxy, gold = mean_curves(curves, name, "proxy"), mean_curves(curves, name, "gold")
        k = max(len(proxy) // 10, 1)
        ax.plot(smooth(proxy, k), smooth(gold, k), "-", lw=1.2, label=f"PPO β={b}")
        ax.plot([smooth(proxy, k)[-1]], [smooth(gold, k)[-1]], "o", color="k", ms=4)
        ax.plot([smooth(proxy, k)[0]], [smooth(gold, k)[0]], "x", color="k", ms=7, mew=2)
    ax.set(xlabel="proxy reward (RM), rollout mean", ylabel="gold reward, rollout mean",
           title="over-optimisation along PPO training (× first, • last 10% of steps)")
    ax = axes[2]
    start_name = f"fixed_{ADAPTIVE['kl_coef']}"
    for b in summary["ppo_betas"]:
        name = f"fixed_{b}"
        style = {"lw": 1.5, "color": "C3"} if name == start_name else {"lw": 0.8, "alpha": 0.5}
        ax.plot(smooth(mean_curves(curves, name, "kl"), 3), label=f"fixed β={b}", **style)
    ax.plot(smooth(mean_curves(curves, "adaptive", "kl"), 3), lw=2.0, color="C2",
            label=f"adaptive (β₀={ADAPTIVE['kl_coef']}, horizon {ADAPTIVE['kl_horizon']:.0f})")
    ax.axhline(ADAPTIVE["kl_target"], color="k", ls="--", lw=1, label=f"target KL {ADAPTIVE['kl_target']}")
    ax.set(xlabel="PPO step", ylabel="KL per response (rollout, 3-step mean)",
           title="adaptive vs fixed β: KL along training")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
