"""Did ASHA stop trials that would have won? Rerun early-stopped trials to the full budget.

    .venv/bin/python bench/asha_check.py --space search_spaces/faerec.yaml [--top 3]

Reads the search's summary (`<storage>/<name>/summary.csv`, written by run_search.py),
takes the `--top` early-stopped trials by the validation metric they had reached,
trains each with the same settings (Ray's `params.json` of the trial) for the full epoch
budget, and compares their best validation metric with the best trial ASHA kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.train import fit, load_inputs, settings_from_dict  # noqa: E402
from tuning.space import load_space, trial_settings  # noqa: E402
from tuning.tuner import local_folder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces/faerec.yaml"))
    p.add_argument("--name", help="search name, if not the space's")
    p.add_argument("--top", type=int, default=3)
    args = p.parse_args()
    space = load_space(args.space, {"name": args.name} if args.name else None)
    folder = local_folder(space)
    metric = space.search.metric
    table = pd.read_csv(folder / "summary.csv", dtype={"trial": str})
    kept = table[table["outcome"] == "completed"]
    stopped = table[table["outcome"] == "early-stopped"].head(args.top)
    best_kept = kept[f"best/{metric}"].max()
    print(f"{len(stopped)} of {(table['outcome'] == 'early-stopped').sum()} early-stopped trials "
          f"rerun to {space.search.max_epochs} epochs; best kept trial: {best_kept:.4f}")

    inputs = load_inputs(space.dataset, space.embedding)
    print(f"| trial | stopped at epoch | {metric} then | after the full budget | beats the best kept? |")
    print("|---|---|---|---|---|")
    for row in stopped.itertuples():
        params = json.loads((folder / f"trial_{row.trial}" / "params.json").read_text())
        model_cfg, train_cfg = settings_from_dict(trial_settings(params), f"trial {row.trial}")
        result = fit(inputs, model_cfg, train_cfg)
        full = result.val[metric]
        then = table.loc[row.Index, f"best/{metric}"]
        print(f"| {row.trial} | {row.epochs} | {then:.4f} | {full:.4f} | "
              f"{'yes' if full > best_kept else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
