"""CITIES: item contexts against a loop over the sequences, the inference function's masking,
the two stages (what trains, which rows change), and that it learns."""

import numpy as np
import pytest
import torch

from model.cities import CITIESConfig, EmbeddingInference, ItemContexts, inference_loss
from model.config import FAERecConfig
from model.faerec import SequentialRecommender
from model.methods import build_model

from conftest import sequence_data

N_ITEMS, D, L = 12, 16, 6
pytestmark = pytest.mark.usefixtures("one_thread")


def test_contexts_against_a_loop_over_the_training_sequences():
    rng = np.random.default_rng(0)
    data = sequence_data([rng.integers(1, N_ITEMS + 1, size=rng.integers(3, 11)) for _ in range(9)], N_ITEMS)
    w = 2
    expected = {i: [] for i in range(1, N_ITEMS + 1)}
    for seq in data.sequences:
        train = [int(x) for x in seq[:-2]]  # validation and test items never enter a context
        for t, item in enumerate(train):
            left, right = train[max(0, t - w):t], train[t + 1:t + 1 + w]
            if len(left) + len(right) >= 2:  # theirs: at least 2 other items around
                expected[item].append([0] * (w - len(left)) + left + [item] + right + [0] * (w - len(right)))
    contexts = ItemContexts(data, w)
    for item in range(1, N_ITEMS + 1):
        occurrences = np.arange(contexts.start[item], contexts.start[item + 1])
        assert sorted(contexts.contexts(occurrences).tolist()) == sorted(expected[item])
        assert contexts.count(np.array([item]))[0] == len(expected[item])


def test_inference_loss_by_hand():
    assert inference_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).item() == pytest.approx(2.5)


def test_inference_ignores_padded_contexts_and_their_order():
    """An item with 2 contexts padded by an all-zero third gets what it gets alone (their code
    buckets items by context count instead), and the order of the contexts does not matter."""
    torch.manual_seed(0)
    f = EmbeddingInference(D, window=2, num_layers=2, num_heads=4).eval()
    table = torch.randn(N_ITEMS + 1, D)
    table[0] = 0
    two = torch.tensor([[[0, 3, 5, 4, 1], [2, 7, 5, 0, 0]]])  # (1, 2, 5), item 5 in the middle
    with torch.no_grad():
        alone = f(two, table)
        padded = f(torch.cat([two, torch.zeros(1, 1, 5, dtype=torch.long)], 1), table)
        swapped = f(two.flip(1), table)
        other = f(torch.tensor([[[0, 3, 5, 4, 1], [2, 7, 5, 6, 0]]]), table)
        masked = f(torch.tensor([[[0, 3, 9, 4, 1], [2, 7, 9, 0, 0]]]), table)  # the middle item is never read
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(swapped, alone)
    torch.testing.assert_close(masked, alone)
    assert not torch.allclose(other, alone)


def test_contexts_encoded_in_length_groups_as_at_full_width():
    """encode_contexts (real positions first, groups of similar length, each cut to its
    longest) equals the context encoder over every context at full width, padding masked."""
    torch.manual_seed(1)
    f = EmbeddingInference(D, window=3, num_layers=2, num_heads=4).eval()
    n, c = 40, 7
    left, right = torch.randint(0, 4, (n,)), torch.randint(0, 4, (n,))  # real items on each side
    offsets = torch.arange(c) - c // 2
    real = (offsets >= -left[:, None]) & (offsets <= right[:, None])  # contiguous around the middle
    x = torch.randn(n, c, D)
    with torch.no_grad():
        full = f.context_encoder(x, src_key_padding_mask=~real)
        expected = (full * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        for groups in (1, 3, 8, n + 5):
            torch.testing.assert_close(f.encode_contexts(x, real, groups), expected, rtol=1e-5, atol=1e-5)


def walk_data(n_users=24, length=L + 3, seed=0):
    """Users walk one fixed permutation; items 1-3 appear only as starting points, rarely."""
    rng = np.random.default_rng(seed)
    following = rng.permutation(N_ITEMS) + 1
    sequences = []
    for _ in range(n_users):
        seq = [int(rng.integers(1, N_ITEMS + 1))]
        for _ in range(length - 1):
            seq.append(int(following[seq[-1] - 1]))
        sequences.append(seq)
    return sequence_data(sequences, N_ITEMS)


def cities_model(data, **settings):
    cfg = FAERecConfig(method="cities", hidden_size=D, max_len=L, num_layers=1, dropout=0.1,
                       method_settings=CITIESConfig(**{"window": 2, "max_shots": 3, "items_per_step": 8, **settings}))
    torch.manual_seed(0)
    return build_model(cfg, N_ITEMS, None, None, data.train_popularity, data)


def test_stages_what_trains_and_which_rows_change():
    data = walk_data()
    popularity = data.train_popularity.copy()
    tail_max = int(np.sort(popularity[1:])[3])  # the 4 least popular items (and ties) are tail
    model = cities_model(data, pretrain_epochs=2, tail_max_count=tail_max).eval()  # no dropout: comparable losses
    inputs = torch.as_tensor(np.array([s[:-2][-L:] for s in data.sequences if len(s) - 2 >= L]))[:, :L]
    batch = inputs[:, :-1], inputs[:, 1:], torch.randint(1, N_ITEMS + 1, inputs[:, 1:].shape)
    base = SequentialRecommender.loss(model, *batch, epoch=1)["loss"]
    stage1 = model.loss(*batch, epoch=1)
    torch.testing.assert_close(stage1["loss"], base)  # stage 1: the backbone's BCE, nothing else
    torch.testing.assert_close(model.item_tables()[0], model.id_embedding.weight)

    out = model.loss(*batch, epoch=2)  # stage 2: only the inference function gets gradients
    out["loss"].backward()
    assert set(out) == {"loss", "inference"}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.startswith("infer."), name
    with torch.no_grad():
        table = model.item_tables()[0]
    tail = torch.as_tensor(model.tail_items)
    assert len(tail) and set(model.tail_items) <= set(np.flatnonzero(popularity <= tail_max))
    keep = torch.ones(N_ITEMS + 1, dtype=torch.bool)
    keep[tail] = False
    torch.testing.assert_close(table[keep], model.id_embedding.weight[keep])  # head rows as trained
    assert not torch.allclose(table[tail], model.id_embedding.weight[tail])  # tail rows inferred
    # the stage is part of the saved state: a stage-1 checkpoint evaluates as stage 1
    assert bool(model.state_dict()["inferring"])


def test_the_inference_function_learns_head_embeddings():
    """Stage 2 on fixed embeddings: the MSE on head items falls well below its start."""
    data = walk_data(n_users=40)
    model = cities_model(data, pretrain_epochs=0, tail_max_count=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    dummy = (torch.ones(1, 2, dtype=torch.long),) * 3
    losses = []
    for step in range(150):
        loss = model.loss(*dummy, epoch=0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
