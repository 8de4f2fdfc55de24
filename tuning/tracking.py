"""MLflow as an idempotent replica of Tune's experiment folder, the record of truth.

The folder `<storage_path>/<name>/` holds Tune's saved state (which trials the search
has), each trial's `params.json`, `result.json` and `error.txt`, the driver's
`tracking.json` (store, search, stage, params, outcome, best metrics) and PARENT_FILES.
MLflow gets a parent run per search and a nested run per trial, found again by their
tags before any is created; a metric is logged only at epochs after the last one its run
holds. So MLflow is brought up to date at any time: live by `MlflowCallback`, or from
the folder by `python -m tuning.tracking sync FOLDER [--tracking-uri URI]` (after a crash
or an outage, to copy a search to a team server; the driver runs it before and after a
search). Outcomes: completed, early-stopped (FINISHED), failed (FAILED), interrupted
(KILLED: a user's stop, or a crash not yet resumed), lost (KILLED: a trial a crash took
before Tune saved it; the resumed search runs another in its place).
"""

import argparse
import fcntl
import json
import logging
import queue
import re
import sys
import threading
import time
from contextlib import contextmanager
from numbers import Real
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH,
                                     MAX_TAG_VAL_LENGTH, path_not_unique)
from ray import tune
from ray.tune import ExperimentAnalysis

from model.cache import atomic_write
from model.config import PROJECT_ROOT
from model.urls import mask_text, mask_url
from tuning.trainable import outcome as ended_outcome

logger = logging.getLogger(__name__)

SETTINGS_FILE = "tracking.json"
PARENT_FILES = ("search_space.yaml", "dataset_stats.json", "summary.csv", "summary.md")
REPORT_FOLDER = "report"  # the search's report (tuning.report): artifacts report/... of the parent
RUN_TAGS = ("backbone", "method", "configuration", "seed")  # config values shown as run tags
EPOCH_PREFIXES = ("train/", "val/", "time/")  # logged every epoch; test/ once, at the end
STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "failed": "FAILED",
          "interrupted": "KILLED", "lost": "KILLED"}

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./: ]")  # MLflow also rejects '@'
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)


# ---------------------------------------------------------------- names and values

def metric_name(name: str) -> str | None:
    """`name` with the characters MLflow rejects replaced by '_' ('ndcg@10' -> 'ndcg_10');
    None for a name MLflow would still reject (empty, '..', leading '/')."""
    name = _BAD_NAME_CHARS.sub("_", str(name))[:MAX_ENTITY_KEY_LENGTH]
    return None if not name or path_not_unique(name) else name


def config_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A configuration as MLflow params: nested dicts flattened with '/', values cut to
    MLflow's limit. A key naming a key, token, secret, passw(ord) or credential is dropped
    with everything under it: credentials never reach the tracking store."""
    params = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if _SECRET_NAME.search(str(key)):
            continue
        if isinstance(value, dict):
            params.update(config_params(value, prefix=f"{name}/"))
        elif (clean := metric_name(name)) is not None:
            params[clean] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return params


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric values (bools and strings dropped; NaN kept) under valid names."""
    return {name: float(value) for key, value in metrics.items()
            if isinstance(value, Real) and not isinstance(value, bool)
            and (name := metric_name(key)) is not None}


def run_tags(tags: dict) -> dict[str, str]:
    return {name: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in tags.items()
            if (name := metric_name(key)) is not None}


def artifact_location(tracking_uri: str) -> str | None:
    """A new experiment's artifacts in a database store: beside the SQLite file, else in
    mlflow/artifacts (not ./mlruns of the current directory). None: the server decides."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    if tracking_uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        return (PROJECT_ROOT / "mlflow" / "artifacts").as_uri()
    return None


# ---------------------------------------------------------------- the folder

def _epoch(result: dict) -> int:
    return int(result.get("epoch", result.get("training_iteration", 0)))


def read_results(trial_dir) -> list[dict]:
    """A trial's `result.json` (a line cut short by a crash ends it)."""
    path, out = Path(trial_dir) / "result.json", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def failure_reason(error_file) -> str | None:
    """The last line of a trial's error file, e.g. 'ValueError: diverged' (None: no file)."""
    path = Path(error_file) if error_file else None
    lines = path.read_text().strip().splitlines() if path and path.exists() else []
    return lines[-1].strip() if lines else None


