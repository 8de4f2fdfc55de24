"""MELT (Kim et al., SIGIR 2023): mutual enhancement of long-tailed users and items.

Users are split by training-sequence length, items by training frequency (head: above the
`pareto` quantile). On top of the backbone's BCE, two branches train with curriculum weights:
- user branch: a head user's few most recent items, mapped by W_U, should encode like the
  user's full sequence; at prediction, a tail user's encoding h becomes h + W_U(h);
- item branch: a few contexts of a head item (training subsequences ending at it, forward
  and reversed), encoded, passed through the user branch (r + W_U(r)), averaged and mapped by
  W_I, should give the item's embedding; before every epoch each tail item's embedding is
  overwritten by W_I of the mean encoding of all its contexts.
Their code fine-tunes a pretrained backbone; here the first `pretrain_epochs` epochs train
the backbone alone, then MELT's losses join.

Where ours differs from their code (rlqja1107/MELT): README, "MELT".
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from model.config import check_fields, rule
from model.data import SequenceData
from model.faerec import SequentialRecommender


@dataclass(frozen=True)
class MELTConfig:
    """Settings `melt.<field>`."""
    lamb_u: float = rule(0.1, ge=0)  # weight of the user-branch loss (their shell scripts: 0.1)
    lamb_i: float = rule(0.4, ge=0)  # weight of the item-branch loss (their shell scripts: 0.4)
    pareto: float = rule(0.8, gt=0.02, lt=1)  # head/tail quantile (theirs: 0.8 Amazon, 0.5 others)
    e_max: int = rule(200, ge=1)  # epochs over which the curriculum weights sweep (their e_max)
    pretrain_epochs: int = rule(20, ge=0)  # the backbone alone first (theirs loads a trained SASRec)
    max_contexts: int = rule(0, ge=0)  # most contexts encoded per item per step and per tail update; 0 = all (theirs)
    warmup_epochs: int = rule(0, ge=0)  # MELT epochs that train W_I before its first tail update (theirs: 0)

    def __post_init__(self):
        check_fields(self)


class Contexts:
    """Training subsequences ending at an item, each as the last `max_len` items of a
    sequence read forward (seq[:t + 1]) or backward (seq[t:] reversed, when the sequence has
    more than one item), grouped by item; over seq[:-2] only. Stored as two flat arrays of the
    sequences (forward, reversed) separated by max_len zeros: a context is a slice."""

    def __init__(self, sequences: list[np.ndarray], n_items: int, max_len: int):
        gap = np.zeros(max_len, dtype=np.int64)
        forward, backward, keys, where = [gap], [gap], [], []
        at = max_len  # where the user's sequence starts in both flat arrays
        for seq in sequences:
            forward += [seq, gap]
            backward += [seq[::-1], gap]
            t = np.arange(len(seq))
            keys.append(seq), where.append(np.stack([np.zeros_like(t), at + t], 1))  # seq[:t + 1]
            if len(seq) > 1:  # seq[t:] reversed: its copy holds seq[t] at at + len - 1 - t
                keys.append(seq), where.append(np.stack([np.ones_like(t), at + len(seq) - 1 - t], 1))
            at += len(seq) + max_len
        self.flat = np.stack([np.concatenate(forward), np.concatenate(backward)])  # (2, N)
        self.max_len = max_len
        keys = np.concatenate([np.zeros(0, np.int64), *keys])
        where = np.concatenate([np.zeros((0, 2), np.int64), *where])
        order = np.argsort(keys, kind="stable")
        self.where = where[order]  # (n_contexts, 2): which flat array, end index; grouped by item
        self.start = np.searchsorted(keys[order], np.arange(n_items + 2))  # item i: [start[i], start[i+1])

    def count(self, items):
        return self.start[np.asarray(items) + 1] - self.start[np.asarray(items)]

    def sequences(self, contexts: np.ndarray) -> np.ndarray:
        """(k,) context indices -> (k, max_len) left-padded item ids, the item last."""
        side, end = self.where[contexts].T
        return self.flat[side[:, None], end[:, None] + np.arange(-self.max_len + 1, 1)]


def head_tail_split(data: SequenceData, pareto: float):
    """Their embedder.split_head_tail over the training part seq[:-2]: head users are longer
    than the `pareto` quantile of the lengths, head items more frequent than the
    `pareto - 0.02` quantile of the frequencies of the items seen in training.
    Returns (user threshold, head users (n_users,) bool, item threshold, head items (n + 1,) bool)."""
    lengths = np.array([max(len(seq) - 2, 0) for seq in data.sequences])
    user_threshold = float(np.quantile(lengths, pareto))
    counts = data.train_popularity
    item_threshold = float(np.quantile(counts[1:][counts[1:] > 0], pareto - 0.02))
    head_items = counts > item_threshold
    head_items[0] = False
    return user_threshold, lengths > user_threshold, item_threshold, head_items


def user_weight(epoch, e_max, length, max_len, threshold):
    """Curriculum weight of a head user of `length` items (their USERBRANCH):
    |sin(π/2 · e/e_max + π / (2 (L_max - thr - 1)) · (length - thr - 1))|."""
    span = (max_len - threshold - 1) or 1.0  # their formula divides by it
    return torch.abs(torch.sin(math.pi / 2 * epoch / e_max + math.pi / (2 * span) * (length - threshold - 1)))


def item_weight(epoch, e_max, n_context, threshold):
    """Curriculum weight of a head item with `n_context` occurrences (their ITEMBRANCH):
    |sin(π/2 · e/e_max + π/100 · (n - thr - 1))|, n capped at thr + 50."""
    n = torch.clamp(n_context, max=threshold + 50)
    return torch.abs(torch.sin(math.pi / 2 * epoch / e_max + math.pi / 100 * (n - threshold - 1)))


def branch_loss(weights, predicted, target):
    """Curriculum-weighted squared error: mean over (B, d) of w_b (predicted - target)^2."""
    return (weights[:, None] * (predicted - target) ** 2).mean()


class MELT(SequentialRecommender):
    """The backbone with MELT's user branch (W_U) and item branch (W_I)."""

    def __init__(self, cfg, n_items, data: SequenceData):
        super().__init__(cfg, n_items)
        self.params = p = cfg.method_settings
        d = cfg.hidden_size
        self.W_U = nn.Linear(d, d)
        self.W_I = nn.Linear(d, d)
        for layer in (self.W_U, self.W_I):
            nn.init.xavier_normal_(layer.weight)  # theirs
        self.user_threshold, head_users, self.item_threshold, head_items = head_tail_split(data, p.pareto)
        train = [seq[:-2] for seq in data.sequences]
        self.contexts = Contexts(train, n_items, cfg.max_len)
        self.head_users = np.flatnonzero(head_users)
        self.n_users = len(train)
        counts = self.contexts.count(np.arange(n_items + 1))
        self.head_items = np.flatnonzero(head_items & (counts > 0))
        self.tail_items = np.flatnonzero(~head_items & (counts > 0))  # never item 0: it has no context
        self.register_buffer("user_history", torch.as_tensor(np.stack([  # the last max_len training items
            np.r_[np.zeros(cfg.max_len, np.int64), seq][-cfg.max_len:] for seq in train])), persistent=False)
        self.register_buffer("occurrences", torch.tensor(data.train_popularity), persistent=False)
        # the last epoch whose tail items were updated (-1: stage 1); saved with the weights
        self.register_buffer("updated_epoch", torch.tensor(-1))

    def encode(self, seqs):
        """(k, L) left-padded ids -> (k, d), the backbone at the last position (their user_representation)."""
        return self.backbone(self.id_embedding(seqs), seqs != 0, last_only=True)

    def user_representation(self, input_ids, seq):
        """A tail user's encoding h (no more than the threshold's items) becomes h + W_U(h), in stage 2."""
        h = self.backbone(seq, input_ids != 0, last_only=True)
        if int(self.updated_epoch) < 0:
            return h
        tail = ((input_ids != 0).sum(1) <= self.user_threshold)[:, None]
        return torch.where(tail, h + self.W_U(h), h)

    def draw_contexts(self, item, k):
        """k of the item's contexts, drawn without replacement (torch's generator)."""
        n = int(self.contexts.count(item))
        return self.contexts.start[item] + torch.randperm(n)[:k].numpy()

    def user_branch_loss(self, users, epoch):
        """Head users: W_U(encoding of their last R items) vs the encoding of their (max_len) history."""
        full = self.user_history[torch.as_tensor(users, device=self.user_history.device)]  # (U, L)
        L = full.size(1)
        R = torch.randint(1, max(2, int(self.user_threshold)), (len(full), 1), device=full.device)  # theirs: 1..thr-1
        few = full * (torch.arange(L, device=full.device) >= L - R)
        w = user_weight(epoch, self.params.e_max, (full != 0).sum(1).float(), L, self.user_threshold)
        return branch_loss(w, self.W_U(self.encode(few)), self.encode(full))

    def item_branch_loss(self, items, epoch):
        """Head items: W_I(mean over a few contexts of r + W_U(r)) vs the item's embedding."""
        picks, owner = [], []
        for j, item in enumerate(items):
            n = int(self.contexts.count(item))
            k = int(torch.randint(1, max(1, int(min(n, self.item_threshold))) + 1, ()))  # theirs: 1..min(n, thr)
            picks.append(self.draw_contexts(item, min(k, self.params.max_contexts or k)))
            owner.append(np.full(len(picks[-1]), j))
        device = self.id_embedding.weight.device
        r = self.encode(torch.as_tensor(self.contexts.sequences(np.concatenate(picks)), device=device))
        r = r + self.W_U(r)  # knowledge from the user branch
        mean = segment_mean(r, torch.as_tensor(np.concatenate(owner), device=device), len(items))
        items = torch.as_tensor(items, device=device)
        w = item_weight(epoch, self.params.e_max, self.occurrences[items].float(), self.item_threshold)
        return branch_loss(w, self.W_I(mean), self.id_embedding(items))

    @torch.no_grad()
    def update_tail_items(self):
        """Every tail item's embedding := W_I(mean encoding of its contexts) (their
        update_tail_item_representation, before each epoch, in eval mode)."""
        was_training = self.training
        self.eval()
        cap = self.params.max_contexts
        device = self.id_embedding.weight.device
        for start in range(0, len(self.tail_items), 256):
            items = self.tail_items[start:start + 256]
            picks = [self.draw_contexts(i, cap) if cap else
                     np.arange(self.contexts.start[i], self.contexts.start[i + 1]) for i in items]
            owner = torch.as_tensor(np.concatenate([np.full(len(c), j) for j, c in enumerate(picks)]), device=device)
            r = self.encode(torch.as_tensor(self.contexts.sequences(np.concatenate(picks)), device=device))
            self.id_embedding.weight[torch.as_tensor(items, device=device)] = self.W_I(
                segment_mean(r, owner, len(items)))
        self.train(was_training)

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        p = self.params
        if epoch < p.pretrain_epochs:  # the backbone alone (theirs starts from a trained one)
            return super().loss(input_ids, pos_ids, neg_ids, epoch)
        t = epoch - p.pretrain_epochs  # MELT's own epoch count drives the curriculum
        if int(self.updated_epoch) != epoch:  # the first step of an epoch
            if t >= p.warmup_epochs:  # theirs overwrites at once, with a W_I that never trained
                self.update_tail_items()
            self.updated_epoch.fill_(epoch)
        rec = super().loss(input_ids, pos_ids, neg_ids, epoch)["rec"]
        # per step, a share of the head users and items as large as the batch's share of all
        # users: one epoch visits each about once (theirs: len(head) // batches + 1 per step)
        B = len(input_ids)
        users = self.head_users[torch.randperm(len(self.head_users)).numpy()[:math.ceil(B * len(self.head_users) / self.n_users)]]
        items = self.head_items[torch.randperm(len(self.head_items)).numpy()[:math.ceil(B * len(self.head_items) / self.n_users)]]
        zero = rec.new_zeros(())
        user = self.user_branch_loss(users, t) if len(users) else zero
        item = self.item_branch_loss(items, t) if len(items) else zero
        return {"loss": rec + p.lamb_u * user + p.lamb_i * item, "rec": rec, "user": user, "item": item}


def segment_mean(x, owner, n):
    """Rows of x (k, d) averaged by owner (k,) in 0..n-1 -> (n, d)."""
    sums = x.new_zeros(n, x.size(1)).index_add_(0, owner, x)
    return sums / torch.bincount(owner, minlength=n).clamp(min=1)[:, None].to(x.dtype)


def build_melt(cfg, n_items, llm, pca, popularity, data: SequenceData) -> MELT:
    """MELT on `data` (the registry's builder): splits and contexts from training interactions only."""
    return MELT(cfg, n_items, data)
