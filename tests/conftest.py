"""Shared fixtures: a small dataset in the paper's format, written where a test wants it."""

import numpy as np
import pytest


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


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_faerec_dataset(tmp_path / "data")
