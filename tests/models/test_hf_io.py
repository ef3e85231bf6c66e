"""Logits parity with the transformers PyTorch implementation, save/load round trips,
sharded checkpoints and clear errors for mismatched checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.models import (
    CausalLM,
    ModelConfig,
    count_params,
    load_hf,
    load_tokenizer,
    save_hf,
)
from tests.models.helpers import (
    as_jnp,
    hf_logits,
    make_hf_model,
    max_diff_valid,
    padded_batch,
    scale_params,
    small_config,
)

TOL = 1e-4
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"]
# measured max |Δlogits| per case, printed at the end of the module (pytest -s).
MEASURED: dict[str, float] = {}


def _compare(hf_model, model, rng, total=12, lengths=(12, 7, 3)):
    """Max |Δ| over valid positions for unpadded, right-padded and left-padded batches."""
    worst = 0.0
    for side in ("right", "left"):
        tokens, mask, positions = padded_batch(rng, lengths, total, side)
        ref = hf_logits(hf_model, tokens, mask, positions)
        logits, _ = model(*as_jnp(tokens, positions), attention_mask=jnp.asarray(mask))
        assert logits.dtype == jnp.float32
        worst = max(worst, max_diff_valid(logits, ref, mask))
    return worst


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if MEASURED:
        print("\nmax |logits diff| vs transformers:")
        for k, v in sorted(MEASURED.items()):
            print(f"  {k:40s} {v:.2e}")


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, tie, tmp_path):
    hf_model = make_hf_model(family, tie=tie)
    hf_model.save_pretrained(tmp_path / "hf")
    model, config = load_hf(str(tmp_path / "hf"))
    assert config.model_type == family and config.tie_word_embeddings == tie
    assert count_params(model) == sum(p.numel() for p in hf_model.parameters())
    diff = _compare(hf_model, model, np.random.default_rng(0))
    MEASURED[f"{family}-{'tied' if tie else 'untied'}"] = diff
    assert diff <= TOL

    # round trip: save_hf → transformers.from_pretrained gives the same logits.
    from transformers import AutoModelForCausalLM

    save_hf(model, str(tmp_path / "ours"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    tokens, mask, positions = padded_batch(np.random.default_rng(1), (12, 5, 9), 12, "right")
    ours, _ = model(*as_jnp(tokens, positions), attention_mask=jnp.asarray(mask))
    diff = max_diff_valid(ours, hf_logits(reloaded, tokens, mask, positions), mask)
    MEASURED[f"{family}-{'tied' if tie else 'untied'} (save_hf→HF)"] = diff
    assert diff <= TOL


@pytest.mark.parametrize(
    "family,overrides",
    [
        (
            "llama",
            dict(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=10000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=16,
                )
            ),
        ),
        ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0))),
        ("mistral", dict(sliding_window=4)),
        ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1)),
        ("mixtral", dict(sliding_window=5)),
        ("qwen3_moe", dict(norm_topk_prob=False)),
    ],
    ids=[
        "llama3-rope",
        "linear-rope",
        "mistral-window4",
        "qwen2-window3-layer1",
        "mixtral-window5",
        "qwen3moe-no-topk-norm",
    ],
)
def test_logits_match_transformers_variants(family, overrides, tmp_path, request):
    hf_model = make_hf_model(family, **overrides)
    hf_model.save_pretrained(tmp_path)
    model, config = load_hf(str(tmp_path))
    if "sliding_window" in overrides:
        assert config.sliding_window == overrides["sliding_window"]
    if family == "qwen2":
        assert config.sliding_layers == (1,)
    # sequence (16) longer than the window / beyond original_max_position_embeddings.
    diff = _compare(hf_model, model, np.random.default_rng(2))
    MEASURED[request.node.callspec.id] = diff
    assert diff <= TOL
    # the variant must matter: the plain config gives different logits.
    from transformers import AutoModelForCausalLM

    save_hf(model, str(tmp_path / "rt"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rt")).eval()
    tokens, mask, positions = padded_batch(np.random.default_rng(3), (12, 12, 9), 12, "right")
    ours, _ = model(*as_jnp(tokens, positions), attention_mask=jnp.asarray(mask))
    assert max_diff_valid(ours, hf_logits(reloaded, tokens, mask, positions), mask) <= TOL


def test_rope_and_window_variants_change_logits(tmp_path):
    """Sanity for the variant tests: the scaled rope / window are not no-ops."""
    base = small_config("llama")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 12)))
    outs = []
    for cfg in (
        base,
        base.replace(rope_type="linear", rope_factor=4.0),
        base.replace(rope_type="llama3", rope_factor=8.0, rope_original_max_position_embeddings=16),
        base.replace(sliding_window=4),
    ):
        model = scale_params(CausalLM(cfg, rngs=__import__("flax").nnx.Rngs(0)))
        outs.append(np.asarray(model(tokens)[0]))
    for other in outs[1:]:
        assert np.abs(other - outs[0]).max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_saves_as_transformers_model(family, tmp_path):
    """A model trained from scratch (tiny preset) exports to transformers identically."""
    from flax import nnx
    from transformers import AutoModelForCausalLM

    config = small_config(family, tie_word_embeddings=family in ("qwen2", "mixtral"))
    model = scale_params(CausalLM(config, rngs=nnx.Rngs(3)))
    save_hf(model, str(tmp_path))
    hf_model = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert sum(p.numel() for p in hf_model.parameters()) == count_params(model)
    tokens, mask, positions = padded_batch(np.random.default_rng(4), (12, 7, 3), 12, "left")
    ours, _ = model(*as_jnp(tokens, positions), attention_mask=jnp.asarray(mask))
    assert max_diff_valid(ours, hf_logits(hf_model, tokens, mask, positions), mask) <= TOL
    assert ModelConfig.from_hf(json.load(open(tmp_path / "config.json"))) == config


def test_sharded_checkpoint_round_trip(tmp_path):
    hf_model = make_hf_model("qwen3_moe")
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    model, _ = load_hf(str(tmp_path / "hf"))
    diff = _compare(hf_model, model, np.random.default_rng(5))
    assert diff <= TOL

    save_hf(model, str(tmp_path / "ours"), max_shard_bytes=30_000)
    index = json.load(open(tmp_path / "ours" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    again, _ = load_hf(str(tmp_path / "ours"))
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.tree.leaves(__import__("flax").nnx.state(model)),
        jax.tree.leaves(__import__("flax").nnx.state(again)),
    )


def test_load_bfloat16(tmp_path):
    hf_model = make_hf_model("llama")
    hf_model.save_pretrained(tmp_path)
    model, _ = load_hf(str(tmp_path), dtype=jnp.bfloat16)
    assert model.model.embed[...].dtype == jnp.bfloat16
    tokens, mask, positions = padded_batch(np.random.default_rng(6), (12, 7, 3), 12, "right")
    logits, _ = model(*as_jnp(tokens, positions), attention_mask=jnp.asarray(mask))
    ref = hf_logits(hf_model, tokens, mask, positions)
    assert logits.dtype == jnp.float32
    assert max_diff_valid(logits, ref, mask) < 0.5  # bf16 params and activations
    save_hf(model, str(tmp_path / "bf16"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "np") as f:
        assert str(f.get_tensor("model.norm.weight").dtype) == "bfloat16"


def test_wrong_hidden_size_names_tensor_and_shapes(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["hidden_size"] = 64
    cfg["head_dim"] = 16
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(
        ValueError,
        match=r"tensor '[a-z_.0-9]+' has shape \(\d+, 32\) but the config expects \(\d+, 64\)",
    ):
        load_hf(str(tmp_path))


def test_unknown_model_type_and_missing_tensors(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, "model_type": "gpt2"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_hf(str(tmp_path))
    # more layers in the config than in the weights → missing tensors are named.
    json.dump({**cfg, "num_hidden_layers": 3}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.2\."):
        load_hf(str(tmp_path))
    # fewer layers → unexpected tensors are named.
    json.dump({**cfg, "num_hidden_layers": 1}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"does not use: .*model\.layers\.1\."):
        load_hf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="kind="):
        load_hf(str(tmp_path), kind="classifier")


def test_load_tokenizer_from_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded("hello world foo")["input_ids"] == [2, 3, 1]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_load_places_each_tensor_with_sharding_fn(tmp_path):
    """Tensors go straight to their (mesh) sharding, chosen from logical axis names."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    hf_model = make_hf_model("mixtral")
    hf_model.save_pretrained(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:2]), ("tensor",))
    rules = {"vocab": "tensor", "mlp": "tensor", "heads": "tensor", "kv_heads": "tensor"}
    seen = []

    def sharding_fn(names, shape):
        seen.append(names)
        return NamedSharding(mesh, PartitionSpec(*(rules.get(n) for n in names)))

    model, _ = load_hf(str(tmp_path), sharding_fn=sharding_fn)
    assert ("embed", "heads", "head_dim") in seen and ("experts", "embed", "mlp") in seen
    q = model.model.layers[0].attn.q_proj[...]
    assert q.sharding.spec == PartitionSpec(None, "tensor", None)
    assert len(q.addressable_shards) == 2
    assert _compare(hf_model, model, np.random.default_rng(8)) <= TOL


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_fused_expert_checkpoint_format(family, tmp_path):
    """transformers 5 in-memory layout (experts.gate_up_proj [E, 2F, D], experts.down_proj
    [E, D, F]) loads like the per-expert layout."""
    from safetensors.numpy import load_file, save_file

    hf_model = make_hf_model(family)
    hf_model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    prefix = "block_sparse_moe" if family == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for layer in range(2):
        base = f"model.layers.{layer}.{prefix}.experts."
        pop = [[tensors.pop(f"{base}{e}.{n}.weight") for e in range(4)] for n in names]
        tensors[base + "gate_up_proj"] = np.stack(
            [np.concatenate([g, u], axis=0) for g, u in zip(pop[0], pop[1], strict=True)]
        )
        tensors[base + "down_proj"] = np.stack(pop[2])
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load_hf(str(tmp_path))
    assert _compare(hf_model, model, np.random.default_rng(9)) <= TOL
