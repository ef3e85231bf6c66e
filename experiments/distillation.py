"""Distillation at an equal teacher budget: sequence-level KD, token-level KD, on-policy
distillation and GKD.

The task is the quick-start's single-digit addition ("3+5=" → "8"; same 70 training /
30 held-out split, ``train.quickstart.split_problems``), character-level:

* Teacher: tiny llama, width 64, 2 layers (91 k parameters), SFT for 800 steps on
  the right answers of the 70 training problems. Measured: greedy accuracy 1.00 on the
  training prompts, 0.83–0.90 on the held-out ones (seeds 0–2).
* Student: tiny llama, width 32, 2 layers (27 k parameters), trained from scratch (the
  same initial weights for every method of a seed), Adam lr 3e-3 constant, 16 prompts
  per step, on the 70 training prompts only; same CharTokenizer (one vocabulary).

Methods, at an **equal budget of 12 800 teacher calls** each. One teacher call = the
teacher processes one sequence (prompt + ≤ 4 completion tokens): it either samples a
completion (decoding with a KV cache) or scores one in a forward pass. (Completions are
1–3 tokens, so calls are ~equal in tokens too.)

1. ``seq_kd`` — sequence-level KD: 12 800 teacher samples (T = 1), SFT of the student on
   them (``train.sft``), 800 steps × 16, each sample used once.
2. ``token_kd`` — token-level KD on fixed data: ``distill`` with λ = 0, forward KL, on a
   pool of 4 teacher samples per training prompt (280 calls); every step the teacher
   scores 16 rows: (12 800 − 280) / 16 = 782 steps.
3. ``on_policy`` — on-policy distillation: λ = 1, reverse KL; the student samples, the
   teacher scores its samples: 800 steps.
4. ``gkd`` — GKD: λ = 0.5, JSD(β = 0.5), the same 280-sample pool for the off-policy
   half: 782 steps.

Measured on held-out prompts (30 problems; greedy, and 16 samples per problem at T = 1)
and the per-token KL(student ‖ teacher) on the student's own T = 1 samples, every few
hundred calls. Each evaluation point resumes the run (same optimizer state, data order
and RNG as one uninterrupted run). Final values (seed 0 / seed 1 / seed 2 → mean):

| method | held-out greedy | held-out T = 1 | train-prompt T = 1 | KL(student ‖ teacher), held-out |
|---|---|---|---|---|
| seq_kd | 0.90 / 0.90 / 0.97 → **0.92** | 0.88 / 0.80 / 0.93 → **0.87** | 0.87 / 0.93 / 0.93 → **0.91** | 0.57 / 0.28 / 0.39 → **0.41** |
| token_kd | 0.93 / 0.63 / 0.80 → 0.79 | 0.88 / 0.56 / 0.74 → 0.73 | 0.91 / 0.84 / 0.93 → 0.89 | 0.57 / 0.75 / 0.43 → 0.58 |
| on_policy | 0.23 / 0.70 / 0.43 → 0.46 | 0.30 / 0.55 / 0.43 → 0.42 | 0.46 / 0.77 / 0.74 → 0.66 | 2.06 / 1.02 / 1.20 → 1.43 |
| gkd | 0.20 / 0.23 / 0.70 → 0.38 | 0.21 / 0.26 / 0.54 → 0.33 | 0.46 / 0.35 / 0.63 → 0.48 | 2.25 / 2.69 / 0.79 → 1.91 |

(teacher held-out greedy 0.90 / 0.90 / 0.83, T = 1 0.89 / 0.90 / 0.84; train-prompt greedy 1.00 / 1.00 / 1.00.)

**On-policy distillation does not win here; it loses, even on the quantity it
optimises** (the reverse KL on its own samples, worse than both off-policy methods on
every seed). It is behind sequence-level KD on every seed and metric and behind token KD
on every mean (seed 1 alone has it ahead of token KD on held-out greedy, 0.70 vs 0.63,
tied at T = 1). GKD is last on seeds 0–1 and, on the held-out metrics, between on-policy
and token KD on seed 2 (it takes off late: held-out greedy 0.20 at 9 880 calls → 0.70 at 12 792). Sequence-level
KD reaches the teacher's held-out accuracy. Why, we think:

* The student starts from scratch. Its early samples are random characters the teacher
  never saw, and the teacher's next-token distribution after them carries no useful
  signal; on-policy steps spend much of the budget on such prefixes. The papers that
  report on-policy distillation winning (GKD, MiniLLM) start from an SFT'd student whose
  samples are already close to the teacher's support.
* Reverse KL's gradient on a token's logit is q·(log q/p − KL): small where the student
  puts little mass, so putting mass on the teacher's answer when the student rarely
  samples it is slow. Forward KL's (q − p) pushes straight towards the teacher's token;
  JSD saturates (bounded by log 2) when the two distributions barely overlap, hence
  GKD's flat curve for the first ~6 000 calls.
* The teacher is almost deterministic on the training prompts (T = 1 accuracy 1.00), so
  there is little "dark knowledge" beyond its samples: SFT on fresh teacher samples is
  nearly forward-KL token KD with a new sample per step, which is why seq_kd and token_kd
  behave alike; the task's answers are 1–3 tokens, so the exposure-bias problem that
  on-policy training addresses barely exists.

A one-seed check of the first point, outside this script (seed 0; the student first
trained 200 SFT steps on the right answers, reaching held-out greedy 0.77 / T = 1 0.37,
KL 1.47; then 4 800 teacher calls per method through ``run_method(..., student=...)``):
on-policy 0.83 / 0.71 (KL 0.54), token KD 0.83 / 0.76 (KL 0.68), sequence KD 0.70 / 0.59
(KL 0.91); at half the budget on-policy had the lowest KL (0.59 vs 1.03 and 0.86). From a
student already on the teacher's support, on-policy distillation is competitive and the
best on the KL — one seed, so indicative only.

Runtime on a 2-core CPU shared with other jobs (load average 5–7): ≈ 10 min per seed
with two seeds running at once (587 s, 590 s), 16 min for seed 2 alongside other jobs
(954 s). Teacher ≈ 2 min, each method 1.5–4 min, mostly compilation: every evaluation
point re-jits the resumed trainer (the persistent compilation cache under the result
folder turns the repeats into cache hits). ``--quick`` (120 teacher steps, 24 student steps, one evaluation) takes
2.6–3 min there (158–177 s measured; the ~90 s target is not met under that load), and
only exercises the pipeline.

Run:  python experiments/distillation.py [--seed N | --seeds 0 1] [--quick] [--out results]
      python experiments/distillation.py --combine results_s0/distillation results_s1/distillation
Writes <out>/distillation/{metrics.jsonl (one row per method × seed × evaluation point),
summary.json, distillation.png} and the runs' folders (teacher/, runs/<method>/).
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
from jaxrl_llm.rewards.arithmetic import arithmetic_reward
from jaxrl_llm.rollout import generate
from jaxrl_llm.train import distill, sft
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.quickstart import TASK, split_problems

TEACHER = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
           "head_dim": 16}
STUDENT = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
           "head_dim": 16}
MAX_NEW = 4  # answers are ≤ 2 digits + eos
BATCH = 16  # prompts (rows) per student step, every method
POOL_PER_PROMPT, QUICK_POOL_PER_PROMPT = 4, 1  # teacher samples per training prompt, off-policy methods
EVAL_SAMPLES = 16  # T = 1 samples per prompt for sampled accuracy and the KL
STUDENT_LR = 3e-3
# full run / --quick
TEACHER_STEPS, STEPS, EVAL_AT = 800, 800, (0, 50, 100, 200, 400, 600, 800)
QUICK_TEACHER_STEPS, QUICK_STEPS, QUICK_EVAL_AT = 120, 24, (0, 24)

# name → (label, lmbda, divergence); "seq_kd" is SFT on teacher samples (no distill call)
METHODS = {
    "seq_kd": ("sequence-level KD (SFT on teacher samples)", None, None),
    "token_kd": ("token KD (λ=0, forward KL, teacher samples)", 0.0, "forward_kl"),
    "on_policy": ("on-policy (λ=1, reverse KL)", 1.0, "reverse_kl"),
    "gkd": ("GKD (λ=0.5, JSD β=0.5)", 0.5, "jsd"),
}


def teacher_calls(method: str, step: int, n_train: int, pool: int) -> int:
    """Teacher calls spent after ``step`` student steps. One call = the teacher processes
    one sequence (prompt + ≤ MAX_NEW completion tokens): sampling a completion (decoding
    with a KV cache) or scoring one in a forward pass."""
    if method == "seq_kd":
        return step * BATCH  # one fresh teacher sample per training example
    return (pool * n_train if METHODS[method][1] < 1 else 0) + step * BATCH


def steps_for_budget(method: str, budget: int, n_train: int, pool: int) -> int:
    return (budget - teacher_calls(method, 0, n_train, pool)) // BATCH


def sample_completions(model, tokenizer, prompts, num_samples, temperature, seed):
    enc = tokenizer(prompts, padding_side="left")
    out = generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=MAX_NEW, temperature=temperature,
                   num_samples=num_samples, stop_token_ids=(tokenizer.eos_token_id,),
                   pad_token_id=tokenizer.pad_token_id, rng=jax.random.PRNGKey(seed))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    texts = [decode_ids(tokenizer, tokens[i, : lengths[i]].tolist(), skip_special_tokens=True)
             for i in range(len(tokens))]
    return out, texts


@nnx.jit
def _logits(model, tokens, mask):
    return model.forward(tokens, attention_mask=mask).logits


def evaluate(student, teacher, tokenizer, splits: dict[str, list[dict]], seed) -> dict[str, float]:
    """Per split (name → records): greedy and sampled (T = 1) accuracy, and the per-token
    KL(student ‖ teacher) (``kl``) and KL(teacher ‖ student) (``forward_kl``) on the
    student's own T = 1 samples. All splits go through one batch (one compilation)."""
    records = [r for recs in splits.values() for r in recs]
    prompts = [r["prompt"] for r in records]
    answers = [r["answer"] for r in records]
    _, greedy = sample_completions(student, tokenizer, prompts, 1, 0.0, seed)
    out, sampled = sample_completions(student, tokenizer, prompts, EVAL_SAMPLES, 1.0, seed + 1)
    tokens, full_mask = out.full_tokens()
    p = tokens.shape[1] - MAX_NEW
    ls = _logits(student, tokens, full_mask)[:, p - 1:-1]
    lt = _logits(teacher, tokens, full_mask)[:, p - 1:-1]
    mask = jnp.asarray(out.mask, jnp.float32)
    kls = {k: np.asarray(ops.divergence_from_logits(ls, lt, mask, kind=k)) for k in ("reverse_kl", "forward_kl")}
    mask = np.asarray(mask)
    right_greedy = np.asarray(arithmetic_reward(prompts, greedy, answer=answers))
    rep = lambda xs: [x for x in xs for _ in range(EVAL_SAMPLES)]
    right_sampled = np.asarray(arithmetic_reward(rep(prompts), sampled, answer=rep(answers)))
    result, start = {}, 0
    for name, recs in splits.items():
        rows = slice(start * EVAL_SAMPLES, (start + len(recs)) * EVAL_SAMPLES)
        result[name] = {"greedy": float(right_greedy[start:start + len(recs)].mean()),
                        "sampled": float(right_sampled[rows].mean()),
                        "kl": float((kls["reverse_kl"][rows] * mask[rows]).sum() / mask[rows].sum()),
                        "forward_kl": float((kls["forward_kl"][rows] * mask[rows]).sum() / mask[rows].sum())}
        start += len(recs)
    return result


