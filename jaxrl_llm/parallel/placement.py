"""The one placement path every trainer uses: a mesh from the config, models and train
state placed by the logical-axis rules, batches split over the batch axes, results
brought back to the host.

A trainer reads::

    placement = Placement.create(config.mesh, rows={"batch_size": config.batch_size},
                                 model_config=model.config)
    model = placement.model(policy)                    # sharded by the rules (or loaded straight into it)
    state = placement.place({"params": params, "opt_state": tx.init(params)})
    with placement.context():                          # activation constraints inside the model
        params, opt_state, ... = update(params, opt_state, placement.rows(batch))
    tokens = placement.to_host(rollout.tokens)         # numpy, whole batch, on every process

``MeshConfig`` is the ``mesh`` field of every trainer config (``mesh.fsdp=4 mesh.tensor=2``
on the command line). Roles: the policy and critic are trainable (params and optimizer
state sharded over fsdp × tensor), the reference and reward models are frozen (params
only, same rules); all four live on the same mesh, so a log-prob pass of the reference
and an update of the policy are the same SPMD program shape.

Multi-process (``jax.distributed``): every process runs the same host code over the same
global batch (same data order as one process, so runs match one process exactly);
:meth:`Placement.rows` builds the global arrays from each process's slice only, and
:meth:`Placement.to_host` all-gathers device results that span processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrl_llm.parallel.mesh import MESH_AXES, make_mesh, mesh_shape
from jaxrl_llm.parallel.rules import LOGICAL_AXIS_RULES, Rules, resolve_spec, validate_rules
from jaxrl_llm.parallel.sharding import batch_sharding, model_shardings, sharding_context

__all__ = ["MeshConfig", "Placement", "forward_rows", "host_array"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape of a run (the ``mesh`` field of every trainer config).

    Attributes:
      data: pure data-parallel size (params replicated), or -1 for the remaining devices.
      fsdp: fully-sharded data-parallel size (batch split and params / optimizer state
        sharded), or -1.
      tensor: tensor-parallel size (heads, MLP hidden and vocab split), or -1.
      num_devices: use the first ``num_devices`` devices (None: all devices of all
        processes), e.g. 1 to run on one device of a multi-device host.

    The default (``data=-1``) is pure data parallelism over every device: one device on
    a plain CPU. Only with the default, a batch whose rows do not split over every
    device runs on the largest device count that divides it (with a warning); a mesh
    given explicitly must fit exactly or the run fails at start naming the field.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int | None = None

    def __post_init__(self):
        # the size checks of mesh_shape, on one device count that fits any valid sizes
        fixed = [getattr(self, n) for n in MESH_AXES]
        mesh_shape(self._sizes(), math.prod(s for s in fixed if isinstance(s, int) and s > 0), "mesh.")
        if self.num_devices is not None and (
            isinstance(self.num_devices, bool) or not isinstance(self.num_devices, int) or self.num_devices < 1
        ):
            raise ValueError(f"mesh.num_devices: expected a positive int or None (all devices), got {self.num_devices!r}")
        if self.num_devices is not None:  # the mesh runs on exactly num_devices devices (or fails to start)
            sizes = self._sizes()
            fixed = math.prod(s for s in sizes.values() if s != -1)
            names = " × ".join(f"mesh.{a}" for a in MESH_AXES)
            if -1 not in sizes.values() and fixed != self.num_devices:
                raise ValueError(
                    f"mesh.num_devices={self.num_devices}, but {names} = "
                    f"{' × '.join(str(sizes[a]) for a in MESH_AXES)} = {fixed}: the sizes must multiply to "
                    "mesh.num_devices (or set one of them to -1)")
            if self.num_devices % fixed:
                free = next(a for a in MESH_AXES if sizes[a] == -1)
                raise ValueError(
                    f"mesh.num_devices={self.num_devices} is not divisible by {fixed}, the product of the sizes "
                    f"other than mesh.{free}=-1 ({self._describe()})")

    @property
    def is_default(self) -> bool:
        return self == MeshConfig()

    def _sizes(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in MESH_AXES}

    def sizes(self, num_devices: int) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` on ``num_devices`` devices (-1 resolved).

        Raises:
          ValueError: naming the mesh fields, when the sizes cannot cover the devices
            (use -1 for one size, or ``mesh.num_devices`` to use fewer devices).
        """
        return mesh_shape(self._sizes(), num_devices, "mesh.", "mesh.num_devices=N")

    def _describe(self) -> str:
        return ", ".join(f"mesh.{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def _device_list(config: MeshConfig, devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    devices = list(jax.devices() if devices is None else devices)
    if config.num_devices is not None:
        if config.num_devices > len(devices):
            raise ValueError(f"mesh.num_devices={config.num_devices}, but only {len(devices)} devices are visible")
        devices = devices[: config.num_devices]
    return devices


def _check_rows(rows: Mapping[str, int], batch_shards: int, config: MeshConfig) -> None:
    for name, count in rows.items():
        if count % batch_shards:
            raise ValueError(
                f"{name}={count} is not divisible by mesh.data × mesh.fsdp = {batch_shards} (the batch "
                f"shards; {config._describe()}): use a multiple of {batch_shards}, or a mesh with fewer "
                "batch shards"
            )


def _check_model(model_config: Any, tensor: int) -> None:
    """Tensor parallelism splits attention by heads: the head count must divide."""
    heads = getattr(model_config, "num_heads", None)
    if tensor > 1 and heads is not None and heads % tensor:
        raise ValueError(
            f"mesh.tensor={tensor} does not divide the model's num_heads={heads}: tensor parallelism "
            "splits attention heads; use a mesh.tensor that divides it"
        )
    experts = getattr(model_config, "num_experts", 0) or 0
    if tensor > 1 and experts and experts % tensor:
        raise ValueError(
            f"mesh.tensor={tensor} does not divide the model's num_experts={experts}: expert "
            "parallelism runs on the tensor axis"
        )


def host_array(x: Any) -> np.ndarray | None:
    """``x`` as a whole numpy array on this process: an array that spans several processes
    is all-gathered (a collective: every process must call it), a replicated one is read
    from a local copy."""
    if x is None:
        return None
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass(frozen=True)
class Placement:
    """A mesh and its rules, with the operations that put training data on it (hashable)."""

    mesh: Mesh
    rules: Rules = LOGICAL_AXIS_RULES

    @classmethod
    def create(
        cls,
        config: MeshConfig | None = None,
        *,
        rows: Mapping[str, int] | None = None,
        model_config: Any = None,
        rules: Rules = LOGICAL_AXIS_RULES,
        devices: Sequence[jax.Device] | None = None,
    ) -> "Placement":
        """Build the mesh of ``config`` and check that the run fits it.

        Args:
          config: the ``mesh`` field of a trainer config (default: all devices, data parallel).
          rows: ``{config field: row count}`` of every array the trainer splits over the
            batch axes (e.g. ``{"batch_size": 16}``); each must divide by data × fsdp.
          model_config: a ``ModelConfig``; checked against ``mesh.tensor``.
          rules: logical → mesh rules.
          devices: devices to use (default ``jax.devices()``).

        Raises:
          ValueError: naming the config field that does not fit.
        """
        config = MeshConfig() if config is None else config
        rows = dict(rows or {})
        devices = _device_list(config, devices)
        data, fsdp, tensor = config.sizes(len(devices))
        if config.is_default and jax.process_count() == 1:
            # Plain data parallelism over every device unless the batch does not split:
            # then the largest device count that divides every row count (never an error).
            usable = max(d for d in range(1, len(devices) + 1)
                         if len(devices) % d == 0 and all(n % d == 0 for n in rows.values()))
            if usable < len(devices):
                logger.warning(
                    "mesh: the batch (%s) does not split over all %d devices; running data-parallel on "
                    "%d of them. Set mesh.data / mesh.num_devices to choose.",
                    ", ".join(f"{k}={v}" for k, v in rows.items()), len(devices), usable)
                devices, data = devices[:usable], usable
        _check_rows(rows, data * fsdp, config)
        if model_config is not None:
            _check_model(model_config, tensor)
        mesh = make_mesh(data, fsdp, tensor, devices=devices)
        return cls(mesh, validate_rules(rules))

    # -- sizes --------------------------------------------------------------------------
    @property
    def batch_shards(self) -> int:
        """Number of row shards: data × fsdp."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def is_multiprocess(self) -> bool:
        return jax.process_count() > 1

    # -- models and state -----------------------------------------------------------------
    def shardings(self, tree: Any) -> Any:
        """``NamedSharding`` of every array of a model / state tree by its logical names
        (unannotated leaves: replicated)."""
        return model_shardings(tree, self.mesh, self.rules)

    def sharding_fn(self) -> Callable[[tuple, tuple], NamedSharding]:
        """``(logical names, shape) -> NamedSharding``, for loaders that place tensor by tensor."""
        def fn(names, shape):
            return NamedSharding(self.mesh, resolve_spec(tuple(names), self.rules, shape=shape, mesh=self.mesh)[0])

        return fn

    def place(self, tree: Any) -> Any:
        """Put a model's / train state's arrays into their shardings (a no-op for arrays
        already there). Leaves without logical names (RNG keys, counters, scalars) are
        replicated."""
        from flax import nnx

        if isinstance(tree, nnx.Module):
            state = nnx.state(tree)
            nnx.update(tree, self.place(state))
            return tree
        return jax.device_put(tree, self.shardings(tree))

    def model(self, model_or_path: Any, **load_kwargs) -> Any:
        """A model placed by the rules: an NNX model is moved in place; a local HF
        checkpoint path is loaded tensor by tensor straight into its sharding."""
        if isinstance(model_or_path, str):
            from jaxrl_llm.models.hf_io import load_hf

            return load_hf(model_or_path, sharding_fn=self.sharding_fn(), **load_kwargs)[0]
        return self.place(model_or_path)

    def constrain(self, tree: Any) -> Any:
        """Inside a jitted function: keep a state tree (params, optimizer state) in the
        sharding of its logical names, so updates never replicate what was sharded."""
        sharding_logger = logging.getLogger("jaxrl_llm.parallel.sharding")
        level = sharding_logger.level
        sharding_logger.setLevel(logging.ERROR)  # fallbacks were reported when the state was placed
        try:
            shardings = self.shardings(tree)
        finally:
            sharding_logger.setLevel(level)
        return jax.lax.with_sharding_constraint(tree, shardings)

    # -- batches ------------------------------------------------------------------------
    def row_sharding(self, ndim: int = 1, axis: int = 0) -> NamedSharding:
        """Sharding of an array whose axis ``axis`` holds batch rows."""
        row = batch_sharding(self.mesh, self.rules).spec
        spec = [None] * ndim
        spec[axis] = row[0] if len(row) else None
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def rows(self, tree: Any, *, axis: int = 0) -> Any:
        """Split every ``[N, ...]`` leaf of a batch over the batch axes (rank-0 leaves and
        None are replicated / kept). ``N`` must divide by the batch shards.

        Host arrays are the global batch, the same on every process; each process
        transfers only its own rows. Device arrays already on the mesh are resharded.
        """
        def put(x):
            if x is None:
                return None
            if np.ndim(x) == 0:
                return self.replicate(x)
            n = np.shape(x)[axis]
            if n % self.batch_shards:
                raise ValueError(
                    f"batch: {n} rows (shape {np.shape(x)}) do not split over the {self.batch_shards} "
                    f"batch shards of mesh {dict(self.mesh.shape)}"
                )
            sharding = self.row_sharding(np.ndim(x), axis)
            return self._put(x, sharding)

        return jax.tree.map(put, tree, is_leaf=lambda x: x is None)

    def replicate(self, tree: Any) -> Any:
        """Every leaf replicated on the mesh."""
        sharding = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree.map(lambda x: self._put(x, sharding), tree)

    def _put(self, x: Any, sharding: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or not self.is_multiprocess):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    # -- results ------------------------------------------------------------------------
    def to_host(self, tree: Any) -> Any:
        """numpy copies of every leaf, whole on every process (all-gathered across
        processes when an array spans several)."""
        return jax.tree.map(host_array, tree, is_leaf=lambda x: x is None)

    def forward_rows(self, fn: Callable, rows: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
        """:func:`forward_rows` on this placement's mesh."""
        return forward_rows(fn, rows, batch_size, self)

    @contextlib.contextmanager
    def context(self) -> Iterator[Mesh]:
        """Set the mesh and rules for tracing (activation constraints in model code)."""
        with sharding_context(self.mesh, self.rules) as mesh:
            yield mesh


def forward_rows(
    fn: Callable, rows: Sequence[np.ndarray], batch_size: int, placement: Placement | None = None
) -> np.ndarray:
    """``fn`` over host arrays ``rows`` (each [R, ...]) in forwards of ``batch_size`` rows.

    The last forward is padded with copies of its first row, so every forward has one
    compiled shape. With a ``placement`` each forward's rows are split over its batch axes
    (``batch_size`` must divide by them); without one they go to ``fn`` whole. Returns
    fn's [R, ...] outputs on the host.
    """
    out = []
    for start in range(0, len(rows[0]), batch_size):
        chunk = [np.asarray(x[start : start + batch_size]) for x in rows]
        n = len(chunk[0])
        if n < batch_size:
            chunk = [np.concatenate([x, np.repeat(x[:1], batch_size - n, 0)]) for x in chunk]
        if placement is None:
            out.append(host_array(fn(*chunk))[:n])
            continue
        with placement.context():
            values = fn(*placement.rows(chunk))
        out.append(placement.to_host(values)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)
