"""Pareto fronts, crowding distance and hypervolume against brute-force computations."""

import functools
import itertools

import numpy as np
import pytest

from tuning.pareto import (confirmation_candidates, crowding_distance, hypervolume, losses,
                           non_dominated_fronts, pareto_mask, promotion_order)


def brute_fronts(points):
    """Front of p = 0 if nothing dominates p, else 1 + the largest front among its dominators
    (the longest domination chain ending at p), written with plain loops."""
    points = [tuple(p) for p in points]

    def dominates(a, b):
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    @functools.lru_cache(maxsize=None)
    def front(i):
        fronts = [front(j) for j in range(len(points)) if dominates(points[j], points[i])]
        return 1 + max(fronts) if fronts else 0

    return [front(i) for i in range(len(points))]


def textbook_crowding(points):
    """NSGA-II's sort-based crowding distance of ONE front of distinct values (Deb 2002)."""
    n, m = len(points), len(points[0])
    distance = [0.0] * n
    for k in range(m):
        order = sorted(range(n), key=lambda i: points[i][k])
        lo, hi = points[order[0]][k], points[order[-1]][k]
        distance[order[0]] = distance[order[-1]] = float("inf")
        for a, i, b in zip(order, order[1:], order[2:]):
            distance[i] += (points[b][k] - points[a][k]) / (hi - lo)
    return distance


def grid_hypervolume(points, reference):
    """Exact volume of the union of boxes [p, reference] by cutting space at every coordinate
    and adding the cells some point dominates."""
    points = [p for p in points if all(x < r for x, r in zip(p, reference))]
    axes = [sorted({p[k] for p in points} | {reference[k]}) for k in range(len(reference))]
    volume = 0.0
    for cell in itertools.product(*[range(len(a) - 1) for a in axes]):
        low = [axes[k][c] for k, c in enumerate(cell)]
        if any(all(x <= l for x, l in zip(p, low)) for p in points):
            volume += np.prod([axes[k][c + 1] - axes[k][c] for k, c in enumerate(cell)])
    return volume


def test_losses_negates_max_columns_and_makes_nan_worst():
    out = losses([[0.2, 3.0], [np.nan, 1.0]], ["max", "min"])
    np.testing.assert_array_equal(out, [[-0.2, 3.0], [np.inf, 1.0]])
    with pytest.raises(ValueError, match="mode"):
        losses([[1.0]], ["maximise"])
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        losses([1.0, 2.0], ["max", "max"])


def test_fronts_by_hand():
    # (1,4) (2,2) (4,1) trade off; (3,3) is dominated by (2,2) only; (4,4) by all of them
    pts = [[1, 4], [2, 2], [4, 1], [3, 3], [4, 4], [2, 2]]
    assert non_dominated_fronts(pts).tolist() == [0, 0, 0, 1, 2, 0]  # a duplicate is not dominated
    assert pareto_mask(pts).tolist() == [True, True, True, False, False, True]


@pytest.mark.parametrize("m", [2, 3, 4])
def test_fronts_match_brute_force(m):
    rng = np.random.default_rng(m)
    for _ in range(20):
        pts = rng.integers(0, 5, size=(rng.integers(1, 25), m)).astype(float)  # many ties
        assert non_dominated_fronts(pts).tolist() == brute_fronts(pts)


def test_crowding_matches_nsga2_on_distinct_values():
    rng = np.random.default_rng(0)
    for m in (2, 3):
        for _ in range(20):
            pts = rng.random((rng.integers(3, 15), m))
            front = non_dominated_fronts(pts)
            got = crowding_distance(pts, front)
            for f in np.unique(front):
                idx = np.flatnonzero(front == f)
                if len(idx) < 3:
                    assert np.isinf(got[idx]).all()  # only extremes
                    continue
                np.testing.assert_allclose(got[idx], textbook_crowding(pts[idx].tolist()))


def test_crowding_by_hand_gives_ties_equal_distances():
    # one front: x = 0, 1, 1, 3 and y = 3, 2, 2, 0 (the middle point twice)
    pts = [[0, 3], [1, 2], [1, 2], [3, 0]]
    d = crowding_distance(pts, [0, 0, 0, 0])
    # the two copies: gap on x (3 - 0) / 3 plus gap on y (3 - 0) / 3 = 2 each
    assert d.tolist() == [np.inf, 2.0, 2.0, np.inf]
    # an objective without spread says nothing: only x separates these
    assert crowding_distance([[0, 5], [1, 5], [2, 5]], [0, 0, 0]).tolist() == [np.inf, 1.0, np.inf]


def test_promotion_order_front_first_then_crowding():
    # front 0: (0,4) (1,3) (3,1) (4,0); (1,3) and (3,1) both have crowding 3/4 + 3/4 = 1.5;
    # (2,3.5) is dominated by (1,3) only; (5,5) by everything
    pts = [[0, 4], [1, 3], [3, 1], [4, 0], [5, 5], [2, 3.5]]
    front = non_dominated_fronts(pts)
    assert front.tolist() == [0, 0, 0, 0, 2, 1]
    order = promotion_order(pts)
    assert order[[0, 3]].tolist() == [0, 0]        # extremes first, tied
    assert order[[1, 2]].tolist() == [2, 2]        # equal crowding 1.5: tied behind them
    assert order[5] == 4 and order[4] == 5         # then the next fronts
    # brute force: positions count the points strictly ahead by (front, -crowding)
    crowd = crowding_distance(pts, front)
    key = list(zip(front, -crowd))
    assert order.tolist() == [sum(k2 < k1 for k2 in key) for k1 in key]


def test_hypervolume_by_hand():
    # 2-D losses (1,3) (2,2) (3,1) against (4,4): 3 + 2 + 1 = 6 unit squares, 3x1 + 2x1 + 1x1
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    # dominated and out-of-reference points add nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]], [4, 4]) == pytest.approx(6.0)
    assert hypervolume([[5, 5]], [4, 4]) == 0.0
    # 3-D against (3,3,3): one box 2x2x2; two boxes 3x1x1 overlapping in a unit cube
    assert hypervolume([[1, 1, 1]], [3, 3, 3]) == pytest.approx(8.0)
    assert hypervolume([[0, 2, 2], [2, 0, 2]], [3, 3, 3]) == pytest.approx(3 + 3 - 1)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_hypervolume_matches_grid_brute_force(m):
    rng = np.random.default_rng(10 + m)
    for _ in range(15):
        pts = rng.random((rng.integers(1, 9), m))
        ref = np.full(m, 0.9)
        assert hypervolume(pts, ref) == pytest.approx(grid_hypervolume(pts.tolist(), ref.tolist()))


def test_hypervolume_rejects_mismatched_reference():
    with pytest.raises(ValueError, match="reference point of 3"):
        hypervolume([[1, 2]], [1, 2, 3])


def test_confirmation_candidates():
    # one objective: the best `top`, ties in input order
    assert confirmation_candidates([[3.0], [1.0], [2.0], [1.0]], 3).tolist() == [1, 3, 2]
    # two objectives: the front only, even when it is smaller than `top`...
    assert confirmation_candidates([[1, 4], [2, 2], [3, 3]], 3).tolist() == [0, 1]
    # ...and capped by crowding: extremes (0 and 3) first, then the less crowded (1: gaps
    # 3.5/4 + 3.4/4 around it) before the more crowded (2: gaps 2/4 + 2/4)
    pts = [[0, 4], [2, 2], [3.5, 0.6], [4, 0], [5, 5]]
    assert confirmation_candidates(pts, 3).tolist() == [0, 3, 1]
