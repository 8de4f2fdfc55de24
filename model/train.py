"""One training run: FAERec (or the plain backbone) on one dataset, evaluated like the paper.

    python -m model.train --dataset ml-100k --backbone sasrec --method faerec --json

Protocol (reference code): leave-one-out splits, sequence-to-sequence BCE with one
sampled negative per position, validation every epoch, early stopping on a validation
metric, the best validation state evaluated once on test. The loop knows nothing of Ray
or MLflow: a caller passes `on_epoch` to watch (and checkpoint) the epochs go by.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import yaml

from model.config import (SETTING_NAMES, EmbeddingConfig, FAERecConfig, TrainConfig,  # noqa: F401
                          embedding_config_from_dict, setting_names, settings_from_dict,
                          settings_to_dict)
from model.data import SequenceData, check_trainable, load_dataset, pad_left, resolve_dataset
from model.errors import ConfigError
from model.methods import METHODS, build_model
from model.metrics import RankingEvaluator, UserRanks
from model.text import item_embeddings, pca_embeddings


# ---------------------------------------------------------------------------------------
# Inputs: dataset + frozen LLM item embeddings (prepared once, shared by many runs).

@dataclass
class Inputs:
    data: SequenceData
    llm_embeddings: np.ndarray | None    # (n_items, d_llm); None when only `base` runs


def load_inputs(dataset_cfg, embedding_cfg: EmbeddingConfig, need_llm: bool = True) -> Inputs:
    data = load_dataset(dataset_cfg)
    check_trainable(data, dataset_cfg)
    llm = item_embeddings(data, embedding_cfg) if need_llm else None
    return Inputs(data, llm)


# ---------------------------------------------------------------------------------------
# Batches

class TrainBatches:
    """Sequence-to-sequence training arrays and the per-position negative sampler.

    Each training sequence x = seq[:-2] gives input x[:-1] and target x[1:] (reference
    code: items[:-3] -> items[1:-2]). One negative per position is drawn uniformly from
    the items the user never interacted with (whole sequence, as the reference code).
    Users with exactly 2 items are never evaluated; two_item_users="pair" trains them on
    their one pair (items[0] -> items[1], the code's datasets.py 83-89), "drop" leaves them out.
    batch_all_users keeps a row for every other user too, all padding (1 or 3 items: nothing
    to train), as the code's DataLoader does: fewer real users per batch, more batches.

    On a GPU (`device`), the arrays stay on the device and negatives are drawn there,
    directly from each user's unseen items (no rejection loop, no host sync per step).
    """

    def __init__(self, data: SequenceData, max_len: int, rng: np.random.Generator,
                 two_item_users: str = "drop", batch_all_users: bool = False,
                 device: torch.device | None = None):
        def trained(seq):  # what the user trains on: seq[:-2], or a 2-item user's pair
            return seq[:-2] if len(seq) >= 4 else seq if len(seq) == 2 and two_item_users == "pair" else None

        users = [u for u, s in enumerate(data.sequences) if batch_all_users or trained(s) is not None]
        train = [trained(data.sequences[u]) for u in users]
        train = [x if x is not None else np.zeros(0, np.int64) for x in train]
        self.users = np.asarray(users, dtype=np.int64)             # (U,) row -> index into data.sequences
        self.inputs = pad_left([x[:-1] for x in train], max_len)   # (U, L)
        self.targets = pad_left([x[1:] for x in train], max_len)   # (U, L)
        self.n_items = data.n_items
        self.rng = rng
        # Sorted keys user * (n + 1) + item answer "did user u see item i?" for a whole
        # batch with one searchsorted call instead of a Python loop over users.
        stride = data.n_items + 1
        self.seen_keys = np.unique(np.concatenate(
            [i * stride + np.asarray(data.sequences[u]) for i, u in enumerate(users)]))
        self.device = device
        if device is not None:
            self.on_device = {"inputs": torch.as_tensor(self.inputs, device=device),
                              "targets": torch.as_tensor(self.targets, device=device),
                              "users": torch.as_tensor(self.users, device=device),
                              **unseen_tables(self.seen_keys, len(users), data.n_items, device)}
            self.has_target = self.targets.any(1)  # host copy: empty batches skipped without a sync
            self.generator = torch.Generator(device)

    def __len__(self) -> int:
        return len(self.inputs)

    def sample_negatives(self, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        stride = self.n_items + 1
        neg = self.rng.integers(1, self.n_items + 1, size=shape)
        todo = np.ones(shape, dtype=bool)
        for _ in range(100):  # rejection sampling; a user who saw almost every item needs more
            keys = rows[:, None] * stride + neg
            pos = np.searchsorted(self.seen_keys, keys).clip(max=len(self.seen_keys) - 1)
            todo = self.seen_keys[pos] == keys
            if not todo.any():
                break
            neg[todo] = self.rng.integers(1, self.n_items + 1, size=int(todo.sum()))
        return neg

    def sample_negatives_on_device(self, rows: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Uniform over each row's unseen items: the r-th unseen item of user i is
        r + 1 + #{j : s_j - j <= r + 1} for i's sorted seen items s_0 < s_1 < ... (1-based)."""
        t = self.on_device
        r = (torch.rand(shape, dtype=torch.float64, device=rows.device, generator=self.generator)
             * t["unseen"][rows, None]).long()  # (B, L) in [0, unseen)
        keys = rows[:, None] * (self.n_items + 1) + r + 1
        return r + 1 + torch.searchsorted(t["shifted"], keys, right=True) - t["starts"][rows, None]

    def epoch(self, batch_size: int, with_users: bool = False):
        """(inputs, targets, negatives) batches, plus each row's user index with_users."""
        if self.device is not None:
            yield from self.epoch_on_device(batch_size, with_users)
            return
        order = self.rng.permutation(len(self))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            inputs, targets = self.inputs[rows], self.targets[rows]
            if not targets.any():  # only padding rows (batch_all_users): no loss to take
                continue
            negatives = self.sample_negatives(rows, targets.shape) * (targets > 0)
            yield (inputs, targets, negatives, self.users[rows]) if with_users else (inputs, targets, negatives)

    def epoch_on_device(self, batch_size: int, with_users: bool = False):
        order = self.rng.permutation(len(self))
        self.generator.manual_seed(int(self.rng.integers(2**63)))  # from rng: a resumed run draws the same
        on_device = torch.as_tensor(order, device=self.device)  # one copy per epoch
        for start in range(0, len(order), batch_size):
            if not self.has_target[order[start:start + batch_size]].any():
                continue
            rows = on_device[start:start + batch_size]
            inputs, targets = self.on_device["inputs"][rows], self.on_device["targets"][rows]
            negatives = self.sample_negatives_on_device(rows, tuple(targets.shape)) * (targets > 0)
            yield ((inputs, targets, negatives, self.on_device["users"][rows]) if with_users
                   else (inputs, targets, negatives))


def unseen_tables(seen_keys: np.ndarray, n_rows: int, n_items: int, device) -> dict[str, torch.Tensor]:
    """From sorted keys row * (n_items + 1) + item: per row, how many items it has not seen
    and where its seen items start, and the keys row * (n_items + 1) + s_j - j (j-th seen
    item s_j of the row) that map a rank among unseen items to the item."""
    stride = n_items + 1
    row = seen_keys // stride
    starts = np.searchsorted(row, np.arange(n_rows))
    counts = np.bincount(row, minlength=n_rows)
    shifted = seen_keys - (np.arange(len(seen_keys)) - starts[row])  # still sorted: s_j - j never decreases
    return {"unseen": torch.as_tensor(np.maximum(n_items - counts, 1), device=device),  # 1: a user who saw all
            "starts": torch.as_tensor(starts, device=device),
            "shifted": torch.as_tensor(shifted, device=device)}


@dataclass
class EvalSplit:
    """Padded histories, targets and the (row, item) pairs to exclude from ranking."""
    inputs: np.ndarray          # (U, L)
    targets: np.ndarray         # (U,)
    seen_rows: np.ndarray       # flat row index of every history item...
    seen_items: np.ndarray      # ...and the item itself (whole history, not just the last L)
    users: np.ndarray           # (U,) index of each row's user in data.sequences

    @classmethod
    def build(cls, data: SequenceData, split: str, max_len: int) -> "EvalSplit":
        histories, targets = data.eval_examples(split)
        rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(histories)])
        items = np.concatenate(histories)
        return cls(pad_left(histories, max_len), np.asarray(targets), rows, items, data.eval_users)


