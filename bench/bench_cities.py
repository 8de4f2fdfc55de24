"""CITIES' stage 2 with its contexts encoded in length groups against one group (every
context at the width of the longest), measured in one run, alternating, so that a shared
machine's load falls on both alike.

    .venv/bin/python bench/bench_cities.py [--dataset amazon_office] [--tail-max-count 9]
        [--groups 8] [--rounds 3] [--threads 1]

Times the inferred table (every tail item from all its contexts: what each evaluation of
validation and of test computes) and one step of the inference function (the training
step of stage 2), CPU seconds, median over rounds; checks that both give the same table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model.train as train  # noqa: E402


def timed(fn) -> float:
    tic = time.process_time()
    fn()
    return time.process_time() - tic


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon_office")
    p.add_argument("--tail-max-count", type=int, default=9)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    inputs = train.load_inputs(train.resolve_dataset(args.dataset),
                               train.embedding_config_from_dict({}, "bench"), need_llm=False)
    model_cfg, train_cfg = train.settings_from_dict(
        {"method": "cities", "cities.tail_max_count": args.tail_max_count}, "bench")
    torch.manual_seed(0)
    model = train.build(inputs, model_cfg, torch.device("cpu"))
    model.inferring.fill_(True)  # stage 2
    optimizer = train.make_optimizer(model, train_cfg)
    encode = model.infer.encode_contexts
    counts = model.contexts.count(model.tail_items)
    print(f"{args.dataset}: {len(model.tail_items)} tail items, {counts.sum()} contexts "
          f"(at most {counts.max()} per item)")

    def table(groups):
        model.infer.encode_contexts = partial(encode, groups=groups)
        model.eval()
        with torch.no_grad():
            return model.inferred_table()

    def step(groups):
        model.infer.encode_contexts = partial(encode, groups=groups)
        model.train()
        x = torch.zeros(1, 2, dtype=torch.long)  # stage 2 reads no sequence
        loss = model.loss(x, x, x, epoch=model.params.pretrain_epochs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    torch.testing.assert_close(table(1), table(args.groups), rtol=1e-4, atol=1e-5)
    seconds = {(what, g): [] for what in ("table", "step") for g in (1, args.groups)}
    for r in range(args.rounds):
        for g in ((1, args.groups) if r % 2 == 0 else (args.groups, 1)):
            seconds["table", g].append(timed(lambda: table(g)))
            seconds["step", g].append(timed(lambda: step(g)))
    for what in ("table", "step"):
        one, many = (statistics.median(seconds[what, g]) for g in (1, args.groups))
        print(f"{what}: 1 group {one:.2f} CPU s, {args.groups} groups {many:.2f} CPU s: {one / many:.1f}x")


if __name__ == "__main__":
    main()
