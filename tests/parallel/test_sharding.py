"""Tests for jaxrl_llm.parallel.sharding: param/optimizer/batch placement, create_sharded, constrain."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import (
    abstract_model,
    batch_sharding,
    batch_shardings,
    check_batch_size,
    constrain,
    create_sharded,
    make_mesh,
    model_shardings,
    optimizer_shardings,
    rules_for_role,
    shard_batch,
    shard_model,
    sharding_context,
    sharding_fallbacks,
)
from jaxrl_llm.parallel import sharding as sharding_lib

from .toy_model import ToyConfig, make_toy


@pytest.fixture(scope="module")
def mesh222():
    return make_mesh(2, 2, 2)


@pytest.fixture(scope="module")
def abstract_toy():
    """Shapes and metadata only (nnx.eval_shape): fast, and what model_shardings needs."""
    return nnx.eval_shape(make_toy)


def test_model_shardings_follow_rules(mesh222, abstract_toy):
    sh = model_shardings(abstract_toy, mesh222)
    assert sh["embed"].get_value().spec == P("tensor", "fsdp")
    assert sh["unembed"].get_value().spec == P("fsdp", "tensor")
    block = sh["blocks"][0]
    assert block["q"].get_value().spec == P("fsdp", "tensor")
    assert block["k"].get_value().spec == P("fsdp", "tensor")  # kv_heads=2 divides tensor=2
    assert block["o"].get_value().spec == P("tensor", None, "fsdp")
    assert block["down"].get_value().spec == P("tensor", "fsdp")
    assert block["attn_norm"]["scale"].get_value().spec == P()
    assert all(isinstance(s, NamedSharding) and s.mesh == mesh222 for s in jax.tree.leaves(sh))
    assert sharding_fallbacks(abstract_toy, mesh222) == {}


def test_fallback_when_not_divisible():
    mesh = make_mesh(1, 2, 4)
    cfg = ToyConfig(kv_heads=2, heads=4)  # kv_heads=2 not divisible by tensor=4
    abstract = nnx.eval_shape(lambda: make_toy(cfg=cfg))
    sh = model_shardings(abstract, mesh)
    assert sh["blocks"][0]["k"].get_value().spec == P("fsdp")
    assert sh["blocks"][0]["q"].get_value().spec == P("fsdp", "tensor")
    fallbacks = sharding_fallbacks(abstract, mesh)
    assert set(fallbacks) == {f"['blocks'][{i}]['{n}']" for i in range(2) for n in ("k", "v")}
    assert "not divisible" in fallbacks["['blocks'][0]['k']"][0]


def test_shard_model_places_params(mesh222, toy, toy_state):
    model = shard_model(toy, mesh222)
    q = model.blocks[1].q[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (16 // 2, 4 // 2, 4)
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")
    # frozen small-model preset: replicated over fsdp, still split over tensor
    ref = shard_model(model, mesh222, rules_for_role("reference", replicate_over_fsdp=True))
    assert ref.blocks[0].gate[...].sharding.spec == P(None, "tensor")
    chex.assert_trees_all_equal(jax.device_get(nnx.state(ref)), jax.device_get(toy_state))


def test_legacy_sharding_names_spelling(mesh222):
    class Lin(nnx.Module):
        def __init__(self):
            with pytest.warns(DeprecationWarning):
                self.w = nnx.Param(jnp.ones((4, 8)), sharding_names=("embed", "mlp"), eager_sharding=False)

    assert model_shardings(Lin(), mesh222)["w"].get_value().spec == P("fsdp", "tensor")


def test_create_sharded_equals_eager_init(mesh222, toy_state):
    model = create_sharded(lambda: make_toy(seed=0), mesh222)
    expected = jax.device_get(toy_state)
    # same random bits; jit may fuse the init scale differently (1 ulp)
    chex.assert_trees_all_close(jax.device_get(nnx.state(model)), expected, rtol=1e-6, atol=1e-7)
    assert model.unembed[...].sharding.spec == P("fsdp", "tensor")
    assert model.unembed[...].addressable_shards[0].data.shape == (8, 16)


def _per_device_bytes(abs_state):
    total = 0
    for leaf in jax.tree.leaves(abs_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def test_create_sharded_never_materialises_full_copy():
    """Per-device memory of the sharded init (outputs + temporaries) stays below one full copy."""
    cfg = ToyConfig(vocab=512, embed=256, heads=8, kv_heads=4, head_dim=32, mlp=1024, layers=1)
    factory = lambda: make_toy(seed=1, cfg=cfg)
    mesh = make_mesh(1, 4, 2)
    _, abs_state = abstract_model(factory, mesh)
    full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abs_state))

    _, init = sharding_lib._sharded_init(factory, mesh, rules_for_role("policy"))
    compiled = init.lower().compile()
    mem = compiled.memory_analysis()
    shard_bytes = _per_device_bytes(abs_state)
    assert shard_bytes < full_bytes / 6
    # outputs are the shards only (+ alignment padding); a replicated init would give full_bytes
    assert shard_bytes <= mem.output_size_in_bytes <= shard_bytes + 1024
    # temporaries (RNG bits) are per-shard too: no device ever holds a full copy
    assert mem.output_size_in_bytes + mem.temp_size_in_bytes < full_bytes / 2
    out_specs = [s.spec for s in jax.tree.leaves(compiled.output_shardings)]
    assert P("tensor", "fsdp") in out_specs

    for leaf in jax.tree.leaves(compiled()):
        expected = leaf.sharding.shard_shape(leaf.shape)
        assert all(s.data.shape == expected for s in leaf.addressable_shards)


def test_optimizer_state_sharded_like_params(mesh222, toy):
    model = shard_model(toy, mesh222)
    # nnx.Optimizer: moments carry the params' logical metadata
    opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    opt_sh = optimizer_shardings(opt, mesh222)
    param_sh = model_shardings(model, mesh222)
    adam = opt_sh["opt_state"][0]
    specs = lambda tree: [(jax.tree_util.keystr(k), s.spec) for k, s in jax.tree_util.tree_leaves_with_path(tree)]
    for moment in ("mu", "nu"):
        assert specs(adam[moment]) == specs(param_sh)
    assert adam["count"].get_value().spec == P()
    shard_model(opt, mesh222)
    assert opt.opt_state[0].mu["blocks"][0]["gate"][...].sharding.spec == P("fsdp", "tensor")

    # optax state of an nnx.State of params
    params = nnx.state(model, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    abs_opt = jax.eval_shape(tx.init, params)
    sh = optimizer_shardings(abs_opt, mesh222)
    assert sh[1][0].mu["blocks"][0]["q"].get_value().spec == P("fsdp", "tensor")
    assert sh[1][0].count.spec == P()

    # optax state of plain arrays: via tx + param shardings
    plain = {"w": jnp.ones((16, 32)), "b": jnp.ones((32,))}
    plain_sh = {"w": NamedSharding(mesh222, P("fsdp", "tensor")), "b": NamedSharding(mesh222, P())}
    sh = optimizer_shardings(tx.init(plain), mesh222, tx=tx, param_shardings=plain_sh)
    assert sh[1][0].nu["w"].spec == P("fsdp", "tensor") and sh[1][0].count.spec == P()
    with pytest.raises(ValueError, match="together"):
        optimizer_shardings(tx.init(plain), mesh222, tx=tx)


def test_batch_sharding_and_errors(mesh222):
    assert batch_sharding(mesh222).spec == P(("data", "fsdp"))
    batch = {"tokens": np.zeros((8, 5), np.int32), "coef": np.float32(0.1)}
    sh = batch_shardings(batch, mesh222)
    assert sh["tokens"].spec == P(("data", "fsdp")) and sh["coef"].spec == P()
    placed = shard_batch(batch, mesh222)
    assert placed["tokens"].addressable_shards[0].data.shape == (2, 5)
    with pytest.raises(ValueError, match="batch.*not divisible by the 4 batch shards"):
        shard_batch({"tokens": np.zeros((6, 5))}, mesh222)
    with pytest.raises(ValueError, match="num_microbatches=3"):
        check_batch_size(8, mesh222, num_microbatches=3)
    check_batch_size(8, mesh222, num_microbatches=2)  # 4 rows per micro-batch: fine
    with pytest.raises(ValueError, match="micro-batch size 2"):
        check_batch_size(8, mesh222, num_microbatches=4)
    with pytest.raises(ValueError, match="share B"):
        batch_shardings({"a": np.zeros((8,)), "b": np.zeros((4,))}, mesh222)


def test_constrain(mesh222):
    x = jnp.ones((8, 3, 16))
    # no mesh set: no-op, so model code runs without a mesh
    assert constrain(x, ("batch", None, "embed")) is x

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", None, "embed")), constrain(x, (None, None, "embed"))

    with sharding_context(mesh222):
        a, b = f(x)
    assert a.sharding.spec == P(("data", "fsdp"))
    assert b.sharding.spec == P(None, None, "fsdp")
    # explicit mesh and rules, outside any context; odd sizes fall back
    y = constrain(jnp.ones((3, 16)), ("batch", "embed"), mesh=mesh222)
    assert y.sharding.spec == P(None, "fsdp")
    with pytest.raises(ValueError, match="logical_axes"):
        constrain(jnp.ones((4,)), ("batch", "embed"), mesh=mesh222)
