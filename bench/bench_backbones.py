"""Training-epoch and full-ranking evaluation seconds of every backbone against SASRec,
measured in one run with the backbones alternating, so that a shared machine's load falls
on all of them alike.

    .venv/bin/python bench/bench_backbones.py [--dataset ml-100k] [--method M]
        [--rounds 3] [--threads 1] [--backbones sasrec,narm,...] [--json]

The project's defaults (d = 128, max_len 50, 2 layers, batch 256), the real training step
and evaluation of model.train. Each round times one whole training epoch and one
evaluation of the validation users per backbone (a warm-up step first, in round 1); the
backbones' order rotates from round to round. Reported: the median over rounds, and its
ratio to SASRec's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model.train as train  # noqa: E402
from model.config import BACKBONE_NAMES, EmbeddingConfig, FAERecConfig, TrainConfig  # noqa: E402
from model.data import resolve_dataset  # noqa: E402
from model.methods import METHODS  # noqa: E402


def timed_epoch(model, optimizer, batches, split, data) -> tuple[float, float]:
    tic = time.perf_counter()
    train.train_epoch(model, optimizer, batches, 256, 1, torch.device("cpu"))
    epoch_s = time.perf_counter() - tic
    tic = time.perf_counter()
    train.evaluate(model, split, data, "val", 512, torch.device("cpu"))
    return epoch_s, time.perf_counter() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--method", default="base", choices=list(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backbones", default=",".join(BACKBONE_NAMES))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    names = args.backbones.split(",")
    if "sasrec" not in names:
        raise SystemExit("--backbones must include sasrec, the reference")
    torch.set_num_threads(args.threads)
    inputs = train.load_inputs(resolve_dataset(args.dataset), EmbeddingConfig(),
                               need_llm=METHODS[args.method].needs_llm_table(FAERecConfig(method=args.method)))
    setups = {}
    for name in names:
        torch.manual_seed(0)
        cfg = FAERecConfig(method=args.method, backbone=name)
        model = train.build(inputs, cfg, torch.device("cpu"))
        optimizer = train.make_optimizer(model, TrainConfig())
        batches = train.TrainBatches(inputs.data, cfg.max_len, np.random.default_rng(0))
        train.train_step(model, optimizer, [torch.as_tensor(a) for a in next(batches.epoch(256))], 0)  # warm-up
        setups[name] = model, optimizer, batches
    split = train.EvalSplit.build(inputs.data, "val", 50)
    times = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed_epoch(*setups[name], split, inputs.data))
    result = {}
    for name in names:
        epoch_s = statistics.median(t[0] for t in times[name])
        eval_s = statistics.median(t[1] for t in times[name])
        result[name] = {"epoch_s": round(epoch_s, 3), "eval_s": round(eval_s, 3)}
    for name in names:
        result[name]["epoch_vs_sasrec"] = round(result[name]["epoch_s"] / result["sasrec"]["epoch_s"], 2)
        result[name]["eval_vs_sasrec"] = round(result[name]["eval_s"] / result["sasrec"]["eval_s"], 2)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.dataset}, method {args.method}, {args.threads} thread(s), median of {args.rounds} rounds")
    print(f"{'backbone':<10}{'epoch s':>9}{'x SASRec':>10}{'eval s':>9}{'x SASRec':>10}")
    for name, r in result.items():
        print(f"{name:<10}{r['epoch_s']:>9.2f}{r['epoch_vs_sasrec']:>10.2f}{r['eval_s']:>9.2f}{r['eval_vs_sasrec']:>10.2f}")


if __name__ == "__main__":
    main()
