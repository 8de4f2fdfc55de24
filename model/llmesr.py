"""LLM-ESR (Liu et al., NeurIPS 2024): dual-view modelling and retrieval-augmented
self-distillation, on any of our backbones.

Dual view (their sec. 3.2): the sequence is encoded twice by the same backbone, once on
trainable ID embeddings (initialised from the PCA of the LLM table) and once on the frozen
LLM embeddings through an adapter; optional cross-attention lets each view read the other
first. The user is the concatenation of the two encodings, an item the concatenation of its
two embeddings, and the score their dot product.

Self-distillation (their sec. 3.3): each user's k most similar users, by cosine of LLM user
representations, are retrieved once before training; their encodings (no gradient) averaged
are the target of the user's own encoding, an MSE weighted by alpha.

Where ours differs from their code (liuqidong07/LLM-ESR): README, "LLM-ESR".
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import check_fields, rule
from model.data import SequenceData, pad_left
from model.faerec import PreparedInput, SequentialRecommender, init_weights, padded_llm_table


@dataclass(frozen=True)
class LLMESRConfig:
    """Settings `llmesr.<field>`."""
    alpha: float = rule(0.1, ge=0)  # weight of the self-distillation loss (their --alpha 0.1)
    sim_users: int = rule(10, ge=1)  # similar users averaged into the target (their --sim_user_num 10);
                                     # each costs one more (gradient-free) encoding per training row
    cross_attention: bool = True  # views read each other before the backbone (their --use_cross_att)
    pca_init: bool = True  # ID table from the PCA of the LLM table (their pca64_itm_emb_np)

    def __post_init__(self):
        check_fields(self)


def user_llm_representations(data: SequenceData, llm_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's LLM representation: the mean LLM embedding of their training items
    seq[:-2] (their code asks an LLM to summarise the history instead), and whether the user
    has any training item. Returns (n_users, d_llm) float32 and (n_users,) bool."""
    reps = np.zeros((len(data.sequences), llm_embeddings.shape[1]), dtype=np.float32)
    has_history = np.zeros(len(data.sequences), dtype=bool)
    for u, seq in enumerate(data.sequences):
        if len(seq) > 2:
            reps[u] = llm_embeddings[seq[:-2] - 1].mean(0)  # row i-1 = item i
            has_history[u] = True
    return reps, has_history


def similar_users(reps: np.ndarray, candidates: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """The k users most cosine-similar to each user, among `candidates` (bool (n_users,)) and
    never the user itself: (n_users, k) int64. Computed a block of rows at a time, so that the
    n_users x n_users similarity matrix never exists whole."""
    pool = np.flatnonzero(candidates)
    if len(pool) < k + 1:
        raise ValueError(f"llmesr: sim_users = {k} needs more than {k} users with a training "
                         f"history, the data has {len(pool)}")
    where = np.full(len(reps), -1)
    where[pool] = np.arange(len(pool))  # each user's column among the candidates, -1 if none
    unit = F.normalize(torch.as_tensor(reps), dim=1)
    out = np.empty((len(reps), k), dtype=np.int64)
    for start in range(0, len(reps), block):
        sims = unit[start:start + block] @ unit[pool].T  # (b, |pool|) cosine
        rows = np.flatnonzero(where[start:start + len(sims)] >= 0)
        sims[rows, where[start + rows]] = -torch.inf  # never oneself
        out[start:start + len(sims)] = pool[sims.topk(k, dim=1).indices.numpy()]
    return out


def self_distillation_loss(user, similar):
    """MSE between each user's encoding (B, D) and the mean of its similar users' (B, k, D),
    averaged over the B x D entries (their nn.MSELoss)."""
    return F.mse_loss(user, similar.mean(1))


class CrossViewAttention(nn.Module):
    """Multi-head attention with the query from one view, keys and values from the other
    (their Multi_CrossAttention), causal and blind to padded keys."""

    def __init__(self, d, num_heads=2):
        super().__init__()
        if d % num_heads:
            raise ValueError(f"llmesr cross-attention: hidden_size {d} is not a multiple of {num_heads} heads")
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = nn.Linear(d, d)

    def forward(self, x, y, mask):
        """x (query view), y (key/value view) (B, L, d); mask (B, L) True = real item."""
        B, L, d = x.shape
        heads = lambda t: t.view(B, L, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        # real keys up to the query's position; a padded query sees itself, so no row is all -inf
        allowed = causal & (mask[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))  # (B, L, L)
        att = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(y)), heads(self.v(y)),
                                             attn_mask=allowed[:, None])
        return self.out(att.transpose(1, 2).reshape(B, L, d))


