"""Full-ranking evaluation as in the paper (section 5.1): HR@K and NDCG@K over all users,
over users whose target is a tail / head item, and by target popularity group; plus
Coverage@K and Tail_Coverage@K (eq. 15).

Batched and on the scores' device: `update` adds per-group sums, `compute` divides once.
A group without users (e.g. no target in "50+" on a small dataset) is left out of the
result rather than reported as 0 or NaN.
"""

import torch

from model.data import POPULARITY_GROUPS  # names of the indices in SequenceData.popularity_group

METRICS = ("hr", "ndcg")


def metric_name(split, group, metric, k):
    """E.g. metric_name("val", "tail", "ndcg", 10) == "val/tail/ndcg_10" (MLflow forbids '@')."""
    return f"{split}/{group}/{metric}_{k}"


class RankingEvaluator:
    """Accumulates ranking metrics over batches of users.

    tail_mask (n_items + 1,) bool and popularity_group (n_items + 1,) int, indexed by item id.
    update(scores (B, n_items + 1), targets (B,)): excluded items (seen items, padding
    column 0) must score -inf. The target's rank is the number of items scoring strictly
    higher (ties count in the target's favour); HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2).
    Ranks are found from the top max(K) items, exact wherever they are below max(K).
    """

    def __init__(self, tail_mask, popularity_group, ks=(5, 10, 20)):
        self.tail_mask = torch.as_tensor(tail_mask, dtype=torch.bool)
        self.popularity_group = torch.as_tensor(popularity_group, dtype=torch.long)
        self.ks = tuple(ks)
        self.groups = ("overall", "tail", "head") + tuple(f"pop_{g}" for g in POPULARITY_GROUPS)
        self.sums = None  # (groups, metrics * ks) float64, created on the first batch's device
        self.users = None  # (groups,)
        self.covered = None  # (ks, n_items + 1) bool: item appeared in some top-K list

    def update(self, scores, targets):
        device = scores.device
        if self.sums is None:
            self.tail_mask = self.tail_mask.to(device)
            self.popularity_group = self.popularity_group.to(device)
            self.sums = torch.zeros(len(self.groups), len(METRICS) * len(self.ks), dtype=torch.float64, device=device)
            self.users = torch.zeros(len(self.groups), dtype=torch.float64, device=device)
            self.covered = torch.zeros(len(self.ks), scores.size(1), dtype=torch.bool, device=device)
        # The target's rank only matters below max K: items beating the target are all in the
        # top max K unless its last one does too (then rank >= max K, a miss at every K). One
        # top-k pass serves the ranks and the coverage; no count over all items.
        top_scores, top = scores.topk(min(max(self.ks), scores.size(1)), dim=1)  # (B, max K)
        target = scores.gather(1, targets[:, None])  # (B, 1)
        rank = torch.where(top_scores[:, -1:] > target, top.size(1), (top_scores > target).sum(1, keepdim=True))  # (B, 1)
        hit = (rank < torch.tensor(self.ks, device=device)).double()  # (B, ks)
        ndcg = hit / torch.log2(rank + 2.0)  # (B, ks)
        tail = self.tail_mask[targets]  # (B,)
        pop = self.popularity_group[targets]  # (B,)
        member = torch.stack([torch.ones_like(tail), tail, ~tail]
                             + [pop == g for g in range(len(POPULARITY_GROUPS))], dim=1).double()  # (B, groups)
        self.sums += member.T @ torch.cat([hit, ndcg], dim=1)  # (groups, metrics * ks)
        self.users += member.sum(0)
        for i, k in enumerate(self.ks):
            self.covered[i, top[:, :k][top_scores[:, :k] > -torch.inf]] = True

    def compute(self, split):
        if self.sums is None:
            raise ValueError("RankingEvaluator.compute called before any update")
        sums, users = self.sums.tolist(), self.users.tolist()
        out = {}
        for g, group in enumerate(self.groups):
            if users[g] == 0:
                continue
            for m, metric in enumerate(METRICS):
                for i, k in enumerate(self.ks):
                    out[metric_name(split, group, metric, k)] = sums[g][m * len(self.ks) + i] / users[g]
        n_items, n_tail = len(self.tail_mask) - 1, int(self.tail_mask.sum())
        for i, k in enumerate(self.ks):
            out[f"{split}/coverage_{k}"] = int(self.covered[i, 1:].sum()) / n_items  # eq. (15)
            if n_tail:
                out[f"{split}/tail_coverage_{k}"] = int((self.covered[i] & self.tail_mask).sum()) / n_tail  # eq. (15)
        return out
