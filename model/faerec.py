"""FAERec (paper section 4): ID embeddings and frozen LLM embeddings, fused by a gate and
aligned at the item and the feature level, in front of any sequential backbone.

Reads top-down like the paper: projection (eq. 2), gating fusion (eqs. 3-4), item-level
alignment (eq. 5), feature-level alignment (eqs. 6-10), curriculum (eqs. 11-12), then the
config and the two models: the backbone alone on ID embeddings (`method="base"`, the
paper's baselines) and FAERec, whose loss is eq. (14) with the BCE of eq. (13).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backbones import BACKBONE_SETTINGS, BACKBONES, Dropout
from model.config import FAERecConfig  # noqa: F401 (the settings of both models live in model.config)


class ProjectionMLP(nn.Sequential):
    """f_p of eq. (2): d_llm -> proj_hidden -> d, trainable; the LLM table itself stays frozen."""

    def __init__(self, d_llm, hidden, d, dropout):
        super().__init__(nn.Linear(d_llm, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d))


class GatingFusion(nn.Module):
    """Dimension-wise gate between ID and LLM embeddings, eqs. (3-4).

    W1: 2d -> 2d and W2: 2d -> d as the paper prints them; gate="code" puts GELU +
    Dropout(0.1) between the two layers, as the authors' code does.
    """

    def __init__(self, d, gate="paper"):
        super().__init__()
        self.W1 = nn.Linear(2 * d, 2 * d)
        self.between = nn.Sequential(nn.GELU(), Dropout(0.1)) if gate == "code" else nn.Identity()
        self.W2 = nn.Linear(2 * d, d)

    def gate(self, e_id, e_llm):
        return torch.sigmoid(self.W2(self.between(self.W1(torch.cat([e_id, e_llm], dim=-1)))))  # eq. (3)

    def forward(self, e_id, e_llm):
        g = self.gate(e_id, e_llm)
        return g * e_id + (1 - g) * e_llm  # eq. (4)


def item_alignment_loss(e_id, e_llm, tau, item_ids=None):
    """InfoNCE from each item's ID embedding to its LLM embedding over K items, eq. (5).

    e_id, e_llm (K, d). Other rows holding the same item id (`item_ids` (K,), when items
    occur more than once) are removed from the negatives: they are not different items.
    """
    logits = (F.normalize(e_id, dim=-1) / tau) @ F.normalize(e_llm, dim=-1).T  # (K, K) cosine / tau
    if item_ids is not None:
        copies = (item_ids[:, None] == item_ids[None, :]).fill_diagonal_(False)  # (K, K)
        logits = logits.masked_fill(copies, -torch.inf)
    return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


def standardize(e, members, eps=1e-6):
    """Eq. (7) over a group's rows (`members` (S,) bool), per dimension, biased std, so that C
    in eq. (8) is a true correlation (C_ii = 1 for identical views); eps keeps constant
    dimensions at 0, not NaN. Rows outside the group come out 0: weighting instead of
    indexing keeps the group's size on the device (no host sync on a GPU)."""
    m = members[:, None].to(e.dtype)
    n = m.sum().clamp(min=1)
    centered = (e - (e * m).sum(0) / n) * m
    return centered / torch.sqrt(centered.pow(2).sum(0) / n + eps)


def barlow_twins_loss(e_id, e_llm, lambda_, members=None):
    """Eqs. (7-9) for one group of items: the rows `members` (S,) bool of e_id, e_llm (S, d), default all."""
    if members is None:
        members = torch.ones(len(e_id), dtype=torch.bool, device=e_id.device)
    c = standardize(e_id, members).T @ standardize(e_llm, members) / members.sum().clamp(min=1)  # (d, d) eq. (8)
    on_diag = c.diagonal()
    return (1 - on_diag).pow(2).sum() + lambda_ * (c.pow(2).sum() - on_diag.pow(2).sum())  # eq. (9)


