"""Bad input → a clear error before any compute: one registry of bad calls to the public
entry points (ops, model, generate, loading, data, configs, mesh), each with the error type
and the message that must name the argument and what was expected.

Every case is one test id ``test_bad_input*[<case>]``; docs/reliability.md counts them:
    pytest --collect-only -q tests/reliability/test_bad_inputs.py | grep -c "::test_bad_input"
Further bad-input tests live next to each module (tests/data, tests/train, ...).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm import ops
from jaxrl_llm.data.prompts import PromptLoader, tokenize_prompts
from jaxrl_llm.data.records import load_records
from jaxrl_llm.data.sampler import EpochSampler
from jaxrl_llm.data.tokenization import eos_id, pad_id
from jaxrl_llm.models import CausalLM, tiny_config
from jaxrl_llm.models.heads import pool_values
from jaxrl_llm.models.hf_io import load_hf
from jaxrl_llm.models.tokenizer import CharTokenizer
from jaxrl_llm.rollout import filters
from jaxrl_llm.rollout.sampler import generate
from jaxrl_llm.parallel import MeshConfig, Placement
from jaxrl_llm.train.config import load_config
from jaxrl_llm.train.grpo import GRPOConfig
from jaxrl_llm.train.sft import SFTConfig
from jaxrl_llm.train.loop import RunConfig
from jaxrl_llm.train.optim import OptimConfig
from tests.data.conftest import make_hf_tokenizer

MODEL = CausalLM(tiny_config("llama", max_position_embeddings=64), rngs=nnx.Rngs(0))
KEY = jax.random.PRNGKey(0)
BT, BTV = np.zeros((2, 3), np.float32), np.zeros((2, 3, 5), np.float32)
TOK = np.ones((2, 3), np.int32)
HALF = np.full((2, 3), 0.5, np.float32)


def _gen(prompts=TOK, mask=TOK, **kw):
    return lambda: generate(MODEL, prompts, mask, rng=KEY, **{"max_new_tokens": 4, **kw})


def _records_file(tmp_dir, text):
    path = tmp_dir / "records.jsonl"
    path.write_text(text)
    return path


# (case id, call, exception type, regex the message must match)
CASES = [
    # ---- ops: ranks / shapes / masks / strings / group layout / lengths
    ("ops.token_logprobs-logits-rank", lambda: ops.token_logprobs(BT, TOK), ValueError, r"logits must be \[B, T, V\] \(rank 3\), got shape \(2, 3\)"),
    ("ops.token_logprobs-tokens-shape", lambda: ops.token_logprobs(BTV, TOK[:, :2]), ValueError, r"tokens has shape \(2, 2\): its first 2 dimensions must match logits"),
    ("ops.token_logprobs-tokens-float", lambda: ops.token_logprobs(BTV, BT), ValueError, r"tokens must be an integer array"),
    ("ops.entropy_from_logits-rank", lambda: ops.entropy_from_logits(BT), ValueError, r"logits must be \[B, T, V\]"),
    ("ops.logprobs_from_hidden-unembed-rank", lambda: ops.logprobs_from_hidden(BTV, np.zeros(5), TOK), ValueError, r"unembed must be \[D, V\] \(rank 2\)"),
    ("ops.logprobs_from_hidden-unembed-D", lambda: ops.logprobs_from_hidden(BTV, np.zeros((4, 7)), TOK), ValueError, r"unembed.*D = hidden.shape\[-1\] = 5"),
    ("ops.aggregate_loss-mask-shape", lambda: ops.aggregate_loss(BT, BT[:, :2]), ValueError, r"mask has shape \(2, 2\), expected \(2, 3\)"),
    ("ops.aggregate_loss-mask-nonbinary", lambda: ops.aggregate_loss(BT, HALF), ValueError, r"mask must hold only 0 and 1.*found \[0.5\]"),
    ("ops.aggregate_loss-mask-int2", lambda: ops.aggregate_loss(BT, 2 * TOK), ValueError, r"mask must hold only 0 and 1.*found \[2\]"),
    ("ops.aggregate_loss-mask-complex", lambda: ops.aggregate_loss(BT, TOK.astype(np.complex64)), ValueError, r"mask must be a bool, int or float mask of 0/1, got dtype complex64"),
    ("ops.aggregate_loss-mode", lambda: ops.aggregate_loss(BT, TOK, mode="sum"), ValueError, r"mode must be one of .*'token_mean'.*got 'sum'"),
    ("ops.sequence_logprobs-mask-nonbinary", lambda: ops.sequence_logprobs(BT, HALF), ValueError, r"mask must hold only 0 and 1"),
    ("ops.ppo_policy_loss-mask-nonbinary", lambda: ops.ppo_policy_loss(BT, BT, np.zeros(2), HALF), ValueError, r"mask must hold only 0 and 1"),
    ("ops.kl_penalty-kind", lambda: ops.kl_penalty(BT, BT, kind="k4"), ValueError, r"kind.*k4"),
    ("ops.group_advantages-not-divisible", lambda: ops.group_advantages(np.zeros(6), 4), ValueError, r"(?i)divisible|group_size"),
    ("ops.group_advantages-scale", lambda: ops.group_advantages(np.zeros(4), 2, scale="max"), ValueError, r"scale.*max"),
    ("ops.overlong_penalty-max_len", lambda: ops.overlong_penalty(np.zeros(2), 0, 1), ValueError, r"max_len must be > 0, got 0"),
    ("ops.overlong_penalty-buffer_len", lambda: ops.overlong_penalty(np.zeros(2), 10, 0), ValueError, r"buffer_len must be in \(0, max_len=10\], got 0"),
    # ---- model forward and heads
    ("model-tokens-rank", lambda: MODEL(np.zeros((2, 3, 4), np.int32)), ValueError, r"tokens must be \[B, T\] \(rank 2\), got shape \(2, 3, 4\)"),
    ("model-tokens-float", lambda: MODEL(BT), ValueError, r"tokens must be an integer array"),
    ("model-attention_mask-shape", lambda: MODEL(TOK, attention_mask=TOK[:, :2]), ValueError, r"attention_mask has shape \(2, 2\), expected \(2, 3\) \(the shape of tokens\)"),
    ("model-attention_mask-nonbinary", lambda: MODEL(TOK, attention_mask=HALF), ValueError, r"attention_mask must hold only 0 and 1"),
    ("model-positions-shape", lambda: MODEL(TOK, np.zeros((2, 2), np.int32)), ValueError, r"positions has shape \(2, 2\), expected \(2, 3\)"),
    ("model-routing-shape", lambda: MODEL(TOK, routing=np.zeros((1, 2, 3, 2), np.int32)), ValueError, r"routing has shape \(1, 2, 3, 2\), expected \[M, B, T, k\] = \(0, 2, 3, 0\)"),
    ("model-cache-batch", lambda: MODEL(TOK, cache=MODEL.init_cache(4, 8)), ValueError, r"cache \(batch size\) has shape \(4, 8\): its first dimension must match tokens"),
    ("model-cache-overflow", lambda: MODEL(TOK, cache=MODEL.init_cache(2, 2)), ValueError, r"max_len=2"),
    ("model-attention_impl", lambda: CausalLM(tiny_config(), rngs=nnx.Rngs(0), attention_impl="flash"), ValueError, r"attention_impl"),
    ("heads.pool_values-pool", lambda: pool_values(BT, TOK, "max"), ValueError, r"pool='max'; expected one of \('none', 'last', 'mean'\)"),
    ("heads.pool_values-mask-shape", lambda: pool_values(BT, TOK[:, :2], "last"), ValueError, r"mask has shape \(2, 2\), expected \(2, 3\) \(the shape of values\)"),
    ("heads.pool_values-mask-nonbinary", lambda: pool_values(BT, HALF, "mean"), ValueError, r"mask must hold only 0 and 1"),
    # ---- sampling
    ("filters-logits-rank", lambda: filters.top_k_filter(np.zeros(5), 2), ValueError, r"logits must be \[B, V\] \(rank 2\), got shape \(5,\)"),
    ("filters-temperature<0", lambda: filters.apply_temperature(np.zeros((2, 5)), -1.0), ValueError, r"temperature"),
    ("filters-top_p>1", lambda: filters.top_p_filter(np.zeros((2, 5)), 1.5), ValueError, r"top_p"),
    ("filters-top_p=0", lambda: filters.top_p_filter(np.zeros((2, 5)), 0.0), ValueError, r"top_p"),
    ("filters-repetition-prev_mask-shape", lambda: filters.repetition_penalty(np.zeros((2, 5)), TOK, TOK[:, :2], 1.2), ValueError, r"prev_mask has shape \(2, 2\), expected \(2, 3\) \(the shape of prev_tokens\)"),
    ("filters-repetition-prev_tokens-batch", lambda: filters.repetition_penalty(np.zeros((3, 5)), TOK, TOK, 1.2), ValueError, r"prev_tokens has shape \(2, 3\): its first dimension must match logits \(shape \(3, 5\)\)"),
    ("filters-repetition-prev_mask-nonbinary", lambda: filters.repetition_penalty(np.zeros((2, 5)), TOK, HALF, 1.2), ValueError, r"prev_mask must hold only 0 and 1"),
    ("generate-max_new_tokens=0", _gen(max_new_tokens=0), ValueError, r"max_new_tokens must be a positive int, got 0"),
    ("generate-max_new_tokens<0", _gen(max_new_tokens=-3), ValueError, r"max_new_tokens must be a positive int, got -3"),
    ("generate-temperature<0", _gen(temperature=-0.5), ValueError, r"temperature"),
    ("generate-top_p>1", _gen(top_p=1.5), ValueError, r"top_p"),
    ("generate-top_p<=0", _gen(top_p=0.0), ValueError, r"top_p"),
    ("generate-num_samples=0", _gen(num_samples=0), ValueError, r"num_samples must be a positive int, got 0"),
    ("generate-prompts-rank", _gen(prompts=TOK[0], mask=TOK[0]), ValueError, r"prompts must be \[B, P\] token ids, got shape \(3,\)"),
    ("generate-prompt_mask-shape", _gen(mask=TOK[:, :2]), ValueError, r"prompt_mask must have the shape of prompts \(2, 3\), got \(2, 2\)"),
    ("generate-prompt_mask-nonbinary", _gen(mask=2 * TOK), ValueError, r"prompt_mask must hold only 0 and 1.*found \[2\]"),
    ("generate-prompts-float", _gen(prompts=BT), ValueError, r"prompts must be an integer array"),
    ("generate-empty-prompt", _gen(mask=np.array([[1, 1, 1], [0, 0, 0]])), ValueError, r"empty prompt rows: \[1\]"),
    ("generate-context-window", _gen(prompts=np.ones((2, 60), np.int32), mask=np.ones((2, 60), np.int32), max_new_tokens=8), ValueError,
     r"longest prompt has 60 tokens \+ max_new_tokens=8 > max_position_embeddings=64"),
    # ---- data: records, tokenizers, loaders
    ("records-missing-field", lambda: load_records([{"prompt": "a"}, {"question": "b"}]), ValueError, r"record 1 is missing required field 'prompt'.*\['question'\]"),
    ("records-empty-list", lambda: load_records([]), ValueError, r"empty"),
    ("records-not-a-dict", lambda: load_records([{"prompt": "a"}, "b"]), ValueError, r"record 1 must be a dict"),
    ("tokenizer-no-pad-no-eos", lambda: pad_id(make_hf_tokenizer(specials=False)), ValueError, r"tokenizer has no pad_token_id and no eos_token_id; set one"),
    ("tokenizer-no-eos", lambda: eos_id(make_hf_tokenizer(specials=False)), ValueError, r"no eos_token_id"),
    ("prompts-longer-than-max_prompt_len", lambda: tokenize_prompts([{"prompt": "x" * 20}], CharTokenizer(), max_prompt_len=8), ValueError, r"record 0: prompt has \d+ tokens > max_prompt_len=8"),
    ("prompts-overlong-mode", lambda: tokenize_prompts([{"prompt": "x"}], CharTokenizer(), overlong="cut"), ValueError, r"overlong='cut'"),
    ("loader-tokenizer-without-pad", lambda: PromptLoader([{"prompt": "a"}] * 4, make_hf_tokenizer(specials=False), 2), ValueError, r"no pad_token_id and no eos_token_id"),
    ("sampler-empty-dataset", lambda: EpochSampler(0, 1), ValueError, r"empty"),
    ("sampler-batch-larger-than-dataset", lambda: EpochSampler(3, 4), ValueError, r"no full batch"),
    ("loader-batch-not-divisible-by-processes", lambda: PromptLoader([{"prompt": "a"}] * 8, CharTokenizer(), 3, process_index=0, process_count=2), ValueError, r"batch_size=3 .* divisible by process_count=2"),
    # ---- trainer configs
    ("grpo-group_size<2", lambda: GRPOConfig(group_size=1), ValueError, r"group_size"),
    ("grpo-advantage-kind", lambda: GRPOConfig(advantage="std"), ValueError, r"advantage"),
    ("grpo-loss_agg-mode", lambda: GRPOConfig(loss_agg="sum"), ValueError, r"loss_agg"),
    ("grpo-batch-not-divisible-by-minibatches", lambda: GRPOConfig(prompts_per_step=3, group_size=3, minibatches=2), ValueError, r"divisible"),
    ("grpo-temperature", lambda: GRPOConfig(temperature=0.0), ValueError, r"temperature"),
    ("run-total_steps=0", lambda: RunConfig(total_steps=0), ValueError, r"total_steps must be >= 1, got 0"),
    ("run-checkpoint_every<0", lambda: RunConfig(checkpoint_every=-1), ValueError, r"checkpoint_every must be >= 0, got -1"),
    # ---- optimizer settings
    ("optim-learning_rate<0", lambda: OptimConfig(learning_rate=-1e-5), ValueError, r"learning_rate must be >= 0, got -1e-05"),
    ("optim-learning_rate-nan", lambda: OptimConfig(learning_rate=float("nan")), ValueError, r"learning_rate must be >= 0, got nan"),
    ("optim-b1=1", lambda: OptimConfig(b1=1.0), ValueError, r"b1 must be in \[0, 1\)"),
    ("optim-b2<0", lambda: OptimConfig(b2=-0.1), ValueError, r"b2 must be in \[0, 1\)"),
    ("optim-eps=0", lambda: OptimConfig(eps=0.0), ValueError, r"eps must be > 0"),
    ("optim-weight_decay<0", lambda: OptimConfig(weight_decay=-0.1), ValueError, r"weight_decay must be >= 0"),
    # ---- mesh config (the ``mesh`` field of every trainer config)
    ("mesh-size-0", lambda: MeshConfig(fsdp=0), ValueError, r"mesh.fsdp: expected a positive int or -1"),
    ("mesh-size-float", lambda: MeshConfig(tensor=2.0), ValueError, r"mesh.tensor: expected a positive int or -1 .*got 2.0"),
    ("mesh-two-sizes-free", lambda: MeshConfig(data=-1, fsdp=-1), ValueError, r"at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1"),
    ("mesh-num_devices-0", lambda: MeshConfig(num_devices=0), ValueError, r"mesh.num_devices: expected a positive int or None"),
    ("mesh-unknown-cli-key", lambda: load_config(SFTConfig, overrides=["mesh.fdsp=2"]), ValueError, r"unknown config key\(s\) \['mesh.fdsp'\]"),
]

MESH_CASES = [
    ("generate-batch-not-divisible-by-mesh", "generate"),
    ("check_batch_size-not-divisible-by-mesh", "check"),
]


@pytest.mark.parametrize("case, call, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("case, which", MESH_CASES, ids=[c[0] for c in MESH_CASES])
def test_bad_input_mesh(case, which):
    """A batch that does not split over the data-parallel devices is named with the sizes."""
    from jaxrl_llm.parallel import check_batch_size, make_mesh

    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = make_mesh(data=-1)
    shards = jax.device_count()
    rows = shards + 1
    with pytest.raises(ValueError, match=rf"not divisible by the {shards} batch shards"):
        if which == "generate":
            generate(MODEL, np.ones((rows, 3), np.int32), np.ones((rows, 3), np.int32), max_new_tokens=2, rng=KEY, mesh=mesh)
        else:
            check_batch_size(rows, mesh)


MESH_CONFIG_CASES = [
    ("mesh-sizes-do-not-cover-devices", dict(config=MeshConfig(2, 2, 1)),
     r"mesh.data × mesh.fsdp × mesh.tensor = 2 × 2 × 1 = 4 must equal the number of devices, 8"),
    ("mesh-free-size-does-not-divide", dict(config=MeshConfig(data=-1, fsdp=3)),
     r"mesh.data=-1: the other sizes multiply to 3, which does not divide the 8 devices"),
    ("mesh-num_devices-too-many", dict(config=MeshConfig(num_devices=16)),
     r"mesh.num_devices=16, but only 8 devices are visible"),
    ("mesh-batch-rows-do-not-split", dict(config=MeshConfig(2, 2, 2), rows={"batch_size": 6}),
     r"batch_size=6 is not divisible by mesh.data × mesh.fsdp = 4"),
    ("mesh-tensor-does-not-divide-heads", dict(config=MeshConfig(1, 1, 8), model_config=tiny_config("llama", num_heads=4, num_kv_heads=2)),
     r"mesh.tensor=8 does not divide the model's num_heads=4"),
]


@pytest.mark.parametrize("case, kwargs, message", MESH_CONFIG_CASES, ids=[c[0] for c in MESH_CONFIG_CASES])
def test_bad_input_mesh_config(case, kwargs, message):
    """A mesh that does not fit the devices, the batch or the model fails at start, naming the field."""
    if jax.device_count() != 8:
        pytest.skip("the messages are written for XLA_FLAGS=--xla_force_host_platform_device_count=8")
    with pytest.raises(ValueError, match=message):
        Placement.create(**kwargs)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"hidden_size": 64, "head_dim": 16}, r"tensor '[a-z_.0-9]+' has shape \(\d+, 32\) but the config expects \(\d+, 64\).*do not match \(.*model.safetensors\)"),
        ({"num_hidden_layers": 3}, r"missing .*model\.layers\.2\."),
        ({"model_type": "gpt2"}, r"model_type='gpt2'"),
    ],
    ids=["hf-config-hidden_size", "hf-config-layers", "hf-config-model_type"],
)
def test_bad_input_hf_checkpoint(tmp_path, edit, message):
    """load_hf with a config.json that does not match the safetensors weights."""
    from tests.models.helpers import make_hf_model

    make_hf_model("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=message):
        load_hf(str(tmp_path))


def test_ops_checks_hold_under_jit():
    """Shape and dtype checks fire at trace time; value checks need concrete masks."""
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 2\)"):
        jax.jit(ops.token_logprobs)(BTV, TOK[:, :2])
    with pytest.raises(ValueError, match="complex64"):
        jax.jit(ops.aggregate_loss)(BT, TOK.astype(np.complex64))
    assert np.isfinite(jax.jit(ops.aggregate_loss)(BT, jnp.ones((2, 3))))
