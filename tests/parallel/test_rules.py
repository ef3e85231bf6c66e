"""Tests for jaxrl_llm.parallel.rules: logical → mesh spec resolution and role presets."""

import logging

import pytest
from jax.sharding import PartitionSpec as P

from jaxrl_llm.parallel import (
    LOGICAL_AXIS_RULES,
    ROLES,
    logical_to_mesh_spec,
    make_mesh,
    override_rules,
    resolve_spec,
    rules_for_role,
    validate_rules,
)


def test_default_table():
    table = dict(LOGICAL_AXIS_RULES)
    assert table["batch"] == ("data", "fsdp")
    assert table["embed"] == "fsdp"
    for name in ("heads", "kv_heads", "mlp", "vocab", "experts"):
        assert table[name] == "tensor"
    for name in ("head_dim", "norm", "length", "layers"):
        assert table[name] is None


@pytest.mark.parametrize(
    "logical, expected",
    [
        (("embed", "mlp"), P("fsdp", "tensor")),
        (("mlp", "embed"), P("tensor", "fsdp")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("embed", "heads", "head_dim"), P("fsdp", "tensor")),
        (("norm",), P()),
        ((None, "mlp"), P(None, "tensor")),
        (("batch", "length", "embed"), P(("data", "fsdp"))),  # fsdp already used by batch
        (("experts", "embed", "mlp"), P("tensor", "fsdp")),  # tensor used by experts
        ((("heads", "head_dim"),), P("tensor")),  # several logical names on one dim
        ((), P()),
        (None, P()),
    ],
)
def test_logical_to_mesh_spec(logical, expected):
    assert logical_to_mesh_spec(logical) == expected


def test_mesh_axis_used_at_most_once_is_recorded():
    spec, reasons = resolve_spec(("mlp", "heads"))
    assert spec == P("tensor")
    assert len(reasons) == 1 and "already used" in reasons[0] and "dim 1" in reasons[0]


def test_divisibility_fallback_replicates_with_reason(caplog):
    mesh = make_mesh(2, 2, 2)
    # kv_heads=1 cannot be split over tensor=2; embed 16 splits over fsdp=2
    spec, reasons = resolve_spec(("embed", "kv_heads", "head_dim"), shape=(16, 1, 4), mesh=mesh)
    assert spec == P("fsdp")
    assert len(reasons) == 1 and "not divisible" in reasons[0]
    # batch 2 over data*fsdp=4: falls back to the prefix ('data',)
    spec, reasons = resolve_spec(("batch", None), shape=(2, 5), mesh=mesh)
    assert spec == P("data")
    assert "dropped 'fsdp'" in reasons[0]
    with caplog.at_level(logging.WARNING, logger="jaxrl_llm.parallel.rules"):
        assert logical_to_mesh_spec(("vocab",), shape=(33,), mesh=mesh, name="embed") == P()
    assert "not divisible" in caplog.text and "embed" in caplog.text
    # divisible: no fallback
    assert resolve_spec(("vocab", "embed"), shape=(32, 16), mesh=mesh) == (P("tensor", "fsdp"), ())


def test_axes_missing_from_mesh_are_dropped():
    mesh = make_mesh(2, 2, 2)
    rules = override_rules(mlp="expert_axis")
    spec, reasons = resolve_spec(("embed", "mlp"), rules, shape=(4, 4), mesh=mesh)
    assert spec == P("fsdp")
    assert "no axis 'expert_axis'" in reasons[0]


def test_unknown_logical_name_raises():
    with pytest.raises(ValueError, match="'embd'.*known names"):
        logical_to_mesh_spec(("embd",))
    with pytest.raises(ValueError, match="rank 1"):
        resolve_spec(("embed", "mlp"), shape=(4,))


def test_validate_and_override_rules():
    rules = override_rules(embed=None, experts="data")
    assert dict(rules)["embed"] is None and dict(rules)["experts"] == "data"
    assert dict(LOGICAL_AXIS_RULES)["embed"] == "fsdp"  # original untouched
    assert validate_rules({"a": ["data", "fsdp"]}) == (("a", ("data", "fsdp")),)
    with pytest.raises(ValueError, match="more than once"):
        validate_rules((("a", None), ("a", "data")))
    with pytest.raises(ValueError, match="mesh axes for 'a'"):
        validate_rules((("a", 3),))


def test_role_presets():
    for role in ROLES:
        assert rules_for_role(role) == LOGICAL_AXIS_RULES
    small_ref = rules_for_role("reference", replicate_over_fsdp=True)
    assert logical_to_mesh_spec(("embed", "mlp"), small_ref) == P(None, "tensor")
    assert logical_to_mesh_spec(("batch",), small_ref) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="role"):
        rules_for_role("actor")
