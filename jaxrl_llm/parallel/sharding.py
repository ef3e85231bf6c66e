"""Turn logical axis annotations into placed arrays: params, optimizer state, batches, activations.

Parameters carry logical names in their ``out_sharding`` metadata (see
:mod:`jaxrl_llm.parallel.rules`); everything here reads that metadata, maps it
through one ``Rules`` table and returns / applies ``NamedSharding``s:

* :func:`model_shardings` — state tree of ``NamedSharding`` for a model, an
  ``nnx.Optimizer``, or any tree holding ``nnx.Variable``s (abstract or concrete).
* :func:`abstract_model` / :func:`create_sharded` — build a model directly into
  its sharding (each device only ever holds its shard).
* :func:`shard_model` — place an existing model's state.
* :func:`optimizer_shardings` — optimizer state sharded like its params.
* :func:`batch_sharding` / :func:`batch_shardings` / :func:`shard_batch` —
  ``[B, ...]`` arrays split over ``('data', 'fsdp')``.
* :func:`constrain` / :func:`sharding_context` — activation sharding hints at
  block boundaries, by logical name; a no-op when no mesh is set, so model code
  can call it unconditionally.

Leaves that are not annotated (no ``out_sharding``: RNG keys, step counters,
optax scalars) are replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.parallel.mesh import data_parallel_size
from jaxrl_llm.parallel.rules import (
    LOGICAL_AXIS_RULES,
    Rules,
    logical_to_mesh_spec,
    resolve_spec,
    validate_rules,
)

__all__ = [
    "model_shardings",
    "sharding_fallbacks",
    "abstract_model",
    "create_sharded",
    "shard_model",
    "optimizer_shardings",
    "batch_sharding",
    "batch_shardings",
    "shard_batch",
    "check_batch_size",
    "constrain",
    "sharding_context",
    "current_rules",
]

logger = logging.getLogger(__name__)

M = TypeVar("M")

_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("jaxrl_llm_rules", default=None)


def _shape(x: Any) -> tuple[int, ...]:
    """Shape of an array, ``ShapeDtypeStruct`` or Python scalar."""
    return tuple(getattr(x, "shape", np.shape(x)))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _as_state(tree: Any) -> Any:
    """An nnx graph node (Module, Optimizer, ...) → its state; any other pytree as is."""
    if isinstance(tree, nnx.State):
        return tree
    if isinstance(tree, nnx.Pytree):  # Module, Optimizer, any NNX graph node
        return nnx.state(tree)
    return tree


def _leaf_spec(
    path: tuple, leaf: Any, mesh: Mesh, rules: Rules
) -> tuple[PartitionSpec, tuple[str, ...]]:
    """Mesh spec of one leaf (Variable or array) and the fallback reasons."""
    logical = None
    value = leaf
    if _is_variable(leaf):
        logical = leaf.get_metadata().get("out_sharding")
        value = leaf.get_value()
    shape = getattr(value, "shape", None)
    if not logical or shape is None:
        return PartitionSpec(), ()
    if len(logical) > len(shape):
        # e.g. a factored optimizer statistic that kept its param's metadata.
        return PartitionSpec(), (
            f"logical spec {tuple(logical)} longer than rank {len(shape)} (shape {tuple(shape)}): replicated",
        )
    return resolve_spec(logical, rules, shape=shape, mesh=mesh)


def model_shardings(model_or_state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` for every array of a model / optimizer / state tree.

    Args:
      model_or_state: an ``nnx.Module``, ``nnx.Optimizer``, an ``nnx.State`` (e.g.
        from ``nnx.split`` or ``nnx.eval_shape``), or an optax state produced from
        such a state (its param-shaped subtrees keep the params' metadata). Values
        may be arrays or ``jax.ShapeDtypeStruct``s.
      mesh: the device mesh.
      rules: logical → mesh rules.

    Returns:
      The same tree (``nnx.state(model)`` for graph nodes) with each array replaced
      by its ``NamedSharding`` (Variables keep their type and metadata), usable as
      ``in_shardings`` / ``out_shardings`` / ``jax.device_put`` target. Dimensions
      that don't divide their mesh axes are replicated (logged at WARNING; see
      :func:`sharding_fallbacks`).
    """
    rules = validate_rules(rules)
    state = _as_state(model_or_state)

    def one(path, leaf):
        spec, reasons = _leaf_spec(path, leaf, mesh, rules)
        name = jax.tree_util.keystr(path)
        for reason in reasons:
            level = logging.WARNING if "not divisible" in reason else logging.INFO
            logger.log(level, "sharding %s: %s", name, reason)
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if _is_variable(leaf) else sharding

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_variable)


