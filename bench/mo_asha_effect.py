"""What MO-ASHA saves and what it costs: the same search (space, seed) run twice, with the
space's scheduler (asha: MO-ASHA with several objectives) and with none; epochs trained
and the hypervolume of the front each search found.

    .venv/bin/python bench/mo_asha_effect.py --space search_spaces/pareto_smoke.yaml \
        [--num-samples 12] [--max-epochs 8]

References, confirmation and constraints are left out (the first two do not depend on
the scheduler; constraints need the references). The
hypervolume's reference point is 0 in every objective (all are rates to maximise), so
the two numbers compare. One run per scheduler: with a handful of trials, TPE's
proposals differ between the two as soon as one trial's values differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tuning.pareto import hypervolume, losses, pareto_mask  # noqa: E402
from tuning.space import load_space  # noqa: E402
from tuning.tuner import objective_keys, run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces/pareto_smoke.yaml"))
    p.add_argument("--num-samples", type=int)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--storage-path", help="where both searches go (default: the space's)")
    p.add_argument("--tracking-uri")
    args = p.parse_args()
    overrides = {"num_samples": args.num_samples, "max_epochs": args.max_epochs,
                 "storage_path": args.storage_path, "tracking_uri": args.tracking_uri}
    space = load_space(args.space, {k: v for k, v in overrides.items() if v is not None})
    keys = objective_keys(space)
    rows = []
    for scheduler in (space.search.scheduler, "none"):
        variant = dataclasses.replace(
            space, name=f"{space.name}-{scheduler}", references=False, confirm=None,
            search=dataclasses.replace(space.search, scheduler=scheduler, constraints=()))
        outcome = run(variant)
        table = outcome.summary
        values = table[[k for k, _ in keys]].to_numpy(float)
        loss = losses(values, [m for _, m in keys])
        volume = hypervolume(loss, losses([[0.0] * len(keys)], [m for _, m in keys])[0])
        rows.append((scheduler, len(table), int(table["epochs"].sum()),
                     int((table["outcome"] == "early-stopped").sum()),
                     int(pareto_mask(loss).sum()), volume, outcome.seconds))
    print(f"\n{space.label}: {space.search.num_samples} trials, up to {space.search.max_epochs} "
          f"epochs, sampler {space.search.sampler} seed {space.search.seed}")
    print("| scheduler | trials | epochs trained | stopped early | front size | hypervolume | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.6g} | {r[6]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
