"""Logical-axis → mesh-axis rules: the one place where sharding is decided.

Model code names the axes of every parameter with *logical* names
(``nnx.Param(w, out_sharding=('embed', 'mlp'))``; ``sharding_names=`` is the
older spelling of the same metadata). This module maps those names onto the
``('data', 'fsdp', 'tensor')`` mesh of :mod:`jaxrl_llm.parallel.mesh`:

=============  ====================  ==========================================
logical name   mesh axes             why
=============  ====================  ==========================================
batch          ('data', 'fsdp')      data parallel over both batch-like axes
length         None                  sequence not split (no context parallel)
embed          'fsdp'                FSDP: params/optimizer state split on D
vocab          'tensor'              embedding / unembedding rows split
heads          'tensor'              Megatron attention: split heads
kv_heads       'tensor'              (replicated if K < tensor size)
mlp            'tensor'              Megatron MLP: split the hidden dim
experts        'tensor'              expert parallelism on the tensor axis
head_dim       None
norm           None                  norm scales are tiny: replicate
layers         None                  stacked-layer axis (nnx.scan/vmap)
=============  ====================  ==========================================

Resolution of one spec (``logical_to_mesh_spec``), dimension by dimension, left
to right:

1. each logical name is looked up in the rules (unknown name → ``ValueError``,
   so typos don't silently replicate a big matrix);
2. a mesh axis is used at most once per spec: an axis already taken by an
   earlier dimension is dropped for this one (e.g. activations
   ``('batch', None, 'embed')``: batch takes data+fsdp, so embed stays
   unsplit; expert weights ``('experts', 'embed', 'mlp')``: experts takes
   tensor, so mlp is unsplit);
3. mesh axes absent from the mesh are dropped;
4. if the dimension size is not divisible by the product of its mesh axis sizes,
   trailing mesh axes are dropped until it is (down to replication).

Every drop in steps 2–4 is recorded as a human-readable reason (returned by
:func:`resolve_spec`, logged at INFO, divisibility fallbacks at WARNING).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Union

from jax.sharding import Mesh, PartitionSpec

__all__ = [
    "MeshAxes",
    "Rules",
    "LOGICAL_AXIS_RULES",
    "ROLES",
    "TRAINABLE_ROLES",
    "validate_rules",
    "override_rules",
    "rules_for_role",
    "resolve_spec",
    "logical_to_mesh_spec",
]

logger = logging.getLogger(__name__)

MeshAxes = Union[str, tuple[str, ...], None]
"""What a logical name maps to: one mesh axis, several (major to minor), or None."""

Rules = tuple[tuple[str, MeshAxes], ...]
"""Ordered ``(logical name, mesh axes)`` pairs; hashable, so usable as a static arg."""

LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)
"""Default rules: FSDP on ``embed``, Megatron-style tensor parallelism, DP on batch."""

ROLES: tuple[str, ...] = ("policy", "reference", "reward", "critic")
"""The four models of RLHF-style training."""

TRAINABLE_ROLES: frozenset[str] = frozenset({"policy", "critic"})


def _as_axes(value: MeshAxes) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def validate_rules(rules: Sequence[tuple[str, MeshAxes]] | Mapping[str, MeshAxes]) -> Rules:
    """Check and normalise ``rules`` to the hashable ``Rules`` tuple form.

    Raises:
      ValueError: an entry is not ``(str, None | str | tuple[str, ...])`` or a
        logical name appears twice.
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    seen: set[str] = set()
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"rules: expected (logical_name, mesh_axes) pairs, got {item!r}")
        name, value = item
        if name in seen:
            raise ValueError(f"rules: logical name {name!r} appears more than once")
        seen.add(name)
        if value is not None and not isinstance(value, str):
            if not (isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value)):
                raise ValueError(
                    f"rules: mesh axes for {name!r} must be None, a str or a tuple of str, got {value!r}"
                )
            value = tuple(value)
        out.append((name, value))
    return tuple(out)


def override_rules(rules: Rules = LOGICAL_AXIS_RULES, **overrides: MeshAxes) -> Rules:
    """Copy of ``rules`` with some logical names remapped (or added).

    Example: ``override_rules(embed=None)`` → parameters replicated over fsdp.
    """
    rules = validate_rules(rules)
    table = dict(rules)
    table.update(overrides)
    return validate_rules(tuple(table.items()))


