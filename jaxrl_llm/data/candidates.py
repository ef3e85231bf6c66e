"""Post-processing of sampled candidates: within-group dedup and length/finish filters.

After sampling G responses per prompt the data pipeline holds ``N = num_prompts · G``
candidates in group layout (the G responses of a prompt are contiguous:
candidate i belongs to group ``i // G``). This module decides which candidates to keep
(e.g. for rejection-sampling fine-tuning or best-of-n data) and counts why the others
were dropped. Candidates are decoded texts (``str``) or token-id sequences (lists,
tuples or 1-D integer arrays). Pure Python/numpy, no JAX.

Every dropped candidate is counted under exactly one reason, the first that applies in
this order: ``empty`` (length < min_length) → ``over_length`` (length > max_length) →
``unfinished`` (cut by the length limit, when asked) → ``duplicates`` (an identical
candidate was already kept earlier in the same group). Hence

  total = kept + empty + over_length + unfinished + duplicates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

Candidate = Any  # str | Sequence[int] | 1-D integer np.ndarray


@dataclasses.dataclass(frozen=True)
class CandidateStats:
    """Counts of kept and dropped candidates (each dropped one counted once).

    Attributes:
      total: number of candidates examined.
      duplicates: dropped because an identical candidate was kept earlier in the group.
      empty: dropped because length < min_length (for min_length=1: empty).
      over_length: dropped because length > max_length.
      unfinished: dropped because not finished (cut at the length limit) and
        ``drop_unfinished`` was set.
      kept: kept candidates.
    """

    total: int = 0
    duplicates: int = 0
    empty: int = 0
    over_length: int = 0
    unfinished: int = 0
    kept: int = 0

    def __post_init__(self):
        dropped = self.duplicates + self.empty + self.over_length + self.unfinished
        if self.kept + dropped != self.total:
            raise ValueError(f"CandidateStats counts do not add up to total={self.total}: {self}")

    def __add__(self, other: CandidateStats) -> CandidateStats:
        """Sum of two batches' counts (for accumulating over a run)."""
        return CandidateStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )

    @property
    def kept_fraction(self) -> float:
        """kept / total (0.0 when total is 0)."""
        return self.kept / self.total if self.total else 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Counts as a flat metrics dict, e.g. ``{"candidates/kept": 12, ...}``."""
        out = {prefix + f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out[prefix + "kept_fraction"] = self.kept_fraction
        return out


def _key(candidate: Candidate) -> Hashable:
    """A hashable identity for a candidate: the string itself or a tuple of ints."""
    if isinstance(candidate, str):
        return candidate
    if isinstance(candidate, np.ndarray):
        if candidate.ndim != 1:
            raise ValueError(f"token candidates must be 1-D, got shape {candidate.shape}")
        return tuple(candidate.tolist())
    try:
        return tuple(int(t) for t in candidate)
    except TypeError as err:
        raise ValueError(
            f"candidates must be str or sequences of token ids, got {type(candidate).__name__}"
        ) from err


def _check_groups(n: int, group_size: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"number of candidates ({n}) must be a multiple of group_size={group_size}")


def dedup_within_groups(
    candidates: Sequence[Candidate],
    group_size: int,
    *,
    key: Callable[[Candidate], Hashable] | None = None,
    valid: Sequence[bool] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first occurrence of each distinct candidate within each group.

    Candidates in different groups never count as duplicates of each other.

    Args:
      candidates: N candidates in group layout (str or token-id sequences).
      group_size: G ≥ 1; N must be a multiple of G.
      key: optional normalisation before comparing, e.g. ``str.strip``; default compares
        strings exactly and token sequences as tuples of ints.
      valid: optional [N] bool; invalid candidates are neither kept nor counted, so the
        first *valid* occurrence is the one kept.

    Returns:
      keep: [N] bool, True for the first (valid) occurrence of each distinct candidate.
      counts: [N] int64, for a kept candidate the number of valid occurrences of it in its
        group (its multiplicity); 0 for every candidate that is not kept. Per group,
        counts sum to the number of valid candidates.
    """
    n = len(candidates)
    _check_groups(n, group_size)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    if valid.shape != (n,):
        raise ValueError(f"valid must have shape ({n},), got {valid.shape}")
    key = key or _key
    keep = np.zeros(n, bool)
    counts = np.zeros(n, np.int64)
    for start in range(0, n, group_size):
        first_index: dict[Hashable, int] = {}
        for i in range(start, start + group_size):
            if not valid[i]:
                continue
            k = key(candidates[i])
            if k not in first_index:
                first_index[k] = i
                keep[i] = True
            counts[first_index[k]] += 1
    return keep, counts


