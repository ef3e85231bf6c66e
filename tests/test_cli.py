"""The CLI builds the same configs as Python use and runs each stage."""

import json

import jax
import numpy as np
import pytest
import yaml

from jaxrl_llm.cli import main, run
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


def test_scan_layers_flag_trains_the_same_model_and_exports_it_per_layer(tmp_path):
    from flax import nnx

    from jaxrl_llm.models import load_hf

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n"
                            for r in make_arithmetic_dataset(8, 0)))
    losses, params = {}, {}
    for flag in ([], ["--scan-layers"]):
        out = tmp_path / ("scan" if flag else "plain")
        assert main(["sft", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(data), *flag,
                     f"run.output_dir={out}", "run.total_steps=2", "run.progress=false", "batch_size=4",
                     "max_len=16"]) == 0
        losses[out.name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        exported, _ = load_hf(str(out / "export"))  # HF layout whatever the training layout
        params[out.name] = [np.asarray(x) for x in jax.tree.leaves(nnx.state(exported, nnx.Param))]
    np.testing.assert_allclose(losses["scan"], losses["plain"], rtol=1e-4)
    for got, want in zip(params["scan"], params["plain"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_missing_inputs_and_bad_keys(tmp_path, arithmetic_jsonl):
    with pytest.raises(SystemExit, match="--reward"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl)])
    with pytest.raises(ValueError, match="unknown config key"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
              "--reward", "arithmetic", "group_sizes=4"])


def test_command_line_errors_are_one_message_and_exit_2(arithmetic_jsonl, capsys):
    """The jaxrl-llm command: a bad field, mesh or path prints its message (no traceback)
    and exits 2; --debug raises the exception with its traceback instead."""
    base = ["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
            "--reward", "arithmetic"]
    for extra, message in [(["group_sizes=4"], "unknown config key(s) ['group_sizes']"),
                           (["mesh.fsdp=3"], "mesh.data=-1: the other sizes multiply to 3"),
                           (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "prompts_per_step=6"],
                            "prompts_per_step=6 is not divisible by mesh.data × mesh.fsdp = 4")]:
        assert run(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxrl-llm grpo: error: ") and message in err, err
        assert "Traceback" not in err and "--debug" in err
    with pytest.raises(ValueError, match="unknown config key"):
        run(base + ["group_sizes=4", "--debug"])


def test_own_reward_function_from_a_file_or_module(tmp_path, arithmetic_jsonl, capsys):
    """--reward path/to/file.py:function and package.module:function; a wrong spec names
    what is missing."""
    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text("def calls(prompts, completions, **columns):\n"
                           "    assert 'answer' in columns  # dataset columns arrive as keyword lists\n"
                           "    return [float(len(c)) for c in completions]\n")
    for spec in (f"{reward_file}:calls", "jaxrl_llm.rewards.arithmetic:arithmetic_reward"):
        out = tmp_path / spec.rsplit(":", 1)[1]
        assert main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                     "--reward", spec, f"run.output_dir={out}", "run.total_steps=1", "run.progress=false",
                     "prompts_per_step=2", "group_size=2", "max_prompt_len=8", "max_new_tokens=4"]) == 0
        assert "reward_mean" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    for spec, message in [(f"{tmp_path}/missing.py:f", "not found"), (f"{reward_file}:nope", "no function 'nope'"),
                          ("no_such_module_xyz:f", "cannot import module")]:
        with pytest.raises(ValueError, match=message):
            main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                  "--reward", spec])


def test_several_rewards_with_weights(tmp_path, arithmetic_jsonl):
    """--reward twice + reward_weights: the logged reward is the weighted sum of the two,
    each one's mean is logged too, and the config records the specs."""
    reward_file = tmp_path / "lengths.py"
    reward_file.write_text("def length(prompts, completions, **columns):\n"
                           "    return [float(len(c)) for c in completions]\n"
                           "def one(prompts, completions, **columns):\n"
                           "    return [1.0] * len(completions)\n")
    out = tmp_path / "run"
    assert main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                 "--reward", f"{reward_file}:length", "--reward", f"{reward_file}:one", "reward_weights=[0.5,3.0]",
                 f"run.output_dir={out}", "run.total_steps=2", "run.progress=false", "prompts_per_step=2",
                 "group_size=2", "max_prompt_len=8", "max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["reward/one"] == 1.0
        assert row["reward_mean"] == pytest.approx(0.5 * row["reward/length"] + 3.0, abs=1e-5)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward_funcs"] == [f"{reward_file}:length", f"{reward_file}:one"]
    assert saved["reward_weights"] == [0.5, 3.0]
    with pytest.raises(SystemExit, match="missing --reward.*arithmetic"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl)])
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2"):
        main(["grpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
              "--reward", "arithmetic", "--reward", "math", "reward_weights=[1.0]"])