def new_student(seed: int) -> CausalLM:
    return CausalLM(tiny_config("llama", **STUDENT), rngs=nnx.Rngs(1000 + seed))


def train_teacher(train, tokenizer, steps, seed, out_dir, quick):
    model = CausalLM(tiny_config("llama", **TEACHER), rngs=nnx.Rngs(seed))
    config = sft.SFTConfig(
        run=RunConfig(output_dir=str(out_dir / "teacher"), total_steps=steps, seed=seed, progress=False,
                      overwrite=True, export_hf=False),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.05),
        batch_size=32, max_len=16)
    return sft.train(config, policy=model, tokenizer=tokenizer,
                     examples=[{"prompt": p["prompt"], "response": p["answer"]} for p in train]).model


def run_method(method, teacher, tokenizer, train, held_out, eval_at, pool, seed, out_dir, log, student=None):
    """Trains a fresh student (or ``student``) with ``method`` in chunks (each chunk resumes the run: same
    optimizer state, data order and RNG stream as one uninterrupted run), evaluating at
    each step of ``eval_at``; returns the evaluation rows."""
    _, lmbda, divergence = METHODS[method]
    n_train = len(train)
    run_dir = out_dir / "runs" / method
    # the teacher's samples this method trains on (sampled once, counted in the budget)
    if method == "seq_kd":
        n = eval_at[-1] * BATCH
        per_prompt = -(-n // n_train)
        _, texts = sample_completions(teacher, tokenizer, [p["prompt"] for p in train], per_prompt, 1.0, seed + 7)
        prompts = [p["prompt"] for p in train for _ in range(per_prompt)]
        order = np.random.default_rng(seed).permutation(len(texts))[:n]
        records = [{"prompt": prompts[i], "response": texts[i]} for i in order]
    elif lmbda < 1:
        _, texts = sample_completions(teacher, tokenizer, [p["prompt"] for p in train], pool, 1.0,
                                      seed + 7)
        records = [{"prompt": p["prompt"], "completion": texts[i * pool + k]}
                   for i, p in enumerate(train) for k in range(pool)]
    else:
        records = [{"prompt": p["prompt"]} for p in train]
    optim = OptimConfig(learning_rate=STUDENT_LR)
    student = student if student is not None else new_student(seed)
    rows, done = [], 0
    for step in eval_at:
        t_train = time.perf_counter()
        if step > done:
            run = RunConfig(output_dir=str(run_dir), total_steps=step, seed=seed, progress=False, export_hf=False,
                            overwrite=done == 0, resume=done > 0)
            if method == "seq_kd":
                config = sft.SFTConfig(run=run, optim=optim, batch_size=BATCH, max_len=16)
                student = sft.train(config, policy=student, tokenizer=tokenizer, examples=records).model
            else:
                config = distill.DistillConfig(run=run, optim=optim, prompts_per_step=BATCH, max_prompt_len=8,
                                               max_new_tokens=MAX_NEW, temperature=1.0, lmbda=lmbda,
                                               divergence=divergence, beta=0.5)
                student = distill.train(config, student=student, teacher=teacher, tokenizer=tokenizer,
                                        prompts=records).model
            done = step
        row = {"method": method, "seed": seed, "step": step,
               "teacher_calls": teacher_calls(method, step, n_train, pool)}
        t_eval = time.perf_counter()
        row["seconds_train"] = round(t_eval - t_train, 2)
        for split, res in evaluate(student, teacher, tokenizer, {"held_out": held_out, "train": train},
                                   seed).items():
            for k, v in res.items():
                row[f"{split}_{k}"] = v
        row["seconds_eval"] = round(time.perf_counter() - t_eval, 2)
        log(**row)
        rows.append(row)
        print(f"  {method:9s} step {step:4d} calls {row['teacher_calls']:5d}: held-out greedy "
              f"{row['held_out_greedy']:.2f} sampled {row['held_out_sampled']:.2f} KL {row['held_out_kl']:.3f} | "
              f"train sampled {row['train_sampled']:.2f} KL {row['train_kl']:.3f} "
              f"({row['seconds_train']:.0f} s train, {row['seconds_eval']:.0f} s eval)", flush=True)
    return rows


def run_seed(seed, out_dir, quick, log):
    t0 = time.perf_counter()
    tokenizer = CharTokenizer()
    train, held_out = split_problems(seed)
    teacher = train_teacher(train, tokenizer, QUICK_TEACHER_STEPS if quick else TEACHER_STEPS, seed, out_dir, quick)
    teacher_eval = evaluate(teacher, teacher, tokenizer, {"held_out": held_out, "train": train}, seed)
    print(f"seed {seed}: teacher ({TEACHER['hidden_size']}-wide) accuracy: held-out greedy "
          f"{teacher_eval['held_out']['greedy']:.2f} sampled {teacher_eval['held_out']['sampled']:.2f}; train "
          f"greedy {teacher_eval['train']['greedy']:.2f} sampled {teacher_eval['train']['sampled']:.2f}", flush=True)
    steps = QUICK_STEPS if quick else STEPS
    budget = steps * BATCH
    results = {}
    pool = QUICK_POOL_PER_PROMPT if quick else POOL_PER_PROMPT
    for method in METHODS:
        last = steps_for_budget(method, budget, len(train), pool)
        eval_at = sorted({min(s, last) for s in (QUICK_EVAL_AT if quick else EVAL_AT)})
        results[method] = run_method(method, teacher, tokenizer, train, held_out, eval_at, pool, seed, out_dir,
                                     log)
    return {"teacher": teacher_eval, "budget": budget, "methods": results,
            "seconds": round(time.perf_counter() - t0, 1)}


def _plot(path, per_seed, quick):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("held_out_greedy", "held-out accuracy, greedy"), ("held_out_sampled", "held-out accuracy, T = 1"),
              ("train_sampled", "train-prompt accuracy, T = 1"),
              ("held_out_kl", "KL(student ‖ teacher) per token\non the student's samples (held-out)"))
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    axes = axes.ravel()
    seeds = sorted(per_seed)
    teacher_calls_budget = per_seed[seeds[0]]["budget"]
    fig.suptitle(f"Distillation into a {STUDENT['hidden_size']}-wide student from a {TEACHER['hidden_size']}-wide "
                 f"teacher — task: {TASK}\nequal budget of {teacher_calls_budget} teacher calls per method "
                 f"(1 call = the teacher samples or scores one sequence); mean over seeds {seeds}, thin lines: "
                 f"each seed" + (" [--quick]" if quick else "")
                 + f"\nteacher calls = {BATCH} × student step, plus, for token KD "
                 f"and GKD, the pool of teacher samples they train on (drawn up front)", fontsize=10.5)
    for c, method in enumerate(METHODS):
        for ax, (key, title) in zip(axes, panels):
            curves = [per_seed[s]["methods"][method] for s in seeds]
            x = np.array([r["teacher_calls"] for r in curves[0]])
            ys = np.array([[r[key] for r in rows] for rows in curves])
            for y in ys:
                ax.plot(x, y, color=f"C{c}", alpha=0.3, lw=0.8)
            ax.plot(x, ys.mean(0), color=f"C{c}", marker="o", ms=3, label=METHODS[method][0])
    for ax, (key, title) in zip(axes, panels):
        if key != "held_out_kl":
            split, kind = key.rsplit("_", 1)
            teacher = np.mean([per_seed[s]["teacher"][split][kind] for s in seeds])
            ax.axhline(teacher, color="gray", ls=":", label=f"teacher ({teacher:.2f})")
            ax.set_ylim(0, 1.02)
        else:
            ax.set_yscale("log")
        ax.set(title=title, xlabel="teacher calls")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_runs(dirs) -> dict:
    """Per-seed results of earlier runs (their result folders ``<out>/distillation``), to
    combine seeds run as separate processes into one summary and plot."""
    import json

    per_seed = {}
    for d in dirs:
        summary = json.loads((Path(d) / "summary.json").read_text())
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
        for seed in summary["seeds"]:
            per_seed[seed] = {"teacher": summary["teacher_accuracy"][str(seed)],
                              "budget": summary["budget_teacher_calls"],
                              "methods": {m: [r for r in rows if r["method"] == m and r["seed"] == seed]
                                          for m in METHODS},
                              "seconds": summary["seconds_per_seed"][str(seed)]}
    return per_seed


