"""Device mesh construction and multi-host start-up.

One mesh for everything: three named axes ``('data', 'fsdp', 'tensor')``.

* ``data``   — pure data parallelism: parameters replicated, batch split.
* ``fsdp``   — fully-sharded data parallelism: batch split AND parameters /
  optimizer state sharded (gathered per layer by XLA when needed).
* ``tensor`` — tensor (model) parallelism: heads / MLP / vocab dims split.

Axis types. Since JAX 0.7 ``jax.make_mesh`` defaults to ``AxisType.Explicit``
axes, under which shardings are part of an array's type: an op whose
contracting dimension is sharded (e.g. ``x @ w`` with ``w`` sharded on its
input dim over ``fsdp``) raises unless the code states the output sharding.
Our model code only names *logical* axes and lets the compiler decide, so
``make_mesh`` builds ``AxisType.Auto`` axes by default: XLA's sharding
propagation (GSPMD/Shardy) inserts the all-gathers / reduce-scatters. Pass
``axis_types=AxisType.Explicit`` only if every op in your step states its
output sharding.

Multi-host: call :func:`init_distributed` first thing in the program (before
any JAX computation), then :func:`make_mesh` sees every device of every
process (``jax.devices()`` is global) and the same jitted step runs on all
hosts (SPMD).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "make_mesh", "mesh_shape", "init_distributed", "data_parallel_size"]

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
"""Names of the three mesh axes, outermost (slowest interconnect) first."""


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
    axis_types: AxisType | tuple[AxisType, ...] = AxisType.Auto,
) -> Mesh:
    """Build a ``('data', 'fsdp', 'tensor')`` mesh over ``devices``.

    Exactly one of the sizes may be ``-1``: it takes the remaining devices
    (``len(devices) // (product of the others)``). ``make_mesh()`` is pure data
    parallelism over all devices; ``make_mesh(1, 1, 1, devices=jax.devices()[:1])``
    is the single-device mesh, on which the same sharded code runs unchanged.

    Devices are laid out by ``jax.make_mesh`` (topology aware on TPU/GPU), with
    ``tensor`` the innermost (fastest-interconnect) axis.

    Args:
      data: size of the ``data`` axis, or -1.
      fsdp: size of the ``fsdp`` axis, or -1.
      tensor: size of the ``tensor`` axis, or -1.
      devices: devices to use; default ``jax.devices()`` (all devices of all
        processes).
      axis_types: one ``AxisType`` for all axes, or one per axis. Default
        ``AxisType.Auto`` (see module docstring for why).

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``MESH_AXES``.

    Raises:
      ValueError: a size is 0 or < -1, more than one size is -1, or the
        product of the sizes does not equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got an empty sequence")
    shape = mesh_shape({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices))
    if isinstance(axis_types, AxisType):
        axis_types = (axis_types,) * len(MESH_AXES)
    if len(axis_types) != len(MESH_AXES):
        raise ValueError(f"axis_types: expected 1 or {len(MESH_AXES)} AxisTypes, got {axis_types}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=tuple(axis_types), devices=devices)


def mesh_shape(
    sizes: Mapping[str, int], num_devices: int, prefix: str = "", subset_hint: str = "pass devices=[...]"
) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` from ``{axis: size or -1}`` on ``num_devices`` devices.

    Args:
      sizes: one entry per ``MESH_AXES`` name; at most one is -1 (the remaining devices).
      num_devices: the device count the sizes must multiply to.
      prefix: prepended to axis names in errors (``"mesh."`` for a config field).
      subset_hint: how the caller runs on fewer devices, for the error message.

    Raises:
      ValueError: naming the axis (with ``prefix``) and the sizes, when a size is not a
        positive int or -1, two are -1, or the sizes do not cover the devices.
    """
    sizes = dict(sizes)
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"{prefix}{name}: expected a positive int or -1 (the remaining devices), got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one of {' / '.join(prefix + a for a in MESH_AXES)} may be -1, "
                         f"got {[prefix + f for f in free]}")
    described = ", ".join(f"{prefix}{k}={v}" for k, v in sizes.items())
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"{prefix}{free[0]}=-1: the other sizes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices ({described})"
            )
        sizes[free[0]] = num_devices // fixed
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        names = " × ".join(prefix + a for a in MESH_AXES)
        raise ValueError(
            f"{names} = {' × '.join(map(str, shape))} = {math.prod(shape)} must equal the number of "
            f"devices, {num_devices} ({described}); use -1 for one size, or {subset_hint} to use fewer devices"
        )
    return shape


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards: ``mesh.shape['data'] * mesh.shape['fsdp']``."""
    return math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))


# Environment variables that mean "this process is one of several".
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
_OMPI_VAR = "OMPI_MCA_orte_hnp_uri"


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}: expected an int, got {value!r}") from e


def _detected_cluster(env: Mapping[str, str]) -> str | None:
    """Name of a multi-process launcher found in ``env``, else None."""
    if all(v in env for v in _SLURM_VARS) and (_int_env(env, "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if _OMPI_VAR in env:
        return "open-mpi"
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto_detect: bool = False,
    coordinator_bind_address: str | None = None,
    initialization_timeout: int | None = None,
    env: Mapping[str, str] | None = None,
) -> bool:
    """Start JAX's multi-process runtime when running on several hosts; else no-op.

    Must be called before any JAX computation. Decision order:

    1. already initialised → nothing to do, returns True;
    2. explicit arguments or ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
       ``JAX_PROCESS_ID`` in the environment → ``jax.distributed.initialize`` with
       them (``num_processes == 1`` is a single host: no-op);
    3. a multi-process launcher detected (SLURM with ``SLURM_NTASKS > 1``, Open MPI,
       a multi-host TPU slice via ``TPU_WORKER_HOSTNAMES`` / megascale) or
       ``auto_detect=True`` (e.g. GCE TPU pods, whose hosts are found through the
       metadata server) → ``jax.distributed.initialize()`` with JAX's own cluster
       auto-detection;
    4. otherwise a single host: no-op, returns False.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: devices this process drives (default: all visible).
      auto_detect: call ``jax.distributed.initialize()`` even if no launcher was
        recognised from the environment.
      coordinator_bind_address: ``host:port`` the coordinator service of process 0
        listens on (JAX's default: every interface, ``[::]:port``); e.g.
        ``"127.0.0.1:port"`` to keep a single-machine run on loopback.
      initialization_timeout: seconds to wait for all processes to connect (JAX's
        default: 300).
      env: environment to read (default ``os.environ``); for tests.

    Returns:
      True if the multi-process runtime is running after the call, False for the
      single-host no-op.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ if env is None else env
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _int_env(env, "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _int_env(env, "JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if num_processes == 1:
        logger.info("init_distributed: num_processes=1, single host, nothing to do")
        return False
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    cluster = None if explicit else _detected_cluster(env)
    if not (explicit or cluster or auto_detect):
        logger.info("init_distributed: no multi-host environment detected, nothing to do")
        return False
    logger.info(
        "init_distributed: jax.distributed.initialize(coordinator=%s, num_processes=%s, "
        "process_id=%s) [%s]",
        coordinator_address, num_processes, process_id,
        "explicit" if explicit else (cluster or "auto-detect"),
    )
    extra = {}
    if coordinator_bind_address is not None:
        extra["coordinator_bind_address"] = coordinator_bind_address
    if initialization_timeout is not None:
        extra["initialization_timeout"] = int(initialization_timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=None if local_device_ids is None else list(local_device_ids),
        **extra,
    )
    return True
