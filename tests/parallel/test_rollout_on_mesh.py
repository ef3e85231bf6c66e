"""``rollout.generate`` with the policy's params placed on a mesh gives the single-device tokens.

The params are placed by ``shard_model`` (pure data parallel 8×1×1, and 2×2×2 with FSDP and
tensor parallelism) and the prompts are sharded over the batch axes with ``shard_batch``;
greedy decoding must reproduce the single-device tokens exactly and the log-probs to
float tolerance; with ``mesh=`` the rows also stay split over the batch axes.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import make_mesh, shard_batch, shard_model

pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")

config_lib = pytest.importorskip("jaxrl_llm.models.config")
transformer = pytest.importorskip("jaxrl_llm.models.transformer")
rollout = pytest.importorskip("jaxrl_llm.rollout")

CFG = config_lib.tiny_config("llama", vocab_size=264)  # 264 = 8·33: vocab splits on tensor
GEN = dict(max_new_tokens=8, num_samples=2, temperature=0.0, prompt_bucket=8, return_raw_logprobs=True)


@pytest.fixture(scope="module")
def host_state():
    """State of a tiny CausalLM whose weights are scaled up (std 0.8 instead of 0.02) so that
    greedy decoding depends on the whole context instead of repeating the last token."""
    state = jax.device_get(nnx.state(transformer.CausalLM(CFG, rngs=nnx.Rngs(0))))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if "scale" in jax.tree_util.keystr(path) else x * 40, state
    )


def _model(host_state):
    model = nnx.eval_shape(lambda: transformer.CausalLM(CFG, rngs=nnx.Rngs(0)))
    nnx.update(model, host_state)
    return model


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (8, 8)).astype(np.int32)
    lengths = rng.integers(2, 9, 8)
    mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int32)
    return tokens, mask


@pytest.fixture(scope="module")
def reference(host_state, prompts):
    out = rollout.generate(_model(host_state), *prompts, rng=jax.random.key(0), **GEN)
    return jax.device_get(out)


def test_reference_is_not_trivial(reference):
    tokens = np.asarray(reference.tokens)
    assert tokens.shape == (16, 8)
    np.testing.assert_array_equal(tokens[0::2], tokens[1::2])  # greedy: G samples agree
    assert len(np.unique(tokens)) > 20  # not one repeated token


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2)])
def test_generate_on_mesh_matches_single_device(sizes, host_state, prompts, reference):
    mesh = make_mesh(*sizes)
    model = shard_model(_model(host_state), mesh)
    q_proj = model.model.layers[0].attn.q_proj[...]
    assert q_proj.sharding.spec == P("fsdp", "tensor")  # size-1 axes on the 8x1x1 mesh:
    assert q_proj.sharding.is_fully_replicated == (sizes == (8, 1, 1))  # replicated there
    placed = shard_batch({"tokens": prompts[0], "mask": prompts[1]}, mesh)
    assert placed["tokens"].sharding.spec == P(("data", "fsdp"))
    out = rollout.generate(model, placed["tokens"], placed["mask"], rng=jax.random.key(0), **GEN)
    for name in ("tokens", "mask", "lengths", "finished", "prompt_tokens"):
        np.testing.assert_array_equal(getattr(out, name), getattr(reference, name), err_msg=name)
    np.testing.assert_allclose(out.raw_logprobs, reference.raw_logprobs, atol=2e-4)
    np.testing.assert_array_equal(out.logprobs, reference.logprobs)  # greedy: 0


@pytest.mark.parametrize("sizes", [(8, 1, 1), (2, 2, 2)])
def test_generate_with_mesh_keeps_rows_split(sizes, host_state, prompts, reference):
    """With ``mesh=`` every output row (and the decode loop) stays split over data × fsdp."""
    mesh = make_mesh(*sizes)
    model = shard_model(_model(host_state), mesh)
    out = rollout.generate(model, *prompts, rng=jax.random.key(0), mesh=mesh, **GEN)
    for name in ("tokens", "mask", "lengths", "finished"):
        np.testing.assert_array_equal(getattr(out, name), getattr(reference, name), err_msg=name)
    np.testing.assert_allclose(out.raw_logprobs, reference.raw_logprobs, atol=2e-4)
    rows_per_device = 16 // (sizes[0] * sizes[1])
    assert not out.tokens.sharding.is_fully_replicated
    assert {s.data.shape[0] for s in out.tokens.addressable_shards} == {rows_per_device}
    with pytest.raises(ValueError, match="prompts"):
        rollout.generate(model, prompts[0][:3], prompts[1][:3], rng=jax.random.key(0), mesh=mesh, **GEN)
