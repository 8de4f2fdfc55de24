"""The Tuner, built in one place: Optuna (TPE) proposes, ASHA stops, MLflow records.

`run(space)` prepares the dataset and embeddings once in the driver, puts them in the
object store, runs the trials and returns the summary of the search.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickletools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from model.config import PROJECT_ROOT, FAERecConfig
from model.errors import ConfigError
from model.methods import METHODS
from model.train import load_inputs
from model.urls import mask_text
from tuning.cluster import check_cluster, start_ray
from tuning.space import SearchSpace, define_by_run, drawn_in_every_trial, make_sampler, methods_drawn
from tuning.trainable import best_key, outcome, train_trial
from tuning.tracking import MlflowCallback, read_results, sync, write_settings

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("test/overall/hr_10", "test/overall/ndcg_10", "test/tail/hr_10",
                   "test/tail/ndcg_10", "test/overall/hr_20")


@dataclass
class SearchOutcome:
    experiment_path: str
    summary: pd.DataFrame            # one row per trial, best validation first
    summary_files: dict[str, Path]   # csv / md
    counts: dict[str, int]           # completed / early-stopped / failed
    parent_run_id: str
    experiment_id: str | None        # MLflow's
    seconds: float


def _searched_names(space: SearchSpace) -> list[str]:
    return [p.name for p in space.params if p.kind != "fixed"]


def _outcome(result, max_epochs: int) -> str:
    return "failed" if result.error is not None else outcome(result.metrics or {}, max_epochs)


def summarise(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial: its sampled values, best validation metric, test metrics."""
    metric = space.search.metric
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id", r.path and Path(r.path).name),
               "outcome": _outcome(r, space.search.max_epochs),
               "epochs": m.get("epoch", 0)}
        row.update({name: (r.config or {}).get(name) for name in _searched_names(space)})
        row[f"best {metric}"] = m.get(best_key(metric), math.nan)
        row.update({c: m.get(c, math.nan) for c in SUMMARY_COLUMNS})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best {metric}", ascending=space.search.mode == "min",
                                  na_position="last", ignore_index=True)
    return table


def to_markdown(table: pd.DataFrame) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def local_folder(space: SearchSpace) -> Path:
    """Where the driver writes its own files (summary, tracking.json, dataset stats):
    the experiment folder for local storage, else a folder in the project."""
    storage = space.search.storage_path
    base = Path(storage) if "://" not in storage else PROJECT_ROOT / "results"
    return base / space.name


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive `Tuner.restore`. Tune saves neither the scheduler nor its
    rung records (Ray 2.60 re-creates ASHA empty from tuner.pkl), so a resumed search would
    judge its trials against empty rungs. Tune adds every restored trial again: replay the
    results its folder holds (result.json, as Tune saved it with its state) into its
    bracket, as they came the first time. Needs a local storage_path (else as Ray's)."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        restored = self._time_attr in trial.last_result  # a new trial has reported nothing
        for result in read_results(trial.path) if restored else []:
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr],
                                  self._metric_op * result[self._metric])


# What Tune saves together under one session string, and how each is written (Ray 2.60's
# search_gen_state-*.json holds a pickle despite its name).
STATE_FILES = {"experiment_state-{}.json": "json", "search_gen_state-{}.json": "pickle",
               "searcher-state-{}.pkl": "pickle", "callback-states-{}.pkl": "pickle"}


def _complete(path: Path, kind: str) -> bool:
    """Whether a state file reads to its end (pickles walked opcode by opcode: nothing loaded)."""
    try:
        if kind == "json":
            json.loads(path.read_text())
        else:
            with path.open("rb") as f:
                for _ in pickletools.genops(f):
                    pass
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def set_aside_torn_state(experiment: Path) -> None:
    """A kill while Tune copies its state into the experiment folder can leave the newest save
    torn (seen in the group-kill test: an empty searcher-state-*.pkl, on which
    `Tuner.restore` fails with EOFError). Rename such a save to torn-*: Tune then restores the
    save before it, and the trials that started since are marked lost by the sync."""
    for state in sorted(experiment.glob("experiment_state-*.json"), reverse=True):
        session = state.name[len("experiment_state-"):-len(".json")]
        files = {experiment / name.format(session): kind for name, kind in STATE_FILES.items()}
        files = {f: kind for f, kind in files.items() if f.exists()}
        if all(_complete(f, kind) for f, kind in files.items()):
            return
        for f in files:
            f.rename(f.with_name(f"torn-{f.name}"))
        logger.warning("--resume: Tune's state saved at %s is incomplete (killed while it was "
                       "written); resuming from the save before it", session)


def can_resume(space: SearchSpace) -> bool:
    """Whether Tune saved a state to continue from (a crash can come before its first)."""
    path = f"{space.search.storage_path}/{space.name}"
    return tune.Tuner.can_restore(path) and (
        "://" in path or any(Path(path).glob("experiment_state-*.json")))


