"""Benchmark: what asynchronous, disaggregated GRPO buys — wall-clock per step and
tokens/s of synchronous vs asynchronous (``max_staleness`` k = 1, 2) GRPO, colocated vs
disaggregated, with a reward function that takes realistic time.

Every variant is a short `jaxrl_llm.train.grpo.train` run (preset "grpo": k3 KL to the
reference, β = 0.04) on the same random tiny Llama (char tokenizer, arithmetic prompts)
in this one process. The reward sleeps ``--reward-ms`` per sample (a sandboxed verifier:
it waits, it does not compute; thread-safe) and is scored with ``reward_workers`` = 1 and
= ``--workers`` threads. Variants:

* ``sync_colocated``       k = 0 on all devices: sample → score → log-probs → update, in
                           turn (the baseline every ratio is to)
* ``sync_colocated_half``  k = 0 on the trainer's share of the devices only (the first
                           n − ``--sampler-devices``): the control that tells "the trainer
                           runs on fewer devices" apart from "overlap"
* ``k{1,2}_colocated``     a sampler thread runs up to k steps ahead, on the same devices
* ``k{1,2}_disaggregated`` ... on a sub-mesh of its own (``--sampler-devices``, default
                           half: 4 sampler + 4 trainer of 8); weights move by one
                           device_put per step

Runs are interleaved round by round (``--rounds``; every (variant, workers) once per
round), so drifting load from other jobs hits all variants alike; the timed steps of all
rounds are pooled. Compiled programs are shared between the runs through a temporary
persistent compilation cache (each ``train`` call jits new closures).

The per-step numbers are the trainer's history: ``time_sampling`` (the trainer waiting
for its batch), ``time_sampler`` (the sampler's own time for that batch, generate +
reward), ``time_logprobs``, ``time_update``, ``staleness`` and ``tokens_per_s``. The
history logs no per-step wall-clock, so a step's wall-clock is recovered as its tokens /
tokens_per_s (every sample is scored — checked — so the trained tokens are the sampled
ones, response_length_mean × rows). The first ``--skip`` steps (compilation, and the
samples an asynchronous sampler drew while the first update compiled) and the last
max-k steps (the pipeline drains: no sampling competes with those updates) are left out
of every variant alike. ``--inner-updates`` defaults to 2 so that every variant does the
same passes: an asynchronous run always takes an old-log-prob pass, a synchronous one
with μ = 1 would skip it.

Per row: median step wall-clock and tokens/s over the timed steps, the speedup over the
synchronous run with the same reward workers (``speedup_over_sync``) and over the fully
serial one (sync, 1 worker: ``speedup_over_sync_w1``), and the breakdown (wait for the
sample, sampler time, log-probs, update, other host work). The overlap's roofline: with
perfect overlap a step takes max(sampler time, trainer time), trainer time = step − wait
for the sample. ``ideal_step_s`` takes both from the run itself (each slowed by sharing
the machine with the other) and ``step_over_ideal`` = measured / ideal (1 = perfect
overlap); ``ideal_step_s_from_sync`` takes them from the synchronous run on the same
devices (``ideal_from``), where neither competes: the bound if overlap came for free. The
hardware side, as in the other benchmarks: XLA FLOP/s of the model's two matmul shapes
([d, d_ff] over its layers' weights, [d, V]) measured in the same run
(`common.gemm_flops_per_s`; one thread with ``--single-thread``), at the decode's B·G rows
and at the trainer's B·G·(prompt + response) rows; ``decode_floor_s`` / ``train_floor_s``
= the phase's model FLOPs (prefill + decode; two log-prob forwards + μ forward + backward)
at those rates, and ``compute_floor_s`` their sum (simulated devices share the cores).

On CPU the devices are simulated (``--xla_force_host_platform_device_count=8``, set here
before jax is imported unless XLA_FLAGS already sets a count): all of them share the
host's cores, so disaggregating cannot add compute there; what overlap can win on CPU is
the reward's waiting and the host (Python) work. On an accelerator host the same script
runs on the real devices (``--sampler-devices`` of them sample); with a single device the
disaggregated and half-mesh variants are skipped.

Usage:
  python benchmarks/async_rl.py --quick          # < 90 s: sync, k1 colocated, k2 disaggregated; 8 workers
  python benchmarks/async_rl.py                  # 6 variants × workers {1, 8} × 2 rounds (≈ 8 min on 2 cores)
  python benchmarks/async_rl.py --steps 12 --reward-ms 100 --workers 16 --json /tmp/async_rl.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.single_thread import pin_from_argv  # noqa: E402  (before jax starts)

pin_from_argv()

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import (  # noqa: E402
    decoder_flops_per_token,
    emit,
    gemm_flops_per_s,
    roofline_fields,
    run_metadata,
)
from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config  # noqa: E402
from jaxrl_llm.parallel.placement import MeshConfig  # noqa: E402
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset  # noqa: E402
from jaxrl_llm.train import grpo  # noqa: E402
from jaxrl_llm.train.loop import RunConfig  # noqa: E402

# name → (max_staleness, placement, mesh): mesh "half" = the colocated run on the devices
# a disaggregated trainer gets (the first n − sampler devices), the control that separates
# "fewer devices for the trainer" from "overlap"
VARIANTS = {
    "sync_colocated": (0, "colocated", "all"),
    "sync_colocated_half": (0, "colocated", "half"),
    "k1_colocated": (1, "colocated", "all"),
    "k2_colocated": (2, "colocated", "all"),
    "k1_disaggregated": (1, "disaggregated", "half"),
    "k2_disaggregated": (2, "disaggregated", "half"),
}
QUICK_VARIANTS = ("sync_colocated", "k1_colocated", "k2_disaggregated")
PROMPT_LEN = 8  # arithmetic prompts "a+b=" fit
PHASES = ("time_sampling", "time_sampler", "time_logprobs", "time_update")


class SleepyReward:
    """A verifier that waits ``seconds`` per sample (sandbox / subprocess / remote judge)
    and scores the completion's length parity. Thread-safe: the only shared state is the
    call statistics, kept under a lock; ``max_concurrency`` shows whether the reward
    workers really overlapped."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._active = 0
        self.max_concurrency = 0
        self.calls = 0
        self.samples = 0
        self.__name__ = "sleepy_reward"

    def __call__(self, prompts, completions, **columns):
        with self._lock:
            self._active += 1
            self.calls += 1
            self.samples += len(completions)
            self.max_concurrency = max(self.max_concurrency, self._active)
        try:
            time.sleep(self.seconds * len(completions))
            return [float(len(c) % 2) for c in completions]
        finally:
            with self._lock:
                self._active -= 1


