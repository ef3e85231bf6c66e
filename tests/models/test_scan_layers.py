"""`scan_layers=True` (runs of identical decoder blocks stored stacked and run as one
`lax.scan`) against the unrolled decoder, for every family: which layers are stacked,
the stacked layout and its conversions (`stack_layers` / `unstack_layers`, HF export and
load), logits on right- and left-padded rows (jitted and eager), prefill + decode with a
KV cache, gradients, MoE routing record/replay and aux losses, remat, and a sharded
forward/backward on the 8-device CPU mesh.

The unrolled reference of each family is computed once (`_reference`) and shared by
the tests, so each compiles only its scanned program."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl_llm.models import CausalLM, ScalarHeadModel, load_hf, save_hf
from jaxrl_llm.models.layer_stacking import is_stacked, per_layer_state, stack_layers, unstack_layers
from jaxrl_llm.models.transformer import layer_runs
from tests.models.helpers import VOCAB as V
from tests.models.helpers import padded_batch, scale_params, small_config

# every family, with layer patterns that give one scanned run, two runs (sliding-window
# layers, then full-attention layers) and a single unrolled block before a scanned run
CASES = {
    "llama": ({"num_layers": 3}, [(0, 3)]),
    "mistral": ({"num_layers": 4, "sliding_window": 3, "sliding_layers": (0, 1)}, [(0, 2), (2, 4)]),
    "qwen2": ({"num_layers": 2}, [(0, 2)]),  # q/k/v bias
    "qwen3": ({"num_layers": 2}, [(0, 2)]),  # q/k norm
    "mixtral": ({"num_layers": 2}, [(0, 2)]),  # MoE in every layer
    "qwen3_moe": ({"num_layers": 3, "mlp_only_layers": (0,)}, [(0, 1), (1, 3)]),  # dense, then MoE
}
FAMILIES = list(CASES)
# the jitted forward + backward + decode comparison compiles two programs per family: the
# families whose features the others already cover there (llama ⊂ mistral, qwen3's q/k
# norm ⊂ qwen3_moe, mixtral's MoE ⊂ qwen3_moe) are marked slow (`-m "not slow"` skips them)
COVERED = ("llama", "qwen3", "mixtral")
FAMILIES_JIT = [pytest.param(f, marks=pytest.mark.slow) if f in COVERED else f for f in FAMILIES]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _pair(family, *, remat_scanned=False, seed=0):
    """(unrolled, scanned) CausalLMs of the family's case with the same O(1) weights."""
    cfg = small_config(family, **CASES[family][0])
    unrolled = scale_params(CausalLM(cfg, rngs=nnx.Rngs(seed)), seed=seed)
    scanned = stack_layers(unrolled)
    scanned.model.remat = remat_scanned
    return unrolled, scanned


def _per_layer(model, grads):
    """Gradients of a stacked model (an `nnx.State` of its layout) in the per-layer one."""
    return per_layer_state(nnx.merge(nnx.graphdef(model), grads))


def _batch(rows=3):
    """Rows of 10 tokens: right-padded (7 valid), left-padded (5 valid), full, then the
    first row again (rows=4, for the mesh)."""
    rng = np.random.default_rng(0)
    right, rmask, _ = padded_batch(rng, (7,), 10, "right")
    left, lmask, _ = padded_batch(rng, (5,), 10, "left")
    full, fmask, _ = padded_batch(rng, (10,), 10, "right")
    tokens, mask = np.concatenate([right, left, full, right]), np.concatenate([rmask, lmask, fmask, rmask])
    return jnp.asarray(tokens[:rows]), jnp.asarray(mask[:rows])


def _close(a, b, **tol):
    chex.assert_trees_all_close(a, b, **(tol or TOL))


def _loss(model, tokens, mask, routing=None):
    """Next-token loss + MoE aux loss; aux outputs (logits, routing, aux, router z)."""
    out = model.forward(tokens, attention_mask=mask, routing=routing)
    logp = jax.nn.log_softmax(out.logits)
    nll = -jnp.sum(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]) / 10
    return nll + out.aux_loss, (out.logits, out.routing, out.aux_loss, out.router_z_loss)


_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))  # (loss, outputs), grads


