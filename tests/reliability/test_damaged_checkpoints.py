"""Corruption injection: the latest checkpoint of a run is damaged (a truncated array
file, truncated or empty metadata, a missing file); ``run.resume=true`` falls back to the
newest checkpoint that restores, warns naming the damaged one, moves it aside (evidence
kept, invisible to orbax) and the run ends with the uninterrupted run's metrics. Damage is
told apart from a config mismatch, which stays an error naming the leaf."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.train.checkpoint import (
    CheckpointDamagedError,
    Checkpointer,
    CheckpointMismatchError,
    damage_reason,
    damaged_checkpoints,
    scan_step_dir,
)
from jaxrl_llm.train.metrics import read_metrics
from jaxrl_llm.train.storage import checkpoint_steps, describe_run_outputs

STEPS, EVERY = 4, 2  # checkpoints 2 and 4; 4 is damaged, the run falls back to 2


def _largest_array_chunk(step_dir: Path) -> tuple[str, int, int]:
    """``(data file, offset, length)`` of the largest array chunk the checkpoint's OCDBT
    index points at.

    Read from the index, not guessed from the folder: a data file may end in B-tree node
    bytes of the per-process index that nothing reads once orbax has merged it, and how
    orbax splits the arrays over files varies from run to run (under load, more writes,
    smaller files). Damaging "the largest file" or "its second half" could thus hit bytes
    that are never read, and the damage would, rightly, go unnoticed."""
    import tensorstore as ts

    state = step_dir / "state"
    kvstore = ts.KvStore.open(f"file://{state}/").result()
    chunks = []

    def visit(location: str) -> None:
        for entry in ts.ocdbt.dump(kvstore, location).result()["entries"]:
            ref = entry.get("indirect_value") or entry.get("node")
            if isinstance(ref, str) and ref.startswith("btreenode:"):
                visit(ref)
            elif isinstance(ref, str) and ref.startswith("value:"):
                _, base, name, offset, length = ref.split(":")  # value:<base>:<file>:<offset>:<length>
                chunks.append((str(state / base / name), int(offset), int(length)))

    visit(ts.ocdbt.dump(kvstore).result()["versions"][-1]["root"]["location"])
    assert chunks, f"the index of {step_dir} points at no array data"
    return max(chunks, key=lambda chunk: chunk[2])


def _truncate_in_chunk(step_dir: Path) -> None:
    """An interrupted copy: the data file ends halfway through its largest array chunk."""
    path, offset, length = _largest_array_chunk(step_dir)
    os.truncate(path, offset + length // 2)


def _overwrite_in_chunk(step_dir: Path, n: int = 16) -> None:
    """A bad sector / stray write: ``n`` bytes in the middle of the largest array chunk
    changed, the file's size kept."""
    path, offset, length = _largest_array_chunk(step_dir)
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        old = f.read(n)
        f.seek(-len(old), os.SEEK_CUR)
        f.write(bytes(b ^ 0x5A for b in old))


def _truncate(path, keep: float = 0.5) -> None:
    os.truncate(path, int(os.path.getsize(path) * keep))


# what is done to the latest checkpoint, and what the warning must say about it
DAMAGE = {
    "truncated-array-file": (_truncate_in_chunk, r"an array file is truncated"),
    "truncated-metadata": (lambda d: _truncate(d / "state" / "_METADATA"), r"state/_METADATA is truncated or corrupt: not valid JSON"),
    "empty-metadata": (lambda d: os.truncate(d / "state" / "_METADATA", 0), r"state/_METADATA is empty \(0 bytes\)"),
    "empty-sidecar-metadata": (lambda d: os.truncate(d / "meta" / "metadata", 0), r"meta/metadata is empty \(0 bytes\)"),
    "missing-array-file": (lambda d: os.remove(_largest_array_chunk(d)[0]), r"an array file is truncated or missing"),
    "bytes-overwritten-in-array-file": (_overwrite_in_chunk,
                                        r"the arrays read back differ from the ones saved \(checksum mismatch in \S+"),
    "missing-step-file": (lambda d: os.remove(d / "state" / "manifest.ocdbt"), r"state/manifest.ocdbt \(the index of the array files\) is missing"),
}