def _lengths(candidates: Sequence[Candidate], lengths) -> np.ndarray:
    if lengths is None:
        return np.array([len(c) for c in candidates], np.int64)
    lengths = np.asarray(lengths, np.int64)
    if lengths.shape != (len(candidates),):
        raise ValueError(f"lengths must have shape ({len(candidates)},), got {lengths.shape}")
    return lengths


def filter_candidates(
    candidates: Sequence[Candidate],
    *,
    group_size: int | None = None,
    lengths: Sequence[int] | np.ndarray | None = None,
    finished: Sequence[bool] | np.ndarray | None = None,
    min_length: int = 1,
    max_length: int | None = None,
    drop_unfinished: bool = False,
    dedup: bool = True,
    key: Callable[[Candidate], Hashable] | None = None,
) -> tuple[np.ndarray, CandidateStats]:
    """Drop empty / over-length / unfinished candidates, then duplicates within groups.

    Reasons are checked in the order empty → over_length → unfinished → duplicate, and
    each dropped candidate is counted under the first that applies (see module doc).

    Args:
      candidates: N candidates in group layout (str or token-id sequences; a padded
        [N, T] token array works together with ``lengths``).
      group_size: G for within-group dedup (N must be a multiple of G); None treats
        the whole batch as one group.
      lengths: optional [N] int lengths (e.g. ``Rollout.lengths`` in tokens); default
        ``len(candidate)`` (characters for str, tokens for sequences). When given, token
        candidates are deduplicated on their first ``lengths[i]`` tokens (padding ignored).
      finished: optional [N] bool, True when the response ended with a stop token
        (``Rollout.finished``); required when ``drop_unfinished``.
      min_length: candidates with length < min_length are dropped as ``empty``.
      max_length: candidates with length > max_length are dropped (None: no limit).
      drop_unfinished: drop candidates with ``finished == False`` (length-cut).
      dedup: drop later copies of a candidate already kept in its group.
      key: normalisation for dedup comparisons (see ``dedup_within_groups``).

    Returns:
      keep: [N] bool mask of kept candidates.
      stats: CandidateStats with the counts.
    """
    n = len(candidates)
    if not isinstance(min_length, int) or min_length < 0:
        raise ValueError(f"min_length must be an int >= 0, got {min_length!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < min_length):
        raise ValueError(f"max_length must be None or an int >= min_length={min_length}, got {max_length!r}")
    if drop_unfinished and finished is None:
        raise ValueError("finished must be given when drop_unfinished=True")
    group_size = n if group_size is None else group_size
    if n:
        _check_groups(n, group_size)
    length = _lengths(candidates, lengths)

    empty = length < min_length
    over = ~empty & (length > max_length if max_length is not None else np.zeros(n, bool))
    unfinished = np.zeros(n, bool)
    if drop_unfinished:
        finished = np.asarray(finished, bool)
        if finished.shape != (n,):
            raise ValueError(f"finished must have shape ({n},), got {finished.shape}")
        unfinished = ~empty & ~over & ~finished
    valid = ~(empty | over | unfinished)
    if dedup and n:
        items = candidates
        if lengths is not None:  # token rows (e.g. padded Rollout.tokens): compare real tokens only
            items = [c if isinstance(c, str) else c[: int(m)] for c, m in zip(candidates, length)]
        keep, _ = dedup_within_groups(items, group_size, key=key, valid=valid)
    else:
        keep = valid.copy()
    stats = CandidateStats(
        total=n,
        duplicates=int((valid & ~keep).sum()),
        empty=int(empty.sum()),
        over_length=int(over.sum()),
        unfinished=int(unfinished.sum()),
        kept=int(keep.sum()),
    )
    return keep, stats


def group_kept_counts(keep: Sequence[bool] | np.ndarray, group_size: int) -> np.ndarray:
    """Number of kept candidates per group.

    Args:
      keep: [N] bool mask in group layout.
      group_size: G; N must be a multiple of G.

    Returns:
      [N // G] int64 counts (e.g. to skip groups with fewer than 2 left for GRPO).
    """
    keep = np.asarray(keep, bool)
    _check_groups(keep.shape[0], group_size)
    return keep.reshape(-1, group_size).sum(-1).astype(np.int64)
