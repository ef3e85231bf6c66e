"""A run folder belongs to one run: reusing one is refused, run.resume=true continues the
run it holds (with the same config), run.overwrite=true replaces it."""

import dataclasses
import re

import pytest

from jaxrl_llm.train import dpo
from jaxrl_llm.train.loop import RESUMABLE_FIELDS, RunConfig, config_differences
from jaxrl_llm.train.metrics import read_metrics
from jaxrl_llm.train.optim import OptimConfig
from jaxrl_llm.train.storage import RUN_OUTPUT_FILES, describe_run_outputs
from tests.train.test_loop_core import Interrupt, ToyConfig, toy_train


def _config(out, **run) -> ToyConfig:
    run = {"output_dir": str(out), "total_steps": 10, "checkpoint_every": 5, "progress": False, **run}
    return ToyConfig(run=RunConfig(**run))


def _with_run(config: ToyConfig, **run) -> ToyConfig:
    return dataclasses.replace(config, run=dataclasses.replace(config.run, **run))


def _steps(out) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_reusing_a_run_folder_is_refused_with_what_it_holds(tmp_path):
    out = tmp_path / "run"
    config = _config(out)
    toy_train(config)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError) as err:
        toy_train(config)
    message = str(err.value)
    assert str(out) in message
    assert "checkpoints at steps [5, 10]" in message and "metrics.jsonl with 10 rows" in message
    assert "run.resume=true" in message and "run.overwrite=true" in message and "new run.output_dir" in message
    assert (out / "metrics.jsonl").read_text() == before and _steps(out) == [5, 10]  # untouched


def test_empty_or_new_folders_start_fresh(tmp_path):
    toy_train(_config(tmp_path / "does" / "not" / "exist"))
    out = tmp_path / "prepared"
    (out / "checkpoints").mkdir(parents=True)  # empty outputs and unrelated files are no run
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text("")
    (out / "notes.txt").write_text("my notes")
    assert describe_run_outputs(out) == []
    result = toy_train(_config(out))
    assert [r["step"] for r in result.history] == list(range(10))
    assert (out / "notes.txt").read_text() == "my notes"


def test_resume_continues_the_run_and_its_metrics(tmp_path):
    out = tmp_path / "run"
    config = _config(out, total_steps=15)
    with pytest.raises(Interrupt):
        toy_train(config, interrupt_at=7)  # checkpoint 5 written, steps 5, 6 logged
    # a longer run and other bookkeeping may change on resume
    resumed = _with_run(config, resume=True, total_steps=20, checkpoint_every=10, keep_checkpoints=5)
    result = toy_train(resumed)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(20))  # steps 5, 6 re-run once, then continued
    assert [r["step"] for r in result.history] == list(range(20))
    assert _steps(out)[-1] == 20


def test_resume_with_changed_fields_names_every_one(tmp_path):
    out = tmp_path / "run"
    config = _config(out)
    toy_train(config)
    changed = dataclasses.replace(
        _with_run(config, resume=True, seed=3, total_steps=12, progress=True),
        optim=OptimConfig(learning_rate=0.5), batch_size=4, tags=("x",),
    )
    with pytest.raises(ValueError) as err:
        toy_train(changed)
    message = str(err.value)
    listed = re.findall(r"^  (\S+): saved (.*), now (.*)$", message, flags=re.MULTILINE)
    assert listed == [
        ("run.seed", "0", "3"),
        ("optim.learning_rate", "0.05", "0.5"),
        ("batch_size", "8", "4"),
        ("tags", "[]", '["x"]'),
    ]
    assert "4 fields" in message and str(out) in message and "run.overwrite=true" in message
    assert _steps(out) == [5, 10]  # nothing restored or written
    assert "seed: 0" in (out / "config.yaml").read_text()  # the saved config is kept


def test_resume_accepts_fields_added_to_the_config_since(tmp_path):
    """A config.yaml written before a field existed (here run.overwrite) still resumes."""
    out = tmp_path / "run"
    config = _config(out, total_steps=5)
    toy_train(config)
    path = out / "config.yaml"
    path.write_text("".join(line for line in path.read_text().splitlines(True) if "overwrite:" not in line))
    result = toy_train(_with_run(config, resume=True, total_steps=8))
    assert [r["step"] for r in result.history] == list(range(8))


