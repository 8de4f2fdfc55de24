"""Search FAERec's hyper-parameters: Optuna over Ray Tune with ASHA, every trial in MLflow.

    python run_search.py --space search_spaces/faerec.yaml [--dry-run]

This file only parses arguments; `tuning.space` validates the space and `tuning.tuner`
runs it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from model.errors import ConfigError, DataError
from model.urls import mask_text, mask_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    p.add_argument("--dataset", help="built-in dataset name or dataset YAML; replaces the space's")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-epochs", type=int, help="epoch budget per trial")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the space's, "
                                          "sqlite:///mlflow/mlflow.db)")
    p.add_argument("--storage-path", help="where Ray Tune keeps results and checkpoints")
    p.add_argument("--name", help="experiment name (results folder and MLflow experiment)")
    p.add_argument("--resume", action="store_true", help="continue the search of that name")
    p.add_argument("--address", help="join a Ray cluster: auto or HOST:PORT")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tuning.space import load_space, plan  # after argparse: --help stays instant

    if args.dataset and args.dataset.endswith((".yaml", ".yml")):
        args.dataset = os.path.abspath(args.dataset)  # relative to where the user typed it
    overrides = {k: v for k, v in {
        "dataset": args.dataset, "num_samples": args.num_samples, "max_epochs": args.max_epochs,
        "tracking_uri": args.tracking_uri, "storage_path": args.storage_path,
        "name": args.name}.items() if v is not None}
    from tuning.preflight import preflight
    try:
        space = load_space(args.space, overrides)
        # the machine, stores and cluster: before Ray, MLflow or a results folder
        address = preflight(space, resume=args.resume, address=args.address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan(space))
    if args.dry_run:
        return 0

    from tuning.tuner import run
    try:
        outcome = run(space, resume=args.resume, address=address)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a store, disk or connection failing mid-way: not a bug to trace
        print(f"error: {type(e).__name__}: {mask_text(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nstopped; continue with: python run_search.py "
              f"{mask_text(' '.join(shlex.quote(a) for a in (argv or sys.argv[1:])))} --resume",
              file=sys.stderr)
        return 130

    from tuning.report import answer_table, frame_markdown
    from tuning.tuner import objective_keys
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcome.counts.items()))
    print(f"\nSearch {space.name!r} finished in {outcome.seconds:.0f} s: {counts}.")
    several = len(space.search.objectives) > 1
    print("\nTop trials (" + ("Pareto front first; " if several else "")
          + "selected on validation; test metrics of each trial's best state):")
    shown = ["trial", "outcome", "epochs", *(k for k, _ in objective_keys(space)),
             "test/overall/hr_10", "test/tail/hr_10"]
    print(frame_markdown(outcome.summary.head(10)[[c for c in shown if c in outcome.summary]]
                         .rename(columns=lambda c: c.removeprefix("best/"))))
    print(f"\nSummary (every parameter): {outcome.summary_files['csv']}  "
          f"{outcome.summary_files['md']}")
    print(f"Ray Tune results: {outcome.experiment_path}")
    print(f"MLflow: parent run {outcome.parent_run_id} in experiment {space.name!r} "
          f"(id {outcome.experiment_id}) of {mask_url(space.search.tracking_uri)}")
    if space.search.tracking_uri.startswith(("http://", "https://")):
        base = mask_url(space.search.tracking_uri).rstrip("/")
    else:
        base = "http://127.0.0.1:5000"
        print("Open the UI with `make ui` (bash mlflow/server.sh), then:")
    # MLflow 3 opens experiments in its GenAI view; this one lists the runs.
    print(f"    {base}/#/experiments/{outcome.experiment_id}?workflowType=machine_learning")
    if outcome.record is not None:
        print("\nConfirmed against the base (test metrics, mean ± std over seeds "
              f"{sorted(outcome.record.confirmed['seed'].unique().tolist())}; change against "
              "the base: % overall, x tail; Holm-adjusted Wilcoxon p):")
        print(answer_table(outcome.record))
        print(f"\nReport: {outcome.report_files['report.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
