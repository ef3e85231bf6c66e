"""The README's main job, ``jaxrl-llm grpo``: SFT on demonstrations that are right only half
of the time leaves held-out accuracy near 0.5; GRPO with the exact-answer reward lifts it
far above that."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_llm.cli import main
from jaxrl_llm.train import quickstart

ROOT = Path(__file__).resolve().parents[2]


def _run_python(args: list[str], out: Path) -> tuple[str, dict]:
    """Runs ``python <args>`` as a user does on a plain CPU (one device: the test session's
    simulated device count is not passed on); returns stdout and the summary."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900, check=False)
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout, json.loads((out / "grpo_quickstart" / "summary.json").read_text())


def test_split_is_disjoint_and_demonstrations_are_half_wrong():
    train, held_out = quickstart.split_problems(seed=3)
    assert (len(train), len(held_out)) == (70, 30)
    train_prompts = {p["prompt"] for p in train}
    assert not train_prompts & {p["prompt"] for p in held_out}
    assert len(train_prompts | {p["prompt"] for p in held_out}) == 100
    for p in held_out:  # a ≠ b, and the mirror b+a is a training problem
        a, b = p["prompt"][:-1].split("+")
        assert a != b and f"{b}+{a}=" in train_prompts
    assert quickstart.split_problems(seed=3) == (train, held_out)
    assert quickstart.split_problems(seed=4)[1] != held_out

    demos = quickstart.half_wrong_demonstrations(train, seed=0)
    assert len(demos) == 8 * len(train)
    for p in train:
        responses = sorted(int(d["response"]) for d in demos if d["prompt"] == p["prompt"])
        s = int(p["answer"])
        assert responses == [s] * 4 + [s + 1] * 4

    records = [{"prompt": "3+5=", "answer": "8"}, {"prompt": "9+9=", "answer": "18"}]
    got = quickstart.answer_breakdown(records, ["8", "9", "18", "1"], num_samples=2)
    assert got == {"right": 0.5, "plus_one": 0.25, "other": 0.25}


def test_quick_path_writes_outputs(tmp_path):
    """``jaxrl-llm grpo --quick``: a few steps only, every output written (no learning claim)."""
    assert main(["grpo", "--quick", "--out", str(tmp_path)]) == 0
    out = tmp_path / "grpo_quickstart"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("held_out_accuracy_after_sft", "held_out_accuracy_after_rl", "held_out_sampled_accuracy_after_sft",
                "held_out_sampled_accuracy_after_rl", "train_accuracy_first_steps", "train_accuracy_last_steps",
                "held_out_plus_one_after_sft", "held_out_plus_one_after_rl"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert (summary["sft_steps"], summary["rl_steps"]) == (quickstart.QUICK_SFT_STEPS, quickstart.QUICK_RL_STEPS)
    assert (summary["train_prompts"], summary["held_out_prompts"]) == (70, 30)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == quickstart.QUICK_RL_STEPS
    assert (out / "grpo_quickstart.png").stat().st_size > 10_000
    assert main(["grpo", "--quick", "--out", str(tmp_path)]) == 0  # a rerun replaces the first run's folders


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_lifts_held_out_accuracy_far_above_imitation(tmp_path, seed):
    """The main job's recipe, shortened to 600 SFT + 250 GRPO steps (of 1000 + 600) to fit
    CI: measured 0.45 → 0.81 (seed 0) and 0.44 → 0.85 (seed 1) sampled, greedy 0.50 → 0.90
    and 0.47 → 0.97; seed 0 with XLA_FLAGS=--xla_cpu_max_isa=AVX2 0.45 → 0.85, greedy
    0.40 → 0.90. The full run reaches 0.93–0.98 on seeds 0–4."""
    code = ("from jaxrl_llm.train import quickstart; "
            f"quickstart.run('grpo', {str(tmp_path)!r}, seed={seed}, sft_steps=600, rl_steps=250)")
    stdout, s = _run_python(["-c", code], tmp_path)
    assert "after SFT on half-wrong demonstrations" in stdout and "held-out accuracy" in stdout
    # imitation reproduces the demonstrator: about half right, most of the rest its off-by-one mistake
    assert 0.3 < s["held_out_sampled_accuracy_after_sft"] < 0.65
    assert s["held_out_plus_one_after_sft"] > 0.3
    # GRPO with the verifier (960 sampled answers on 30 held-out problems; greedy: one per problem)
    assert s["held_out_sampled_accuracy_after_rl"] > s["held_out_sampled_accuracy_after_sft"] + 0.2
    assert s["held_out_sampled_accuracy_after_rl"] > 0.7
    assert s["held_out_accuracy_after_rl"] > s["held_out_accuracy_after_sft"] + 0.15
    assert s["held_out_plus_one_after_rl"] < 0.15
    assert s["train_accuracy_last_steps"] > s["train_accuracy_first_steps"] + 0.15
    assert (tmp_path / "grpo_quickstart" / "grpo_quickstart.png").stat().st_size > 10_000
