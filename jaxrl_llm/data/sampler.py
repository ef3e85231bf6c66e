"""Deterministic, resumable batch order over a dataset, and a loader built on it.

``EpochSampler`` yields batches of item indices. The order of epoch ``e`` depends only
on ``(seed, e)`` (a permutation drawn from ``numpy.random.default_rng([seed, e])``), so
the sampler's whole state is ``(epoch, position)``: ``state_dict()`` after k batches,
``load_state_dict`` on a fresh sampler, and the next batches are exactly the same.

An optional ``group_fn`` turns an epoch's ordered indices into *units* (e.g. packed rows
of several examples); batches are then made of units. ``BatchLoader`` pairs a sampler
with a list of prepared items and a ``collate`` function that builds a batch from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Unit = Any  # an item index, or a tuple of item indices (a packed row)


class EpochSampler:
    """Batches of indices in an order set by (seed, epoch); resumable.

    Args:
      num_items: dataset size N (> 0).
      batch_size: B units per batch.
      seed: int seed of the shuffles.
      shuffle: permute items each epoch (else 0..N-1 every epoch).
      drop_last: drop the last incomplete batch of an epoch (keeps shapes static).
      num_epochs: stop after this many epochs (None: iterate forever).
      group_fn: maps an epoch's ordered indices (list[int]) to a list of units.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_epochs: int | None = None,
                 group_fn: Callable[[list[int]], list[Unit]] | None = None):
        if num_items <= 0:
            raise ValueError(f"num_items={num_items}; the dataset is empty.")
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size}; expected a positive int.")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs={num_epochs}; expected a positive int or None.")
        self.num_items, self.batch_size = int(num_items), int(batch_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.num_epochs, self.group_fn = num_epochs, group_fn
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[list[Unit]]] | None = None
        if not self.epoch_batches(0):
            raise ValueError(
                f"batch_size={batch_size} with drop_last=True leaves no full batch in an epoch of "
                f"{len(self._units(0))} units; lower batch_size or set drop_last=False.")

    def epoch_order(self, epoch: int) -> list[int]:
        """The item order of ``epoch`` (a function of seed and epoch only)."""
        if not self.shuffle:
            return list(range(self.num_items))
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_items).tolist()

    def _units(self, epoch: int) -> list[Unit]:
        order = self.epoch_order(epoch)
        return self.group_fn(order) if self.group_fn is not None else order

    def epoch_batches(self, epoch: int) -> list[list[Unit]]:
        """All batches of ``epoch`` (cached for the current epoch)."""
        if self._cache is None or self._cache[0] != epoch:
            units = self._units(epoch)
            b = self.batch_size
            stop = len(units) - len(units) % b if self.drop_last else len(units)
            self._cache = (epoch, [units[i:i + b] for i in range(0, stop, b)])
        return self._cache[1]

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self.epoch_batches(self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> list[Unit]:
        batches = self.epoch_batches(self.epoch)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            batches = self.epoch_batches(self.epoch)
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        self.position += 1
        return batches[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position" (batches already taken this epoch), "seed", "num_items"}."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resumes from ``state_dict()``; the seed and dataset size must match."""
        for key in ("seed", "num_items"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"state_dict {key}={state[key]} does not match this loader's {key}="
                    f"{getattr(self, key)}; the batch order would differ.")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"state_dict has negative epoch/position: {state}.")
        self.epoch, self.position = epoch, position


class BatchLoader:
    """Iterates batches ``collate(rows, longest)`` in sampler order.

    ``rows`` are the batch's units with indices replaced by items (``items[i]``, or a
    list of items for a packed unit); ``longest`` is ``max(row_length(row))`` over the
    GLOBAL batch (None without ``row_length``), so that every process pads to the same
    length. Subclasses prepare ``items`` (e.g. tokenized examples) and ``collate``.
    Iteration is infinite unless ``num_epochs`` is set; ``state_dict``/``load_state_dict``
    resume exactly.

    Multi-host: every process builds the same loader (same records and seed) with its
    ``process_index`` / ``process_count`` (e.g. ``jax.process_index()``,
    ``jax.process_count()``); all walk the same global order of ``batch_size`` units and
    each collates its contiguous slice of ``batch_size // process_count`` units.
    """

    def __init__(self, items: Sequence[Any], collate: Callable[[list[Any], int | None], Any],
                 batch_size: int, *, row_length: Callable[[Any], int] | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_epochs: int | None = None, group_fn=None, process_index: int = 0,
                 process_count: int = 1):
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}; "
                             "expected 0 <= process_index < process_count.")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} (global) must be divisible by "
                             f"process_count={process_count}.")
        if process_count > 1 and not drop_last:
            raise ValueError("process_count > 1 needs drop_last=True (every process needs a full slice).")
        self.items = list(items)
        self.collate, self.row_length = collate, row_length
        self.sampler = EpochSampler(len(self.items), batch_size, seed=seed, shuffle=shuffle,
                                    drop_last=drop_last, num_epochs=num_epochs, group_fn=group_fn)
        per = batch_size // process_count
        self._slice = slice(process_index * per, (process_index + 1) * per)

    def _gather(self, unit: Unit):
        if isinstance(unit, tuple):
            return [self.items[i] for i in unit]
        return self.items[unit]

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return self

    def __next__(self):
        rows = [self._gather(u) for u in next(self.sampler)]
        longest = max(self.row_length(r) for r in rows) if self.row_length is not None else None
        return self.collate(rows[self._slice], longest)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
