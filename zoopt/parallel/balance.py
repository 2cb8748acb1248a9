"""Cutting one step's coordinates into per-worker chunks of equal measured cost.

Pure numpy: no Dask, no torch. The parallel oracle feeds these functions the timings its
workers report; everything here can be tested (and reasoned about) without a cluster.

Costs are seconds. A parameter group (a layer's weights, say) is an index range
``[start, stop)`` of the flat vector; the cost model is seconds per coordinate of each group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GroupCosts",
    "group_bounds",
    "plan_probes",
    "predict_group_cost",
    "split_by_cost",
    "split_equal",
]


def split_equal(coords: np.ndarray, parts: int) -> list[np.ndarray]:
    """Cut ``coords`` (shape ``(k,)``) into at most ``parts`` contiguous, non-empty chunks
    whose sizes differ by at most one."""
    _check_parts(parts)
    coords = np.asarray(coords)
    if coords.size == 0:
        return []
    return [c for c in np.array_split(coords, min(int(parts), coords.size)) if c.size]


def split_by_cost(coords: np.ndarray, costs: np.ndarray, parts: int) -> list[np.ndarray]:
    """Cut ``coords`` into at most ``parts`` contiguous, non-empty chunks of near-equal cost.

    Args:
        coords: shape ``(k,)``, in the order the chunks should follow (sorted indices keep
            each worker's coordinates within few stages, which the torch engine reuses).
        costs: shape ``(k,)``, estimated seconds of each coordinate (>= 0).
        parts: number of chunks wanted (workers).

    Returns:
        chunks whose concatenation is ``coords``; each chunk's cost differs from
        ``sum(costs) / parts`` by at most the largest single cost.
    """
    coords = np.asarray(coords)
    costs = np.asarray(costs, dtype=np.float64)
    if coords.ndim != 1 or costs.shape != coords.shape:
        raise ValueError(
            f"coords and costs must be 1-D of the same length, got {coords.shape} and {costs.shape}"
        )
    _check_parts(parts)
    if costs.size and (not np.all(np.isfinite(costs)) or costs.min() < 0):
        bad = costs[~(np.isfinite(costs) & (costs >= 0))][0]
        raise ValueError(f"costs must be finite and >= 0, got {bad!r}")
    k = coords.shape[0]
    if k == 0:
        return []
    parts = min(int(parts), k)
    cum = np.cumsum(costs)
    total = cum[-1]
    if parts == 1 or total <= 0:
        return split_equal(coords, parts)
    # Chunk j ends after the coordinate where the running cost crosses total * j / parts;
    # of the two candidate cut points around each crossing, take the closer one.
    targets = total * np.arange(1, parts) / parts
    hi = np.searchsorted(cum, targets, side="left") + 1  # first cut with cum[cut-1] >= target
    lo = hi - 1
    lo_cost = np.where(lo > 0, cum[np.maximum(lo - 1, 0)], 0.0)
    hi_cost = cum[np.minimum(hi, k) - 1]
    cuts = np.unique(np.where(targets - lo_cost < hi_cost - targets, lo, hi))
    # a cut at 0 or k, or two equal cuts, leave an empty chunk: dropped (fewer workers busy)
    return [c for c in np.split(coords, cuts) if c.size]


def _check_parts(parts: int) -> None:
    if isinstance(parts, bool) or not isinstance(parts, int | np.integer) or parts < 1:
        raise ValueError(f"parts must be a positive integer, got {parts!r}")


def predict_group_cost(timings: Sequence[tuple[int, float]], n: int) -> float:
    """Seconds for one call on ``n`` coordinates of a group, from probe ``timings`` ``[(size,
    seconds), ...]``: the line ``a + b size`` through the smallest and largest size (``a, b
    >= 0``; the fastest of repeated sizes), or the per-coordinate rate of a single size."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n!r}")
    by_size: dict[int, float] = {}
    for size, seconds in timings:
        if size < 1 or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"probe timings need a size >= 1 and finite seconds >= 0, got {(size, seconds)!r}"
            )
        by_size[size] = min(seconds, by_size.get(size, math.inf))
    if not by_size:
        raise ValueError("no probe timings")
    if len(by_size) == 1:
        ((size, seconds),) = by_size.items()
        return seconds / size * n
    ordered = sorted(by_size.items())
    (n1, t1), (n2, t2) = ordered[0], ordered[-1]
    per_coord = max((t2 - t1) / (n2 - n1), 0.0)
    fixed = max(t1 - per_coord * n1, 0.0)
    return fixed + per_coord * n