def evaluate(model, split: EvalSplit, data: SequenceData, name: str, batch_size: int,
             device: torch.device, keep_ranks: bool = False
             ) -> dict[str, float] | tuple[dict[str, float], UserRanks]:
    """Full ranking over all items; the user's already-seen items score -inf.

    A target that the user had already seen keeps its score: excluding it would count
    a guaranteed miss, which no ranking could avoid. Head/tail and popularity groups follow
    split `name`'s rule (val: never counting a test item). keep_ranks: also return each
    user's rank, (metrics, UserRanks).
    """
    model.eval()
    tail_mask = data.eval_tail_mask(name)
    evaluator = RankingEvaluator(torch.tensor(tail_mask, device=device),
                                 torch.tensor(data.eval_popularity_group(name), device=device),
                                 keep_ranks=keep_ranks)
    row_starts = np.searchsorted(split.seen_rows, np.arange(len(split.targets) + 1))
    with torch.no_grad():
        table, items = model.item_tables()  # every item's input embedding and scoring row, once
        for start in range(0, len(split.targets), batch_size):
            stop = min(start + batch_size, len(split.targets))
            inputs = torch.as_tensor(split.inputs[start:stop], device=device)
            targets = torch.as_tensor(split.targets[start:stop], device=device)
            scores = model.score_all(inputs, items=items, table=table)  # (B, n + 1)
            lo, hi = row_starts[start], row_starts[stop]
            rows = torch.as_tensor(split.seen_rows[lo:hi] - start, device=device)
            cols = torch.as_tensor(split.seen_items[lo:hi], device=device)
            arange = torch.arange(len(targets), device=device)
            target_scores = scores[arange, targets].clone()
            scores[rows, cols] = -torch.inf
            scores[arange, targets] = target_scores
            evaluator.update(scores, targets)
    if keep_ranks:
        return evaluator.compute(name), UserRanks(split.users, evaluator.ranks(), tail_mask[split.targets])
    return evaluator.compute(name)


