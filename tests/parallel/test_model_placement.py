"""Contract test: the library's models (jaxrl_llm.models) resolve under the sharding rules.

Abstract only (``nnx.eval_shape``): every logical name the models use has a rule, and
the only fallbacks are the expected ones (an odd vocabulary on the tensor axis, MoE
expert weights whose ``mlp`` dim yields ``tensor`` to ``experts``).
"""

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import make_mesh, model_shardings, sharding_fallbacks

# the models module still uses the deprecated spelling (same metadata); not our concern here
pytestmark = pytest.mark.filterwarnings("ignore:'sharding_names' is deprecated:DeprecationWarning")

config = pytest.importorskip("jaxrl_llm.models.config")
transformer = pytest.importorskip("jaxrl_llm.models.transformer")


@pytest.mark.parametrize("family", config.FAMILIES)
def test_causal_lm_places_under_default_rules(family):
    mesh = make_mesh(2, 2, 2)
    cfg = config.tiny_config(family)
    abstract = nnx.eval_shape(lambda: transformer.CausalLM(cfg, rngs=nnx.Rngs(0)))
    shardings = model_shardings(abstract, mesh)  # raises on an unknown logical name
    for path, reasons in sharding_fallbacks(abstract, mesh).items():
        for reason in reasons:
            expected = ("'vocab'" in reason and "not divisible" in reason) or (
                "'mlp'" in reason and "already used" in reason and "mlp" in path
            )
            assert expected, (path, reason)
    by_logical = {}
    for leaf in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        by_logical.setdefault(leaf.get_metadata().get("out_sharding"), set()).add(leaf.get_value().spec)
    assert by_logical[("embed", "heads", "head_dim")] == {P("fsdp", "tensor")}
    assert by_logical[("norm",)] == {P()}
