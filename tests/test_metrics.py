"""RankingEvaluator and UserRanks against hand-written values and a brute-force ranking by
sorting."""

import math

import numpy as np
import pytest
import torch

from model.data import POPULARITY_GROUPS
from model.metrics import RankingEvaluator, UserRanks, metric_name

INF = float("inf")


def test_hand_written_case():
    tail = torch.tensor([False, True, False, True, True])
    groups = torch.tensor([-1, 0, 4, 0, 1])
    scores = torch.tensor([[-INF, 0.9, 0.1, 0.5, 0.5],     # target 3: only item 1 scores higher -> rank 1
                           [-INF, -INF, 0.3, 0.1, 0.2]])   # target 2: item 1 seen (-inf) -> rank 0
    ev = RankingEvaluator(tail, groups, ks=(1, 2))
    ev.update(scores, torch.tensor([3, 2]))
    out = ev.compute("test")
    assert out["test/overall/hr_1"] == pytest.approx(0.5)
    assert out["test/overall/hr_2"] == pytest.approx(1.0)
    assert out["test/overall/ndcg_2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    assert out["test/tail/hr_1"] == 0.0 and out["test/tail/ndcg_2"] == pytest.approx(1 / math.log2(3))
    assert out["test/head/ndcg_1"] == 1.0
    assert out["test/pop_1-4/hr_1"] == 0.0 and out["test/pop_50+/hr_1"] == 1.0
    assert "test/pop_5-9/hr_1" not in out  # no user's target in that group: omitted, not 0
    # top-1 lists: {1}, {2}; top-2: {1, 3 or 4}, {2, 4}
    assert out["test/coverage_1"] == pytest.approx(2 / 4)
    assert out["test/tail_coverage_1"] == pytest.approx(1 / 3)


def sorted_order(s, t):
    """Every item of one user's scores `s`, best first, the target `t` first among its ties."""
    return sorted(range(len(s)), key=lambda j: (-s[j], j != t))


def brute_force(scores, targets, tail, groups, ks):
    """Rank by sorting each user's items, the target placed first among its ties."""
    n_items = scores.shape[1] - 1
    per_group = {}
    covered = {k: set() for k in ks}
    for s, t in zip(scores.tolist(), targets.tolist()):
        order = sorted_order(s, t)
        rank = order.index(t)
        names = ["overall", "tail" if tail[t] else "head", f"pop_{POPULARITY_GROUPS[groups[t]]}"]
        for name in names:
            per_group.setdefault(name, []).append(rank)
        for k in ks:
            covered[k].update(j for j in order[:k] if s[j] != -INF)
    out = {}
    for name, ranks in per_group.items():
        for k in ks:
            out[metric_name("val", name, "hr", k)] = sum(r < k for r in ranks) / len(ranks)
            out[metric_name("val", name, "ndcg", k)] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    tail_items = {j for j in range(1, n_items + 1) if tail[j]}
    for k in ks:
        out[f"val/coverage_{k}"] = len(covered[k]) / n_items
        out[f"val/tail_coverage_{k}"] = len(covered[k] & tail_items) / len(tail_items)
    return out


def random_case(seed, ties, levels=6):
    g = torch.Generator().manual_seed(seed)
    n_items, n_users = 40, 57
    tail = torch.rand(n_items + 1, generator=g) < 0.7
    tail[0] = False
    groups = torch.randint(0, 4, (n_items + 1,), generator=g)  # group "50+" stays empty
    groups[0] = -1
    if ties:
        scores = torch.randint(0, levels, (n_users, n_items + 1), generator=g).float()
    else:
        scores = torch.randn(n_users, n_items + 1, generator=g)
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g)
    seen = torch.rand(n_users, n_items + 1, generator=g) < 0.3
    seen[torch.arange(n_users), targets] = False
    seen[:, 0] = True
    scores[seen] = -INF
    return scores, targets, tail, groups


def evaluate(scores, targets, tail, groups, ks, batch=16, keep_ranks=False):
    ev = RankingEvaluator(tail, groups, ks, keep_ranks=keep_ranks)
    for start in range(0, len(targets), batch):
        ev.update(scores[start:start + batch], targets[start:start + batch])
    return (ev.compute("val"), ev.ranks()) if keep_ranks else ev.compute("val")


