"""Asynchronous sampling for the RL trainers (GRPO family, PPO): where the sampler runs,
and how far ahead of the trainer it may run.

**Placement** (``config.placement``):

* ``"colocated"`` (default): sampler and trainer share the run's mesh and take turns.
* ``"disaggregated"``: the sampler gets a sub-mesh of its own (the last
  ``sampler_mesh.num_devices`` devices, default half of them; shaped by ``sampler_mesh``)
  and the trainer the rest (shaped by ``mesh``; with several processes each process gives
  both roles devices). After every update the new weights move
  to the sampler with one resharding ``jax.device_put`` (device to device, no host round
  trip), and every sample carries the version of the weights it was drawn with.

**Staleness** (``config.max_staleness`` k): a sampler thread samples step j with the
policy of the step at which j was submitted, at most k steps ahead of the trainer, so a
batch is at most k policy versions old. k = 0 is the synchronous run (sampled in the
trainer's thread, bit-identical to it). The pipeline never samples across a checkpoint
(it drains before one), so a resumed run samples exactly what an uninterrupted one does:
in-flight samples are regenerated deterministically, never checkpointed. Step keys come
from the same chain of ``state["rng"]`` splits as in a synchronous run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxrl_llm.parallel.placement import MeshConfig, Placement
from jaxrl_llm.train.policy import model_config_of

__all__ = ["PLACEMENTS", "RolePlacements", "SamplePipeline", "check_async_fields", "make_role_placements"]

PLACEMENTS = ("colocated", "disaggregated")


def check_async_fields(config: Any) -> None:
    """Checks ``placement``, ``sampler_mesh`` and ``reward_workers`` of a trainer config."""
    if config.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {config.placement!r}")
    if not isinstance(config.sampler_mesh, MeshConfig):
        raise ValueError(f"sampler_mesh must be a MeshConfig, got {type(config.sampler_mesh).__name__}")
    if config.placement == "colocated" and not config.sampler_mesh.is_default:
        raise ValueError("sampler_mesh is set but placement='colocated' samples on the trainer's mesh; "
                         "set placement='disaggregated' to give the sampler devices of its own")
    workers = config.reward_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"reward_workers: expected an int >= 1 (threads scoring a batch), got {workers!r}")


def _split_devices(sampler_mesh: MeshConfig) -> tuple[list[jax.Device], list[jax.Device]]:
    """(trainer devices, sampler devices). One process: the sampler takes the last
    devices. Several processes: each process gives the sampler its last
    ``num_devices / process_count`` devices, so both sub-meshes span every process and
    every process takes part in both roles' programs (SPMD)."""
    devices = jax.devices()
    n = sampler_mesh.num_devices if sampler_mesh.num_devices is not None else len(devices) // 2
    if len(devices) < 2 or not 1 <= n < len(devices):
        raise ValueError(
            f"placement='disaggregated' needs devices for both roles: sampler_mesh.num_devices={n} of "
            f"{len(devices)} visible devices leaves {len(devices) - n} for the trainer (use 1 .. "
            f"{len(devices) - 1}, or placement='colocated')")
    processes = jax.process_count()
    if processes == 1:
        return devices[: len(devices) - n], devices[len(devices) - n :]
    if n % processes:
        raise ValueError(f"sampler_mesh.num_devices={n} must divide by the {processes} processes: each process "
                         "gives the sampler the same number of its devices")
    trainer, sampler = [], []
    for p in range(processes):
        local = [d for d in devices if d.process_index == p]
        trainer += local[: len(local) - n // processes]
        sampler += local[len(local) - n // processes :]
    return trainer, sampler


@dataclasses.dataclass(frozen=True)
class RolePlacements:
    """The trainer's placement and the sampler's (the same object when colocated)."""

    trainer: Placement
    sampler: Placement

    @property
    def disaggregated(self) -> bool:
        return self.sampler is not self.trainer

    def to_sampler(self, params: Any) -> Any:
        """The sampler's copy of trainer-placed ``params`` (an nnx.State or pytree):
        resharded onto the sampler's mesh by one ``jax.device_put``; ``params`` itself
        when colocated. With several processes (where JAX reshards only between equal
        device sets) each array is first gathered on the trainer's mesh, then each
        process copies the slices its sampler devices hold from its own devices: device
        to device, one array at a time."""
        if not self.disaggregated:
            return params
        if jax.process_count() == 1:
            return self.sampler.place(params)
        return jax.tree.map(_put_across_device_sets, params, self.sampler.shardings(params))


def _put_across_device_sets(x: jax.Array, target: NamedSharding) -> jax.Array:
    """``x`` (on the trainer's devices of every process) in ``target`` (the sampler's)."""
    gathered = jax.device_put(x, NamedSharding(x.sharding.mesh, PartitionSpec()))  # same devices: allowed
    local = gathered.addressable_data(0)
    shards = [jax.device_put(local[index], device)
              for device, index in target.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


def make_role_placements(config: Any, policy: Any, trainer_rows: dict[str, int],
                         sampler_rows: dict[str, int]) -> RolePlacements:
    """The placements of ``config.placement`` for ``policy``; ``*_rows`` name the row
    counts each role splits over its batch axes (``{config field: rows}``)."""
    model_config = model_config_of(policy)
    if config.placement == "colocated":
        placement = Placement.create(config.mesh, rows={**sampler_rows, **trainer_rows}, model_config=model_config)
        return RolePlacements(placement, placement)
    trainer_devices, sampler_devices = _split_devices(config.sampler_mesh)
    sampler_mesh = dataclasses.replace(config.sampler_mesh, num_devices=None)
    return RolePlacements(
        Placement.create(config.mesh, rows=trainer_rows, model_config=model_config, devices=trainer_devices),
        Placement.create(sampler_mesh, rows=sampler_rows, model_config=model_config, devices=sampler_devices),
    )


class SamplePipeline:
    """Samples the steps of a run, up to ``config.max_staleness`` steps ahead of the trainer.

    ``sample(step, key, policy) -> drawn`` samples and scores one step with ``policy``, the
    sampler's copy of the model, and ``key``, on the sampler's devices; it runs in a
    sampler thread when ``max_staleness`` > 0, so it must return everything it reads or
    counts rather than share it. ``get(step, params)`` returns ``(drawn, version, rng)``
    for ``step``: what was sampled, the step whose policy sampled it (``step - version``
    is the staleness) and the state rng after ``step``. ``params`` is a function giving
    the trainer's current (full) policy parameters; it is called, and the weights moved
    to the sampler (``RolePlacements.to_sampler``), only when a step is submitted.

    Args:
      sample: the sampling function.
      config: the trainer config (``max_staleness``, ``run.total_steps``,
        ``run.checkpoint_every``: nothing is sampled across a checkpoint).
      roles: the run's placements.
      split: the policy as (graphdef, params, rest); its ``rest`` is moved to the sampler
        once.
      start: the first step of this (possibly resumed) run.
      rng: the train state's rng at ``start`` (key data).
    """

    def __init__(self, sample: Callable[[int, Any, Any], Any], config: Any, roles: RolePlacements, split: Any, *,
                 start: int, rng: Any, name: str = "sampler"):
        max_staleness = config.max_staleness
        if max_staleness and jax.process_count() > 1:
            # Every process must issue the same collectives in the same order; the sampler
            # thread's (sampling on the mesh, gathering the rollout) would interleave with
            # the trainer's in a different order on each process and hang or abort.
            raise ValueError(
                f"max_staleness={max_staleness}: asynchronous sampling runs in one process only (this run has "
                f"{jax.process_count()}); use max_staleness=0 (placement='disaggregated' works with several "
                "processes)")
        self.sample = sample
        self.max_staleness = max_staleness
        self.total_steps = config.run.total_steps
        self.checkpoint_every = config.run.checkpoint_every
        self.roles = roles
        self._sampler_split = split._replace(rest=roles.to_sampler(split.rest))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if max_staleness else None
        self._pending: dict[int, tuple[Future, int]] = {}  # step -> (future, policy version)
        self._rng_before = {start: jax.random.wrap_key_data(jnp.asarray(rng))}  # step -> state rng at its start
        self._step_keys: dict[int, Any] = {}  # step -> its sampling key

    def _key(self, j: int) -> tuple[Any, Any]:
        """(rng after step j, sampling key of step j), from the chain of splits."""
        while j + 1 not in self._rng_before:
            last = max(self._rng_before)
            self._rng_before[last + 1], self._step_keys[last] = jax.random.split(self._rng_before[last])
        return self._rng_before[j + 1], self._step_keys[j]

    def _checkpointed_after(self, j: int) -> bool:
        return bool(self.checkpoint_every) and (j + 1) % self.checkpoint_every == 0

    def _sampler_key(self, j: int) -> Any:
        """Step j's sampling key, like the weights, on the sampler's devices."""
        return self.roles.to_sampler(self._key(j)[1])

    def get(self, step: int, params: Callable[[], Any]) -> tuple[Any, int, Any]:
        rng, _ = self._key(step)
        for old in [k for k in self._step_keys if k < step]:
            self._rng_before.pop(old, None)
            self._step_keys.pop(old)

        def policy():
            return self._sampler_split.merge(self.roles.to_sampler(params()))

        if self._executor is None:
            return self.sample(step, self._sampler_key(step), policy()), step, rng
        current = None
        ahead = step
        while ahead <= min(step + self.max_staleness, self.total_steps - 1):
            if ahead not in self._pending:
                current = policy() if current is None else current
                self._pending[ahead] = (self._executor.submit(self.sample, ahead, self._sampler_key(ahead), current), step)
            if self._checkpointed_after(ahead):  # nothing is sampled across a checkpoint
                break
            ahead += 1
        future, version = self._pending.pop(step)
        return future.result(), version, rng

    def close(self) -> None:
        """Stops the sampler thread (pending samples are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