# ---------------------------------------------------------------------------------------
# The loop

@dataclass
class EpochRecord:
    """What one epoch produced; `metrics` uses the design's names (`train/loss`, `val/...`)."""
    epoch: int                       # 1-based
    metrics: dict[str, float]
    improved: bool                   # select_metric reached a new best this epoch
    final: bool                      # the run ends after this epoch (budget or patience)
    best_epoch: int
    best_val: dict[str, float]       # validation metrics of the best state so far
    best_test: dict[str, float]      # its test metrics (with test_on_improvement)


@dataclass
class FitResult:
    best_epoch: int
    val: dict[str, float]            # validation metrics of the best state
    test: dict[str, float]           # test metrics of the best state
    history: list[dict[str, float]]
    epochs_run: int
    stopped_early: bool
    seconds: float
    settings: dict = field(default_factory=dict)
    test_ranks: UserRanks | None = None  # per-user test ranks of the best state


def resolve_device(name: str) -> torch.device:
    """The torch device of the `device` setting; a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    visible = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= visible:
        raise ConfigError(f"device = {name!r}: torch sees {visible} GPU(s)"
                          + (f" (cuda:0..cuda:{visible - 1})" if visible else "")
                          + "; use cpu or auto")
    return device


def train_step(model, optimizer, batch, epoch: int, autocast: bool = False) -> dict[str, torch.Tensor]:
    """One optimiser step on (inputs, positives, negatives); returns the loss parts detached
    and still on the device, so that the step never waits for the device (no host sync)."""
    with torch.autocast(batch[0].device.type, dtype=torch.bfloat16, enabled=autocast):
        users = {"users": batch[3]} if len(batch) > 3 else {}  # for the methods that need to know the user
        parts = model.loss(*batch[:3], epoch=epoch, **users)
    optimizer.zero_grad(set_to_none=True)
    parts["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in parts.items()}


def make_optimizer(model, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused: one pass per parameter instead of ~8 (2x faster on the item table, same values)
    return torch.optim.Adam(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                            fused=True)


def build(inputs: Inputs, model_cfg: FAERecConfig, device: torch.device,
          cache_dir: str | None = None) -> torch.nn.Module:
    """The model `model_cfg` names, on `device`, with what its method reads (model.methods):
    the LLM table, its PCA reduction, the training popularity."""
    method = METHODS[model_cfg.method]
    llm = pca = None
    if method.needs_llm_table(model_cfg) and inputs.llm_embeddings is None:
        raise ConfigError(f"method {model_cfg.method} needs LLM item embeddings; none were loaded")
    if method.needs_llm:
        llm = torch.tensor(inputs.llm_embeddings, dtype=torch.float32)  # a writable copy
    if method.needs_pca(model_cfg):
        pca = torch.as_tensor(pca_embeddings(inputs.llm_embeddings, model_cfg.hidden_size, cache_dir))
    popularity = torch.tensor(inputs.data.train_popularity)
    return build_model(model_cfg, inputs.data.n_items, llm, pca, popularity, inputs.data).to(device)


def train_epoch(model, optimizer, batches: TrainBatches, batch_size: int, epoch: int,
                device: torch.device, autocast: bool = False) -> dict[str, float]:
    """One pass over the training users; the mean of each loss part as `train/...`."""
    model.train()
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    for arrays in batches.epoch(batch_size, with_users=getattr(model, "needs_users", False)):
        batch = [torch.as_tensor(a, device=device) for a in arrays]
        # the curriculum's t counts completed epochs: the first epoch uses w1(0) = w_max
        parts = train_step(model, optimizer, batch, epoch - 1, autocast)
        steps += 1
        for k, v in parts.items():
            sums[k] = sums[k] + v if k in sums else v
    metrics = {f"train/{k}": float(v) / steps for k, v in sums.items()}
    if not math.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"training loss is {metrics['train/loss']} at epoch {epoch}")
    return metrics


def validates(epoch: int, cfg: TrainConfig) -> bool:
    """Validation runs every eval_every epochs after the first min_epochs, and at the last."""
    return epoch == cfg.epochs or (epoch > cfg.min_epochs and epoch % cfg.eval_every == 0)


def patience_in_validations(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Patience counted in validations, stretched so it spans at least patience_min_steps."""
    return max(cfg.patience, math.ceil(cfg.patience_min_steps / (steps_per_epoch * cfg.eval_every)))