@pytest.mark.parametrize("seed", [0, 1])
def test_hr_ndcg_with_ties_match_brute_force(seed):
    scores, targets, tail, groups = random_case(seed, ties=True)
    ks = (1, 5, 10)
    got = evaluate(scores, targets, tail, groups, ks)
    want = brute_force(scores, targets, tail, groups, ks)
    for name, value in want.items():
        if "coverage" not in name:  # top-K membership among ties is arbitrary
            assert got[name] == pytest.approx(value), name
    assert not any("pop_50+" in name for name in got)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_with_the_last_of_the_top_k_match_brute_force(seed):
    """Three score levels: most targets tie with the max-K-th best item, many rank just beyond it."""
    scores, targets, tail, groups = random_case(seed, ties=True, levels=3)
    ks = (1, 5, 10)
    top_k_last = scores.topk(10, dim=1).values[:, -1]
    target_scores = scores[torch.arange(len(targets)), targets]
    assert (top_k_last == target_scores).sum() >= 10 and (top_k_last > target_scores).sum() >= 10
    got = evaluate(scores, targets, tail, groups, ks)
    for name, value in brute_force(scores, targets, tail, groups, ks).items():
        if "coverage" not in name:
            assert got[name] == pytest.approx(value), name


@pytest.mark.parametrize("seed", [0, 1])
def test_everything_matches_brute_force_without_ties(seed):
    scores, targets, tail, groups = random_case(seed, ties=False)
    ks = (5, 10, 20)
    got = evaluate(scores, targets, tail, groups, ks)
    want = brute_force(scores, targets, tail, groups, ks)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value), name


def test_excluded_items_are_never_ranked_or_covered():
    scores = torch.full((2, 11), -INF)
    scores[0, [2, 5, 7]] = torch.tensor([0.1, 0.2, 0.3])
    scores[1, [3]] = -5.0
    ev = RankingEvaluator(torch.ones(11, dtype=torch.bool).index_fill(0, torch.tensor([0]), False),
                          torch.zeros(11, dtype=torch.long), ks=(5,))
    ev.update(scores, torch.tensor([2, 3]))
    out = ev.compute("test")
    assert out["test/overall/hr_5"] == 1.0  # item 2 is third of three candidates, item 3 the only one
    assert out["test/overall/ndcg_5"] == pytest.approx((1 / math.log2(4) + 1) / 2)
    assert out["test/coverage_5"] == pytest.approx(4 / 10)  # {2, 5, 7, 3}: never a -inf item


def test_compute_before_update_fails():
    with pytest.raises(ValueError):
        RankingEvaluator(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long)).compute("val")


# ---------------------------------------------------------------- per-user ranks

@pytest.mark.parametrize("seed, levels", [(0, 3), (1, 6), (2, None)])
def test_kept_ranks_are_exact_over_all_items(seed, levels):
    """Ranks by sorting every user's items, also far beyond max K (where the metrics only
    need to know 'a miss'); ties, excluded items and batches as in evaluation."""
    scores, targets, tail, groups = random_case(seed, ties=levels is not None, levels=levels or 6)
    got, ranks = evaluate(scores, targets, tail, groups, ks=(1, 5), keep_ranks=True)
    want = [sorted_order(s, t).index(t) for s, t in zip(scores.tolist(), targets.tolist())]
    assert ranks.dtype == np.int64 and ranks.tolist() == want
    assert max(want) > 5  # ranks beyond max K are kept exactly
    # per-user metrics from the kept ranks average to the evaluator's, overall and tail
    per_user = UserRanks(np.arange(len(targets)), ranks, tail[targets].numpy())
    is_tail = per_user.tail
    for k in (1, 5):
        for metric, values in per_user.metrics(k).items():
            assert values.mean() == pytest.approx(got[f"val/overall/{metric}"])
            assert values[is_tail].mean() == pytest.approx(got[f"val/tail/{metric}"])
            assert values[~is_tail].mean() == pytest.approx(got[f"val/head/{metric}"])


def test_ranks_need_keep_ranks():
    ev = RankingEvaluator(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long))
    ev.update(torch.tensor([[-INF, 1.0, 2.0]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="keep_ranks"):
        ev.ranks()


def test_user_ranks_metrics_by_hand():
    ranks = UserRanks(users=[4, 0, 7, 2], ranks=[0, 1, 9, 10], tail=[True, False, False, True])
    m = ranks.metrics(10)
    assert set(m) == {"hr_10", "ndcg_10"}
    assert m["hr_10"].tolist() == [1.0, 1.0, 1.0, 0.0]
    assert m["ndcg_10"] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0])
    assert ranks.metrics(1)["hr_1"].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_user_ranks_save_and_load(tmp_path):
    ranks = UserRanks(np.array([3, 1, 8]), np.array([0, 250, 7]), np.array([True, False, True]))
    path = tmp_path / "ranks"  # no .npz suffix: saved under exactly this name
    ranks.save(path)
    back = UserRanks.load(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ranks"]
    for name in ("users", "ranks", "tail"):
        assert getattr(back, name).tolist() == getattr(ranks, name).tolist()
    assert back.users.dtype == np.int64 and back.ranks.dtype == np.int64 and back.tail.dtype == bool


def test_user_ranks_refuse_vectors_of_different_lengths():
    with pytest.raises(ValueError, match=r"shapes \(2,\), \(3,\), \(2,\)"):
        UserRanks([1, 2], [0, 1, 2], [True, False])
