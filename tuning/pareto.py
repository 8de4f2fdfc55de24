"""Pareto geometry of several objectives: fronts, crowding distance, hypervolume.

Everything here works on *losses*, an (n, m) array where lower is better in every column;
`losses(values, modes)` turns reported metrics ("max" or "min" each) into that form. The
MO-ASHA scheduler ranks the trials of a rung with `promotion_order`; the report marks the
front and measures it with `hypervolume`.

Definitions (Deb et al., 2002, NSGA-II): a dominates b if a <= b everywhere and a < b
somewhere; front 0 is the set no point dominates, front k the set no point outside fronts
< k dominates. The crowding distance of a point sums, over objectives, the gap between
its nearest neighbours in its front, normalised by the front's range; the front's extremes
get infinity, so a trade-off end is always kept.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MODES = ("max", "min")


def losses(values, modes: Sequence[str]) -> np.ndarray:
    """(n, m) metric values -> losses: "max" columns negated; NaN (a broken trial) -> +inf."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.shape[1] != len(modes):
        raise ValueError(f"expected an (n, {len(modes)}) array of objective values, got shape "
                         f"{values.shape}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"mode must be 'max' or 'min', got {bad[0]!r}")
    sign = np.array([-1.0 if m == "max" else 1.0 for m in modes])
    return np.where(np.isnan(values), np.inf, values * sign)


def domination_matrix(loss: np.ndarray) -> np.ndarray:
    """(n, n) bool: [i, j] is True when point i dominates point j."""
    le = (loss[:, None, :] <= loss[None, :, :]).all(-1)
    lt = (loss[:, None, :] < loss[None, :, :]).any(-1)
    return le & lt


def non_dominated_fronts(loss) -> np.ndarray:
    """(n,) int: the front of each point, 0 = the Pareto front (peeled front by front)."""
    loss = np.asarray(loss, dtype=float)
    dominates = domination_matrix(loss)
    front = np.full(len(loss), -1)
    k = 0
    while (front < 0).any():
        remaining = front < 0
        # a remaining point is in front k if no other remaining point dominates it
        current = remaining & ~dominates[remaining].any(0)
        front[current] = k
        k += 1
    return front


def crowding_distance(loss, front) -> np.ndarray:
    """(n,) float: each point's crowding distance within its own front.

    A point's neighbours on an objective are the nearest strictly smaller and strictly
    larger values in its front, so tied points get the same distance whatever their order
    (NSGA-II's sort-based version gives ties arbitrary, order-dependent values). An
    objective on which the front has no finite spread adds nothing.
    """
    loss, front = np.asarray(loss, dtype=float), np.asarray(front)
    distance = np.zeros(len(loss))
    for f in np.unique(front):
        members = np.flatnonzero(front == f)
        if len(members) <= 2:  # all of them are extremes
            distance[members] = np.inf
            continue
        for column in loss[members].T:
            spread = column.max() - column.min()
            if not np.isfinite(spread) or spread <= 0:
                continue
            for i, v in zip(members, column):
                below, above = column[column < v], column[column > v]
                if len(below) == 0 or len(above) == 0:
                    distance[i] = np.inf
                else:
                    distance[i] += (above.min() - below.max()) / spread
    return distance


def promotion_order(loss) -> np.ndarray:
    """(n,) int: how many points rank strictly ahead of each one, by front first and, within
    a front, larger crowding distance first. Tied points share a position."""
    loss = np.asarray(loss, dtype=float)
    front = non_dominated_fronts(loss)
    crowd = crowding_distance(loss, front)
    ahead = (front[None, :] < front[:, None]) | (
        (front[None, :] == front[:, None]) & (crowd[None, :] > crowd[:, None]))  # [i, j]: j ahead of i
    return ahead.sum(1)


def pareto_mask(loss) -> np.ndarray:
    """(n,) bool: the points of the Pareto front."""
    return non_dominated_fronts(loss) == 0


def hypervolume(loss, reference) -> float:
    """Volume of the region dominated by the points and bounded by `reference` (losses).

    Points not strictly better than the reference in every objective add nothing. Exact:
    a sweep for two objectives, slicing along the last objective above that (HSO, While et
    al., 2006), which is exponential in m but fine for the fronts of a search.
    """
    loss = np.asarray(loss, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if loss.ndim != 2 or loss.shape[1] != len(reference):
        raise ValueError(f"points of shape {loss.shape} do not match a reference point of "
                         f"{len(reference)} objectives")
    inside = loss[(loss < reference).all(1)]
    if len(inside) == 0:
        return 0.0
    return _hypervolume(inside[pareto_mask(inside)], reference)


def _hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:
        # sorted by the first loss, a front's second loss falls: each point adds the strip
        # between it and the next point's first loss
        points = points[np.argsort(points[:, 0])]
        best_y, volume = reference[1], 0.0
        for x, y in points:
            if y < best_y:
                volume += (reference[0] - x) * (best_y - y)
                best_y = y
        return float(volume)
    points = points[np.argsort(points[:, -1])]
    cuts = np.append(points[1:, -1], reference[-1])
    volume = 0.0
    for i in range(len(points)):
        depth = cuts[i] - points[i, -1]
        if depth > 0:
            head = points[: i + 1, :-1]
            volume += depth * _hypervolume(head[pareto_mask(head)], reference[:-1])
    return float(volume)


def confirmation_candidates(loss, top: int) -> np.ndarray:
    """Indices of the points worth confirming: with one objective the `top` best; with
    several the Pareto front, capped at `top` by crowding distance (the extremes first, so
    the trade-off's ends are kept). Ties keep the input order."""
    loss = np.asarray(loss, dtype=float)
    if loss.shape[1] == 1:
        return np.argsort(loss[:, 0], kind="stable")[:top]
    order = promotion_order(loss)
    members = np.flatnonzero(non_dominated_fronts(loss) == 0)
    return members[np.argsort(order[members], kind="stable")][:top]
