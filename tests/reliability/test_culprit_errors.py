"""Errors that name the culprit: a damaged or malformed input file is named with its line
(and column), record index or field, and what was expected — not a bare UnicodeDecodeError,
SafetensorError, YAML scanner error or "could not convert string to float".

The cases extend the bad-input registry of test_bad_inputs.py (same ``test_bad_input*``
test names, counted together in docs/reliability.md):
    pytest --collect-only -q tests/reliability/test_bad_inputs.py \\
        tests/reliability/test_culprit_errors.py | grep -c "::test_bad_input"
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from jaxrl_llm.data.preferences import tokenize_preferences
from jaxrl_llm.data.records import load_records
from jaxrl_llm.models.hf_io import load_hf, load_tokenizer
from jaxrl_llm.models.tokenizer import CharTokenizer
from jaxrl_llm.train.config import apply_overrides, load_config_dict
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.rft import _load_iteration


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _jsonl_with_latin1(tmp: Path) -> Path:
    return _write(tmp / "data.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "caf\xe9"}\n')


def _json_with_latin1(tmp: Path) -> Path:
    return _write(tmp / "data.json", b'[\n  {"prompt": "a"},\n  {"prompt": "caf\xe9"}\n]\n')


def _pairs_with_label(label) -> list[dict]:
    return [{"prompt": "q", "chosen": "a", "rejected": "b", "label": 1.0},
            {"prompt": "q", "chosen": "a", "rejected": "b", "label": label}]


def _hf_checkpoint(tmp: Path) -> Path:
    from tests.models.helpers import make_hf_model

    make_hf_model("llama").save_pretrained(tmp / "hf")
    return tmp / "hf"


def _truncated_safetensors(tmp: Path):
    path = _hf_checkpoint(tmp)
    weights = path / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)  # a download or copy cut short
    return load_hf(str(path))


def _truncated_config_json(tmp: Path):
    path = _hf_checkpoint(tmp)
    config = path / "config.json"
    os.truncate(config, os.path.getsize(config) // 2)
    return load_hf(str(path))


def _corrupt_shard_index(tmp: Path):
    path = _hf_checkpoint(tmp)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    _write(path / "model.safetensors.index.json", '{"weight_map": {"model.embed_tokens.weight": "model-00001-of')
    return load_hf(str(path))


def _empty_tokenizer_dir(tmp: Path):
    (tmp / "tok").mkdir()
    return load_tokenizer(str(tmp / "tok"))


def _orient_pairs(records):
    from jaxrl_llm.train.dpo import _orient_pairs

    return _orient_pairs(records)


def _corrupt_metrics_middle_line_on_resume(tmp: Path):
    """A damaged line in the middle of metrics.jsonl is not a kill mid-write: resume
    refuses it naming the file and line (a half-written LAST line is repaired)."""
    import dataclasses

    from tests.train.test_loop_core import ToyConfig, toy_train

    config = ToyConfig(run=RunConfig(output_dir=str(tmp), total_steps=4, checkpoint_every=2, progress=False))
    toy_train(config)
    metrics = tmp / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:12]
    metrics.write_text("\n".join(lines) + "\n")
    toy_train(dataclasses.replace(config, run=dataclasses.replace(config.run, resume=True, total_steps=6)))


# (case id, call(tmp_path), exception type, regex the message must match)
CASES = [
    ("records-jsonl-not-utf8", lambda t: load_records(_jsonl_with_latin1(t)), ValueError,
     r"data.jsonl: line 3, column 16 is not valid UTF-8 \(byte\(s\) e9: invalid continuation byte\); expected UTF-8 text"),
    ("records-json-not-utf8", lambda t: load_records(_json_with_latin1(t)), ValueError,
     r"data.json: line 3, column 18 is not valid UTF-8 .*expected UTF-8 text"),
    ("records-json-malformed", lambda t: load_records(_write(t / "d.json", '[{"prompt": "a"},\n {"prompt": }]')), ValueError,
     r"d.json: line 2, column 13 is not valid JSON: Expecting value"),
    ("records-jsonl-malformed", lambda t: load_records(_write(t / "d.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n')), ValueError,
     r"d.jsonl: line 2 is not valid JSON: .*\(column 16\)"),
    ("preferences-label-not-a-number", lambda t: tokenize_preferences(_pairs_with_label("yes"), CharTokenizer(), max_len=16), ValueError,
     r"record 1: label='yes' \(str\) is not a number; expected a number in \[0, 1\]"),
    ("preferences-label-bool", lambda t: tokenize_preferences(_pairs_with_label(True), CharTokenizer(), max_len=16), ValueError,
     r"record 1: label=True \(bool\) is not a number"),
    ("dpo-label-not-a-number", lambda t: _orient_pairs(_pairs_with_label("chosen")), ValueError,
     r"record 1: label='chosen' \(str\) is not a number"),
    ("hf-safetensors-truncated", _truncated_safetensors, ValueError,
     r"hf/model.safetensors is truncated/corrupt: Error while deserializing header.*bytes on disk\)\. Expected a complete safetensors file"),
    ("hf-config-json-truncated", _truncated_config_json, ValueError,
     r"hf/config.json \(the model config\) is truncated/corrupt: not valid JSON"),
    ("hf-index-json-corrupt", _corrupt_shard_index, ValueError,
     r"model.safetensors.index.json \(the index of the weight shards\) is truncated/corrupt"),
    ("tokenizer-dir-empty", _empty_tokenizer_dir, FileNotFoundError,
     r"tokenizer directory '.*tok' is empty; expected tokenizer files: tokenizer.json and/or tokenizer_config.json"),
    ("tokenizer-dir-weights-only", lambda t: load_tokenizer(str(_write(t / "w" / "config.json", "{}").parent)), FileNotFoundError,
     r"tokenizer directory '.*w' holds only \['config.json'\]; expected tokenizer files"),
    ("config-yaml-malformed", lambda t: load_config_dict(_write(t / "c.yaml", "run:\n  total_steps: 10\n  seed: [1, 2\nbatch_size: 4\n")), ValueError,
     r"config file .*c.yaml, line 4, column 11: not valid YAML \(while parsing a flow sequence expected ',' or '\]', but got ':'\)"),
    ("config-yaml-bad-indent", lambda t: load_config_dict(_write(t / "c.yaml", "run:\n  seed: 1\n total_steps: 2\n")), ValueError,
     r"config file .*c.yaml, line 3, column 2: not valid YAML"),
    ("config-yaml-not-utf8", lambda t: load_config_dict(_write(t / "c.yaml", b"run:\n  output_dir: caf\xe9\n")), ValueError,
     r"config file .*c.yaml, line 2: not valid UTF-8"),
    ("config-override-bad-yaml", lambda t: apply_overrides({}, ["tags=[a"]), ValueError,
     r"override 'tags=\[a': the value '\[a' is not valid YAML"),
    ("run-seed-negative", lambda t: RunConfig(seed=-1), ValueError, r"run.seed must be an int >= 0 .*got -1"),
    ("run-seed-float", lambda t: RunConfig(seed=0.5), ValueError, r"run.seed must be an int >= 0 .*got 0.5"),
    ("rft-kept-set-truncated", lambda t: _load_iteration(_write(t / "iteration_1.jsonl", '{"metrics": {}}\n{"record": {}, "prompt_ids": [1, ')),
     ValueError, r"iteration_1.jsonl: line 2 is not valid JSON: .*\(the kept set of this RFT iteration, needed to resume it, is damaged"),
    ("rft-kept-set-missing-field", lambda t: _load_iteration(_write(t / "iteration_1.jsonl", '{"metrics": {}}\n{"record": {}}\n')),
     ValueError, r"iteration_1.jsonl: line 2 does not hold the fields \['record', 'prompt_ids', 'response_ids'\]"),
    ("metrics-corrupt-middle-line-on-resume", _corrupt_metrics_middle_line_on_resume, ValueError,
     r"metrics.jsonl, line 2: not a JSON object \(.*\)\. Only a half-written last line .* is repaired on resume"),
]


@pytest.mark.parametrize("case, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_file(tmp_path, case, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path)


# ------------------------------------------------------------------ metrics.jsonl repairs


@pytest.mark.parametrize("tail", [b'{"step": 4, "loss": 0.1', b"\x00" * 64, b'{"step": 4, "lo\xe2\x80'],
                         ids=["half-written", "nul-filled", "cut-multibyte"])
def test_damaged_last_metrics_line_is_repaired_on_resume(tmp_path, tail):
    import dataclasses

    from jaxrl_llm.train.metrics import read_metrics
    from tests.train.test_loop_core import ToyConfig, toy_train

    config = ToyConfig(run=RunConfig(output_dir=str(tmp_path / "a"), total_steps=6, checkpoint_every=2, progress=False))
    full = read_metrics(toy_train(config).output_dir / "metrics.jsonl")
    other = dataclasses.replace(config, run=dataclasses.replace(config.run, output_dir=str(tmp_path / "b"), total_steps=4))
    toy_train(other)
    metrics = tmp_path / "b" / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + tail)
    resumed = toy_train(dataclasses.replace(other, run=dataclasses.replace(other.run, resume=True, total_steps=6)))
    assert read_metrics(metrics) == full and [r["step"] for r in resumed.history] == list(range(6))


# ------------------------------------------------------------------ DPO ties


def test_dpo_evaluate_counts_a_tie_as_half_and_reports_ties(tmp_path):
    """At the reference model every implicit reward margin is exactly 0: a tie, not a
    wrong preference — accuracy 0.5 (as a coin flip), ties 1.0."""
    from jaxrl_llm.train.dpo import evaluate
    from tests.train.test_dpo import _config, _model, synthetic_pairs

    pairs = synthetic_pairs(6, 0)
    at_reference = evaluate(_config(tmp_path), policy=_model(0), tokenizer=CharTokenizer(), preferences=pairs)
    assert at_reference["reward_accuracy"] == 0.5 and at_reference["ties"] == 1.0
    assert at_reference["reward_margin"] == 0.0 and at_reference["num_pairs"] == 6
    other = evaluate(_config(tmp_path), policy=_model(0), tokenizer=CharTokenizer(), preferences=pairs,
                     reference=_model(1))
    assert other["ties"] == 0.0 and other["reward_accuracy"] in {i / 6 for i in range(7)}
    assert np.isfinite(other["reward_margin"])
