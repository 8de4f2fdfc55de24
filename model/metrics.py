"""Full-ranking evaluation as in the paper (section 5.1): HR@K and NDCG@K over all users,
over users whose target is a tail / head item, and by target popularity group; plus
Coverage@K and Tail_Coverage@K (eq. 15).

Batched and on the scores' device: `update` adds per-group sums, `compute` divides once.
A group without users (e.g. no target in "50+" on a small dataset) is left out of the
result rather than reported as 0 or NaN. With keep_ranks the evaluator also keeps each
user's rank, for per-user tests (UserRanks).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.cache import atomic_write
from model.data import POPULARITY_GROUPS  # names of the indices in SequenceData.popularity_group

METRICS = ("hr", "ndcg")


def metric_name(split, group, metric, k):
    """E.g. metric_name("val", "tail", "ndcg", 10) == "val/tail/ndcg_10" (MLflow forbids '@')."""
    return f"{split}/{group}/{metric}_{k}"


def hit_and_ndcg(rank: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HR@K = [rank < K] and NDCG@K = [rank < K] / log2(rank + 2) of 0-based ranks (one
    relevant item): rank (B, 1), ks (K,) -> two (B, K) float64."""
    hit = (rank < ks).double()
    return hit, hit / torch.log2(rank + 2.0)


@dataclass
class UserRanks:
    """The target's 0-based rank per evaluated user, for paired per-user tests."""
    users: np.ndarray  # (U,) int64, index of the evaluated user in data.sequences
    ranks: np.ndarray  # (U,) int64, rank of the target among all items (seen items excluded as evaluate() does)
    tail: np.ndarray  # (U,) bool, the target is a tail item under that split's head/tail rule

    def __post_init__(self):
        self.users = np.asarray(self.users, dtype=np.int64)
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.tail = np.asarray(self.tail, dtype=bool)
        if not self.users.ndim == 1 or not self.users.shape == self.ranks.shape == self.tail.shape:
            raise ValueError(f"UserRanks: users, ranks and tail must be equal-length vectors, got "
                             f"shapes {self.users.shape}, {self.ranks.shape}, {self.tail.shape}")

    def metrics(self, k: int) -> dict[str, np.ndarray]:
        """Per-user `hr_k` and `ndcg_k` (U,) float64; their means are evaluate()'s overall metrics."""
        hit, ndcg = hit_and_ndcg(torch.tensor(self.ranks)[:, None], torch.tensor([k]))
        return {f"hr_{k}": hit[:, 0].numpy(), f"ndcg_{k}": ndcg[:, 0].numpy()}

    def save(self, path) -> None:
        """One .npz file (written whole or not at all), whatever the name's suffix."""
        atomic_write(Path(path), lambda f: np.savez(f, users=self.users, ranks=self.ranks, tail=self.tail))

    @classmethod
    def load(cls, path) -> "UserRanks":
        with np.load(path, allow_pickle=False) as arrays:
            return cls(arrays["users"], arrays["ranks"], arrays["tail"])


class RankingEvaluator:
    """Accumulates ranking metrics over batches of users.

    tail_mask (n_items + 1,) bool and popularity_group (n_items + 1,) int, indexed by item id.
    update(scores (B, n_items + 1), targets (B,)): excluded items (seen items, padding
    column 0) must score -inf. The target's rank is the number of items scoring strictly
    higher (ties count in the target's favour); HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2).
    Ranks are found from the top max(K) items, exact wherever they are below max(K).
    keep_ranks: also keep every user's exact rank among all items, for `ranks()`.
    """

    def __init__(self, tail_mask, popularity_group, ks=(5, 10, 20), keep_ranks=False):
        self.tail_mask = torch.as_tensor(tail_mask, dtype=torch.bool)
        self.popularity_group = torch.as_tensor(popularity_group, dtype=torch.long)
        self.ks = tuple(ks)
        self.groups = ("overall", "tail", "head") + tuple(f"pop_{g}" for g in POPULARITY_GROUPS)
        self.sums = None  # (groups, metrics * ks) float64, created on the first batch's device
        self.users = None  # (groups,)
        self.covered = None  # (ks, n_items + 1) bool: item appeared in some top-K list
        self.kept = [] if keep_ranks else None  # (B,) exact ranks of each batch

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
        hit, ndcg = hit_and_ndcg(rank, torch.tensor(self.ks, device=device))  # (B, ks) each
        if self.kept is not None:  # one more pass over the scores, only when ranks are kept
            self.kept.append((scores > target).sum(1))
        tail = self.tail_mask[targets]  # (B,)
        pop = self.popularity_group[targets]  # (B,)
        member = torch.stack([torch.ones_like(tail), tail, ~tail]
                             + [pop == g for g in range(len(POPULARITY_GROUPS))], dim=1).double()  # (B, groups)
        self.sums += member.T @ torch.cat([hit, ndcg], dim=1)  # (groups, metrics * ks)
        self.users += member.sum(0)
        for i, k in enumerate(self.ks):
            self.covered[i, top[:, :k][top_scores[:, :k] > -torch.inf]] = True

    def ranks(self) -> np.ndarray:
        """(U,) int64 exact 0-based rank of each user's target, in update order."""
        if self.kept is None:
            raise ValueError("RankingEvaluator.ranks needs keep_ranks=True")
        return torch.cat(self.kept).cpu().numpy() if self.kept else np.zeros(0, np.int64)

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