def sharding_fallbacks(
    model_or_state: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> dict[str, tuple[str, ...]]:
    """``{param path: reasons}`` for every leaf whose rules could not be applied in full.

    Use it to audit a placement: an empty dict means every logical axis got the
    mesh axes its rule asked for.
    """
    rules = validate_rules(rules)
    out: dict[str, tuple[str, ...]] = {}

    def one(path, leaf):
        _, reasons = _leaf_spec(path, leaf, mesh, rules)
        if reasons:
            out[jax.tree_util.keystr(path)] = reasons
        return None

    jax.tree_util.tree_map_with_path(one, _as_state(model_or_state), is_leaf=_is_variable)
    return out


def abstract_model(
    model_factory: Callable[[], Any], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, Any]:
    """Shapes, dtypes and shardings of a model without allocating it.

    Args:
      model_factory: zero-argument callable building the model, e.g.
        ``lambda: CausalLM(cfg, rngs=nnx.Rngs(0))``.

    Returns:
      ``(graphdef, abstract_state)``: leaves are ``jax.ShapeDtypeStruct`` with
      ``.sharding`` set; this is also the target to restore a checkpoint into
      (orbax) directly in its sharding.
    """
    abs_model = nnx.eval_shape(model_factory)
    graphdef, abs_state = nnx.split(abs_model)
    shardings = model_shardings(abs_state, mesh, rules)
    abs_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings
    )
    return graphdef, abs_state


def create_sharded(
    model_factory: Callable[[], M], mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES
) -> M:
    """Build a model with every parameter created directly in its sharding.

    The factory is traced once abstractly (``nnx.eval_shape``) to read shapes and
    logical specs, then run under ``jax.jit(..., out_shardings=...)``: XLA partitions
    the initialisers, so each device computes and stores only its shard — no full
    copy of the model exists on any device (random initialisers are partitionable
    since ``jax_threefry_partitionable`` is on by default). Values equal those of
    ``model_factory()`` run eagerly.

    The factory must create its own RNGs (``nnx.Rngs(seed)`` inside it): state
    captured from outside would be traced, not updated.

    Returns:
      The model, its arrays sharded by ``rules`` on ``mesh``.
    """
    graphdef, init = _sharded_init(model_factory, mesh, rules)
    with sharding_context(mesh, rules):
        state = init()
    return nnx.merge(graphdef, state)


def _sharded_init(
    model_factory: Callable[[], Any], mesh: Mesh, rules: Rules
) -> tuple[nnx.GraphDef, Callable[[], Any]]:
    """``(graphdef, init)`` where ``init()`` is the jitted, sharded state initialiser."""
    graphdef, abs_state = abstract_model(model_factory, mesh, rules)
    out_shardings = jax.tree.map(lambda a: a.sharding, abs_state)

    @functools.partial(jax.jit, out_shardings=out_shardings)
    def init():
        return nnx.split(model_factory())[1]

    return graphdef, init


def shard_model(model: M, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> M:
    """Move an existing model's (or ``nnx.Optimizer``'s) arrays into their shardings, in place.

    Goes through host/default-device memory if the model lives there; prefer
    :func:`create_sharded` for models that don't fit one device.

    Returns:
      ``model`` itself (updated in place), for chaining.
    """
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, model_shardings(state, mesh, rules)))
    return model


