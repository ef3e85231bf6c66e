"""DPO, IPO, KTO, ORPO and SimPO on the same preference data: gold reward, KL to the
starting policy and response length.

Task: prompts "p00:" … "p39:" (no information in them); responses are 2–12 letters over
"abcd" then eos. The hidden gold score is the DENSITY of the letter "a",

    gold(y) = 4 · n_a(y) / len(y)            (0 … 4, blind to length)

so a longer answer is neither better nor worse by itself, and any change of length is the
objective's doing, not the labeller's. The SFT policy π_ref is trained on uniform random
letters with uniform random lengths (mean gold 1, mean length 7).

Pipeline per seed (library trainers only):
  1. SFT (``train.sft``) → π_ref.
  2. Pairs: two π_ref samples per draw, labelled by a noisy gold judge
     P(a ≻ b) = σ(gold(a) − gold(b)).
  3. From π_ref on the same pairs, ``train.dpo`` with loss_kind = sigmoid (DPO), ipo,
     kto (each pair split into a desirable and an undesirable unpaired record, TRL's
     format), orpo and simpo — the last two reference-free.
  4. Each final policy on held-out prompts with fresh samples: gold mean, mean response
     length, and KL(π ‖ π_ref) = E_{y∼π}[log π(y) − log π_ref(y)] (k1, summed over the
     response, eos included).

Measured (full run, seeds 0–2, 251–254 pairs, 200 steps of 16 pairs ≈ 13 epochs, lr 1e-3,
6.7 min on a loaded 2-core CPU; held-out: 8 prompts × 16 samples, up to 24 new tokens):

| method | gold (seeds 0 / 1 / 2) | mean | KL (mean) | length (SFT 7.2) |
|---|---|---|---|---|
| SFT π_ref | 0.85 / 1.41 / 1.12 | 1.13 | 0 | 8.5 / 6.2 / 6.8 |
| DPO β 0.1 | 0.03 / 2.80 / 2.87 | 1.90 | 44.5 | 22.5 / 4.9 / 12.9 |
| IPO β 0.1 | 0.64 / 1.86 / 2.15 | 1.55 | 27.3 | 18.7 / 7.4 / 9.7 |
| KTO β 0.1 | 2.59 / 2.89 / 3.19 | 2.89 | 5.4 | 6.5 / 4.2 / 6.7 |
| ORPO λ 0.1 | 1.25 / 1.66 / 1.41 | 1.44 | 0.6 | 8.8 / 5.8 / 6.9 |
| SimPO β 2, γ 0.5 | 2.41 / 2.17 / 2.20 | 2.26 | 20.2 | 8.9 / 10.2 / 6.2 |

What it shows at this scale:
- Over ~13 epochs DPO and IPO can run away: on seed 0 DPO's answers stop ending (99% hit
  the 24-token budget, KL 112 nats, gold 0.03) — the known failure where both the chosen
  and the rejected log-likelihoods fall and the mass goes to sequences neither holds
  (here: "no eos"); IPO's squared loss slows but does not stop it (seed 0: 65% truncated).
  The same data and steps give DPO gold 2.8–2.9 on the other seeds: the drift is a
  knife-edge, not the rule.
- KTO (the pairs split into unpaired good / bad answers) is the best and the steadiest
  here: highest gold on every seed at a small KL, answers a little shorter.
- Reference-free: SimPO reaches gold 2.2–2.4 but at KL 10–28 with no anchor to π_ref, and
  on seed 1 its answers grow (6.2 → 10.2 letters, 19% truncated) although gold is blind
  to length; ORPO with λ = 0.1 stays near its SFT term (KL < 1.2, small gold gain).

Run:  python experiments/preference_objectives.py [--quick] [--seed N] [--seeds K]
Writes results/preference_objectives/{metrics.jsonl, summary.json, preference_objectives.png}.
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

from jaxrl_llm import ops
from jaxrl_llm.data.tokenization import decode_ids
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import dpo, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.policy import response_logprobs, split_model

NAME = "preference_objectives"
ALPHABET = "abcd"
MIN_LEN, MAX_LEN_LETTERS = 2, 12
NUM_PROMPTS, HELD_OUT = 40, 8
EVAL_NEW_TOKENS = 24  # room to grow past the data's 12 letters: length drift shows
MAX_LEN = 4 + MAX_LEN_LETTERS + 1  # prompt + response + eos rows of the loaders
MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
TOKENIZER = CharTokenizer()
# method -> DPOConfig fields (β per the papers' usual scale for each loss)
METHODS = {
    "dpo": dict(loss_kind="sigmoid", beta=0.1),
    "ipo": dict(loss_kind="ipo", beta=0.1),
    "kto": dict(loss_kind="kto", beta=0.1),
    "orpo": dict(loss_kind="orpo", beta=0.1),
    "simpo": dict(loss_kind="simpo", beta=2.0, simpo_gamma=0.5),
}
PRESETS = {
    "full": dict(sft_steps=400, pairs_per_prompt=8, steps=200, eval_samples=16),
    "quick": dict(sft_steps=150, pairs_per_prompt=4, steps=40, eval_samples=8),
}


def gold_score(response: str) -> float:
    """4 × the density of "a" (0 for an empty response)."""
    return 4.0 * response.count("a") / len(response) if response else 0.0


def make_prompts() -> tuple[list[dict], list[dict]]:
    records = [{"prompt": f"p{i:02d}:"} for i in range(NUM_PROMPTS)]
    return records[HELD_OUT:], records[:HELD_OUT]


def sft_examples(prompts: list[dict], rng: np.random.Generator, copies: int = 8) -> list[dict]:
    letters = np.array(list(ALPHABET))
    return [{"prompt": p["prompt"], "response": "".join(rng.choice(letters, rng.integers(MIN_LEN, MAX_LEN_LETTERS + 1)))}
            for _ in range(copies) for p in prompts]


def sample(model, prompts: list[dict], num_samples: int, seed: int, max_new_tokens: int):
    enc = TOKENIZER([p["prompt"] for p in prompts], padding_side="left")
    ro = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                  num_samples=num_samples, temperature=1.0, stop_token_ids=(TOKENIZER.eos_token_id,),
                  pad_token_id=TOKENIZER.pad_token_id, rng=jax.random.PRNGKey(seed), prompt_bucket=0)
    tokens, lengths = np.asarray(ro.tokens), np.asarray(ro.lengths)
    texts = [decode_ids(TOKENIZER, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
             for i in range(len(tokens))]
    return ro, texts


def sequence_logp(model, tokens, full_mask, resp_mask) -> np.ndarray:
    """Σ_t log π(y_t) over each response: [N]."""
    split = split_model(model)
    p = tokens.shape[1] - resp_mask.shape[1]
    fn = jax.jit(lambda params: ops.masked_sum(
        response_logprobs(split.merge(params), tokens, full_mask, p).logprobs, resp_mask, axis=-1))
    return np.asarray(fn(split.params))


def evaluate(model, reference, prompts: list[dict], num_samples: int, seed: int) -> dict:
    ro, texts = sample(model, prompts, num_samples, seed, EVAL_NEW_TOKENS)
    tokens, full_mask = ro.full_tokens()
    resp_mask = jnp.asarray(ro.mask, jnp.float32)
    log_ratio = sequence_logp(model, tokens, full_mask, resp_mask) - sequence_logp(reference, tokens, full_mask,
                                                                                   resp_mask)
    gold = np.array([gold_score(t) for t in texts])
    lengths = np.array([len(t) for t in texts], np.float64)
    return {"gold": float(gold.mean()), "gold_se": float(gold.std() / np.sqrt(len(gold))),
            "kl": float(log_ratio.mean()), "length": float(lengths.mean()),
            "truncated": float(np.mean(~np.asarray(ro.finished)))}


def make_preferences(policy, prompts: list[dict], pairs_per_prompt: int, seed: int) -> list[dict]:
    _, texts = sample(policy, prompts, 2 * pairs_per_prompt, seed, MAX_LEN_LETTERS + 1)
    rng = np.random.default_rng(seed + 1)
    records = []
    for i, p in enumerate(prompts):
        mine = texts[i * 2 * pairs_per_prompt: (i + 1) * 2 * pairs_per_prompt]
        for a, b in zip(mine[0::2], mine[1::2]):
            if not a or not b or a == b:
                continue
            a_wins = rng.random() < 1.0 / (1.0 + np.exp(gold_score(b) - gold_score(a)))
            chosen, rejected = (a, b) if a_wins else (b, a)
            records.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected})
    return records


def unpaired(pairs: list[dict]) -> list[dict]:
    """Each pair as a desirable and an undesirable record (TRL's unpaired format)."""
    out = []
    for r in pairs:
        out += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
    return out


def run_method(name: str, reference, pairs: list[dict], seed: int, steps: int, out: Path):
    fields = METHODS[name]
    config = dpo.DPOConfig(
        run=RunConfig(output_dir=str(out / name), total_steps=steps, seed=seed, progress=False, overwrite=True,
                      export_hf=False),
        optim=OptimConfig(learning_rate=1e-3), batch_size=16, max_len=MAX_LEN, **fields)
    data = unpaired(pairs) if fields["loss_kind"] == "kto" else pairs
    return dpo.train(config, policy=reference, tokenizer=TOKENIZER, preferences=data).model


def run_seed(seed: int, preset: dict, writer: ExperimentWriter, start: float) -> dict:
    runs = writer.dir / "runs" / f"seed{seed}"
    train_prompts, held_out = make_prompts()
    model = CausalLM(tiny_config("llama", **MODEL), rngs=nnx.Rngs(seed))
    config = sft.SFTConfig(run=RunConfig(output_dir=str(runs / "sft"), total_steps=preset["sft_steps"], seed=seed,
                                         progress=False, overwrite=True, export_hf=False),
                           optim=OptimConfig(learning_rate=3e-3, warmup_steps=10), batch_size=32, max_len=MAX_LEN)
    reference = sft.train(config, policy=model, tokenizer=TOKENIZER,
                          examples=sft_examples(train_prompts, np.random.default_rng(seed))).model
    pairs = make_preferences(reference, train_prompts, preset["pairs_per_prompt"], seed)
    results = {"sft": evaluate(reference, reference, held_out, preset["eval_samples"], 10_000 + seed)}
    writer.log(seed=seed, method="sft", **results["sft"])
    print(f"[seed {seed}] SFT gold={results['sft']['gold']:.3f} length={results['sft']['length']:.2f} "
          f"pairs={len(pairs)} ({time.time() - start:.0f} s)", flush=True)
    for name in METHODS:
        trained = run_method(name, reference, pairs, seed, preset["steps"], runs)
        results[name] = evaluate(trained, reference, held_out, preset["eval_samples"], 10_000 + seed)
        writer.log(seed=seed, method=name, **results[name])
        r = results[name]
        print(f"[seed {seed}] {name:6s} gold={r['gold']:.3f} kl={r['kl']:.2f} length={r['length']:.2f} "
              f"truncated={r['truncated']:.2f} ({time.time() - start:.0f} s)", flush=True)
    return {"pairs": len(pairs), "results": results}


def plot(path: Path, per_seed: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["sft", *METHODS]
    colors = dict(zip(methods, ["black", "tab:blue", "tab:cyan", "tab:green", "tab:orange", "tab:red"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        kl = [s["results"][m]["kl"] for s in per_seed]
        gold = [s["results"][m]["gold"] for s in per_seed]
        length = [s["results"][m]["length"] for s in per_seed]
        ax1.scatter(kl, gold, color=colors[m], alpha=0.5, s=18)
        ax1.scatter([np.mean(kl)], [np.mean(gold)], color=colors[m], s=80, marker="D", label=m)
        ax2.bar(methods.index(m), np.mean(length), color=colors[m], yerr=np.std(length) if len(length) > 1 else None)
    ax1.set_xlabel("KL(π ‖ π_ref), nats per response")
    ax1.set_ylabel("gold = 4 × density of 'a' (held-out)")
    ax1.set_title("gold vs KL (dots: seeds, diamonds: mean)")
    ax1.legend(fontsize=8)
    ax2.set_xticks(range(len(methods)), methods)
    ax2.set_ylabel("mean response length (letters)")
    ax2.set_title("length after training (gold is length-blind)")
    fig.suptitle("Preference objectives on the same pairs: DPO, IPO, KTO, ORPO, SimPO", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, quick: 1)")
    args = parser.parse_args()
    preset = PRESETS["quick" if args.quick else "full"]
    seeds = list(range(args.seed, args.seed + (args.seeds or (1 if args.quick else 3))))
    writer = ExperimentWriter(args.out, NAME)
    start = time.time()
    per_seed = [run_seed(s, preset, writer, start) for s in seeds]
    methods = ["sft", *METHODS]
    mean = {m: {k: float(np.mean([s["results"][m][k] for s in per_seed])) for k in ("gold", "kl", "length")}
            for m in methods}
    summary = {"seeds": seeds, "preset": preset, "methods": METHODS, "per_seed": per_seed, "mean": mean,
               "seconds": time.time() - start}
    writer.summary(summary)
    plot(writer.plot_path(f"{NAME}.png"), per_seed)
    for m in methods:
        print(f"mean {m:6s} gold={mean[m]['gold']:.3f} kl={mean[m]['kl']:.2f} length={mean[m]['length']:.2f}")


if __name__ == "__main__":
    main()
