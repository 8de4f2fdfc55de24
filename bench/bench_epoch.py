"""Seconds per training step and epoch, full-ranking evaluation time and peak memory:
FAERec-SASRec against plain SASRec, measured in one run; optionally the same against
another copy of the code (before/after a change), alternating rounds.

    .venv/bin/python bench/bench_epoch.py [--dataset beauty|yelp|YAML] [--max-batches 8]
        [--eval-users 4096] [--threads 1] [--autocast] [--device cpu|cuda] [--json]
    git worktree add /tmp/before 8e7f091
    .venv/bin/python bench/bench_epoch.py --dataset yelp --compare-with /tmp/before --rounds 3

Random-normal 1536-d stand-in embeddings (the paper's ada-002 size), d = 128, batch 256,
length 50. Each model runs in its own process so that peak memory (max RSS) belongs to that
model alone; with --compare-with the process imports `model` from that tree instead (same
measuring code, same cache), and the rounds alternate trees so that a shared machine's load
falls on both alike. The first step is a warm-up; `--max-batches` steps are timed and scaled
to the epoch. Evaluation is timed on one user (the per-evaluation fixed cost: FAERec
embeds the item table) and on `--eval-users` users, and scaled to every test user.
`--json` prints one JSON object: per model (`base`, `faerec`) `epoch_s`, `step_s`,
`step_cpu_s` (CPU seconds of the process per step: less sensitive to a shared machine's
load), `eval_s`, `eval_cpu_s` (likewise), `peak_rss_mib`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: --compare-with runs the other tree's `model`
MODELS = ("base", "faerec")
FIELDS = ("epoch_s", "step_s", "step_cpu_s", "eval_s", "eval_cpu_s", "peak_rss_mib")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(method: str, args) -> dict:
    import numpy as np
    import torch

    import model.train as train
    from model.data import load_dataset, resolve_dataset
    from model.faerec import FAERecConfig
    from model.methods import build_model
    from model.text import EmbeddingConfig, item_embeddings, pca_embeddings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = load_dataset(resolve_dataset(args.dataset))
    cfg = FAERecConfig(method=method, backbone="sasrec", hidden_size=128, max_len=50)
    llm = pca = None
    if method == "faerec":
        emb = item_embeddings(data, EmbeddingConfig(encoder="random", dim=1536, seed=0))
        llm = torch.tensor(emb)
        pca = torch.as_tensor(pca_embeddings(emb, 128))
    model = build_model(cfg, data.n_items, llm, pca, torch.tensor(data.train_popularity)).to(device)
    on_device = {"device": device} if device.type != "cpu" else {}  # the GPU path: batches drawn there
    batches = train.TrainBatches(data, cfg.max_len, np.random.default_rng(0), **on_device)

    def sync():  # a GPU's queue done, so that wall time is its time
        if device.type == "cuda":
            torch.cuda.synchronize()
    if hasattr(train, "train_step"):  # this tree's training step
        optimizer = train.make_optimizer(model, train.TrainConfig())

        def step(batch):
            train.train_step(model, optimizer, batch, 1, args.autocast)
    else:  # the loop of the code before train_step existed (8e7f091)
        if args.autocast:
            raise SystemExit("--autocast: this tree has no autocast option")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(batch):
            parts = model.loss(*batch, epoch=1)
            optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            optimizer.step()
            for v in parts.values():
                float(v.detach())

    model.train()
    epoch = batches.epoch(256)
    step([torch.as_tensor(a, device=device) for a in next(epoch)])  # warm-up: first-call allocations
    if args.ready_dir:  # several trials on one GPU: start timing together (bench/gpu_check.sh)
        sync()
        (args.ready_dir / f"{os.getpid()}.ready").touch()
        while not (args.ready_dir / "go").exists():
            time.sleep(0.05)
    sync()
    steps, tic, cpu = 0, time.perf_counter(), cpu_seconds()
    for arrays in epoch:
        step([torch.as_tensor(a, device=device) for a in arrays])
        steps += 1
        if steps >= args.max_batches:
            break
    sync()
    step_s, step_cpu_s = (time.perf_counter() - tic) / steps, (cpu_seconds() - cpu) / steps

    split = train.EvalSplit.build(data, "test", cfg.max_len)
    n_users, timed = len(split.targets), {}

    def first(users):
        keep = split.seen_rows < users
        users_field = [split.users[:users]] if hasattr(split, "users") else []  # older trees: no such field
        return train.EvalSplit(split.inputs[:users], split.targets[:users], split.seen_rows[keep],
                               split.seen_items[keep], *users_field)

    train.evaluate(model, first(1), data, "test", 512, device)  # warm-up: first-call allocations
    for users in sorted({1, min(args.eval_users or n_users, n_users)}):
        part = first(users)
        tic, cpu = time.perf_counter(), cpu_seconds()
        train.evaluate(model, part, data, "test", 512, device)  # ends reading the metrics: synced
        timed[users] = time.perf_counter() - tic, cpu_seconds() - cpu
    most = max(timed)
    # one user's time is the fixed cost (FAERec embeds the item table); the rest scales with users
    eval_s, eval_cpu_s = (fixed + max(total - fixed, 0) * n_users / most if most > 1 else fixed
                          for fixed, total in zip(timed[1], timed[most]))
    return {"steps_timed": steps, "epoch_s": step_s * math.ceil(len(batches) / 256),
            "step_s": step_s, "step_cpu_s": step_cpu_s, "eval_s": eval_s, "eval_cpu_s": eval_cpu_s,
            "eval_users_timed": most, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20} if device.type == "cuda" else {})}


def run_one(method: str, args, tree: Path | None) -> dict:
    """One model in a fresh process, importing `model` from `tree` (default: this one)."""
    env = {**os.environ, "PYTHONPATH": str(tree or ROOT),
           "FAEREC_CACHE": os.environ.get("FAEREC_CACHE") or str((ROOT / ".cache").resolve())}
    command = [sys.executable, __file__, "--one", method, "--dataset", args.dataset,
               "--max-batches", str(args.max_batches), "--eval-users", str(args.eval_users),
               "--threads", str(args.threads), "--device", args.device] + (["--autocast"] if args.autocast else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_rows(rounds: list[dict]) -> dict:
    return {m: {f: statistics.median(r[m][f] for r in rounds) for f in FIELDS} for m in MODELS}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="beauty", help="built-in name or dataset YAML path")
    p.add_argument("--max-batches", type=int, default=8, help="training steps timed after the warm-up")
    p.add_argument("--eval-users", type=int, default=0, help="test users evaluated (0 = all), scaled to all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--autocast", action="store_true", help="bf16 autocast of the training step")
    p.add_argument("--device", default="cpu", help="cpu | cuda (this tree only: the GPU path)")
    p.add_argument("--ready-dir", type=Path, help=argparse.SUPPRESS)  # with --one: wait for <dir>/go
    p.add_argument("--compare-with", type=Path, metavar="TREE",
                   help="another checkout of the project: measure it too, alternating rounds")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return 0

    shipped = ROOT / "search_spaces" / "datasets" / f"{args.dataset}.yaml"
    if shipped.is_file():  # by path: the other tree may not ship this dataset's YAML
        args.dataset = str(shipped)
    trees = {"after": None} if args.compare_with is None else {"before": args.compare_with.resolve(), "after": None}
    rounds: dict[str, list[dict]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))  # alternate who runs first
        for name in order:
            rounds[name].append({m: run_one(m, args, trees[name]) for m in MODELS})
    result = {"dataset": args.dataset, "threads": args.threads, "rounds": args.rounds,
              "autocast": args.autocast, "steps_timed": args.max_batches,
              "eval_users_timed": rounds["after"][0]["faerec"]["eval_users_timed"],
              "load_average": os.getloadavg(), **median_rows(rounds["after"])}
    result["faerec_over_base_epoch"] = result["faerec"]["epoch_s"] / result["base"]["epoch_s"]
    if args.compare_with is not None:
        result["before"] = median_rows(rounds["before"])
        result["before"]["faerec_over_base_epoch"] = (result["before"]["faerec"]["epoch_s"]
                                                      / result["before"]["base"]["epoch_s"])
        result["speedup"] = {m: {f: result["before"][m][f] / result[m][f] for f in FIELDS if f != "peak_rss_mib"}
                             for m in MODELS}
        result["per_round"] = rounds
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"dataset {args.dataset}, {args.threads} threads, {args.max_batches} steps timed per model, "
          f"{args.rounds} round(s), medians; load average {result['load_average'][0]:.1f}")
    print("| model | code | s/epoch | s/step | CPU s/step | full-ranking eval, s | eval, CPU s | peak RSS, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for m, name in (("base", "SASRec (base)"), ("faerec", "FAERec-SASRec")):
        for code in trees:
            row = result[m] if code == "after" else result["before"][m]
            print(f"| {name} | {code if args.compare_with else 'this'} | {row['epoch_s']:.1f} | {row['step_s']:.3f} | "
                  f"{row['step_cpu_s']:.3f} | {row['eval_s']:.1f} | {row['eval_cpu_s']:.1f} | {row['peak_rss_mib']:.0f} |")
    print(f"FAERec / base epoch time: {result['faerec_over_base_epoch']:.2f}x")
    if args.compare_with is not None:
        print(f"before: FAERec / base epoch time {result['before']['faerec_over_base_epoch']:.2f}x")
        for m in MODELS:
            print(f"speed-up {m}: " + ", ".join(f"{f} {v:.2f}x" for f, v in result["speedup"][m].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