def group_bounds(groups: Sequence[tuple[int, int]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Index ranges ``[(start, stop), ...]`` → sorted ``starts``, ``stops`` (shape ``(G,)``).

    Raises:
        TypeError: a group is not a ``(start, stop)`` pair of integers.
        ValueError: a range is empty or outside ``[0, dim)``, or two ranges overlap.
    """
    bounds = []
    for g in groups:
        try:
            start, stop = g
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a group must be a (start, stop) pair, got {g!r}") from exc
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in g):
            raise TypeError(f"a group must be a (start, stop) pair of integers, got {g!r}")
        start, stop = int(start), int(stop)
        if not 0 <= start < stop <= dim:
            raise ValueError(f"group range [{start}, {stop}) is not inside [0, dim={dim})")
        bounds.append((start, stop))
    bounds.sort()
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        if start < stop:
            raise ValueError(f"groups overlap at index {start}")
    starts = np.array([b[0] for b in bounds], dtype=np.int64)
    stops = np.array([b[1] for b in bounds], dtype=np.int64)
    return starts, stops


@dataclass(frozen=True)
class GroupCosts:
    """Measured cost of the coordinates of each parameter group (immutable: updates return
    a new model).

    ``starts``/``stops`` (shape ``(G,)``, sorted, disjoint): index range ``[start, stop)`` of
    each group; ``per_coord`` (shape ``(G,)``): seconds per coordinate when the group is
    evaluated in one call (group overheads amortized), NaN where not measured yet;
    ``provisional`` (shape ``(G,)``, bool): the value comes from a small probe only (per-call
    overhead inflates it), so the first timing of the group at its real size replaces it.
    """

    starts: np.ndarray
    stops: np.ndarray
    per_coord: np.ndarray
    provisional: np.ndarray | None = None

    @classmethod
    def unmeasured(cls, groups: Sequence[tuple[int, int]], dim: int) -> GroupCosts:
        """A model of ``groups`` (``(start, stop)`` ranges in ``[0, dim)``) with no timings."""
        starts, stops = group_bounds(groups, dim)
        return cls(starts, stops, np.full(starts.size, np.nan))

    def group_of(self, coords: np.ndarray) -> np.ndarray:
        """Group index of each coordinate (-1 outside every group), shape ``(k,)``."""
        g = np.searchsorted(self.starts, coords, side="right") - 1
        inside = (g >= 0) & (coords < self.stops[np.maximum(g, 0)])
        return np.where(inside, g, -1)

    def coordinate_costs(self, coords: np.ndarray) -> np.ndarray:
        """Estimated seconds of each coordinate, shape ``(k,)`` (unmeasured: the mean)."""
        measured = np.isfinite(self.per_coord)
        default = float(np.mean(self.per_coord[measured])) if measured.any() else 1.0
        known = np.where(measured, self.per_coord, default)
        g = self.group_of(coords)
        return np.where(g >= 0, known[np.maximum(g, 0)], default)

    def unmeasured_groups(self, coords: np.ndarray) -> np.ndarray:
        """Indices of the groups that ``coords`` touch and that have no cost yet, sorted."""
        ids = self.group_of(coords)
        present = np.unique(ids[ids >= 0])
        return present[~np.isfinite(self.per_coord[present])]

    def updated(
        self, samples: Sequence[tuple[int, int, float]], weight: float, provisional: bool = False
    ) -> GroupCosts:
        """Blend in timings ``(group, coordinates, seconds)``: new = (1-w) old + w measured;
        groups without a value, or with a provisional one, take the measurement."""
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        per_coord = self.per_coord.copy()
        flags = (
            np.zeros(per_coord.shape, dtype=bool)
            if self.provisional is None
            else self.provisional.copy()
        )
        seconds = np.zeros_like(per_coord)
        counts = np.zeros_like(per_coord)
        for g, n, t in samples:
            if g >= 0 and n > 0:
                seconds[g] += t
                counts[g] += n
        seen = counts > 0
        measured = seconds[seen] / counts[seen]
        old = per_coord[seen]
        keep_old = np.isfinite(old) & ~flags[seen]
        per_coord[seen] = np.where(keep_old, (1 - weight) * old + weight * measured, measured)
        flags[seen] = provisional
        return GroupCosts(self.starts, self.stops, per_coord, flags)


def plan_probes(
    costs: GroupCosts, coords: np.ndarray, probe_coords: int
) -> tuple[list[tuple[int, np.ndarray]], dict[int, int]]:
    """What to time for the groups of ``coords`` that have no cost yet.

    A group's call costs ``a + b n`` (a fixed part, e.g. the cached forward up to the layer,
    plus a part per coordinate), so one tiny probe overstates the per-coordinate cost of
    groups with a large fixed part. Each such group is probed at ``n1 = probe_coords`` and
    ``n2 = 4 n1`` of its coordinates (spread over the group's coordinates in ``coords``,
    capped at how many there are); :func:`predict_group_cost` then fits ``a`` and ``b``.

    Returns:
        ``[(group, probe coordinates), ...]`` and ``{group: its number of coordinates in
        coords}`` (the size to predict the cost at).
    """
    if isinstance(probe_coords, bool) or not isinstance(probe_coords, int) or probe_coords < 1:
        raise ValueError(f"probe_coords must be a positive integer, got {probe_coords!r}")
    group_ids = costs.group_of(coords)
    probes: list[tuple[int, np.ndarray]] = []
    sizes: dict[int, int] = {}
    for g in costs.unmeasured_groups(coords):
        members = coords[group_ids == g]
        sizes[int(g)] = members.size
        for n in sorted({min(probe_coords, members.size), min(4 * probe_coords, members.size)}):
            probes.append((int(g), members[np.linspace(0, members.size - 1, n).astype(np.int64)]))
    return probes, sizes