def feature_alignment_loss(e_id, e_llm, lambda_, popularity, grouped=True):
    """Barlow Twins within a high- and a low-popularity group of the batch items, eqs. (6-10).

    Split at the median popularity of the K items: high = p > median, low = p <= median.
    Eq. (6) prints strict inequalities on both sides, which with integer counts would drop
    every item tied at the median; here every item lands in exactly one group. A group
    with fewer than 2 items (e.g. all items equally popular: high is empty) adds nothing,
    since a standard deviation over one item is undefined. grouped=False (w/o PG): one group.
    """
    if grouped:
        high = popularity > popularity.median()  # torch's median of an even count: the lower middle value
        groups = [high, ~high]
    else:
        groups = [torch.ones_like(popularity, dtype=torch.bool)]
    loss = e_id.new_zeros(())
    for members in groups:
        loss = loss + torch.where(members.sum() >= 2, barlow_twins_loss(e_id, e_llm, lambda_, members), 0)  # eq. (10)
    return loss


@dataclass(frozen=True)
class CurriculumSchedule:
    """Weight w1(t) of the item-level alignment at epoch t, eq. (11); FLA gets 1 - w1 (eq. 12)."""

    w_max: float
    w_min: float
    period: int
    enabled: bool = True  # False = w/o CLS: fixed at the schedule's mean

    def __call__(self, epoch):
        if not self.enabled:
            return (self.w_max + self.w_min) / 2
        return (self.w_max - self.w_min) * (1 + math.cos(2 * math.pi * epoch / self.period)) / 2 + self.w_min  # eq. (11)


class PreparedInput(nn.Module):
    """A backbone input layer for sequences FAERec has already embedded (input_path "code"):
    it only zeroes the padded positions; `embed` is the packed path's no-op."""

    def __init__(self, max_len):
        super().__init__()
        self.max_len = max_len

    def embed(self, x, recency):
        return x

    def forward(self, x, mask):
        return x * mask.unsqueeze(-1)


