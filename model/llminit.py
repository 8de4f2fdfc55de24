"""LLMInit (LLM2BERT4Rec, SAID, Elephant; FAERec paper sec. 5.1.3): the backbone's ID table
starts from the LLM item embeddings reduced to d dimensions (the PCA table FAERec starts
from too), then trains like the plain backbone. The LLM table is not used after that."""

from model.faerec import SequentialRecommender


class LLMInit(SequentialRecommender):
    def __init__(self, cfg, n_items, pca):
        super().__init__(cfg, n_items)
        self.start_from_pca(pca, "llminit")
