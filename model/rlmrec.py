"""RLMRec (Ren et al., WWW 2024; HKUDS/RLMRec): collaborative and LLM item representations
aligned by maximising their mutual information, contrastively (RLMRec-Con) or generatively
(RLMRec-Gen), next to the recommendation loss.

RLMRec was built for graph collaborative filtering (LightGCN and kin): it aligns the user and
item node embeddings after graph propagation with LLM-written profiles. Here, as in the
FAERec paper's baselines (sec. 5.1.3), it runs on a sequential backbone, items only (the
datasets have item texts, no user profiles):
- Con: the backbone's ID item table takes the place of the propagated item embeddings;
- Gen: masked input positions take the place of masked graph nodes, and the backbone's
  output at a masked position the place of the node's propagated embedding;
- the BCE of eq. (13) takes the place of their BPR loss, and Adam's weight_decay of their
  L2 term on every parameter.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from model.config import check_fields, rule
from model.faerec import SequentialRecommender, item_alignment_loss, padded_llm_table


@dataclass
class RLMRecConConfig:
    weight: float = rule(0.01, ge=0)  # of the alignment loss (their kd_weight, 1e-2)
    tau: float = rule(0.2, gt=0)      # InfoNCE temperature (their kd_temperature)

    def __post_init__(self):
        check_fields(self)


@dataclass
class RLMRecGenConfig:
    weight: float = rule(0.1, ge=0)   # of the reconstruction loss (their recon_weight)
    tau: float = rule(0.2, gt=0)      # InfoNCE temperature (their re_temperature)
    mask_ratio: float = rule(0.1, gt=0, lt=1)  # chance that a real input position is masked

    def __post_init__(self):
        check_fields(self)


def semantic_mlp(d_in, d_out):
    """RLMRec's map between the two spaces: d_in -> (d_in + d_out) // 2 -> LeakyReLU -> d_out,
    Xavier-uniform weights as in their code."""
    hidden = (d_in + d_out) // 2
    mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.LeakyReLU(), nn.Linear(hidden, d_out))
    for layer in (mlp[0], mlp[2]):
        nn.init.xavier_uniform_(layer.weight)
    return mlp


class RLMRecCon(SequentialRecommender):
    """BCE + weight * InfoNCE between each batch item's ID embedding e_i and its LLM embedding
    mapped down, σ↓(s_i): -log exp(cos(e_i, σ↓(s_i))/τ) / Σ_j exp(cos(e_i, σ↓(s_j))/τ) over the
    batch's distinct items (RLMRec's contrastive alignment; their cal_infonce_loss)."""

    def __init__(self, cfg, n_items, llm_embeddings):
        super().__init__(cfg, n_items)
        self.register_buffer("llm_embedding", padded_llm_table(llm_embeddings, n_items), persistent=False)
        self.down = semantic_mlp(self.llm_embedding.size(1), cfg.hidden_size)  # σ↓: language -> collaborative

    def alignment_loss(self, ids):
        """Contrastive alignment over the distinct item ids (K,)."""
        with torch.autocast(ids.device.type, enabled=False):  # cos / τ needs float32
            e_id = self.id_embedding(ids).float()
            return item_alignment_loss(e_id, self.down(self.llm_embedding[ids]), self.cfg.method_settings.tau)

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        rec = super().loss(input_ids, pos_ids, neg_ids, epoch)["rec"]
        ids = torch.unique(torch.stack([input_ids, pos_ids, neg_ids]))
        align = self.alignment_loss(ids[ids != 0])
        return {"loss": rec + self.cfg.method_settings.weight * align, "rec": rec, "align": align}


class RLMRecGen(SequentialRecommender):
    """Masked reconstruction: a random mask_ratio of the real input positions get a learnt mask
    token instead of their item's ID embedding; the backbone's output h_t at a masked position,
    mapped up, σ↑(h_t), must pick out the masked item's LLM embedding s_t among the other masked
    positions' (InfoNCE, RLMRec's generative alignment; their ssl_con_loss). The recommendation
    loss sees the masked sequence too, as their BPR loss sees the masked graph."""

    def __init__(self, cfg, n_items, llm_embeddings):
        super().__init__(cfg, n_items)
        self.register_buffer("llm_embedding", padded_llm_table(llm_embeddings, n_items), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(cfg.hidden_size))  # their NodeMask: learnt, zero start
        self.up = semantic_mlp(cfg.hidden_size, self.llm_embedding.size(1))  # σ↑: collaborative -> language

    def reconstruction_loss(self, h, item_ids):
        """h (M, d) outputs at the masked positions, item_ids (M,) their items; copies of an
        item are not its negatives."""
        if len(item_ids) < 2:  # no negative to contrast with
            return h.new_zeros(())
        with torch.autocast(h.device.type, enabled=False):
            return item_alignment_loss(self.up(h.float()), self.llm_embedding[item_ids],
                                       self.cfg.method_settings.tau, item_ids)

    def loss(self, input_ids, pos_ids, neg_ids, epoch):
        own = self.cfg.method_settings
        real = input_ids != 0
        masked = (torch.rand(input_ids.shape, device=input_ids.device) < own.mask_ratio) & real  # (B, L)
        seq = torch.where(masked.unsqueeze(-1), self.mask_token, self.id_embedding(input_ids))  # (B, L, d)
        h = self.backbone(seq, real)  # (B, L, d)
        e = self.id_embedding
        rec = self.bce(h, pos_ids, e(pos_ids), e(neg_ids))
        recon = self.reconstruction_loss(h[masked], input_ids[masked])
        return {"loss": rec + own.weight * recon, "rec": rec, "recon": recon}
