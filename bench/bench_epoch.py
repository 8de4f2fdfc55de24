"""Seconds per training epoch, peak memory and full-ranking evaluation time:
FAERec-SASRec against plain SASRec, measured in one run.

    .venv/bin/python bench/bench_epoch.py [--dataset search_spaces/datasets/beauty.yaml]
        [--max-batches N] [--threads 2]

Random-normal 1536-d stand-in embeddings (the paper's ada-002 size), d = 128,
batch 256, length 50. Each model runs in its own process so that peak memory (max
RSS) belongs to that model alone. Target (issue 3): FAERec's epoch <= 1.5x the base's.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(method: str, args) -> dict:
    import numpy as np
    import torch

    from model.data import load_dataset, resolve_dataset
    from model.faerec import FAERecConfig, build_model
    from model.text import EmbeddingConfig, item_embeddings, pca_embeddings
    from model.train import EvalSplit, TrainBatches, evaluate

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset(resolve_dataset(args.dataset))
    cfg = FAERecConfig(method=method, backbone="sasrec", hidden_size=128, max_len=50)
    llm = pca = None
    if method == "faerec":
        emb = item_embeddings(data, EmbeddingConfig(encoder="random", dim=1536, seed=0))
        llm = torch.as_tensor(emb)
        pca = torch.as_tensor(pca_embeddings(emb, 128))
    model = build_model(cfg, data.n_items, llm, pca, torch.as_tensor(data.train_popularity))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = TrainBatches(data, cfg.max_len, np.random.default_rng(0))

    model.train()
    steps, tic = 0, time.perf_counter()
    for inp, pos, neg in batches.epoch(256):
        loss = model.loss(*(torch.as_tensor(a) for a in (inp, pos, neg)), epoch=1)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        if args.max_batches and steps >= args.max_batches:
            break
    step_s = (time.perf_counter() - tic) / steps
    epoch_s = step_s * math.ceil(len(batches) / 256)

    tic = time.perf_counter()
    evaluate(model, EvalSplit.build(data, "test", cfg.max_len), data, "test", 512,
             torch.device("cpu"))
    eval_s = time.perf_counter() - tic
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "steps_measured": steps, "epoch_s": epoch_s,
            "eval_s": eval_s, "peak_mib": peak_mib}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=str(ROOT / "search_spaces/datasets/beauty.yaml"))
    p.add_argument("--max-batches", type=int, default=0,
                   help="time only the first N batches and extrapolate (0 = whole epoch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=["base", "faerec"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0
    rows = []
    for method in ("base", "faerec"):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--dataset", args.dataset,
                              "--max-batches", str(args.max_batches),
                              "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base, faerec = rows
    print(f"dataset {args.dataset}, {args.threads} threads, steps timed per model: "
          f"{base['steps_measured']} / {faerec['steps_measured']}")
    print(f"| model | s/epoch | full-ranking eval, s | peak RSS, MiB |")
    print(f"|---|---|---|---|")
    for name, r in (("SASRec (base)", base), ("FAERec-SASRec", faerec)):
        print(f"| {name} | {r['epoch_s']:.1f} | {r['eval_s']:.1f} | {r['peak_mib']:.0f} |")
    print(f"FAERec / base epoch time: {faerec['epoch_s'] / base['epoch_s']:.2f}x (target <= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