def test_dpo_and_rft_stages(tmp_path, arithmetic_jsonl):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i + 2)}) + "\n"
                             for i in range(8)))
    out = tmp_path / "dpo"
    assert main(["dpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(prefs), f"run.output_dir={out}",
                 "run.total_steps=2", "run.progress=false", "batch_size=4", "max_len=16", "beta=0.2"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["beta"] == 0.2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    out = tmp_path / "rft"
    assert main(["rft", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                 "--reward", "arithmetic", f"run.output_dir={out}", "run.total_steps=2", "run.progress=false",
                 "steps_per_iteration=2", "prompts_per_iteration=4", "samples_per_prompt=2", "sampling_batch_size=4",
                 "max_prompt_len=8", "max_new_tokens=4", "batch_size=2"]) == 0


@pytest.mark.slow
def test_reward_model_then_ppo_pipeline(tmp_path, arithmetic_jsonl):
    """The RLHF chain from the command line: preferences → reward model → PPO against it."""
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{i}+1=", "chosen": "aaa", "rejected": "b"}) + "\n" for i in range(8)))
    rm_dir = tmp_path / "rm"
    assert main(["reward", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(prefs), f"run.output_dir={rm_dir}",
                 "run.total_steps=2", "run.progress=false", "batch_size=4", "max_len=16"]) == 0
    assert (rm_dir / "reward_model" / "config.json").exists()
    out = tmp_path / "ppo"
    assert main(["ppo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                 "--reward-model", str(rm_dir / "reward_model"), f"run.output_dir={out}", "run.total_steps=1",
                 "run.progress=false", "prompts_per_step=2", "max_prompt_len=8", "max_new_tokens=4", "ppo_epochs=1"]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl" in row and "explained_variance" in row


def test_ppo_stage_with_an_environment(tmp_path, arithmetic_jsonl):
    env = tmp_path / "guess_env.py"
    env.write_text(
        "from jaxrl_llm.envs import StepResult\n\n"
        "class Env:\n"
        "    def reset(self, record, *, seed):\n"
        "        self.n = 0\n"
        "        return [{'role': 'user', 'content': record['prompt']}]\n\n"
        "    def step(self, text):\n"
        "        self.n += 1\n"
        "        if self.n < 2:\n"
        "            return StepResult([{'role': 'tool', 'content': 'again'}], 0.0, False, {'asked': 1.0})\n"
        "        return StepResult(None, float(len(text) % 2), True, {'asked': 0.0})\n")
    out = tmp_path / "ppo_env"
    args = ["ppo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
            "--env", f"{env}:Env", f"run.output_dir={out}", "run.total_steps=1", "run.progress=false",
            "prompts_per_step=2", "samples_per_prompt=2", "max_prompt_len=32", "max_new_tokens=6", "max_turns=2",
            "max_total_tokens=48", "stop_token_ids=[97,98,99,100,101,102,103,104,105,106,107,108,109,110]"]
    assert main(args) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["env"] == f"{env}:Env" and resolved["max_turns"] == 2
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["turns_mean"] >= 1 and "finish_length" in row
    with pytest.raises(ValueError, match="either as --env or as env in the config"):
        main([*args, f"env={env}:Env"])
    with pytest.raises(ValueError, match="scored by its rewards"):
        main([*args[:7], "--reward", "arithmetic", *args[7:], "run.overwrite=true"])


def test_distill_and_kto_stages(tmp_path):
    data = tmp_path / "kd.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"]}) + "\n"
                            for r in make_arithmetic_dataset(8, 0)))
    out = tmp_path / "distill"
    assert main(["distill", "--policy", "tiny:llama", "--teacher", "tiny:qwen2", "--tokenizer", "char",
                 "--data", str(data), f"run.output_dir={out}", "run.total_steps=2", "run.progress=false",
                 "prompts_per_step=4", "max_prompt_len=8", "max_new_tokens=4", "lmbda=0.5", "divergence=jsd"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["divergence"]) and r["on_policy"] in (0.0, 1.0) for r in rows)
    with pytest.raises(SystemExit, match="missing --teacher"):
        main(["distill", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(data)])
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["answer"], "label": i % 2 == 0})
                                + "\n" for i, r in enumerate(make_arithmetic_dataset(8, 0))))
    out = tmp_path / "kto"
    assert main(["dpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(unpaired),
                 f"run.output_dir={out}", "run.total_steps=2", "run.progress=false", "loss_kind=kto",
                 "batch_size=4", "max_len=16"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_online_dpo_stage(tmp_path, arithmetic_jsonl):
    out = tmp_path / "odpo"
    assert main(["online-dpo", "--policy", "tiny:llama", "--tokenizer", "char", "--data", str(arithmetic_jsonl),
                 "--reward", "arithmetic", f"run.output_dir={out}", "run.total_steps=2", "run.progress=false",
                 "prompts_per_step=2", "samples_per_prompt=4", "max_prompt_len=8", "max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all("pairs" in r for r in rows)
