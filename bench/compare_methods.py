"""Methods (model/methods.py; default: base and FAERec) under one budget, several seeds: mean ± std of the
test metrics at each run's best validation epoch.

    .venv/bin/python bench/compare_methods.py --dataset ml-100k --seeds 0 1 2 --epochs 100
    .venv/bin/python bench/compare_methods.py --dataset search_spaces/datasets/amazon_office.yaml

Runs use the training defaults (paper settings) unless `--set key=value` says otherwise;
both methods get the same epoch budget and patience. Each finished run is appended to
`--out` (JSON lines) at once, so an interrupted comparison keeps what it computed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.data import resolve_dataset  # noqa: E402
from model.methods import METHODS  # noqa: E402
from model.text import EmbeddingConfig  # noqa: E402
from model.train import parse_assignments, fit, load_inputs, settings_from_dict  # noqa: E402

CURVES = ("val/overall/ndcg_20", "val/tail/hr_10", "train/loss")
SHOWN = ("test/overall/hr_10", "test/overall/ndcg_10", "test/tail/hr_10", "test/tail/ndcg_10")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--backbone", default="sasrec")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["base", "faerec"], choices=list(METHODS))
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, help="JSON lines of every run (default: results/compare-*.jsonl)")
    args = p.parse_args()

    inputs = load_inputs(resolve_dataset(args.dataset), EmbeddingConfig())
    out = args.out or ROOT / "results" / f"compare-{inputs.data.name}-{args.backbone}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for seed in args.seeds:
        for method in runs:
            given = parse_assignments(args.settings, "--set")  # a method's own (M.x) go to method M only
            settings = {"method": method, "backbone": args.backbone, "seed": seed,
                        "epochs": args.epochs, "num_threads": args.threads,
                        **{k: v for k, v in given.items() if k.partition(".")[0] in (k, method)}}
            result = fit(inputs, *settings_from_dict(settings, "compare_methods"))
            record = {"dataset": inputs.data.name, "method": method, "seed": seed,
                      "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                      "seconds": result.seconds, **result.test,
                      # validation curves, to size ASHA's grace period from real runs
                      "curve": {k: [h.get(k) for h in result.history] for k in CURVES}}
            runs[method].append(record)
            with out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{method:10s} seed {seed}: " + "  ".join(
                f"{k.removeprefix('test/')}={record[k]:.4f}" for k in SHOWN)
                + f"  (best epoch {result.best_epoch}/{result.epochs_run}, {result.seconds:.0f} s)",
                flush=True)

    print(f"\n{inputs.data.name}, {args.backbone}, seeds {args.seeds}, budget {args.epochs} epochs")
    print("| method | " + " | ".join(k.removeprefix("test/") for k in SHOWN) + " |")
    print("|---|" + "---|" * len(SHOWN))
    for method, records in runs.items():
        cells = []
        for k in SHOWN:
            values = [r[k] for r in records]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {std:.4f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