def optimizer_shardings(
    opt_state: Any,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    tx: optax.GradientTransformation | None = None,
    param_shardings: Any = None,
) -> Any:
    """Shardings for optimizer state, matching those of the params each statistic belongs to.

    Two ways:

    * ``opt_state`` is an ``nnx.Optimizer`` or an optax state built from an
      ``nnx.State`` of params (``tx.init(params)`` / ``jax.eval_shape(tx.init,
      params)``): its moment trees hold Variables that carry the params' logical
      metadata, so the rules apply to them directly; counters are replicated.
    * ``opt_state`` was built from plain arrays: pass ``tx`` and the params'
      ``param_shardings``; ``optax.tree_map_params`` assigns each param's sharding
      to its statistics (non-param leaves replicated).

    Returns:
      A tree of ``NamedSharding`` with the structure of ``opt_state``
      (``nnx.state(optimizer)`` for an ``nnx.Optimizer``).
    """
    if (tx is None) != (param_shardings is None):
        raise ValueError("tx and param_shardings must be given together (or neither)")
    if tx is None:
        return model_shardings(opt_state, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        opt_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a ``[B, ...]`` array: axis 0 split by the ``batch`` rule (``('data', 'fsdp')``)."""
    spec = logical_to_mesh_spec(("batch",), rules, mesh=mesh)
    return NamedSharding(mesh, spec)


def check_batch_size(
    batch_size: int,
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
    *,
    num_microbatches: int = 1,
    name: str = "batch",
) -> None:
    """Raise unless ``batch_size`` splits into ``num_microbatches`` micro-batches each divisible
    by the number of batch shards.

    Raises:
      ValueError: naming ``name``, the sizes and the mesh.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches: expected >= 1, got {num_microbatches}")
    spec = batch_sharding(mesh, rules).spec
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if batch_size % num_microbatches != 0:
        raise ValueError(
            f"{name}: global batch size {batch_size} is not divisible by num_microbatches={num_microbatches}"
        )
    micro = batch_size // num_microbatches
    if micro % shards != 0:
        raise ValueError(
            f"{name}: micro-batch size {micro} (global batch {batch_size} / {num_microbatches} "
            f"micro-batches) is not divisible by the {shards} batch shards of mesh axes {axes} "
            f"(mesh {dict(mesh.shape)}, data-parallel size {data_parallel_size(mesh)}); "
            f"use a global batch that is a multiple of {shards * num_microbatches}"
        )


def batch_shardings(
    batch: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, *, num_microbatches: int = 1
) -> Any:
    """Tree of ``NamedSharding`` for a batch pytree; validates the batch size.

    Every leaf of rank ≥ 1 is ``[B, ...]`` with the same ``B`` and is split on axis 0;
    rank-0 leaves (scalars such as a KL coefficient) are replicated.

    Raises:
      ValueError: leaves disagree on ``B``, or ``B`` is not divisible (see
        :func:`check_batch_size`).
    """
    sizes = {}

    def visit(path, x):
        if _shape(x):
            sizes[jax.tree_util.keystr(path)] = _shape(x)[0]

    jax.tree_util.tree_map_with_path(visit, batch)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch: all [B, ...] leaves must share B, got leading sizes {sizes}")
    if sizes:
        check_batch_size(next(iter(sizes.values())), mesh, rules, num_microbatches=num_microbatches)
    split = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: split if _shape(x) else replicated, batch)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES, *, num_microbatches: int = 1) -> Any:
    """Place a batch: ``[B, ...]`` leaves split over the batch axes, scalars replicated.

    Single process: ``batch`` is the global batch (numpy or jax arrays).
    Multi-process: each process passes its own rows (``B / process_count`` of them,
    in process order) and gets back global ``jax.Array``s
    (``jax.make_array_from_process_local_data``). Leaves that already are global
    (not fully addressable) ``jax.Array``s pass through.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, batch_shardings(batch, mesh, rules, num_microbatches=num_microbatches))

    def place(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    def global_shape(x):
        shape = _shape(x)
        if not shape or (isinstance(x, jax.Array) and not x.is_fully_addressable):
            return jax.ShapeDtypeStruct(shape, np.int8)
        return jax.ShapeDtypeStruct((shape[0] * jax.process_count(),) + shape[1:], np.int8)

    shardings = batch_shardings(
        jax.tree.map(global_shape, batch), mesh, rules, num_microbatches=num_microbatches
    )
    return jax.tree.map(place, batch, shardings)


def current_rules() -> Rules:
    """Rules set by the innermost :func:`sharding_context` (default ``LOGICAL_AXIS_RULES``)."""
    rules = _RULES.get()
    return LOGICAL_AXIS_RULES if rules is None else rules


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Set the mesh (``jax.set_mesh``) and the rules :func:`constrain` uses, for tracing.

    Example::

        with sharding_context(mesh, rules):
            logits = jax.jit(forward)(model, tokens)   # constrain() inside is active
    """
    token = _RULES.set(validate_rules(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def constrain(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    *,
    rules: Rules | None = None,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Sharding hint for an activation at a block boundary, by logical axis names.

    ``constrain(h, ('batch', None, 'embed'))`` on ``h: [B, T, D]`` →
    ``with_sharding_constraint(h, P(('data', 'fsdp')))`` under the default rules
    (``embed`` cannot reuse ``fsdp``, already taken by ``batch``). Dims that don't
    divide their mesh axes are left unsplit.

    A no-op (returns ``x``) when no mesh is given and none is set with
    :func:`sharding_context` / ``jax.set_mesh``, so model code can call it
    unconditionally and still run on one device without a mesh. Requires ``Auto``
    mesh axes (the :func:`~jaxrl_llm.parallel.mesh.make_mesh` default).

    Args:
      x: array of rank ``len(logical_axes)`` (or more: trailing dims unsplit).
      logical_axes: one logical name or None per leading dim of ``x``.
      rules: default: those of the current :func:`sharding_context`.
      mesh: default: the mesh set with ``jax.set_mesh``.
    """
    if len(logical_axes) > x.ndim:
        raise ValueError(
            f"logical_axes: {tuple(logical_axes)} has {len(logical_axes)} entries for x of shape {x.shape}"
        )
    target = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if target is None or target.empty:
        return x
    # Activation fallbacks (e.g. batch 1 while decoding) are routine: logged at DEBUG.
    spec, reasons = resolve_spec(
        tuple(logical_axes), rules if rules is not None else current_rules(), shape=x.shape, mesh=target
    )
    for reason in reasons:
        logger.debug("constrain %s: %s", tuple(logical_axes), reason)
    sharding = NamedSharding(mesh, spec) if mesh is not None else spec
    return jax.lax.with_sharding_constraint(x, sharding)

