"""Tests for jaxrl_llm.parallel.memory: exact param / optimizer / grad terms, scaling properties."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrl_llm.parallel import (
    abstract_mesh,
    create_sharded,
    estimate_memory,
    make_mesh,
    make_train_step,
    per_device_bytes,
    print_memory_estimate,
    rules_for_role,
)
from jaxrl_llm.parallel import memory as memory_lib

pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")

config_lib = pytest.importorskip("jaxrl_llm.models.config")
transformer = pytest.importorskip("jaxrl_llm.models.transformer")

KW = dict(batch=16, seq_len=64, param_dtype=jnp.bfloat16)


def _factory(cfg, dtype=jnp.bfloat16):
    return lambda: transformer.CausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype)


def _bytes_on_each_device(tree) -> dict:
    """{device: bytes of every shard that lives on it} for a tree of placed arrays."""
    out = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# vocab 259 does not divide the tensor axis: the estimate must follow the same fallback
@pytest.mark.parametrize(
    "family, sizes",
    [("llama", (2, 2, 2)), ("qwen3_moe", (1, 2, 4))],
)
def test_params_term_is_exact_shard_bytes_of_create_sharded(family, sizes):
    cfg = config_lib.tiny_config(family, num_layers=1)  # 1 layer: faster to compile
    devices = jax.devices()[: int(np.prod(sizes))]
    mesh = make_mesh(*sizes, devices=devices)
    rules = rules_for_role("policy")
    model = create_sharded(_factory(cfg), mesh, rules)
    params = nnx.state(model, nnx.Param)
    on_device = _bytes_on_each_device(params)
    assert len(on_device) == len(devices)
    assert len(set(on_device.values())) == 1, on_device  # every device holds the same amount
    est = estimate_memory(cfg, mesh, rules, **KW)
    assert est["params"] == next(iter(on_device.values()))
    # the abstract mesh sizes give the same number without devices
    assert estimate_memory(cfg, sizes, rules, **KW)["params"] == est["params"]
    # and per parameter
    actual = {
        jax.tree_util.keystr(p): x.addressable_shards[0].data.nbytes
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    estimated = per_device_bytes(params, mesh, rules)
    assert {k.removesuffix(".value"): v for k, v in estimated.items()} == {
        k.removesuffix(".value"): v for k, v in actual.items()
    }
    assert est["num_params"] == transformer.count_params(model)


def test_optimizer_and_grads_follow_train_step_shardings():
    """Against the shardings TrainStep really uses (shard_shape of each NamedSharding)."""
    cfg = config_lib.tiny_config("llama")
    mesh = make_mesh(2, 2, 2)
    rules = rules_for_role("policy")
    tx = optax.adamw(1e-3)
    abstract = nnx.eval_shape(_factory(cfg, jnp.float32))
    step = make_train_step(lambda m, b: None, abstract, tx, mesh, rules)  # nothing is compiled
    params = nnx.state(abstract, nnx.Param)

    def shard_bytes(tree, shardings, dtype=None):
        values = jax.tree.leaves(tree)
        shs = jax.tree.leaves(shardings)
        assert len(values) == len(shs)
        return sum(
            int(np.prod(s.shard_shape(v.shape))) * np.dtype(dtype or v.dtype).itemsize
            for v, s in zip(values, shs)
        )

    est = estimate_memory(cfg, mesh, rules, batch=8, seq_len=16, param_dtype=jnp.float32, optimizer=tx)
    opt_state = jax.eval_shape(tx.init, params)
    assert est["optimizer"] == shard_bytes(opt_state, step.state_shardings.opt_state)
    assert est["grads"] == shard_bytes(params, step.state_shardings.params, jnp.float32)
    assert est["params"] == shard_bytes(params, step.state_shardings.params)
    # AdamW: two moments the size of the params (+ a replicated int32 count)
    assert est["optimizer"] == 2 * est["params"] + 4
    # named optimizers
    by_name = lambda name: estimate_memory(cfg, mesh, rules, batch=8, seq_len=16, param_dtype=jnp.float32,
                                          optimizer=name)["optimizer"]
    assert by_name("adamw") == est["optimizer"]
    assert by_name("sgd") == 0
    assert by_name("lion") == est["params"] + 4
    frozen = estimate_memory(cfg, mesh, rules, batch=8, seq_len=16, param_dtype=jnp.float32, optimizer=None)
    assert frozen["optimizer"] == frozen["grads"] == 0


def test_fsdp_divides_params_grads_and_optimizer_by_about_its_size():
    cfg = config_lib.tiny_config("llama", vocab_size=264)
    one = estimate_memory(cfg, (1, 1, 1), **KW)
    fsdp4 = estimate_memory(cfg, {"fsdp": 4}, **KW)
    for term in ("params", "grads", "optimizer"):
        ratio = fsdp4[term] / one[term]
        assert 0.25 <= ratio < 0.27, (term, ratio)  # only the tiny norm scales stay whole
    # fsdp also splits the batch: 4x fewer rows per device
    assert fsdp4["microbatch_rows"] == one["microbatch_rows"] // 4
    assert fsdp4["activations"] == pytest.approx(one["activations"] / 4)
    # replicating a frozen model over fsdp undoes the parameter split
    replicated = estimate_memory(cfg, {"fsdp": 4}, rules_for_role("reference", replicate_over_fsdp=True),
                                 optimizer=None, **KW)
    assert replicated["params"] == one["params"]


def test_tensor_axis_divides_the_sharded_matrices_only():
    cfg = config_lib.tiny_config("llama", vocab_size=264)
    abstract = nnx.eval_shape(_factory(cfg))
    one = per_device_bytes(abstract, (1, 1, 1))
    tp2 = per_device_bytes(abstract, (1, 1, 2))
    split = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed")
    seen = {"split": 0, "whole": 0}
    for name in one:
        if any(w in name for w in split):
            assert tp2[name] * 2 == one[name], name
            seen["split"] += 1
        else:  # RMSNorm scales: replicated
            assert "scale" in name and tp2[name] == one[name], name
            seen["whole"] += 1
    assert seen == {"split": 1 + 7 * cfg.num_layers, "whole": 1 + 2 * cfg.num_layers}
    # data parallelism replicates parameters
    assert per_device_bytes(abstract, {"data": 8}) == one


def test_remat_microbatches_and_kv_cache_terms():
    cfg = config_lib.tiny_config("llama")
    base = estimate_memory(cfg, (2, 1, 1), **KW)
    remat = estimate_memory(cfg, (2, 1, 1), remat=True, **KW)
    assert remat["activations"] < base["activations"]
    assert remat["params"] == base["params"]
    micro = estimate_memory(cfg, (2, 1, 1), num_microbatches=4, **KW)
    assert micro["microbatch_rows"] == 2 and micro["activations"] == pytest.approx(base["activations"] / 4)
    assert base["kv_cache"] == 0
    kv = estimate_memory(cfg, (2, 1, 1), kv_cache_len=128, **KW)
    # [N, B/data, S, K, Hd] keys and values in bfloat16
    c = cfg
    assert kv["kv_cache"] == 2 * c.num_layers * (16 // 2) * 128 * c.num_kv_heads * c.head_dim * 2
    assert kv["total"] == sum(kv[t] for t in memory_lib.MEMORY_TERMS)
    chunked = estimate_memory(cfg, (2, 1, 1), logits_chunk_size=32, **KW)
    assert chunked["logits"] < base["logits"]


def test_print_memory_estimate_and_cli(capsys):
    cfg = config_lib.tiny_config("llama")
    est = print_memory_estimate(cfg, (1, 2, 2), batch=8, seq_len=32)
    out = capsys.readouterr().out
    for term in memory_lib.MEMORY_TERMS + ("total",):
        assert term in out
    assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out
    cli = memory_lib.main(["--tiny", "llama", "--mesh", "1,2,2", "--batch", "8", "--seq-len", "32"])
    assert cli == est
    assert "total" in capsys.readouterr().out


def test_bad_arguments_raise():
    cfg = config_lib.tiny_config("llama")
    with pytest.raises(ValueError, match="optimizer"):
        estimate_memory(cfg, (1, 1, 1), optimizer="rmsprop_typo", **KW)
    with pytest.raises(ValueError, match="mesh"):
        abstract_mesh({"model": 2})
    with pytest.raises(ValueError, match="mesh"):
        abstract_mesh((2, 2))
    with pytest.raises(ValueError, match="batch"):
        estimate_memory(cfg, (1, 1, 1), batch=0, seq_len=8)
