"""CITIES (Jang et al., ICDM 2020): contextual inference of tail-item embeddings.

Two stages, as the original, in one run: for the first `pretrain_epochs` epochs the backbone
trains alone (BCE, eq. 13 of FAERec); from then on only the embedding-inference function
trains. It reads K contexts of an item (the `window` items before and after one of its
occurrences in a training sequence, the item itself masked), encodes each with a
Transformer, aggregates the K encodings with another, and is trained on head items (more
than `tail_max_count` training interactions, whose embeddings are reliable) to regress their
frozen embeddings (MSE). At evaluation, in stage two, every tail item with a context gets
the inferred embedding, in the input table and in the scoring matrix alike.

Where ours differs from their code (swonj90/CITIES): README, "CITIES".
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import check_fields, rule
from model.data import SequenceData
from model.faerec import SequentialRecommender


@dataclass(frozen=True)
class CITIESConfig:
    """Settings `cities.<field>`."""
    pretrain_epochs: int = rule(50, ge=0)  # stage 1 (the backbone alone); later epochs train the inference function
    tail_max_count: int = rule(5, ge=0)  # items with <= this many training interactions get inferred embeddings
    window: int = rule(24, ge=1)  # items taken on each side of the masked item (their MAX_LEN 24)
    max_shots: int = rule(10, ge=1)  # contexts per head item per step: 1..max_shots, drawn per step (their MAX_N_SHOT)
    items_per_step: int = rule(128, ge=1)  # head items regressed per step (their TRAIN_BATCH_SIZE)
    num_layers: int = rule(2, ge=1)  # layers of the context encoder and of the aggregator (their N_LAYER)
    num_heads: int = rule(4, ge=1)  # attention heads of both (their N_HEAD); must divide hidden_size

    def __post_init__(self):
        check_fields(self)


class ItemContexts:
    """Every occurrence of every item in the training sequences seq[:-2], and the context
    around it: `window` items on each side (zeros past a sequence's ends), the item itself
    in the middle. Occurrences whose context holds fewer than 2 other items are left out
    (theirs). Stored as one flat array of the sequences separated by `window` zeros, so a
    context is a slice of it."""

    def __init__(self, data: SequenceData, window: int):
        gap = np.zeros(window, dtype=np.int64)
        parts, starts, at = [gap], [], window
        for seq in data.sequences:
            train = seq[:-2]
            parts += [train, gap]
            starts.append(at)
            at += len(train) + window
        self.flat = np.concatenate(parts)  # gap, seq_0, gap, seq_1, gap, ...
        self.window = window
        positions = np.flatnonzero(self.flat)
        offsets = np.arange(-window, window + 1)
        neighbours = (self.flat[positions[:, None] + offsets] != 0).sum(1) - 1  # other items in the context
        positions = positions[neighbours >= 2]
        items = self.flat[positions]
        order = np.argsort(items, kind="stable")
        self.positions = positions[order]  # occurrences grouped by item
        self.start = np.searchsorted(items[order], np.arange(data.n_items + 2))  # item i: [start[i], start[i+1])

    def count(self, items: np.ndarray) -> np.ndarray:
        return self.start[items + 1] - self.start[items]

    def contexts(self, occurrences: np.ndarray) -> np.ndarray:
        """(...,) indices into `positions` -> (..., 2 window + 1) item ids, the middle one the item."""
        return self.flat[self.positions[occurrences][..., None] + np.arange(-self.window, self.window + 1)]


class EmbeddingInference(nn.Module):
    """f: K contexts (B, K, 2w + 1) -> an embedding (B, d). Context encoder over each context
    (middle position masked), mean over its real positions; aggregator over the K context
    encodings, mean over the real ones; a linear output layer (their Model)."""

    def __init__(self, d, window, num_layers, num_heads):
        super().__init__()
        if d % num_heads:
            raise ValueError(f"cities.num_heads = {num_heads} must divide hidden_size = {d}")
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)  # stands for the item whose embedding is inferred
        self.position = nn.Embedding(2 * window + 1, d)
        layer = lambda: nn.TransformerEncoderLayer(d, num_heads, 2 * d, dropout=0.2, batch_first=True)  # noqa: E731
        self.context_encoder = nn.TransformerEncoder(layer(), num_layers, enable_nested_tensor=False)
        self.aggregator = nn.TransformerEncoder(layer(), num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, d)

    def forward(self, contexts, item_table):
        """contexts (B, K, 2w + 1) ids, rows of all-zero contexts are padding; item_table (n + 1, d)."""
        B, K, C = contexts.shape
        present = (contexts != 0).any(-1)  # (B, K) real contexts
        rows = present.view(-1).nonzero().squeeze(1)
        contexts = contexts.view(B * K, C)[rows]  # (N, C): the real contexts only
        x = item_table[contexts]  # (N, C, d)
        x[:, C // 2] = self.mask_token
        real = contexts != 0
        real[:, C // 2] = True  # the masked item is always there
        h = x.new_zeros(B * K, x.shape[-1])
        h[rows] = self.encode_contexts(x + self.position.weight, real)
        h = self.aggregator(h.view(B, K, -1), src_key_padding_mask=~present)
        h = (h * present[..., None]).sum(1) / present.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        return self.out(h)

    def encode_contexts(self, x, real, groups=8):
        """(N, C, d) inputs with their positions, (N, C) real positions -> (N, d): the context
        encoder's mean over each context's real positions. Real positions go first and the
        contexts are encoded in `groups` of similar length, each cut to its longest: exact
        (attention masks the padding anyway) and 3-5x less work where sequences are short
        (Office: 16 of 49 positions are real on average; bench/bench_cities.py)."""
        first = torch.argsort((~real).to(torch.uint8), dim=1, stable=True)  # real positions first, in order
        lengths = real.sum(1)
        h = x.new_empty(x.shape[0], x.shape[-1])
        for group in torch.argsort(lengths).tensor_split(groups):
            if len(group) == 0:
                continue
            cols = first[group, :int(lengths[group].max())]
            keep = real[group[:, None], cols]  # (g, n)
            out = self.context_encoder(x[group[:, None], cols], src_key_padding_mask=~keep)
            h[group] = (out * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        return h


def inference_loss(predicted, target):
    """MSE between inferred and actual embeddings, (B, d) each, over all B x d entries (theirs)."""
    return F.mse_loss(predicted, target)


class CITIES(SequentialRecommender):
    """The backbone (stage 1), then the embedding-inference function (stage 2) for tail items."""

    def __init__(self, cfg, n_items, contexts: ItemContexts, train_popularity):
        super().__init__(cfg, n_items)
        self.params = params = cfg.method_settings
        self.contexts = contexts
        self.infer = EmbeddingInference(cfg.hidden_size, params.window, params.num_layers, params.num_heads)
        popularity = np.asarray(train_popularity)
        items = np.arange(1, n_items + 1)
        with_context = contexts.count(items) > 0
        self.head_items = items[with_context & (popularity[1:] > params.tail_max_count)]
        self.tail_items = items[with_context & (popularity[1:] <= params.tail_max_count)]
        if len(self.head_items) == 0:
            raise ValueError(f"cities: no item has more than tail_max_count = {params.tail_max_count} training "
                             "interactions and a context: nothing to train the inference function on")
        # stage 2 reached: saved with the weights, so a stage-1 checkpoint evaluates as stage 1
        self.register_buffer("inferring", torch.tensor(False))

    def head_batch(self):
        """items_per_step head items (drawn with replacement), each with k contexts drawn with
        replacement from its own, k drawn once per step from 1..max_shots (theirs)."""
        p = self.params  # torch's generator: seeded by the run's seed
        items = self.head_items[torch.randint(len(self.head_items), (p.items_per_step,)).numpy()]
        k = int(torch.randint(1, p.max_shots + 1, ()))
        draws = (torch.rand(len(items), k).numpy() * self.contexts.count(items)[:, None]).astype(np.int64)
        return items, self.contexts.contexts(self.contexts.start[items][:, None] + draws)  # (I,), (I, k, 2w + 1)

    def inferred_table(self):
        """The ID table with every tail item's row replaced by its inferred embedding (n + 1, d)."""
        table = self.id_embedding.weight
        if not bool(self.inferring) or len(self.tail_items) == 0:
            return table
        counts = self.contexts.count(self.tail_items)
        k = int(counts.max())
        picks = self.contexts.start[self.tail_items][:, None] + np.arange(k)  # every context, padded...
        contexts = self.contexts.contexts(np.minimum(picks, len(self.contexts.positions) - 1))
        contexts[np.arange(k)[None, :] >= counts[:, None]] = 0  # ...with all-zero contexts
        device = table.device
        rows = torch.as_tensor(self.tail_items, device=device)
        table = table.clone()
        for start in range(0, len(rows), 512):
            table[rows[start:start + 512]] = self.infer(torch.as_tensor(contexts[start:start + 512], device=device),
                                                        table.detach())
        return table

    def sequence_embeddings(self, input_ids):
        return self.inferred_table()[input_ids]

    def scoring_items(self):
        return self.inferred_table()

    def item_tables(self):
        table = self.inferred_table()
        return table, table

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        if epoch < self.params.pretrain_epochs:  # stage 1: the backbone alone
            return super().loss(input_ids, pos_ids, neg_ids, epoch)
        self.inferring.fill_(True)
        items, contexts = self.head_batch()
        table = self.id_embedding.weight.detach()  # frozen: only f trains in stage 2
        device = table.device
        mse = inference_loss(self.infer(torch.as_tensor(contexts, device=device), table),
                             table[torch.as_tensor(items, device=device)])
        return {"loss": mse, "inference": mse}


def build_cities(cfg, n_items, llm, pca, popularity, data: SequenceData) -> CITIES:
    """CITIES on `data` (the registry's builder): contexts and head/tail from training interactions only."""
    return CITIES(cfg, n_items, ItemContexts(data, cfg.method_settings.window), popularity)
