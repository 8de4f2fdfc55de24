"""LLM-ESR: similar-user retrieval against a brute-force loop, the self-distillation loss by
hand and against one-user-at-a-time encodings, causal cross-attention, and that it learns."""

import numpy as np
import pytest
import torch

from model.config import FAERecConfig, TrainConfig
from model.llmesr import (CrossViewAttention, LLMESRConfig, self_distillation_loss, similar_users,
                          user_llm_representations)
from model.methods import build_model
from model.train import TrainBatches, make_optimizer, train_step

from conftest import hit_rate, sequence_data

N_ITEMS, D, D_LLM, L = 30, 16, 24, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def pca_of(llm, d):
    centred = llm - llm.mean(0)
    return (centred @ np.linalg.svd(centred, full_matrices=False)[2][:d].T).astype(np.float32)


def test_user_representation_is_the_mean_llm_embedding_of_the_training_items():
    llm = np.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]], dtype=np.float32)  # items 1, 2, 3
    data = sequence_data([[1, 2, 3, 3], [3, 1], [2, 2, 1]], n_items=3)
    reps, has_history = user_llm_representations(data, llm)
    # user 0 trains on [1, 2] (the last two items are validation and test), user 2 on [2]
    np.testing.assert_allclose(reps, [[0.5, 1.0], [0.0, 0.0], [0.0, 2.0]])
    assert has_history.tolist() == [True, False, True]


def test_similar_users_against_a_brute_force_loop():
    rng = np.random.default_rng(0)
    reps = rng.normal(size=(13, 5)).astype(np.float32)
    candidates = rng.random(13) < 0.7
    got = similar_users(reps, candidates, k=3, block=4)  # blocks of 4 rows: the seams are crossed
    for u in range(13):
        cos = {v: reps[u] @ reps[v] / np.linalg.norm(reps[u]) / np.linalg.norm(reps[v])
               for v in range(13) if candidates[v] and v != u}
        assert got[u].tolist() == sorted(cos, key=cos.get, reverse=True)[:3]
    with pytest.raises(ValueError, match="sim_users"):
        similar_users(reps, candidates, k=int(candidates.sum()))


def test_self_distillation_loss_by_hand():
    user = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    similar = torch.tensor([[[0.0, 0.0], [2.0, 2.0]],    # mean (1, 1): squared errors 0, 1
                            [[1.0, -1.0], [1.0, 3.0]]])  # mean (1, 1): squared errors 1, 1
    assert self_distillation_loss(user, similar).item() == pytest.approx((0 + 1 + 1 + 1) / 4)


def test_cross_attention_is_causal_and_blind_to_padding():
    torch.manual_seed(0)
    att = CrossViewAttention(D)
    x, y = torch.randn(2, L, D), torch.randn(2, L, D)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, :3] = False
    out = att(x, y, mask)
    y2 = y.clone()
    y2[:, 5:] = torch.randn(2, L - 5, D)  # change the future
    y2[1, :3] = torch.randn(3, D)         # and the padding
    changed = att(x, y2, mask)
    torch.testing.assert_close(changed[0, :5], out[0, :5])  # real positions before the change
    torch.testing.assert_close(changed[1, 3:5], out[1, 3:5])
    assert not torch.allclose(changed[0, 5:], out[0, 5:])  # the test can fail
    assert torch.isfinite(out).all()


def llmesr(data, llm, sim_users, cross_attention=True, **cfg):
    config = FAERecConfig(**{"method": "llmesr", "hidden_size": D, "max_len": L, **cfg,
                             "method_settings": LLMESRConfig(sim_users=sim_users, cross_attention=cross_attention)})
    torch.manual_seed(0)
    return build_model(config, N_ITEMS, llm, pca_of(llm, D), data.train_popularity, data)


def tiny_setup(seed=0, **cfg):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, N_ITEMS + 1, size=rng.integers(3, 12)) for _ in range(12)]
    data = sequence_data(sequences, N_ITEMS)
    return data, llmesr(data, rng.normal(size=(N_ITEMS, D_LLM)).astype(np.float32), sim_users=2, **cfg)


@pytest.mark.parametrize("backbone", ["sasrec", "lrurec"])
def test_distillation_term_against_one_user_at_a_time(backbone):
    """With dropout 0, the loss's distillation term equals the MSE between each row's encoding
    and the mean of its similar users' encodings, each computed alone from its own history."""
    data, model = tiny_setup(backbone=backbone, dropout=0.0)
    batches = TrainBatches(data, L, np.random.default_rng(0))
    inputs, targets, negatives, users = (torch.as_tensor(a) for a in next(batches.epoch(5, with_users=True)))
    out = model.loss(inputs, targets, negatives, epoch=0, users=users)
    errors = []
    with torch.no_grad():
        for row, u in enumerate(users.tolist()):
            h = model.encode_ids(inputs[row:row + 1], last_only=True)[0]
            target = torch.stack([model.encode_ids(torch.as_tensor(
                np.r_[np.zeros(L, np.int64), data.sequences[v][:-2]][-L:])[None], last_only=True)[0]
                for v in model.similar[u].tolist()]).mean(0)
            errors.append((h - target) ** 2)
    torch.testing.assert_close(out["distill"], torch.cat(errors).mean(), rtol=1e-4, atol=1e-6)
    assert out["loss"].item() == pytest.approx(out["rec"].item() + 0.1 * out["distill"].item(), rel=1e-5)


def test_scores_are_the_dot_product_of_the_concatenated_views():
    data, model = tiny_setup(dropout=0.0)
    model.eval()
    inputs = torch.as_tensor(np.r_[np.zeros(L, np.int64), data.sequences[0]][-L:])[None]
    with torch.no_grad():
        ids = torch.arange(N_ITEMS + 1)
        items = torch.cat([model.id_embedding(ids), model.adapter(model.llm_embedding[ids])], -1)
        expected = model.encode_ids(inputs, last_only=True) @ items.T
        scores = model.score_all(inputs)
    torch.testing.assert_close(scores[:, 1:], expected[:, 1:])
    assert scores[0, 0] == -torch.inf


@pytest.mark.parametrize("cross_attention", [True, False])
def test_overfits_a_tiny_deterministic_dataset(cross_attention):
    """Every user walks one fixed item permutation; training through the loop's own batches
    (with user indices) drives the training loss down and HR@5 of the next item up."""
    rng = np.random.default_rng(0)
    following = rng.permutation(N_ITEMS) + 1
    sequences = []
    for _ in range(24):
        seq = [int(rng.integers(1, N_ITEMS + 1))]
        for _ in range(L + 2):
            seq.append(int(following[seq[-1] - 1]))
        sequences.append(seq)
    data = sequence_data(sequences, N_ITEMS)
    llm = rng.normal(size=(N_ITEMS, D_LLM)).astype(np.float32)
    model = llmesr(data, llm, sim_users=3, cross_attention=cross_attention, dropout=0.1)
    batches = TrainBatches(data, L, np.random.default_rng(0))
    optimizer = make_optimizer(model, TrainConfig(lr=5e-3))
    histories = torch.as_tensor(np.array([s[:-1][-L:] for s in sequences]))
    last = torch.as_tensor([s[-1] for s in sequences])

    assert hit_rate(model, histories, last) <= 0.5
    losses = []
    for epoch in range(100):
        for arrays in batches.epoch(8, with_users=True):
            losses.append(train_step(model, optimizer, [torch.as_tensor(a) for a in arrays], epoch)["loss"].item())
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])
    assert hit_rate(model, histories, last) >= 0.9