class LLMESR(SequentialRecommender):
    """Dual-view encoder (ID view, adapted frozen-LLM view) + self-distillation from similar users.

    user_history (n_users, max_len): each user's training items seq[:-2], left-padded, which
    encode a similar user; similar (n_users, k): `similar_users`. Batches carry user indices.
    """

    needs_users = True

    def __init__(self, cfg, n_items, llm_embeddings, user_history, similar, pca=None):
        super().__init__(cfg, n_items)
        self.params = params = cfg.method_settings
        d = cfg.hidden_size
        self.register_buffer("llm_embedding", padded_llm_table(llm_embeddings, n_items), persistent=False)
        self.register_buffer("user_history", torch.as_tensor(user_history), persistent=False)
        self.register_buffer("similar", torch.as_tensor(similar), persistent=False)
        d_llm = self.llm_embedding.size(1)
        self.adapter = nn.Sequential(nn.Linear(d_llm, d_llm // 2), nn.Linear(d_llm // 2, d))  # theirs: two linears, no activation
        self.llm_to_id = CrossViewAttention(d) if params.cross_attention else None
        self.id_to_llm = CrossViewAttention(d) if params.cross_attention else None
        for module in (self.adapter, self.llm_to_id, self.id_to_llm):
            if module is not None:
                module.apply(init_weights)
        if params.cross_attention:
            # as theirs, the views meet after the input layer (positions, norm, dropout): the
            # backbone's own input layer runs first, then cross-attention, then the blocks
            self.sequence_input = self.backbone.input
            self.backbone.input = PreparedInput(cfg.max_len)
        if params.pca_init:
            self.start_from_pca(pca, "llmesr pca_init")

    def item_views(self, ids):
        """(K,) ids -> ID embeddings and adapted LLM embeddings, (K, d) each."""
        return self.id_embedding(ids), self.adapter(self.llm_embedding[ids])

    def encode(self, input_ids, e_id, e_llm, last_only=False):
        """Both views of the sequences (B, L, d) through the shared backbone, concatenated:
        (B, L, 2d), or (B, 2d) at the most recent position with last_only."""
        mask = input_ids != 0
        if self.llm_to_id is not None:  # their llm2id / id2llm: queries from one view, keys and values from the other
            e_id, e_llm = self.sequence_input(e_id, mask), self.sequence_input(e_llm, mask)
            e_id, e_llm = self.llm_to_id(e_llm, e_id, mask), self.id_to_llm(e_id, e_llm, mask)
        return torch.cat([self.backbone(e_id, mask, last_only=last_only),
                          self.backbone(e_llm, mask, last_only=last_only)], dim=-1)

    def encode_ids(self, input_ids, last_only=False):
        ids, inverse = torch.unique(input_ids, return_inverse=True)
        e_id, e_llm = self.item_views(ids)
        return self.encode(input_ids, e_id[inverse], e_llm[inverse], last_only)

    def item_tables(self):
        """Every item's [ID ; adapted LLM] embedding (n + 1, 2d): input table and scoring matrix."""
        items = torch.cat(self.item_views(torch.arange(len(self.llm_embedding), device=self.llm_embedding.device)), -1)
        return items, items

    def scoring_items(self):
        return self.item_tables()[1]

    def sequence_embeddings(self, input_ids):
        return self.item_tables()[0][input_ids]

    def score_all(self, input_ids, items=None, table=None):
        table, items = self.item_tables() if items is None else (table, items)
        seq = table[input_ids]  # (B, L, 2d)
        d = seq.size(-1) // 2
        scores = self.encode(input_ids, seq[..., :d], seq[..., d:], last_only=True) @ items.T  # (B, n + 1)
        scores[:, 0] = -torch.inf
        return scores

    def loss(self, input_ids, pos_ids, neg_ids, epoch, users=None):
        if users is None:
            raise ValueError("llmesr: training batches must carry user indices (users=...)")
        ids, inverse = torch.unique(torch.stack([input_ids, pos_ids, neg_ids]), return_inverse=True)
        e_id, e_llm = self.item_views(ids)  # (K, d) each
        items = torch.cat([e_id, e_llm], -1)  # (K, 2d)
        h = self.encode(input_ids, e_id[inverse[0]], e_llm[inverse[0]])  # (B, L, 2d)
        rec = self.bce(h, pos_ids, items[inverse[1]], items[inverse[2]])

        real = input_ids[:, -1] != 0  # rows with a history (batch_all_users adds empty ones)
        with torch.no_grad():  # the target takes no gradient (their .detach())
            # each distinct similar user of the batch is encoded once: at most n_users, not B k
            neighbours, which = torch.unique(self.similar[users], return_inverse=True)  # (N,), (B, k)
            target = self.encode_ids(self.user_history[neighbours], last_only=True)[which]  # (B, k, 2d)
        distill = self_distillation_loss(h[:, -1][real].float(), target[real].float())
        return {"loss": rec + self.params.alpha * distill, "rec": rec, "distill": distill}


def build_llmesr(cfg, n_items, llm_embeddings, pca, popularity, data: SequenceData) -> LLMESR:
    """LLM-ESR on `data` (the registry's builder): similar users from training interactions only."""
    reps, has_history = user_llm_representations(data, np.asarray(llm_embeddings, dtype=np.float32))
    similar = similar_users(reps, has_history, cfg.method_settings.sim_users)
    history = pad_left([seq[:-2] for seq in data.sequences], cfg.max_len)
    return LLMESR(cfg, n_items, llm_embeddings, history, similar, pca)