def test_config_differences():
    now = ToyConfig(run=RunConfig(output_dir="a", seed=1))
    saved = {"run": {"output_dir": "a", "seed": 2}, "batch_size": 8, "gone": 1}  # most fields absent
    diffs = config_differences(saved, now)
    assert [d[0] for d in diffs] == ["run.seed", "gone"]  # absent fields at their default are no change
    assert diffs[0][1:] == (2, 1)
    # absent from the saved file and not at its default: a difference
    assert [d[0] for d in config_differences(saved, dataclasses.replace(now, noise=0.5))] == ["run.seed", "gone", "noise"]


def test_overwrite_clears_the_old_run_and_only_it(tmp_path):
    out = tmp_path / "run"
    toy_train(_config(out, tensorboard=True))
    (out / "export").mkdir()
    (out / "export" / "config.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    result = toy_train(_config(out, total_steps=4, checkpoint_every=0, overwrite=True))
    assert [r["step"] for r in result.history] == list(range(4))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(4))
    assert _steps(out) == [4]  # the old run's checkpoints 5 and 10 are gone
    assert not (out / "export").exists() and not (out / "tensorboard").exists()
    assert "total_steps: 4" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "keep me" and (out / "data" / "train.jsonl").exists()


def test_resume_and_overwrite_together_is_an_error():
    with pytest.raises(ValueError, match="run.resume=true and run.overwrite=true"):
        RunConfig(resume=True, overwrite=True)


def test_overwrite_refuses_folders_that_are_not_run_folders(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    (out / "export").mkdir(parents=True)
    (out / "export" / "model.safetensors").write_text("precious")
    with pytest.raises(ValueError, match="does not look like a run folder"):
        toy_train(_config(out, overwrite=True))
    assert (out / "export" / "model.safetensors").read_text() == "precious"

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ValueError, match="refuses to clear"):
        toy_train(_config(home, overwrite=True))
    with pytest.raises(ValueError, match="refuses to clear"):
        toy_train(_config(tmp_path, overwrite=True))  # an ancestor of the home folder
    monkeypatch.chdir(out / "export")
    with pytest.raises(ValueError, match="current working directory"):
        toy_train(_config(out, overwrite=True))


def test_resumable_fields_and_trainer_outputs_are_known():
    assert {"run.total_steps", "run.resume", "run.overwrite"} <= set(RESUMABLE_FIELDS)
    assert "run.seed" not in RESUMABLE_FIELDS and "optim" not in RESUMABLE_FIELDS
    assert {dpo.REFERENCE_CACHE, dpo.DATA_STATS} <= set(RUN_OUTPUT_FILES)


def test_sft_run_folder_reuse_resume_and_overwrite(tmp_path):
    from flax import nnx

    from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
    from jaxrl_llm.train import sft
    from tests.train.test_sft import TINY, _examples

    def run(**kw):
        run = {"output_dir": str(tmp_path), "total_steps": 4, "checkpoint_every": 2, "progress": False,
               "export_hf": False, **kw}
        config = sft.SFTConfig(run=RunConfig(**run), batch_size=4, max_len=16)
        model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
        return sft.train(config, policy=model, tokenizer=CharTokenizer(), examples=_examples(8))

    first = run()
    with pytest.raises(ValueError, match=r"checkpoints at steps \[2, 4\], metrics.jsonl with 4 rows"):
        run()
    longer = run(resume=True, total_steps=6)  # continues at step 4 with the data position saved
    assert [r["step"] for r in longer.history] == list(range(6))
    assert [r["loss"] for r in longer.history[:4]] == [r["loss"] for r in first.history]
    again = run(overwrite=True)
    assert [r["step"] for r in again.history] == list(range(4)) and _steps(tmp_path) == [2, 4]
    assert [r["loss"] for r in again.history] == [r["loss"] for r in first.history]  # same seed, fresh start
