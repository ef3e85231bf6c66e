"""The tool-use experiment: its demonstrations are what the environment really answers,
tokenized like rollouts, and the ``--quick`` run writes every output with sane values.

No learning assertion: --quick (20 SFT + 3 GRPO steps) is a smoke test of the plumbing,
too short to learn the tool call; the full run that does (800 SFT + 120 GRPO steps,
9–13 minutes per seed on 2 shared CPU cores) is too long for CI. Its measured figures are in
experiments/tool_use.py and experiments/README.md.
"""

import math
import sys

import pytest

from jaxrl_llm.data.sft import tokenize_sft
from jaxrl_llm.models import CharTokenizer
from tests.experiments.helpers import ROOT, run_quick

sys.path.insert(0, str(ROOT / "experiments"))
import tool_use  # the experiment module, imported by name as the sandbox needs


def test_problems_and_demonstrations_match_the_environment():
    train, held_out = tool_use.problems(seed=0)
    assert len(train) + len(held_out) == (tool_use.HIGH - tool_use.LOW + 1) ** 2
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held_out}
    assert tool_use.problems(seed=0) == (train, held_out)
    demos = tool_use.demonstrations(train, seed=0, n=20)
    assert len(demos) == 60
    calls = [d for d in demos if len(d["messages"]) == 4]
    assert len(calls) == 20 and sum("tools" in d for d in demos) == 40
    tok = CharTokenizer()
    for d in calls[:5]:
        user, call, obs, answer = d["messages"]
        record = next(p for p in train if p["prompt"] == user["content"])
        env = tool_use.tool_env()
        assert env.reset(record, seed=0) == [user]
        step = env.step(call["content"])  # the demonstration's observation is the environment's
        assert step.observation == [obs] and not step.done and step.info["tool_calls"] == 1.0
        final = env.step(answer["content"])
        assert final.done and final.reward == 1.0
        # tokenized like an episode: the loss covers the call, the answer and their eos only
        [ex], _ = tokenize_sft([d], tok, max_len=tool_use.PROMPT_LEN + tool_use.MAX_TOTAL_TOKENS,
                               assistant_turns="all")
        assert len(ex.prompt_ids) <= tool_use.PROMPT_LEN and len(ex.response_ids) <= tool_use.MAX_TOTAL_TOKENS
        targets = [t for t, m in zip(ex.response_ids, ex.response_mask) if m]
        eos = tok.eos_token_id
        assert targets == tok.encode(call["content"]) + [eos] + tok.encode(answer["content"]) + [eos]
    no_tools = tool_use.no_tool_env()
    no_tools.reset(train[0], seed=0)
    assert no_tools.tools == [] and no_tools.step(tool_use.tool_call_text(1, 2)).reward == 0.0


@pytest.mark.slow
def test_tool_use_quick(tmp_path):
    out, s = run_quick("tool_use", tmp_path)
    assert (out / "tool_use.png").stat().st_size > 10_000
    assert (s["sft_steps"], s["rl_steps"]) == (tool_use.QUICK_SFT_STEPS, tool_use.QUICK_RL_STEPS)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == tool_use.QUICK_RL_STEPS
    for arm in ("no_tools", "tools_sft", "tools_rl"):
        r = s["held_out"][arm]
        for key in ("success", "tool_call_rate", "malformed_rate"):
            assert 0.0 <= r[key] <= 1.0, (arm, key)
        assert 1.0 <= r["turns"] <= tool_use.MAX_TURNS, arm
    assert s["held_out"]["no_tools"]["tool_call_rate"] <= 1.0
    for key in ("train_accuracy_first_steps", "train_accuracy_last_steps"):
        assert 0.0 <= s[key] <= 1.0
    assert math.isfinite(s["seconds"]) and s["isolation"] == "process"
