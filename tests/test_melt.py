"""MELT: contexts against a transcription of their loop, the head/tail split and curriculum
weights by hand, both branch losses and the tail-item update against one-at-a-time
computations, tail-user transfer at prediction, the stages, and that it learns."""

import math

import numpy as np
import pytest
import torch

from model.config import FAERecConfig, TrainConfig
from model.faerec import SequentialRecommender
from model.melt import Contexts, MELTConfig, branch_loss, head_tail_split, item_weight, user_weight
from model.methods import build_model
from model.train import TrainBatches, make_optimizer, train_step

from conftest import hit_rate, sequence_data

N_ITEMS, D, L = 12, 16, 6
pytestmark = pytest.mark.usefixtures("one_thread")


def random_data(n_users=10, seed=0):
    rng = np.random.default_rng(seed)
    return sequence_data([rng.integers(1, N_ITEMS + 1, size=rng.integers(3, 14)) for _ in range(n_users)], N_ITEMS)


def their_contexts(train, maxlen):
    """Their embedder.save_user_item_context, transcribed (item -> list of maxlen arrays)."""
    item_context = {}
    for seq in train:
        seq = list(seq)
        for i, item in enumerate(seq):
            all_seq = np.zeros(maxlen, dtype=np.int64)
            idx = maxlen - 1
            for j in reversed(seq[:i + 1]):
                all_seq[idx] = j
                idx -= 1
                if idx == -1:
                    break
            item_context.setdefault(item, []).append(all_seq)
            if len(seq) > 1:
                all_seq = np.zeros(maxlen, dtype=np.int64)
                idx = maxlen - 1
                for j in seq[i:]:
                    all_seq[idx] = j
                    idx -= 1
                    if idx == -1:
                        break
                item_context[item].append(all_seq)
    return item_context


def test_contexts_against_their_loop():
    data = random_data()
    train = [seq[:-2] for seq in data.sequences]
    contexts = Contexts(train, N_ITEMS, L)
    expected = their_contexts(train, L)
    for item in range(1, N_ITEMS + 1):
        got = contexts.sequences(np.arange(contexts.start[item], contexts.start[item + 1]))
        assert sorted(got.tolist()) == sorted(a.tolist() for a in expected.get(item, []))


def test_head_tail_split_by_hand():
    # training parts seq[:-2]: lengths 1, 2, 3, 6 -> the 0.5 quantile is 2.5: users 2, 3 are head
    data = sequence_data([[1, 9, 9], [1, 2, 9, 9], [1, 2, 3, 9, 9], [1, 1, 1, 2, 2, 4, 9, 9]], n_items=9)
    user_thr, head_users, item_thr, head_items = head_tail_split(data, 0.5)
    assert user_thr == 2.5 and head_users.tolist() == [False, False, True, True]
    # training counts: item 1: 6, 2: 4, 3: 1, 4: 1 -> the 0.48 quantile of (1, 1, 4, 6) is 1 + 0.44 * 3 = 2.32
    assert item_thr == pytest.approx(2.32)
    assert np.flatnonzero(head_items).tolist() == [1, 2]


def test_curriculum_weights_by_hand():
    # epoch 0 of 10, 8 items, max_len 10, threshold 3: |sin(π / (2 * 6) * 4)| = sin(π/3)
    assert user_weight(0, 10, torch.tensor(8.0), 10, 3.0).item() == pytest.approx(math.sin(math.pi / 3))
    # epoch 5 of 10: + π/4
    assert user_weight(5, 10, torch.tensor(8.0), 10, 3.0).item() == pytest.approx(math.sin(math.pi / 3 + math.pi / 4))
    # items: |sin(π/2 * 2/4 + π/100 * (30 - 4 - 1))| = sin(π/4 + π/4) = 1; n capped at thr + 50
    assert item_weight(2, 4, torch.tensor(30.0), 4.0).item() == pytest.approx(1.0)
    assert item_weight(0, 4, torch.tensor(500.0), 4.0).item() == pytest.approx(abs(math.sin(math.pi / 100 * 49)))


def test_branch_loss_by_hand():
    w = torch.tensor([1.0, 0.5])
    predicted, target = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    assert branch_loss(w, predicted, target).item() == pytest.approx((1 + 4 + 0.5 * 4 + 0) / 4)


def melt_model(data, **settings):
    cfg = FAERecConfig(method="melt", hidden_size=D, max_len=L, num_layers=1, dropout=0.0,
                       method_settings=MELTConfig(**{"pareto": 0.5, "pretrain_epochs": 1, "e_max": 10, **settings}))
    torch.manual_seed(0)
    return build_model(cfg, N_ITEMS, None, None, data.train_popularity, data)


def left_padded(items):
    return torch.as_tensor(np.r_[np.zeros(L, np.int64), np.asarray(items, np.int64)][-L:])[None]


def test_user_branch_against_one_user_at_a_time():
    """A threshold of 2 makes R = 1: the few-item sequence is the last item alone."""
    data = random_data()
    model = melt_model(data).eval()
    model.user_threshold = 2.0
    users = model.head_users[:3]
    got = model.user_branch_loss(users, epoch=4)
    terms = []
    with torch.no_grad():
        for u in users:
            train = data.sequences[u][:-2][-L:]
            full = model.encode(left_padded(train))[0]
            few = model.W_U(model.encode(left_padded(train[-1:])))[0]
            w = abs(math.sin(math.pi / 2 * 4 / 10 + math.pi / (2 * (L - 2 - 1)) * (len(train) - 2 - 1)))
            terms.append(w * (few - full) ** 2)
    torch.testing.assert_close(got, torch.cat(terms).mean())