def _sft_run(out: Path, **run_kw):
    from flax import nnx

    from jaxrl_llm.models import CausalLM, CharTokenizer, tiny_config
    from jaxrl_llm.train import sft
    from jaxrl_llm.train.loop import RunConfig
    from tests.train.test_sft import TINY, _examples

    run = dict(output_dir=str(out), total_steps=STEPS, checkpoint_every=EVERY, keep_checkpoints=3,
               progress=False, export_hf=False, **run_kw)
    config = sft.SFTConfig(run=RunConfig(**run), batch_size=4, max_len=16)
    model = CausalLM(tiny_config("llama", **TINY), rngs=nnx.Rngs(0))
    return sft.train(config, policy=model, tokenizer=CharTokenizer(), examples=_examples(8))


def _rows(path: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput (the only figure that differs)."""
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in read_metrics(path)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An uninterrupted tiny SFT run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _sft_run(out)
    assert checkpoint_steps(out / "checkpoints") == [2, 4]
    return out


@pytest.mark.parametrize("kind", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, finished_run, kind, caplog):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damage, reason = DAMAGE[kind]
    latest = out / "checkpoints" / str(STEPS)
    damage(latest)
    files_before = sorted(str(p.relative_to(latest)) for p in latest.rglob("*"))

    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.train.checkpoint"):
        result = _sft_run(out, resume=True)

    # it resumed from checkpoint 2: steps 2 and 3 were re-run, their old rows dropped
    assert [r["step"] for r in result.history] == list(range(STEPS))
    assert _rows(out / "metrics.jsonl") == _rows(finished_run / "metrics.jsonl")
    # the warning names the skipped checkpoint, the damage and where it went
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert str(latest) in warning and "resumed from checkpoint 2" in warning
    assert re.search(reason, warning), warning
    # the damaged checkpoint is kept as evidence, untouched, next to a fresh step 4
    (moved,) = damaged_checkpoints(out / "checkpoints")
    assert moved.name.startswith(f"{STEPS}.damaged-")
    assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*") if p.name != "DAMAGED.txt") == files_before
    assert checkpoint_steps(out / "checkpoints") == [2, 4]
    reader = Checkpointer(out / "checkpoints")
    assert reader.all_steps() == [2, 4]  # orbax's listing does not see the damaged folder
    reader.close()
    assert scan_step_dir(out / "checkpoints" / str(STEPS)) == []


def test_no_restorable_checkpoint_names_each_one_and_moves_nothing(tmp_path, finished_run):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    os.truncate(out / "checkpoints" / "4" / "meta" / "metadata", 0)
    os.remove(out / "checkpoints" / "2" / "state" / "manifest.ocdbt")
    with pytest.raises(CheckpointDamagedError) as info:
        _sft_run(out, resume=True)
    message = str(info.value)
    assert f"no checkpoint in {out / 'checkpoints'} can be restored" in message
    assert f"{out / 'checkpoints' / '4'}: meta/metadata is empty" in message
    assert f"{out / 'checkpoints' / '2'}: state/manifest.ocdbt" in message
    assert damaged_checkpoints(out / "checkpoints") == []  # nothing moved or deleted
    assert checkpoint_steps(out / "checkpoints") == [2, 4]
    assert isinstance(info.value, OSError)  # a user error: the CLI shows it as one line


# ------------------------------------------------------------------ Checkpointer level (fast)


def _state(seed: int) -> dict:
    return {"params": {"w": jax.random.normal(jax.random.PRNGKey(seed), (64, 48)), "b": jnp.full(3, float(seed))},
            "rng": jnp.zeros(2, jnp.uint32)}


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    ckpt = Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
    for step in (1, 2):
        ckpt.save(step, _state(step), {"position": step})
    ckpt.close()
    return tmp_path / "checkpoints"


FAST_DAMAGE = {
    **DAMAGE,
    "truncated-manifest": (lambda d: os.truncate(d / "state" / "manifest.ocdbt", 10), r"a file is corrupt .*manifest.ocdbt"),
    "missing-state-dir": (lambda d: shutil.rmtree(d / "state"), r"state/ \(the arrays\) is missing"),
    "missing-sidecar": (lambda d: os.remove(d / "meta" / "metadata"), r"meta/metadata is missing"),
    "empty-array-files": (lambda d: [os.truncate(f, 0) for f in glob.glob(f"{d}/state/**/d/*", recursive=True)], r"state/.*/d/\w+ is empty \(0 bytes\)"),
    "truncated-array-metadata": (lambda d: _truncate(d / "state" / "array_metadatas" / "process_0", 0.1),
                                 r"state/array_metadatas/process_0 is truncated or corrupt: not valid JSON"),
}


@pytest.mark.parametrize("kind", list(FAST_DAMAGE), ids=list(FAST_DAMAGE))
def test_restore_latest_skips_each_damage_kind(two_checkpoints, kind):
    damage, reason = FAST_DAMAGE[kind]
    damage(two_checkpoints / "2")
    ckpt = Checkpointer(two_checkpoints)
    state, meta, step, skipped = ckpt.restore_latest(_state(0))
    assert step == 1 and meta == {"position": 1}
    np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
    ((bad, why),) = skipped
    assert bad == 2 and re.search(reason, why), why
    assert ckpt.all_steps() == [1]
    ckpt.save(2, _state(2), {"position": 2})  # the step can be written again
    ckpt.close()
    assert [p.name.split(".")[0] for p in damaged_checkpoints(two_checkpoints)] == ["2"]
    assert (damaged_checkpoints(two_checkpoints)[0] / "DAMAGED.txt").read_text().startswith("skipped on resume: ")
    assert Checkpointer(two_checkpoints).restore(_state(0))[1] == {"position": 2}


def test_a_config_mismatch_is_not_damage(two_checkpoints):
    """A checkpoint that reads fine but has other shapes stays a mismatch error naming the
    leaf, even behind a damaged newer one; nothing is moved aside."""
    os.truncate(two_checkpoints / "2" / "state" / "_METADATA", 0)
    other = {"params": {"w": jnp.zeros((64, 96)), "b": jnp.zeros(3)}, "rng": jnp.zeros(2, jnp.uint32)}
    with pytest.raises(CheckpointMismatchError, match=r"params.w: checkpoint has shape \(64, 48\), the current config expects \(64, 96\)"):
        Checkpointer(two_checkpoints).restore_latest(other)
    assert damaged_checkpoints(two_checkpoints) == []


def test_damage_reason_leaves_other_errors_alone():
    assert damage_reason(ValueError("Requested shape (3,) is not compatible")) is None
    oom = Exception("Encountered error while reading array index")
    oom.__cause__ = ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8 GiB")
    assert damage_reason(oom) is None  # not damage: the checkpoint must not be moved aside
    truncated = Exception("Encountered error while reading array index")
    truncated.__cause__ = ValueError('OUT_OF_RANGE: Error reading "params.w/0.0": Requested byte range [0, 9) is not valid for value of size 4')
    assert damage_reason(truncated).startswith("an array file is truncated (OUT_OF_RANGE")


def test_moved_aside_folder_is_no_step_for_the_run_folder_checks(two_checkpoints):
    os.truncate(two_checkpoints / "2" / "meta" / "metadata", 0)
    ckpt = Checkpointer(two_checkpoints)
    ckpt.restore_latest(_state(0))
    ckpt.close()
    assert checkpoint_steps(two_checkpoints) == [1]
    (moved,) = damaged_checkpoints(two_checkpoints)
    assert describe_run_outputs(two_checkpoints.parent) == [f"checkpoints at steps [1] (+ 1 damaged, moved aside: {moved.name})"]
