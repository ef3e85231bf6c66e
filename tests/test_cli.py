"""The CLI builds the same configs as Python use and runs each stage."""

import json

import pytest
import yaml

from jaxrl_llm.cli import main
from jaxrl_llm.rewards.arithmetic import make_arithmetic_dataset


def test_demo(capsys):
    assert main(["demo"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dr_grpo_advantages"][:4] == [0.5, -0.5, -0.5, 0.5]


@pytest.fixture
def arithmetic_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_dataset(16, 0, max_operand=9)))
    return path


def test_grpo_preset_plus_overrides(tmp_path, arithmetic_jsonl):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("group_size: 2\nmax_prompt_len: 8\n")
    out = tmp_path / "run"
    code = main(["grpo", "--preset", "dapo", "--config", str(cfg), "--policy", "tiny:llama", "--tokenizer", "char",
                 "--data", str(arithmetic_jsonl), "--reward", "arithmetic", f"run.output_dir={out}",
                 "run.total_steps=1", "run.progress=false", "prompts_per_step=2", "max_new_tokens=4"])
    assert code == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["clip_high"] == 0.28 and resolved["dynamic_sampling"] is True  # from the preset
    assert resolved["group_size"] == 2 and resolved["run"]["total_steps"] == 1  # file and overrides win
    assert resolved["overlong_buffer"] == 0 or resolved["overlong_buffer"] >= 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_sft_stage(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n"
                            for r in make_arithmetic_dataset(8, 0)))
    out = tmp_path / "sft"
    assert main(["sft", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(data),
                 f"run.output_dir={out}", "run.total_steps=2", "run.progress=false", "batch_size=4", "max_len=16"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("loss" in r for r in rows)


def test_missing_inputs_and_bad_keys(tmp_path, arithmetic_jsonl):
    with pytest.raises(SystemExit, match="--reward"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl)])
    with pytest.raises(ValueError, match="unknown config key"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
              "--reward", "arithmetic", "group_sizes=4"])