def fit(inputs: Inputs, model_cfg: FAERecConfig, train_cfg: TrainConfig,
        on_epoch: Callable[[EpochRecord, Callable[[], dict]], None] | None = None,
        resume: dict | None = None, test_on_improvement: bool = False,
        cache_dir: str | None = None) -> FitResult:
    """Train one configuration; return the best validation state's metrics.

    `on_epoch(record, snapshot)` runs after every epoch; `snapshot()` returns everything
    needed to continue later (`fit(..., resume=snapshot())`). With `test_on_improvement`
    the best state is evaluated on test whenever it changes, so a caller that may be
    stopped at any epoch (ASHA) always holds the test metrics of its best state; selection
    still sees validation metrics only.
    """
    started = time.perf_counter()
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    device = resolve_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    rng = np.random.default_rng(train_cfg.seed)
    data = inputs.data
    model = build(inputs, model_cfg, device, cache_dir)
    optimizer = make_optimizer(model, train_cfg)
    batches = TrainBatches(data, model_cfg.max_len, rng, train_cfg.two_item_users,
                           train_cfg.batch_all_users, device if device.type != "cpu" else None)
    val_split = EvalSplit.build(data, "val", model_cfg.max_len)
    test_split = EvalSplit.build(data, "test", model_cfg.max_len)
    patience = patience_in_validations(train_cfg, math.ceil(len(batches) / train_cfg.batch_size))

    def test() -> tuple[dict[str, float], UserRanks]:
        return evaluate(model, test_split, data, "test", train_cfg.eval_batch_size, device,
                        keep_ranks=True)

    state = {"epoch": 0, "best_metric": -math.inf, "best_epoch": 0, "best_val": {},
             "best_test": {}, "best_test_ranks": None, "best_model": None, "bad_evals": 0,
             "history": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        rng.bit_generator.state = resume["rng"]
        torch.set_rng_state(resume["torch_rng"])
        state = copy.deepcopy(resume["loop"])  # the caller's snapshot stays as it was

    def snapshot() -> dict:
        # Copies: state_dict() tensors are the live ones, which training and the final
        # load_state_dict(best) overwrite in place.
        return copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                              "loop": state})

    stopped_early = False
    for epoch in range(state["epoch"] + 1, train_cfg.epochs + 1):
        tic = time.perf_counter()
        metrics = train_epoch(model, optimizer, batches, train_cfg.batch_size, epoch, device,
                              train_cfg.autocast)
        metrics["time/train_epoch_s"] = time.perf_counter() - tic

        improved = False
        if validates(epoch, train_cfg):
            tic = time.perf_counter()
            val = evaluate(model, val_split, data, "val", train_cfg.eval_batch_size, device)
            metrics.update(val)
            metrics["time/eval_s"] = time.perf_counter() - tic
            if val[train_cfg.select_metric] > state["best_metric"]:
                improved = True
                state.update(best_metric=val[train_cfg.select_metric], best_epoch=epoch,
                             best_val=val, bad_evals=0,
                             best_model=copy.deepcopy(model.state_dict()))
                if test_on_improvement:
                    state["best_test"], ranks = test()
                    # tensors: a checkpoint is read back with torch.load(weights_only=True)
                    state["best_test_ranks"] = {k: torch.tensor(v) for k, v in vars(ranks).items()}
            else:
                state["bad_evals"] += 1
        metrics["time/epoch_s"] = metrics["time/train_epoch_s"] + metrics.get("time/eval_s", 0.0)
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, **metrics})
        stopped_early = state["bad_evals"] >= patience
        if on_epoch is not None:
            on_epoch(EpochRecord(epoch, metrics, improved,
                                 final=stopped_early or epoch == train_cfg.epochs,
                                 best_epoch=state["best_epoch"], best_val=dict(state["best_val"]),
                                 best_test=dict(state["best_test"])), snapshot)
        if stopped_early:
            break

    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    if state["best_test"]:
        best_test, kept = state["best_test"], state.get("best_test_ranks")  # None in older snapshots
        test_ranks = UserRanks(**{k: v.numpy() for k, v in kept.items()}) if kept else None
    else:
        best_test, test_ranks = test()
    return FitResult(best_epoch=state["best_epoch"], val=state["best_val"],
                     test=best_test, history=state["history"],
                     epochs_run=state["epoch"], stopped_early=stopped_early,
                     seconds=time.perf_counter() - started,
                     settings=settings_to_dict(model_cfg, train_cfg), test_ranks=test_ranks)