def write_outputs(writer, per_seed, quick, pool, seconds) -> dict:
    seeds = sorted(per_seed)
    plot = writer.plot_path("distillation.png")
    _plot(plot, per_seed, quick)
    for s in seeds:
        for rows in per_seed[s]["methods"].values():
            for row in rows:
                writer.log(**row)
    final = {m: {s: per_seed[s]["methods"][m][-1] for s in seeds} for m in METHODS}
    keys = ("held_out_greedy", "held_out_sampled", "train_greedy", "train_sampled", "held_out_kl",
            "held_out_forward_kl", "train_kl", "train_forward_kl")
    summary = {
        "task": TASK, "seeds": seeds, "quick": quick, "teacher": TEACHER, "student": STUDENT,
        "batch": BATCH, "pool_per_prompt": pool, "budget_teacher_calls": per_seed[seeds[0]]["budget"],
        "teacher_accuracy": {s: per_seed[s]["teacher"] for s in seeds},
        "final": {m: {"steps": {s: final[m][s]["step"] for s in seeds},
                      **{k: {"per_seed": [final[m][s][k] for s in seeds],
                             "mean": float(np.mean([final[m][s][k] for s in seeds]))} for k in keys}}
                  for m in METHODS},
        "seconds_per_seed": {s: per_seed[s]["seconds"] for s in seeds},
        "seconds": seconds,
    }
    writer.summary(summary)
    for m in METHODS:
        f = summary["final"][m]
        print(f"{m:9s}: held-out greedy {f['held_out_greedy']['mean']:.2f} sampled {f['held_out_sampled']['mean']:.2f}"
              f" KL {f['held_out_kl']['mean']:.3f}; train sampled {f['train_sampled']['mean']:.2f}")
    print(f"wrote {writer.dir / 'summary.json'} and {plot}")
    return summary


def main():
    parser = experiment_args(__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", help="several seeds in one run (default: --seed)")
    parser.add_argument("--combine", nargs="*", metavar="DIR",
                        help="no training: combine the result folders of earlier runs (one seed each, "
                             "<out>/distillation) into one summary and plot under --out")
    args = parser.parse_args()
    t0 = time.perf_counter()
    pool = QUICK_POOL_PER_PROMPT if args.quick else POOL_PER_PROMPT
    if args.combine:
        per_seed = load_runs(args.combine)
        writer = ExperimentWriter(args.out, "distillation")
        write_outputs(writer, per_seed, args.quick, pool, round(sum(r["seconds"] for r in per_seed.values()), 1))
        return
    writer = ExperimentWriter(args.out, "distillation")
    # each evaluation point resumes the run, which re-jits the same update: the persistent
    # cache turns those recompilations into cache hits
    jax.config.update("jax_compilation_cache_dir", str(writer.dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    per_seed = {s: run_seed(s, writer.dir, args.quick, lambda **row: None) for s in (args.seeds or [args.seed])}
    summary = write_outputs(writer, per_seed, args.quick, pool, round(time.perf_counter() - t0, 1))
    print(f"total {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