def _decode_inputs():
    """Left-padded prompts [3, 6] (6, 3 and 5 tokens) and 3 tokens to decode after them."""
    rng = np.random.default_rng(1)
    prompts, pmask, _ = padded_batch(rng, (6, 3, 5), 6, "left")
    return jnp.asarray(prompts), jnp.asarray(pmask), jnp.asarray(rng.integers(1, V, (3, 3)), jnp.int32)


def _decode(model, prompts, pmask, gen):
    """Prefill into a cache of 9 slots, then one decode step per `gen` column in a loop."""
    cache = model.init_cache(3, 9)
    prefill, cache = model(prompts, cache=cache, attention_mask=pmask)

    def step(j, carry):
        cache, steps = carry
        logits, cache = model(jax.lax.dynamic_slice_in_dim(gen, j, 1, axis=1), cache=cache)
        return cache, steps.at[:, j].set(logits[:, 0])

    cache, steps = jax.lax.fori_loop(0, gen.shape[1], step, (cache, jnp.zeros((3, 3, V))))
    return prefill, steps, cache


@nnx.jit
def _everything(model, tokens, mask, prompts, pmask, gen):
    """One program per model (compiling is what these tests spend their time on): loss,
    forward outputs and gradients on `_batch()`, and prefill + decode."""
    return nnx.value_and_grad(_loss, has_aux=True)(model, tokens, mask), _decode(model, prompts, pmask, gen)


@functools.cache
def _reference(family):
    """`_everything` of the family's unrolled model."""
    unrolled, _ = _pair(family)
    return _everything(unrolled, *_batch(), *_decode_inputs())


def _check_outputs(got, want, config, rows=3):
    logits, routing, aux, z = got
    _close(logits, want[0])
    if config.is_moe:
        np.testing.assert_array_equal(routing, want[1])  # [M, B, T, k], same layer order
        assert routing.shape == (config.num_moe_layers, rows, 10, 2)
        _close((aux, z), want[2:])
    else:
        assert routing is None and float(aux) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_runs(family):
    _, scanned = _pair(family)
    assert layer_runs(scanned.model) == CASES[family][1]
    # alternating dense / MoE layers (qwen3_moe decoder_sparse_step=2): nothing to scan
    alternating = CausalLM(small_config("qwen3_moe", num_layers=4, decoder_sparse_step=2), rngs=nnx.Rngs(0))
    assert layer_runs(alternating.model) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_stacked_layout_and_conversions(tmp_path):
    unrolled, scanned = _pair("qwen3_moe")  # a dense block, then a run of two MoE blocks
    params = nnx.state(scanned, nnx.Param)
    router = params["model"]["stacks"][1]["mlp"]["router"]
    assert router.shape == (2, *unrolled.model.layers[1].mlp.router.shape)
    assert router.get_metadata()["out_sharding"][0] == "layers"  # the leading axis' logical name
    assert params["model"]["stacks"][0]["mlp"]["up_proj"].shape[0] == 1
    assert "layers" not in params["model"] and scanned.model.stack_ranges == ((0, 1), (1, 3))
    assert is_stacked(scanned) and not is_stacked(unrolled) and unrolled.model.layers  # input left as it was
    chex.assert_trees_all_equal(per_layer_state(scanned), nnx.state(unrolled, nnx.Param))
    # round trip: the same graph (static layer indices included) and weights
    back = unstack_layers(scanned)
    assert nnx.graphdef(back) == nnx.graphdef(unrolled)
    assert [block.layer for block in back.model.layers] == [0, 1, 2]
    chex.assert_trees_all_equal(nnx.state(back), nnx.state(unrolled))
    # a model built scanned has the weights of the one built unrolled from the same seed
    cfg = small_config("qwen3_moe", **CASES["qwen3_moe"][0])
    built = CausalLM(cfg, rngs=nnx.Rngs(3), scan_layers=True)
    chex.assert_trees_all_equal(per_layer_state(built), nnx.state(CausalLM(cfg, rngs=nnx.Rngs(3)), nnx.Param))
    assert nnx.graphdef(built) == nnx.graphdef(scanned)
    # HF export of the scanned model loads back into a scanned or an unrolled model
    save_hf(scanned, str(tmp_path))
    for scan in (True, False):
        loaded, _ = load_hf(str(tmp_path), scan_layers=scan)
        assert is_stacked(loaded) == scan
        chex.assert_trees_all_equal(per_layer_state(loaded), nnx.state(unrolled, nnx.Param))
    # the flag threads through the other builders
    head = ScalarHeadModel(small_config("llama"), rngs=nnx.Rngs(0), scan_layers=True)
    assert is_stacked(head) and layer_runs(head.model) == [(0, 2)]
    with pytest.raises(AttributeError, match="scan_layers"):
        unrolled.model.scan_layers = True  # the layout is the parameter tree's: convert instead
    with pytest.raises(TypeError, match="model: expected a Transformer"):
        stack_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("family", FAMILIES_JIT)