def model_config(args):
    return tiny_config("llama", hidden_size=args.dim, intermediate_size=args.dim * 2, num_layers=args.layers,
                       num_heads=4, num_kv_heads=2, head_dim=args.dim // 4)


def step_flops(cfg, rows: int, new_tokens: float, inner_updates: int) -> dict[str, dict[str, float]]:
    """Model FLOPs of one GRPO step by phase and matmul shape (``decoder_flops_per_token``,
    causal attention over half the sequence on average), all over rows × (prompt + mean
    response) tokens: ``decode`` = the rows' prefill + decode (one forward per token),
    ``train`` = the old and reference log-prob forwards and μ forward + backward passes
    (3 forwards each)."""
    length = PROMPT_LEN + new_tokens
    per_token = decoder_flops_per_token(cfg, context=length / 2)
    forwards = {"decode": 1, "train": 2 + 3 * inner_updates}
    return {phase: {shape: rows * length * n * f for shape, f in per_token.items()} for phase, n in forwards.items()}


def measure_gemms(cfg, rows: int) -> dict[str, dict[str, float]]:
    """`common.measure_gemm_roofline` without PyTorch (not a dependency of this one): XLA
    FLOP/s of the model's [d, d_ff] over its layers' distinct weights and [d, V] at
    ``rows`` rows → {shape: {"xla": FLOP/s}}."""
    shapes = {"layers": (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers),
              "unembed": (cfg.hidden_size, cfg.vocab_size, 1)}
    return {name: gemm_flops_per_s(rows, k, n, stack, torch_too=False) for name, (k, n, stack) in shapes.items()}


def step_wall_s(row: dict, rows: int) -> float:
    """Wall-clock of one history row: its trained tokens / its tokens_per_s (the history
    logs no wall-clock; every sample is scored here, so trained = sampled tokens)."""
    return row["response_length_mean"] * rows / row["tokens_per_s"]


def run_variant(name: str, args, workers: int, records) -> dict:
    """One GRPO run of ``name`` with ``workers`` reward threads → its history and stats."""
    staleness, placement, mesh = VARIANTS[name]
    reward = SleepyReward(args.reward_ms / 1000)
    fields = {}
    if placement == "disaggregated":
        fields["sampler_mesh"] = MeshConfig(num_devices=args.sampler_devices)
    elif mesh == "half":
        fields["mesh"] = MeshConfig(num_devices=args.num_devices - args.sampler_devices)
    model = CausalLM(model_config(args), rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as out:
        config = grpo.GRPOConfig.preset(
            "grpo", run=RunConfig(output_dir=out, total_steps=args.steps, progress=False, export_hf=False),
            prompts_per_step=args.prompts, group_size=args.group, max_prompt_len=PROMPT_LEN,
            max_new_tokens=args.new_tokens, num_inner_updates=args.inner_updates, max_staleness=staleness,
            placement=placement, reward_workers=workers, **fields)
        t0 = time.perf_counter()
        result = grpo.train(config, policy=model, tokenizer=CharTokenizer(), prompts=records, reward_fn=reward)
        run_s = time.perf_counter() - t0
    history = result.history
    if any(r["reward_unscored_frac"] for r in history):
        raise RuntimeError(f"{name}: unscored samples; the step wall-clock (tokens / tokens_per_s) needs all scored")
    tail = max(VARIANTS[v][0] for v in args.variants)  # the same window for every variant
    return {"history": history, "timed": history[args.skip : len(history) - tail], "run_s": run_s,
            "reward_max_concurrency": reward.max_concurrency}


def summarize(name: str, workers: int, runs: list[dict], args) -> dict:
    """The row of one (variant, workers): medians over the timed steps of all its runs."""
    staleness, placement, mesh = VARIANTS[name]
    rows = args.prompts * args.group
    timed = [r for run in runs for r in run["timed"]]
    step = [step_wall_s(r, rows) for r in timed]
    tokens = [r["response_length_mean"] * rows for r in timed]
    med = {k: statistics.median(r[k] for r in timed) for k in PHASES}
    trainer = statistics.median(s - r["time_sampling"] for s, r in zip(step, timed))
    step_s = statistics.median(step)
    ideal = max(med["time_sampler"], trainer)
    history = [r for run in runs for r in run["history"]]
    return {
        "variant": name, "max_staleness": staleness, "placement": placement, "reward_workers": workers,
        "trainer_devices": args.num_devices - args.sampler_devices if mesh == "half" else args.num_devices,
        "sampler_devices_used": args.sampler_devices if placement == "disaggregated" else None,
        "step_s": step_s,
        "tokens_per_s": sum(tokens) / sum(step),
        **{f"{k}_s": v for k, v in med.items()},
        "trainer_s": trainer,
        "time_other_s": statistics.median(s - r["time_sampling"] - r["time_logprobs"] - r["time_update"]
                                          for s, r in zip(step, timed)),
        "ideal_step_s": ideal,
        "step_over_ideal": step_s / ideal,
        "serial_step_s": med["time_sampler"] + trainer,
        "reward_s_nominal": args.reward_ms / 1000 * math.ceil(rows / min(workers, rows)),
        "reward_max_concurrency": max(run["reward_max_concurrency"] for run in runs),
        "staleness": [r["staleness"] for r in runs[0]["history"]],
        "staleness_max": max(r["staleness"] for r in history),
        "response_length_mean": statistics.mean(r["response_length_mean"] for r in timed),
        "first_step_s": step_wall_s(runs[0]["history"][0], rows),  # compile: round 1 only
        "run_s": [run["run_s"] for run in runs],
        "timed_steps": len(timed),
        "loss_finite": all(math.isfinite(r["loss"]) for r in history),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per run")
    parser.add_argument("--skip", type=int, default=3,
                        help="first steps left out of the timing: compilation, and the k samples drawn during it")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per variant, interleaved round by round (load drift hits all alike)")
    parser.add_argument("--reward-ms", type=float, default=50.0, help="reward wait per sample (ms)")
    parser.add_argument("--workers", type=int, default=8, help="reward threads compared with 1")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--inner-updates", type=int, default=2)
    parser.add_argument("--sampler-devices", type=int, default=None,
                        help="devices of the disaggregated sampler (default: half of them)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{', '.join(QUICK_VARIANTS)} with --workers only, one round; 7 steps, 2 layers, "
                             "d=64, G=2, 16 tokens")
    parser.add_argument("--single-thread", action="store_true", help="CPU: one XLA thread")
    parser.add_argument("--json", default=None, help="also write all rows as one JSON list to this path")
    parser.add_argument("--compile-cache", default=None,
                        help="persistent compilation cache folder (default: a temporary one for this run)")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not share compiled programs between the variants' runs")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    cache = None
    if not args.no_compile_cache:
        # every train() call builds new jitted closures: without a shared cache each run
        # recompiles the same update and log-prob programs (in its first step, not timed)
        if args.compile_cache is None:
            cache = tempfile.TemporaryDirectory(prefix="async_rl_jax_cache_")
        jax.config.update("jax_compilation_cache_dir", args.compile_cache or cache.name)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if args.quick:
        args.steps, args.skip, args.rounds = 7, 3, 1
        args.new_tokens, args.layers, args.dim, args.group = 16, 2, 64, 2
    if args.variants is None:
        args.variants = list(QUICK_VARIANTS if args.quick else VARIANTS)
    worker_counts = [args.workers] if args.quick else sorted({1, args.workers})

    args.num_devices = len(jax.devices())
    if args.sampler_devices is None:
        args.sampler_devices = args.num_devices // 2
    if args.num_devices < 2:
        print(f"only {args.num_devices} device: skipping the disaggregated and half-mesh variants", file=sys.stderr)
        args.variants = [v for v in args.variants if VARIANTS[v][2] == "all"]
    if "sync_colocated" not in args.variants:
        args.variants.insert(0, "sync_colocated")  # every ratio is to it
    tail = max(VARIANTS[v][0] for v in args.variants)
    if args.steps - args.skip - tail < 1:
        parser.error(f"--steps {args.steps} leaves no timed step after --skip {args.skip} and the last {tail}")

    cfg = model_config(args)
    records = make_arithmetic_dataset(256, 0, max_operand=99)
    rows = args.prompts * args.group
    # the hardware side, measured in this run: decode matmuls have B·G rows, the trainer's
    # B·G·(prompt + response)
    gemm = {"decode": measure_gemms(cfg, rows), "train": measure_gemms(cfg, rows * (PROMPT_LEN + args.new_tokens))}
    common = {
        "bench": "async_rl", "layers": args.layers, "dim": args.dim, "vocab": cfg.vocab_size,
        "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
        "inner_updates": args.inner_updates, "steps": args.steps, "skip": args.skip, "drain_steps": tail,
        "rounds": args.rounds, "reward_ms": args.reward_ms, "num_devices": args.num_devices,
        "sampler_devices": args.sampler_devices, "single_thread": args.single_thread,
    }
    configs = [(name, workers) for workers in worker_counts for name in args.variants]
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    for round_ in range(args.rounds):
        for name, workers in configs:
            run = run_variant(name, args, workers, records)
            runs[name, workers].append(run)
            steps = [step_wall_s(r, rows) for r in run["timed"]]
            print(f"# round {round_}: {name} workers={workers}: step {statistics.median(steps):.3f} s "
                  f"(run {run['run_s']:.0f} s)", file=sys.stderr, flush=True)

    results = {c: summarize(*c, runs[c], args) for c in configs}
    sync = {w: results["sync_colocated", w] for w in worker_counts}
    meta = run_metadata(args.quick)
    out = []
    for (name, workers), r in results.items():
        own = sync[workers]
        # the uncontended components of this variant's devices: the synchronous run on them
        ref = "sync_colocated_half" if VARIANTS[name][2] == "half" and ("sync_colocated_half", workers) in results \
            else "sync_colocated"
        flops = step_flops(cfg, rows, r["response_length_mean"], args.inner_updates)
        hw, floors = {}, {}
        for phase in flops:
            fields = roofline_fields(gemm[phase], flops[phase])
            hw.update({k.replace("gemm_", f"gemm_{phase}_").replace("roofline_", f"{phase}_roofline_"): v
                       for k, v in fields.items()})
            floors[f"{phase}_floor_s"] = sum(flops[phase].values()) / fields["roofline_flops_per_s"]
        row = {
            **common, **r,
            "speedup_over_sync": own["step_s"] / r["step_s"],
            "speedup_over_sync_w1": sync[min(sync)]["step_s"] / r["step_s"],
            "ideal_step_s_from_sync": max(results[ref, workers]["time_sampler_s"], results[ref, workers]["trainer_s"]),
            "ideal_from": ref,
            "model_flops_per_step": sum(sum(f.values()) for f in flops.values()),
            **hw, **floors,
            # the simulated devices share the host's cores: the phases' floors add up
            "compute_floor_s": sum(floors.values()),
            "step_over_compute_floor": r["step_s"] / sum(floors.values()),
            **meta,
        }
        emit("async_rl", row, save=not args.no_save)
        out.append(row)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