def outcome(status: str, last: dict, max_epochs: int | None) -> str:
    """From a trial's Tune status and last result (tuning.trainable's rule for one that
    ended)."""
    if status != "TERMINATED":
        return "failed" if status == "ERROR" else "interrupted"
    return ended_outcome(last, max_epochs if max_epochs is not None else float("inf"))


def read_settings(folder) -> dict:
    return json.loads((Path(folder) / SETTINGS_FILE).read_text())


def write_settings(folder, **changes) -> dict:
    """Update the folder's tracking.json (replaced whole: a crash leaves the old one)."""
    path = Path(folder) / SETTINGS_FILE
    settings = {**(read_settings(folder) if path.exists() else {}), **changes}
    # 0600: the tracking URI may hold a database password
    atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, default=str).encode()))
    return settings


@contextmanager
def folder_lock(folder, timeout: float):
    """One writer per folder at a time (the live worker, a sync). The kernel drops an flock
    when its holder dies: a crash never leaves it taken."""
    with open(Path(folder) / ".tracking.lock", "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{folder}: its MLflow records are still being "
                                       "written by another process or thread") from None
                time.sleep(0.2)
        yield


# ---------------------------------------------------------------- the replica

class Replica:
    """One search's runs of one stage (search, reference, confirm...) in an MLflow store."""

    def __init__(self, settings: dict, tracking_uri: str | None = None):
        self.settings, self.stage = settings, settings.get("stage", "search")
        self.client = MlflowClient(tracking_uri or settings["tracking_uri"])
        found = self.client.get_experiment_by_name(settings["experiment"])
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            settings["experiment"], artifact_location(self.client.tracking_uri))
        parent = self._find(f"tags.search_id = '{settings['search_id']}' and "
                            "tags.`faerec.role` = 'search'") or [self.client.create_run(
                                self.experiment_id, run_name=settings["search"], tags={
                                    **run_tags(settings.get("tags", {})),
                                    "search_name": settings["search"], "faerec.role": "search",
                                    "search_id": settings["search_id"]})]
        self.parent_id = parent[0].info.run_id
        self._log_params(parent[0], config_params(settings.get("params", {})))
        children = self._find(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                              f"tags.stage = '{self.stage}'")
        self._runs = {run.data.tags["trial_id"]: run for run in children}
        # run id -> {metric: last step held}: what each run holds, read once
        self._held = {run.info.run_id: {m.key: m.step for m in run.data.to_proto().metrics}
                      for run in [*children, parent[0]]}

    def _find(self, filter_string: str) -> list:
        return list(self.client.search_runs([self.experiment_id], filter_string,
                                            max_results=50000))

    def _log_params(self, run, params: dict[str, str]) -> None:
        """Params the run lacks (MLflow's are immutable: a first value stays)."""
        if new := [Param(k, v) for k, v in params.items() if k not in run.data.params]:
            self.client.log_batch(run.info.run_id, params=new)
            run.data.params.update(params)

    def _log_metrics(self, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
        """Log (key, value, step, ms) points at steps after the last one the run holds."""
        held = self._held.setdefault(run_id, {})
        if new := [Metric(k, v, ms, step) for k, v, step, ms in points
                   if step > held.get(k, -1)]:
            self.client.log_batch(run_id, metrics=new)
            held.update({m.key: max(m.step, held.get(m.key, -1)) for m in new})

    def update_trial(self, trial_id: str, config: dict, results: list[dict],
                     status: str | None = None, error_file=None) -> None:
        """Bring a trial's run up to date with its results: created when missing; RUNNING
        while `status` is None, else ended with the outcome of that Tune status (and the
        reason of an ERROR) and the test metrics of its last report, at its last epoch."""
        run = self._runs.get(trial_id)
        if run is None:
            # a reference's or confirmation's run is named by what it trains: base, seed 43
            name = " seed ".join(str(config[k]) for k in ("configuration", "seed") if k in config)
            run = self._runs[trial_id] = self.client.create_run(
                self.experiment_id, run_name=name if "configuration" in config else trial_id, tags={
                    **run_tags({k: config[k] for k in RUN_TAGS if k in config}),
                    "trial_id": trial_id, "stage": self.stage, "faerec.role": "trial",
                    "mlflow.parentRunId": self.parent_id})
        elif status is None and run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
            run = self._runs[trial_id] = self.client.get_run(run.info.run_id)
        self._log_params(run, config_params(config))
        first = {}  # the first report of each epoch
        for result in results:
            first.setdefault(_epoch(result), result)
        last = list(first.values())[-1] if first else {}
        self._log_metrics(run.info.run_id, [
            (k, v, _epoch(r), int(r.get("timestamp", 0) * 1000)) for r in first.values()
            for k, v in numeric_metrics(r).items() if k.startswith(EPOCH_PREFIXES)
            or (status is not None and r is last and k.startswith("test/"))])
        if status is not None:
            self._end(trial_id, outcome(status, last, self.settings.get("max_epochs")),
                      failure_reason(error_file) if status == "ERROR" else None)

    def _end(self, trial_id: str, result: str, reason: str | None = None) -> bool:
        """Set the outcome and its status; False when the run had them already."""
        run = self._runs[trial_id]
        tags = run_tags({"outcome": result, **({"failure_reason": reason} if reason else {})})
        if {**run.data.tags, **tags} == run.data.tags and run.info.status == STATUS[result]:
            return False
        self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self.client.set_terminated(run.info.run_id, STATUS[result])
        self._runs[trial_id] = self.client.get_run(run.info.run_id)
        return True

    def end_search(self, folder: Path, result: str, best: dict) -> None:
        """The parent's files (uploaded again only when changed), best metrics, outcome."""
        held = {f.path: f.file_size for f in self.client.list_artifacts(self.parent_id)}
        held.update({f.path: f.file_size
                     for f in self.client.list_artifacts(self.parent_id, REPORT_FOLDER)})
        report = sorted((folder / REPORT_FOLDER).glob("*")) if (folder / REPORT_FOLDER).is_dir() else []
        for path in [*(folder / name for name in PARENT_FILES), *report]:
            artifact = path.name if path.parent == folder else f"{REPORT_FOLDER}/{path.name}"
            if path.is_file() and held.get(artifact) != path.stat().st_size:
                self.client.log_artifact(self.parent_id, str(path),
                                         None if path.parent == folder else REPORT_FOLDER)
        self._log_metrics(self.parent_id, [(k, v, 0, int(time.time() * 1000))
                                           for k, v in numeric_metrics(best).items()])
        run, status = self.client.get_run(self.parent_id), STATUS.get(result, "KILLED")
        if run.data.tags.get("outcome") != result or run.info.status != status:
            self.client.set_tag(self.parent_id, "outcome", result)
            self.client.set_terminated(self.parent_id, status)


# ---------------------------------------------------------------- export a folder

def sync(folder, tracking_uri: str | None = None, starting: bool = False,
         wait_s: float = 60.0) -> Replica:
    """Bring MLflow up to date with the folder. Trials Tune has not ended are interrupted;
    runs of trials that Tune's saved state lacks are lost. `starting`: a driver is about to
    run the search (the parent stays RUNNING). `wait_s`: how long to wait for a live worker
    (still retrying an unreachable store) to finish first."""
    folder = Path(folder)
    settings = read_settings(folder)
    with folder_lock(folder, wait_s):
        replica = Replica(settings, tracking_uri)
        # before Tune's first save, or with remote storage, the folder has no trials
        saved = any(folder.glob("experiment_state-*.json"))
        trials = ExperimentAnalysis(str(folder)).trials if saved else []
        for trial in trials:
            trial_dir = folder / Path(trial.path).name
            replica.update_trial(trial.trial_id, trial.config, read_results(trial_dir),
                                 trial.status, trial_dir / "error.txt")
        for trial_id in sorted(set(replica._runs) - {t.trial_id for t in trials}) if saved else []:
            if replica._end(trial_id, "lost"):
                logger.warning("trial %s was lost with a crash (Tune's saved state lacks it): "
                               "its run ends KILLED, outcome lost", trial_id)
        if starting:
            replica.client.update_run(replica.parent_id, status="RUNNING")
        elif "params" in settings:  # this folder's stage owns the parent run
            result = settings.get("outcome", "interrupted")
            replica.end_search(folder, "interrupted" if result == "running" else result,
                               settings.get("best", {}))
    return replica


def sync_search(folder, tracking_uri: str | None = None, starting: bool = False,
                wait_s: float = 60.0) -> Replica:
    """`sync` of a search's stage folders (references/, confirm/: each with its
    tracking.json), then of the search's own folder, which ends the parent run."""
    for stage in sorted(p for p in Path(folder).iterdir() if (p / SETTINGS_FILE).is_file()):
        sync(stage, tracking_uri, wait_s=wait_s)
    return sync(folder, tracking_uri, starting=starting, wait_s=wait_s)


# ---------------------------------------------------------------- live: the Tune callback

class MlflowCallback(tune.Callback):
    """Replicates a running search from the driver without blocking it: Tune's events
    become jobs that one worker thread applies in order. A job brings a trial's run up to
    date with every result seen so far, so one that failed (MLflow's client retries for
    minutes first) is made good by the next. Tune pickles callbacks into tuner.pkl before
    setup: `Tuner.restore` gets this one back with its folder, whose tracking.json names
    the store."""

    def __init__(self, folder, stage: str = "search"):
        self.folder, self.stage = str(folder), stage

    def setup(self, **info):
        self._results, self._jobs = {}, queue.Queue()
        self._worker = threading.Thread(target=self._work, name="mlflow-replica", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        with folder_lock(self.folder, float("inf")):
            replica = None
            for job in iter(self._jobs.get, None):
                try:
                    replica = replica or Replica({**read_settings(self.folder),
                                                  "stage": self.stage})
                    job(replica)
                except Exception as exc:  # noqa: BLE001 - the folder keeps everything
                    logger.warning("MLflow not updated (%s: %s); the folder keeps the results"
                                   " and the search's end (or `python -m tuning.tracking "
                                   "sync %s`) sends them", type(exc).__name__,
                                   mask_text(str(exc))[:200], self.folder)
                    replica = None  # found again: the store may hold more than we know

    def _put(self, trial, status: str | None = None, result: dict | None = None) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        results = self._results.setdefault(trial_id, [])
        if result is not None:
            results.append(dict(result))
        snapshot, error_file = list(results) or [trial.last_result or {}], trial.error_file
        self._jobs.put(lambda replica: replica.update_trial(trial_id, config, snapshot, status,
                                                            error_file))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._put(trial, result=result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._put(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._put(trial, "ERROR")

    def on_experiment_end(self, trials, **info):
        self._jobs.put(None)  # the worker ends after its jobs; the driver's sync waits for it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.tracking", description=__doc__)
    export = parser.add_subparsers(dest="command", required=True).add_parser(
        "sync", help="bring MLflow up to date with an experiment folder (<storage>/<name>)")
    export.add_argument("folder")
    export.add_argument("--tracking-uri", help="the store to write to (default: the folder's)")
    args = parser.parse_args(argv)
    if not (Path(args.folder) / SETTINGS_FILE).is_file():
        parser.error(f"{args.folder}: no {SETTINGS_FILE}, not a folder of run_search.py")
    replica = sync_search(args.folder, args.tracking_uri)
    print(f"{args.folder} synced to {mask_url(replica.client.tracking_uri)}, "
          f"run {replica.parent_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