def init_weights(module):
    """normal(0, 0.02) for linear and embedding weights, zero biases and padding row.

    The authors' code does this for the backbone and the ID table; it builds the projection
    and the gate afterwards, so they keep PyTorch's default init (and a zero bias on the gate's
    last layer). The paper says nothing; here every layer gets this init.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        nn.init.zeros_(module.weight[module.padding_idx])


def padded_llm_table(llm_embeddings, n_items):
    """The frozen LLM table (n_items, d_llm) as float32 with a zero padding row 0: (n_items + 1, d_llm)."""
    llm_embeddings = torch.as_tensor(llm_embeddings, dtype=torch.float32)
    if llm_embeddings.ndim != 2 or len(llm_embeddings) != n_items:
        raise ValueError(f"llm_embeddings must be (n_items={n_items}, d_llm), got {tuple(llm_embeddings.shape)}")
    return torch.cat([llm_embeddings.new_zeros(1, llm_embeddings.size(1)), llm_embeddings])


class SequentialRecommender(nn.Module):
    """A backbone over ID embeddings trained with BCE (eq. 13): method "base", and FAERec's shared path.

    Interface for the training loop: `loss(...)` during training; `scoring_items()` once per
    evaluation (in eval mode, under no_grad) and `score_all(input_ids, items)` per batch.
    """

    def __init__(self, cfg, n_items):
        super().__init__()
        self.cfg = cfg
        self.id_embedding = nn.Embedding(n_items + 1, cfg.hidden_size, padding_idx=0)
        self.backbone = BACKBONES[cfg.backbone](cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dropout,
                                                cfg.max_len, **{name: getattr(cfg, name) for name in
                                                                BACKBONE_SETTINGS.get(cfg.backbone, ())})
        self.apply(init_weights)

    def start_from_pca(self, pca, who: str):
        """The ID table starts from the LLM table reduced to d by PCA (sec. 4.1's balanced start)."""
        n_items, d = self.id_embedding.num_embeddings - 1, self.id_embedding.embedding_dim
        pca = torch.as_tensor(pca, dtype=torch.float32) if pca is not None else None
        if pca is None or pca.shape != (n_items, d):
            raise ValueError(f"{who} needs a PCA table of shape (n_items={n_items}, d={d}), got "
                             f"{None if pca is None else tuple(pca.shape)}")
        with torch.no_grad():
            self.id_embedding.weight[1:] = pca  # row 0 stays the zero padding row

    def sequence_embeddings(self, input_ids):
        """The backbone's input: (B, L) ids -> (B, L, d)."""
        return self.id_embedding(input_ids)

    def scoring_items(self):
        """Item matrix for full ranking, (n_items + 1, d); row 0 is padding."""
        return self.id_embedding.weight

    def item_tables(self):
        """(input table, scoring matrix), each (n_items + 1, d): what evaluation looks items up
        in, built once per evaluation instead of once per batch of users."""
        return self.id_embedding.weight, self.scoring_items()

    def rec_loss(self, input_ids, pos_ids, seq_emb, pos_emb, neg_emb):
        """BCE of eq. (13) at every position with a target: seq_emb, pos_emb, neg_emb (B, L, d)."""
        return self.bce(self.backbone(seq_emb, input_ids != 0), pos_ids, pos_emb, neg_emb)

    @staticmethod
    def bce(h, pos_ids, pos_emb, neg_emb):
        """Eq. (13) from the backbone's output h (B, L, d)."""
        h = h.float()  # float32 even under bf16 autocast
        pos_logits, neg_logits = (h * pos_emb.float()).sum(-1), (h * neg_emb.float()).sum(-1)  # (B, L)
        loss = F.softplus(-pos_logits) + F.softplus(neg_logits)  # -log σ(h·e+) - log(1 - σ(h·e-))
        real = pos_ids != 0
        return (loss * real).sum() / real.sum()  # mean over real positions, without a host sync

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        e = self.id_embedding
        rec = self.rec_loss(input_ids, pos_ids, e(input_ids), e(pos_ids), e(neg_ids))
        return {"loss": rec, "rec": rec}

    def user_representation(self, input_ids, seq):
        """(B, L) ids and their (B, L, d) embeddings -> (B, d): the backbone at the most recent position."""
        return self.backbone(seq, input_ids != 0, last_only=True)

    def score_all(self, input_ids, items=None, table=None):
        """Scores (B, n_items + 1) of every item after each sequence; column 0 (padding) is -inf.

        items, table: `item_tables()`'s scoring matrix and input table, when the caller has them."""
        items = self.scoring_items() if items is None else items
        seq = self.sequence_embeddings(input_ids) if table is None else table[input_ids]  # (B, L, d)
        scores = self.user_representation(input_ids, seq) @ items.T  # (B, n_items + 1)
        scores[:, 0] = -torch.inf
        return scores


class FAERec(SequentialRecommender):
    """Fused ID + LLM item embeddings into the backbone, BCE + α · dual-level alignment (eq. 14).

    Every step projects each distinct item of the batch once (inputs, positives and
    negatives together) and indexes the results back into (B, L, d) tensors: never the
    padded (B, L, d_llm) tensors. The LLM table is a non-persistent buffer: frozen, moved
    by `.to(device)`, and left out of state_dict (checkpoints stay small; it is rebuilt
    from the embedding cache).
    """

    def __init__(self, cfg, n_items, llm_embeddings, pca=None, train_popularity=None):
        super().__init__(cfg, n_items)
        d = cfg.hidden_size
        padded = padded_llm_table(llm_embeddings, n_items)  # (n + 1, d_llm)
        popularity = torch.as_tensor(train_popularity) if train_popularity is not None else None
        if popularity is None or popularity.shape != (n_items + 1,):
            raise ValueError(f"train_popularity must be (n_items + 1 = {n_items + 1},), got "
                             f"{None if popularity is None else tuple(popularity.shape)}")
        self.register_buffer("llm_embedding", padded, persistent=False)
        self.register_buffer("popularity", popularity, persistent=False)
        self.projection = ProjectionMLP(padded.size(1), cfg.proj_hidden, d, cfg.proj_dropout)
        self.fusion = GatingFusion(d, cfg.gate) if cfg.gating else None
        self.projection.apply(init_weights)
        if self.fusion is not None:
            self.fusion.apply(init_weights)
        if cfg.pca_init:
            self.start_from_pca(pca, "pca_init")
        self.curriculum = CurriculumSchedule(cfg.w_max, cfg.w_min, cfg.period, cfg.curriculum)
        if cfg.input_path == "code":
            # The authors' layout (their models.py 32-50): the input layer's position embedding
            # and dropout go on each branch before the gate, its LayerNorm (eps 1e-12 there)
            # after it; the backbone then takes the fused sequence as it is.
            self.code_input = self.backbone.input
            self.code_input.norm.eps = 1e-12
            self.backbone.input = PreparedInput(cfg.max_len)

    def fuse(self, e_id, e_llm):
        return self.fusion(e_id, e_llm) if self.fusion is not None else (e_id + e_llm) / 2

    def item_embeddings(self, ids=None):
        """(K,) ids -> e_id, e_llm (eq. 2), fused f (eqs. 3-4), each (K, d); None: every item
        (the tables themselves, without gathering a copy of the LLM table)."""
        e_id = self.id_embedding.weight if ids is None else self.id_embedding(ids)
        e_llm = self.projection(self.llm_embedding if ids is None else self.llm_embedding[ids])
        return e_id, e_llm, self.fuse(e_id, e_llm)

    def code_input_sequence(self, input_ids, e_id, e_llm):
        """input_path "code": LayerNorm(gate(Dropout(e_id + pos), Dropout(e_llm + pos))), (B, L, d) each."""
        layer = self.code_input
        L = input_ids.size(1)
        if layer.position is not None:  # LRURec has none
            position = layer.position(torch.arange(L - 1, -1, -1, device=input_ids.device))  # recency, (L, d)
            e_id, e_llm = e_id + position, e_llm + position
        fused = self.fuse(layer.dropout(e_id), layer.dropout(e_llm))
        return layer.norm(fused) * (input_ids != 0).unsqueeze(-1)

    def sequence_embeddings(self, input_ids):
        ids, inverse = torch.unique(input_ids, return_inverse=True)  # (K,), (B, L)
        e_id, e_llm, f = self.item_embeddings(ids)
        if self.cfg.input_path == "code":
            return self.code_input_sequence(input_ids, e_id[inverse], e_llm[inverse])
        return f[inverse]  # (B, L, d)

    def scoring_items(self):
        return self.item_tables()[1]

    def item_tables(self):
        """The fused input table f (eqs. 3-4) and the scoring matrix (1 - w) e_id + w proj(e_llm)
        (sec. 4.3, w = score_llm_weight) of every item, from one projection of the LLM table.

        score_layernorm (the authors' trainers.py 224-235): the trained input LayerNorm (its
        learned gain and bias) on 2 ((1 - w) e_id + w proj(e_llm)), which at w = 0.5 is the
        code's LayerNorm(e_id + proj(e_llm)) exactly (the factor 2 matters through the eps).
        """
        e_id, e_llm, f = self.item_embeddings()
        w = self.cfg.score_llm_weight
        items = (1 - w) * e_id + w * e_llm  # (n + 1, d)
        if self.cfg.score_layernorm:
            items = (self.code_input if self.cfg.input_path == "code" else self.backbone.input).norm(2 * items)
        # input_path "code" adds positions before the gate: no per-item input table then
        return (None if self.cfg.input_path == "code" else f), items

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        cfg = self.cfg
        ids, inverse = torch.unique(torch.stack([input_ids, pos_ids, neg_ids]), return_inverse=True)  # (K,), (3, B, L)
        e_id, e_llm, f = self.item_embeddings(ids)  # (K, d) each
        scored = f if cfg.bce_items == "fused" else e_id
        if cfg.input_path == "code":
            seq = self.code_input_sequence(input_ids, e_id[inverse[0]], e_llm[inverse[0]])
        else:
            seq = f[inverse[0]]
        rec = self.rec_loss(input_ids, pos_ids, seq, scored[inverse[1]], scored[inverse[2]])

        # Alignment items: the real input items plus the sampled negatives (the authors' code).
        rows = torch.cat([inverse[0][input_ids != 0], inverse[2][neg_ids != 0]])  # indices into ids
        if cfg.align_items == "unique":
            rows = rows.unique()
        item_ids = ids[rows]  # (K_align,)
        copies = item_ids if cfg.align_items == "occurrence" else None  # unique rows have no copies to mask
        zero = rec.new_zeros(())
        # float32 even under bf16 autocast: bf16 steps of cos / τ are 0.125 wide at τ = 0.05
        with torch.autocast(ids.device.type, enabled=False):
            e_id_a, e_llm_a = e_id[rows].float(), e_llm[rows].float()
            ila = item_alignment_loss(e_id_a, e_llm_a, cfg.tau, copies) if cfg.ila else zero
            fla = (feature_alignment_loss(e_id_a, e_llm_a, cfg.lambda_, self.popularity[item_ids], cfg.pop_groups)
                   if cfg.fla else zero)
        w1 = self.curriculum(epoch)
        align = w1 * ila + (1 - w1) * fla  # eq. (12); a disabled term is 0, the other keeps its weight
        return {"loss": rec + cfg.alpha * align, "rec": rec, "ila": ila, "fla": fla, "align": align,  # eq. (14)
                "w_ila": torch.tensor(w1)}

