"""Per-trial overhead of the search: the time a trial slot spends outside training epochs.

    .venv/bin/python bench/bench_search_overhead.py [--space search_spaces/smoke.yaml]
        [--num-samples 8]

Runs the space once (its own storage and MLflow store under a temporary folder) and
splits the wall time of `Tuner.fit` into epoch time (train + validation, as the trials
report it) and everything else: Ray scheduling, actor start or reuse, putting the
dataset in the object store, model construction, checkpoints, MLflow logging.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuning.space import load_space  # noqa: E402
from tuning.tuner import run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces/smoke.yaml"))
    p.add_argument("--num-samples", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        space = load_space(args.space, {"num_samples": args.num_samples, "name": "overhead",
                                        "storage_path": f"{tmp}/results",
                                        "tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
        tic, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        outcome = run(space)
        wall = time.perf_counter() - tic
        after = resource.getrusage(resource.RUSAGE_SELF)
        driver_cpu = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
        epoch_s, trial_s, epochs = 0.0, 0.0, 0
        for result_file in Path(outcome.experiment_path).glob("*/result.json"):
            rows = [json.loads(line) for line in result_file.read_text().splitlines()]
            epoch_s += sum(r["time/epoch_s"] for r in rows)
            trial_s += rows[-1]["time_total_s"]
            epochs += len(rows)
    n, slots = len(outcome.summary), space.search.max_concurrent
    print(f"{n} trials, {epochs} epochs, {slots} concurrent, {space.search.cpu} CPU each")
    print(f"| quantity | seconds |\n|---|---|")
    print(f"| search wall time (dataset, Ray start, MLflow, Tuner.fit) | {wall:.1f} |")
    print(f"| slot-seconds (wall x concurrency) | {wall * slots:.1f} |")
    print(f"| sum of epoch times reported by trials | {epoch_s:.1f} |")
    print(f"| sum of trial run times (Ray's time_total_s) | {trial_s:.1f} |")
    print(f"| overhead per trial, inside the trial (setup, checkpoints) | {(trial_s - epoch_s) / n:.2f} |")
    print(f"| overhead per trial, whole search ((slot-seconds - epochs) / trials) | "
          f"{(wall * slots - epoch_s) / n:.2f} |")
    print(f"| driver CPU seconds per trial (Tune's loop, Optuna, MLflow logging) | {driver_cpu / n:.2f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (wall figures stretch with it; CPU seconds less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
