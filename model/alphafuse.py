"""AlphaFuse (Hu et al., SIGIR 2025; Hugo-Chinn/AlphaFuse): ID embeddings learnt in the null
space of the language embeddings, no adapter.

The LLM table's covariance is decomposed by SVD, C = U diag(S) U^T. Each item's semantic
coordinates are its centred LLM embedding on the top d directions, z_i = (s_i - μ) U_{:d},
whitened by S^{-1/2} (their `standardization`, on by default). The last d_n of those d
coordinates, the directions where the language embeddings vary least, are the "null space":
there the item's ID embedding (d_n wide, trainable) is added (or replaces the semantic
coordinates, `cover`), f_i = [z_i[:d-d_n], z_i[d-d_n:] + e_i]. The semantic part stays frozen,
so nothing maps language to the ID space: no adapter. This is their SASRec setting
(ID_space = inject_space = "singular", null_dim); their null_thres variant (the null space
chosen by a singular-value threshold) and item-frequency-weighted covariance are left out.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from model.config import Invalid, check_fields, rule
from model.faerec import SequentialRecommender, padded_llm_table


@dataclass
class AlphaFuseConfig:
    null_dim: int = rule(64, ge=1)  # d_n: the ID embeddings' width, the last d_n semantic coordinates
    standardize: bool = True        # whiten the semantic coordinates by S^{-1/2} (their default)
    cover: bool = False             # True: the ID embeddings replace the null-space coordinates
    id_init: str = rule("zeros", choices=("zeros", "normal"))  # their long-tail runs: zeros; normal: N(0, 1)

    def __post_init__(self):
        check_fields(self)

    def check(self, cfg):
        if self.null_dim > cfg.hidden_size:
            raise Invalid("alphafuse.null_dim", f"must be <= hidden_size = {cfg.hidden_size}, "
                                                f"got {self.null_dim!r}")


def semantic_coordinates(llm, d, standardize=True, rel_floor=1e-6):
    """(n, d_llm) -> (n, d): centred LLM embeddings on the top d right-singular directions of their
    covariance, z = (s - μ) U_{:d}, times S^{-1/2} when standardize. Directions with variance under
    rel_floor * S_max carry nothing but rounding noise: their coordinates are 0, not noise
    blown up by S^{-1/2}; with d > min(n, d_llm) the columns past the rank are 0 too."""
    llm = torch.as_tensor(llm, dtype=torch.float64)
    centred = llm - llm.mean(0)
    cov = centred.T @ centred / max(len(llm) - 1, 1)  # (d_llm, d_llm), np.cov's
    U, S, _ = torch.linalg.svd(cov)
    k = min(d, llm.size(1))
    z = centred @ U[:, :k]  # (n, k)
    if standardize:
        kept = S[:k] > rel_floor * S[0]
        z = z * torch.where(kept, S[:k].clamp_min(1e-300).rsqrt(), torch.zeros_like(S[:k]))
    out = torch.zeros(len(llm), d, dtype=torch.float32)
    out[:, :k] = z.float()
    return out


class AlphaFuse(SequentialRecommender):
    def __init__(self, cfg, n_items, llm_embeddings):
        super().__init__(cfg, n_items)
        own = cfg.method_settings
        padded = padded_llm_table(llm_embeddings, n_items)
        semantic = semantic_coordinates(padded[1:], cfg.hidden_size, own.standardize)
        self.register_buffer("semantic", torch.cat([semantic.new_zeros(1, cfg.hidden_size), semantic]),
                             persistent=False)  # (n + 1, d), frozen; row 0: padding
        self.id_embedding = nn.Embedding(n_items + 1, own.null_dim, padding_idx=0)  # e: d_n wide
        with torch.no_grad():
            if own.id_init == "zeros":
                self.id_embedding.weight.zero_()
            else:
                self.id_embedding.weight.normal_(0, 1)
                self.id_embedding.weight[0] = 0

    def item_embeddings(self, ids):
        """f = [z[:d-d_n], z[d-d_n:] + e] (cover: [z[:d-d_n], e]), ids (...) -> (..., d)."""
        z, e = self.semantic[ids], self.id_embedding(ids)
        d_n = e.size(-1)
        null = e if self.cfg.method_settings.cover else z[..., -d_n:] + e
        return torch.cat([z[..., :-d_n], null], dim=-1) if d_n < z.size(-1) else null

    def sequence_embeddings(self, input_ids):
        return self.item_embeddings(input_ids)

    def scoring_items(self):
        return self.item_embeddings(torch.arange(len(self.semantic), device=self.semantic.device))

    def item_tables(self):
        items = self.scoring_items()
        return items, items

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        f = self.item_embeddings
        rec = self.rec_loss(input_ids, pos_ids, f(input_ids), f(pos_ids), f(neg_ids))
        return {"loss": rec, "rec": rec}