# ---------------------------------------------------------------------------------------
# CLI

def parse_assignments(pairs: list[str], flag: str) -> dict:
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def _format_table(result: FitResult) -> str:
    lines = [f"best validation epoch {result.best_epoch} of {result.epochs_run} "
             f"({'early-stopped' if result.stopped_early else 'budget reached'}, "
             f"{result.seconds:.1f} s)", "",
             f"{'group':<10}" + "".join(f"{m:>10}" for m in
                                        ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"))]
    groups = ["overall", "tail", "head"] + sorted(
        {k.split("/")[1] for k in result.test if k.split("/")[1].startswith("pop_")},
        key=lambda g: int(g[4:].split("-")[0].rstrip("+")))
    for g in groups:
        cells = [result.test.get(f"test/{g}/{m}_{k}") for m in ("hr", "ndcg") for k in (5, 10, 20)]
        lines.append(f"{g:<10}" + "".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}"
                                          for c in cells))
    cov = [f"{k}={result.test[k]:.4f}" for k in sorted(result.test) if "coverage" in k]
    lines += ["", "coverage: " + ", ".join(cov)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k", help="built-in name or dataset YAML path")
    p.add_argument("--backbone", default="sasrec", help="sasrec | fmlprec | lrurec | narm | lightsans | gmlp")
    p.add_argument("--method", default="faerec", choices=list(METHODS),
                   help="; ".join(f"{name}: {m.about}" for name, m in METHODS.items()))
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any model/training setting: {', '.join(setting_names())}")
    p.add_argument("--embedding", action="append", default=[], metavar="KEY=VALUE",
                   help="item-embedding setting (encoder, path, url, model, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object of test metrics")
    args = p.parse_args(argv)
    try:
        settings = {"backbone": args.backbone.lower(), "method": args.method,
                    **parse_assignments(args.settings, "--set")}
        if args.epochs is not None:
            settings["epochs"] = args.epochs
        if args.seed is not None:
            settings["seed"] = args.seed
        model_cfg, train_cfg = settings_from_dict(settings, "command line")
        resolve_device(train_cfg.device)  # before the data loads
        dataset_cfg = resolve_dataset(args.dataset)
        embedding_cfg = embedding_config_from_dict(
            parse_assignments(args.embedding, "--embedding"), "--embedding")
        inputs = load_inputs(dataset_cfg, embedding_cfg,
                             need_llm=METHODS[model_cfg.method].needs_llm_table(model_cfg))
        result = fit(inputs, model_cfg, train_cfg)
    except (ConfigError, ValueError, OSError) as e:  # OSError: disk, permission, connection
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**result.test, "best_epoch": result.best_epoch,
                          "epochs_run": result.epochs_run, "seconds": round(result.seconds, 2),
                          "settings": result.settings}))
    else:
        print(_format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