def rules_for_role(
    role: str,
    *,
    replicate_over_fsdp: bool = False,
    base: Rules = LOGICAL_AXIS_RULES,
) -> Rules:
    """Placement preset for one of the four RLHF models, all on the same mesh.

    * ``policy``, ``critic`` (trainable): ``base`` — FSDP + tensor parallel, so
      params, grads and the (2× larger) Adam state are split over fsdp×tensor.
    * ``reference``, ``reward`` (frozen, forward only): ``base`` by default; with
      ``replicate_over_fsdp=True`` their params are replicated over data and fsdp
      and only split over tensor (``embed → None``). For a frozen model small
      enough to fit once per tensor shard this removes the per-layer all-gathers
      of FSDP from every scoring forward, at the cost of memory.

    ``replicate_over_fsdp=True`` on a trainable role is allowed (tiny policies) but
    replicates its optimizer state too.

    Raises:
      ValueError: ``role`` is not one of ``ROLES``.
    """
    if role not in ROLES:
        raise ValueError(f"role: expected one of {ROLES}, got {role!r}")
    rules = validate_rules(base)
    if replicate_over_fsdp:
        rules = override_rules(rules, embed=None)
    return rules


def resolve_spec(
    logical_spec: Sequence[str | tuple[str, ...] | None] | PartitionSpec | None,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> tuple[PartitionSpec, tuple[str, ...]]:
    """Map a logical spec to a mesh ``PartitionSpec``, with the reasons for any fallback.

    Args:
      logical_spec: one entry per array dimension: a logical name, a tuple of
        logical names (their mesh axes are concatenated), or None. May be shorter
        than the array rank (missing trailing dims are replicated). ``None`` or
        ``()`` means fully replicated. ``PartitionSpec.UNCONSTRAINED`` entries pass
        through.
      rules: logical → mesh rules.
      shape: the array shape; enables the divisibility fallback (needs ``mesh``).
      mesh: the mesh; enables dropping axes the mesh lacks and divisibility checks.

    Returns:
      ``(spec, reasons)``: the mesh-axis ``PartitionSpec`` and a tuple of strings,
      one per dropped mesh axis.

    Raises:
      ValueError: unknown logical name, or ``logical_spec`` longer than ``shape``.
    """
    rules = validate_rules(rules)
    table = dict(rules)
    logical = tuple(logical_spec) if logical_spec is not None else ()
    if shape is not None and len(logical) > len(shape):
        raise ValueError(
            f"logical_spec {logical} has {len(logical)} entries for an array of rank {len(shape)} "
            f"(shape {tuple(shape)})"
        )
    mesh_shape: Mapping[str, int] | None = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    reasons: list[str] = []
    out: list[str | tuple[str, ...] | None] = []
    for dim, entry in enumerate(logical):
        if entry is PartitionSpec.UNCONSTRAINED:
            out.append(entry)
            continue
        names = _as_axes(entry)
        axes: list[str] = []
        for name in names:
            if name not in table:
                raise ValueError(
                    f"logical axis name {name!r} (dim {dim} of {logical}) has no rule; "
                    f"known names: {sorted(table)}. Add it with override_rules({name}=...)"
                )
            for axis in _as_axes(table[name]):
                if axis in used or axis in axes:
                    reasons.append(
                        f"dim {dim} ({name!r}): mesh axis {axis!r} already used by an earlier dim"
                    )
                elif mesh_shape is not None and axis not in mesh_shape:
                    reasons.append(f"dim {dim} ({name!r}): mesh has no axis {axis!r}")
                else:
                    axes.append(axis)
        if shape is not None and mesh_shape is not None:
            while axes and shape[dim] % math.prod(mesh_shape[a] for a in axes) != 0:
                size = math.prod(mesh_shape[a] for a in axes)
                dropped = axes.pop()
                reasons.append(
                    f"dim {dim} ({entry!r}) of size {shape[dim]} is not divisible by {size} "
                    f"(mesh axes {tuple(axes) + (dropped,)}); dropped {dropped!r}"
                )
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out), tuple(reasons)


def logical_to_mesh_spec(
    logical_spec: Sequence[str | tuple[str, ...] | None] | PartitionSpec | None,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    name: str = "",
) -> PartitionSpec:
    """:func:`resolve_spec` that logs the fallback reasons instead of returning them.

    Divisibility fallbacks (a parameter or activation left replicated that the rules
    wanted split) are logged at WARNING, the rest at INFO. ``name`` prefixes the
    log lines (e.g. the parameter path).
    """
    spec, reasons = resolve_spec(logical_spec, rules, shape=shape, mesh=mesh)
    for reason in reasons:
        level = logging.WARNING if "not divisible" in reason else logging.INFO
        logger.log(level, "sharding %s: %s", name or tuple(logical_spec or ()), reason)
    return spec
