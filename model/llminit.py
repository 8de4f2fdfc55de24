"""LLMInit (LLM2BERT4Rec, SAID, Elephant; FAERec paper sec. 5.1.3): the backbone's ID table
starts from the LLM item embeddings reduced to d dimensions (the PCA table FAERec starts
from too), then trains like the plain backbone. The LLM table is not used after that."""

import torch

from model.faerec import SequentialRecommender


class LLMInit(SequentialRecommender):
    def __init__(self, cfg, n_items, pca):
        super().__init__(cfg, n_items)
        pca = torch.as_tensor(pca, dtype=torch.float32) if pca is not None else None
        if pca is None or pca.shape != (n_items, cfg.hidden_size):
            raise ValueError(f"llminit needs the PCA table, (n_items={n_items}, d={cfg.hidden_size}), "
                             f"got {None if pca is None else tuple(pca.shape)}")
        with torch.no_grad():
            self.id_embedding.weight[1:] = pca  # row 0 stays the zero padding row