def test_forward_gradients_and_decode_match_with_jit(family):
    """Jitted: logits on right/left-padded rows, MoE routing and aux losses, loss and
    gradients w.r.t. every parameter; left-padded prompts prefilled into a KV cache and 3
    decode steps: logits and the whole cache (k, v of every layer, index, positions)."""
    _, scanned = _pair(family)
    ((lw, ow), gw), decode_want = _reference(family)
    ((lg, og), gg), decode_got = _everything(scanned, *_batch(), *_decode_inputs())
    _check_outputs(og, ow, scanned.config)
    _close(lg, lw)
    _close(_per_layer(scanned, gg), gw)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(nnx.state(gg, nnx.Param)))
    _close(decode_got, decode_want)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_matches_without_jit(family):
    """The scanned model called eagerly against the unrolled one's jitted forward."""
    unrolled, scanned = _pair(family)
    want = nnx.jit(lambda model, tokens, mask: _loss(model, tokens, mask)[1])(unrolled, *_batch())
    _check_outputs(_loss(scanned, *_batch())[1], want, scanned.config)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_routing_replay_matches(family):
    unrolled, scanned = _pair(family)
    tokens, mask = _batch()
    forward = nnx.jit(lambda model, routing: model.forward(tokens, attention_mask=mask, routing=routing))
    free = forward(unrolled, None)
    # besides the model's own choice, a replayed routing where each MoE layer gets its own
    # shift of the experts, so a slice handed to the wrong layer would show
    m = free.routing.shape[0]
    shifted = (free.routing + jnp.arange(1, m + 1)[:, None, None, None]) % unrolled.config.num_experts
    for routing in (free.routing, shifted):
        want, got = forward(unrolled, routing), forward(scanned, routing)
        _close(got.logits, want.logits)
        _close((got.aux_loss, got.router_z_loss), (want.aux_loss, want.router_z_loss))
        np.testing.assert_array_equal(got.routing, routing)
    assert not np.allclose(np.asarray(want.logits), np.asarray(free.logits))  # the shift mattered


@pytest.mark.parametrize("family", ["qwen3_moe"])
def test_remat_with_scan_matches(family):
    """remat + scan (MoE, a dense block before the scanned run) vs the plain unrolled model."""
    _, scanned = _pair(family, remat_scanned=True)
    ((lw, ow), gw), _ = _reference(family)
    (lg, og), gg = _grad(scanned, *_batch())
    _check_outputs(og, ow, scanned.config)
    _close(lg, lw)
    _close(_per_layer(scanned, gg), gw)
    # the scan body is rematerialised: a checkpoint inside the scan of the forward
    graphdef = nnx.graphdef(scanned)
    jaxpr = str(jax.make_jaxpr(lambda s: _loss(nnx.merge(graphdef, s), *_batch())[0])(nnx.state(scanned)))
    assert "scan" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr)


def test_sharded_forward_and_grads_match():
    from jaxrl_llm.parallel import make_mesh, shard_model, sharding_context

    mesh = make_mesh(2, 2, 2)  # data, fsdp, tensor over the 8 simulated devices
    unrolled, scanned = _pair("llama")
    (lw, ow), gw = _grad(unrolled, *_batch(4))  # one device, no mesh; 4 rows = data × fsdp
    shard_model(scanned, mesh)
    q = scanned.model.stacks[0].attn.q_proj[...]  # [layers, embed, heads, head_dim]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec[:2] == (None, "fsdp")
    with sharding_context(mesh):  # activation constraints (inside the scan body) active
        (lg, og), gg = _grad(scanned, *_batch(4))
    assert len(og[0].sharding.device_set) == 8
    _check_outputs(og, ow, scanned.config, rows=4)
    _close(lg, lw)
    _close(_per_layer(scanned, gg), gw)
