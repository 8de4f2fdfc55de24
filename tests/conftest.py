"""Shared fixtures and helpers: a small dataset in the paper's format, and ranking metrics
computed apart from the project's evaluation code."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from model.data import SequenceData


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread only adds contention on a shared 2-core machine (10x slower).
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sequence_data(sequences, n_items):
    """A SequenceData of the given item lists (users and items named by their index)."""
    sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
    return SequenceData("tiny", n_items, sequences, np.array([str(u) for u in range(len(sequences))]),
                        np.array([str(i) for i in range(1, n_items + 1)]), None, None)


def hit_rate(model, histories, targets, k=5):
    """Share of rows whose target the model ranks in its top k (the model goes back to train mode)."""
    model.eval()
    with torch.no_grad():
        scores = model.score_all(histories)
    model.train()
    return ((scores > scores.gather(1, targets.view(-1, 1))).sum(1) < k).float().mean().item()


def deterministic_sequences(n_items, length, n_users=20, seed=0):
    """Every user follows one fixed item permutation: the next item is a function of the current one."""
    g = torch.Generator().manual_seed(seed)
    following = torch.randperm(n_items, generator=g) + 1  # following[i - 1] comes after item i
    seqs = [torch.randint(1, n_items + 1, (n_users,), generator=g)]
    for _ in range(length - 1):
        seqs.append(following[seqs[-1] - 1])
    return torch.stack(seqs, dim=1)  # (n_users, length)


def fit_sequences(model, seqs, n_items, steps=200, seed=1):
    """Adam on every position of `seqs` with fresh negatives outside each sequence; the losses."""
    inputs, positives = seqs[:, :-1], seqs[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        negatives = torch.randint(1, n_items + 1, positives.shape, generator=g)
        clash = (negatives[:, :, None] == seqs[:, None, :]).any(-1)
        negatives[clash] = torch.randint(1, n_items + 1, (int(clash.sum()),), generator=g)
        loss = model.loss(inputs, positives, negatives, epoch=step // 20)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def write_faerec_dataset(folder, n_users=60, n_items=40, emb_dim=24, seed=0):
    """A small dataset in the paper's `uid i1 i2 ...` format with learnable structure:
    each user walks a cycle of items with an occasional random jump. Returns the paths
    of the sequences file and of a random `itm_emb_np.npy` (one row per item)."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, n_users + 1):
        item, length = rng.integers(1, n_items + 1), rng.integers(5, 15)
        seq = []
        for _ in range(length):
            seq.append(int(item))
            item = item % n_items + 1 if rng.random() < 0.8 else rng.integers(1, n_items + 1)
        lines.append(" ".join(map(str, [u, *seq])))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    emb = folder / "itm_emb_np.npy"
    np.save(emb, rng.normal(size=(n_items, emb_dim)).astype(np.float32))
    return path, emb


def leaky_test_items():
    """Users u0..u4 over 5 items (int(0.2 * 5) = 1 head item). Item 3 is every test target
    (and short u3's last item): with them it is the most popular item, without them never
    seen. Validation targets (u0 u1 u2 u4; u3 is not evaluated): items 2 1 1 2."""
    from model.data import SequenceData

    sequences = [np.array(s) for s in ([1, 2, 3], [2, 1, 3], [4, 1, 3], [5, 3], [1, 2, 3])]
    return SequenceData("leak", 5, sequences, np.arange(5).astype(str),
                        np.arange(1, 6).astype(str), None, None)


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_faerec_dataset(tmp_path / "data")


def reference_ranks(model, data, split, max_len):
    """(user, rank, tail) per evaluated user of `model` on a split, computed apart from
    model.train.evaluate: histories and targets cut from the raw sequences, the model's
    scores taken one user at a time, seen items (but the target) masked, ranks counted.

    Leave-one-out: validation predicts seq[-2] from seq[:-2], test seq[-1] from seq[:-1];
    users with fewer than 3 interactions are not evaluated. Tail: not among the 20% most
    counted items (ties: lower id), counted over whole sequences for test and over
    seq[:-1] (never a test item) for validation."""
    import torch

    cut = {"val": 2, "test": 1}[split]
    counted = Counter(int(i) for seq in data.sequences for i in (seq if split == "test" else seq[:-1]))
    head = set(sorted(range(1, data.n_items + 1), key=lambda i: (-counted[i], i))[:int(0.2 * data.n_items)])
    out = []
    model.eval()
    with torch.no_grad():
        for user, seq in enumerate(data.sequences):
            if len(seq) < data.min_sequence_length:
                continue
            history, target = [int(i) for i in seq[:-cut]], int(seq[-cut])
            window = history[-max_len:]
            inputs = torch.tensor([[0] * (max_len - len(window)) + window])
            scores = model.score_all(inputs)[0].tolist()
            seen = set(history) - {target}
            rank = sum(1 for item in range(1, data.n_items + 1)
                       if item not in seen and scores[item] > scores[target])
            out.append((user, rank, target not in head))
    return out


def reference_metrics(model, data, split, max_len, ks=(5, 10, 20)):
    """HR@K and NDCG@K (overall and tail) from reference_ranks."""
    sums, users = {}, {"overall": 0, "tail": 0}
    for _, rank, tail in reference_ranks(model, data, split, max_len):
        for group in ["overall"] + (["tail"] if tail else []):
            users[group] += 1
            for k in ks:
                hit = rank < k
                for metric, value in (("hr", float(hit)), ("ndcg", hit / math.log2(rank + 2))):
                    key = f"{split}/{group}/{metric}_{k}"
                    sums[key] = sums.get(key, 0.0) + value
    return {key: value / users[key.split("/")[1]] for key, value in sums.items()}