def test_item_branch_against_one_item_at_a_time(monkeypatch):
    """A threshold of 1 makes k = 1; the drawn context is made the item's first."""
    data = random_data()
    model = melt_model(data).eval()
    model.item_threshold = 1.0
    monkeypatch.setattr(model, "draw_contexts", lambda item, k: model.contexts.start[item] + np.arange(k))
    items = model.head_items[:4]
    got = model.item_branch_loss(items, epoch=3)
    expected = their_contexts([seq[:-2] for seq in data.sequences], L)
    terms = []
    with torch.no_grad():
        for item in items:
            # the first context of an item: its first occurrence's forward prefix (users in order)
            r = model.encode(torch.as_tensor(expected[item][0])[None])[0]
            predicted = model.W_I(r + model.W_U(r))
            n = min(int(data.train_popularity[item]), 1 + 50)
            w = abs(math.sin(math.pi / 2 * 3 / 10 + math.pi / 100 * (n - 1 - 1)))
            terms.append(w * (predicted - model.id_embedding.weight[item]) ** 2)
    torch.testing.assert_close(got, torch.cat(terms).mean())


def test_tail_update_and_tail_user_transfer():
    data = random_data()
    model = melt_model(data)
    before = model.id_embedding.weight.detach().clone()
    expected = their_contexts([seq[:-2] for seq in data.sequences], L)
    inputs = torch.stack([left_padded(s[:-2][-L:])[0] for s in data.sequences if len(s) > 3])
    batch = inputs[:, :-1], inputs[:, 1:], torch.randint(1, N_ITEMS + 1, inputs[:, 1:].shape) * (inputs[:, 1:] > 0)
    model.eval()
    base = SequentialRecommender.score_all(model, inputs)
    torch.testing.assert_close(model.score_all(inputs), base)  # stage 1: no transfer yet
    torch.testing.assert_close(model.loss(*batch, epoch=0)["loss"], SequentialRecommender.loss(model, *batch, 0)["loss"])
    with torch.no_grad():  # each tail item: W_I of the mean encoding of all its contexts
        inferred = {item: model.W_I(model.encode(torch.as_tensor(np.stack(expected[item]))).mean(0))
                    for item in model.tail_items}
    assert inferred
    model.loss(*batch, epoch=1)  # the first stage-2 step updates the tail items
    after = model.id_embedding.weight.detach()
    with torch.no_grad():
        for item in range(1, N_ITEMS + 1):
            torch.testing.assert_close(after[item], inferred.get(item, before[item]))
        h = SequentialRecommender.user_representation(model, inputs, model.id_embedding(inputs))
        tail = (inputs != 0).sum(1) <= model.user_threshold
        assert tail.any() and (~tail).any()
        h[tail] = h[tail] + model.W_U(h[tail])
        expected_scores = h @ model.id_embedding.weight.T
        expected_scores[:, 0] = -torch.inf
        torch.testing.assert_close(model.score_all(inputs), expected_scores)
    assert int(model.state_dict()["updated_epoch"]) == 1


def test_warmup_epochs_train_w_i_before_the_first_tail_update():
    data = random_data()
    model = melt_model(data, warmup_epochs=1)
    inputs = torch.stack([left_padded(s[:-2][-L:])[0] for s in data.sequences if len(s) > 3])
    batch = inputs[:, :-1], inputs[:, 1:], torch.randint(1, N_ITEMS + 1, inputs[:, 1:].shape) * (inputs[:, 1:] > 0)
    tail = torch.as_tensor(model.tail_items)
    optimizer = torch.optim.SGD([model.W_I.weight], lr=0.1)  # only W_I moves: tail rows change by the update alone
    before = model.id_embedding.weight.detach()[tail].clone()
    w_i = model.W_I.weight.detach().clone()
    optimizer.zero_grad()
    model.loss(*batch, epoch=1)["loss"].backward()  # MELT's first epoch: the warm-up, W_I trains
    optimizer.step()
    torch.testing.assert_close(model.id_embedding.weight.detach()[tail], before)
    assert not torch.equal(model.W_I.weight, w_i)
    model.loss(*batch, epoch=2)  # the next epoch's first step overwrites the tail rows with the trained W_I
    assert not torch.allclose(model.id_embedding.weight.detach()[tail], before)


def test_overfits_a_tiny_deterministic_dataset():
    rng = np.random.default_rng(0)
    following = rng.permutation(N_ITEMS) + 1
    sequences = []
    for _ in range(24):
        seq = [int(rng.integers(1, N_ITEMS + 1))]
        for _ in range(int(rng.integers(L, L + 6))):
            seq.append(int(following[seq[-1] - 1]))
        sequences.append(seq)
    data = sequence_data(sequences, N_ITEMS)
    cfg = FAERecConfig(method="melt", hidden_size=D, max_len=L, dropout=0.1,
                       method_settings=MELTConfig(pareto=0.5, pretrain_epochs=5, e_max=40))
    torch.manual_seed(0)
    model = build_model(cfg, N_ITEMS, None, None, data.train_popularity, data)
    batches = TrainBatches(data, L, np.random.default_rng(0))
    optimizer = make_optimizer(model, TrainConfig(lr=5e-3))
    histories = torch.stack([left_padded(s[:-1][-L:])[0] for s in sequences])
    last = torch.as_tensor([s[-1] for s in sequences])

    assert hit_rate(model, histories, last) <= 0.6
    parts = []
    for epoch in range(40):
        for arrays in batches.epoch(8):
            parts.append(train_step(model, optimizer, [torch.as_tensor(a) for a in arrays], epoch))
    assert {"user", "item"} <= set(parts[-1])
    assert np.mean([p["loss"].item() for p in parts[-6:]]) < 0.5 * np.mean([p["loss"].item() for p in parts[:6]])
    assert hit_rate(model, histories, last) >= 0.9