def build_tuner(space: SearchSpace, inputs, resume: bool, callbacks=()) -> tune.Tuner:
    """The search's Tuner, new or restored (a restored one keeps its first callbacks)."""
    s = space.search
    metric = best_key(s.metric)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, inputs=inputs, checkpoint_every=s.checkpoint_every),
        {"cpu": s.cpu, "gpu": s.gpu})
    storage = space.search.storage_path
    if resume:
        path = f"{storage}/{space.name}"
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)

    searcher = OptunaSearch(space=define_by_run(space), metric=metric, mode=s.mode,
                            sampler=make_sampler(space))
    if s.scheduler == "asha":
        # Epochs are the time unit; a trial is judged only after grace_period epochs.
        scheduler = ResumableASHA(time_attr="epoch", max_t=s.max_epochs,
                                  grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    reporter = CLIReporter(
        # Ray's "current best trial" line fails on a param its trial lacks: conditional ones left out
        parameter_columns=[n for n in _searched_names(space) if n in drawn_in_every_trial(space)],
        metric_columns={"epoch": "epoch", "val/overall/ndcg_10": "val NDCG@10",
                        "val/tail/ndcg_10": "val tail NDCG@10", metric: "best"},
        max_report_frequency=30, sort_by_metric=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=metric, mode=s.mode, search_alg=searcher,
                                    scheduler=scheduler, num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=space.name, storage_path=storage,
            callbacks=list(callbacks),
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            # num_to_keep >= 2: with 1, Ray floods the log with snapshot warnings.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            progress_reporter=reporter, verbose=1))


def run(space: SearchSpace, resume: bool = False, address: str | None = None) -> SearchOutcome:
    started = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter shows our chosen columns
    # Short epochs checkpoint often; Ray's "snapshotting may become a bottleneck" notice
    # about that is noise at this scale.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    s = space.search
    if not ray.is_initialized():
        start_ray(address)
    check_cluster(space)  # before any file, MLflow run or trial: one error if not multi-node-safe
    need_llm = any(METHODS[m].needs_llm_table(FAERecConfig(method=m)) for m in methods_drawn(space))
    # a dataset no trial could use is one message before any results folder or MLflow run
    inputs = load_inputs(space.dataset, space.embedding, need_llm=need_llm)
    folder = local_folder(space)
    folder.mkdir(parents=True, exist_ok=True)
    stats_file = folder / "dataset_stats.json"
    stats_file.write_text(json.dumps(inputs.data.stats(), indent=2, default=str))

    earlier = folder / "tracking.json"
    search_id = (json.loads(earlier.read_text())["search_id"] if resume and earlier.exists()
                 else uuid.uuid4().hex)  # a new search of an old name gets a new parent run
    if resume and "://" not in s.storage_path:
        set_aside_torn_state(Path(s.storage_path) / space.name)
    if resume and not can_resume(space):
        if not earlier.exists():
            raise ConfigError(f"--resume: no search named {space.name!r} under "
                              f"{s.storage_path}")
        logger.warning("--resume: the search %r stopped before Tune saved any state; "
                       "starting it again", space.name)
        resume = False
    # The folder is the record of truth; MLflow is brought up to date from it. The space
    # goes to MLflow too: a copy with credentials in a URI masked.
    (folder / "search_space.yaml").write_text(
        mask_text(Path(space.source).read_text(encoding="utf-8")))
    write_settings(
        folder, tracking_uri=s.tracking_uri, experiment=space.name, search=space.name,
        search_id=search_id, stage="search", max_epochs=s.max_epochs, outcome="running",
        best={}, tags={"dataset": inputs.data.name},
        params={"num_samples": s.num_samples, "max_epochs": s.max_epochs, "metric": s.metric,
                "mode": s.mode, "scheduler": s.scheduler, "grace_period": s.grace_period,
                "reduction_factor": s.reduction_factor, "cpu_per_trial": s.cpu,
                "gpu_per_trial": s.gpu, "max_concurrent": s.max_concurrent, "seed": s.seed,
                "dataset": inputs.data.name, "search_space": space.label})
    replica = sync(folder, starting=True)  # fails early on a wrong URI; ends a crash's runs

    best, files, result = {}, {}, "failed"
    try:
        callbacks = [MlflowCallback(folder)]
        results = build_tuner(space, inputs, resume, callbacks).fit()
        if results.num_terminated + results.num_errors < s.num_samples:
            # Tune catches the first Ctrl-C itself: it stops the trials, saves its state and
            # returns normally; a search that ran fewer trials to the end was interrupted.
            raise KeyboardInterrupt
        table = summarise(results, space)
        files = {"csv": folder / "summary.csv", "md": folder / "summary.md"}
        table.to_csv(files["csv"], index=False)
        files["md"].write_text(to_markdown(table) + "\n")
        if len(table) and not math.isnan(table.iloc[0][f"best {s.metric}"]):
            best_result = results.get_best_result(metric=best_key(s.metric), mode=s.mode)
            best = {k: v for k, v in (best_result.metrics or {}).items()
                    if isinstance(v, (int, float)) and k.startswith(("best/", "test/"))}
        result = "completed"
    except KeyboardInterrupt:
        result = "interrupted"
        raise
    finally:
        write_settings(folder, outcome=result, best=best)
        try:  # waits (as long as MLflow's client retries) for a store that was unreachable
            sync(folder, wait_s=300)
        except Exception as exc:  # noqa: BLE001 - the folder keeps everything
            logger.warning("MLflow not updated (%s); send the results later with: "
                           "python -m tuning.tracking sync %s", exc, folder)
    counts = table["outcome"].value_counts().to_dict() if len(table) else {}
    return SearchOutcome(results.experiment_path, table, files, counts, replica.parent_id,
                         replica.experiment_id, time.perf_counter() - started)
