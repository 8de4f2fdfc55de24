"""MLflow as a replica of Tune's experiment folder.

The record of truth is the experiment folder, `<storage_path>/<name>/`: Tune keeps there
each trial's `params.json`, `result.json` (one line per epoch), `error.txt` and its own
state (which trials the search has); the driver adds `tracking.json` (tracking URI,
experiment, search name and id, stage, the search's params, its outcome and best metrics)
and the parent run's files (`search_space.yaml`, `dataset_stats.json`, `summary.csv/md`).
MLflow holds the same facts as runs:

    parent run  (tags search_name, search_id, faerec.role=search, outcome; params = search
     │           settings; artifacts: the files above; metrics: the best trial's)
     ├─ child run per trial (tags trial_id, stage, backbone, method, outcome[, failure_reason],
     │                       mlflow.parentRunId; params = the trial's configuration;
     │                       metrics every epoch with step = epoch, test metrics once)
     └─ ...

Every write is idempotent, so the replica can be rebuilt or brought up to date at any
time: runs are found by their tags before one is created, params already there are kept,
and a metric is logged only at epochs after the last one the run holds for it (each
trial's epochs are logged in order, the first report of an epoch wins).

- Live: `MlflowCallback`, a driver-side Tune callback, hands Tune's events to one worker
  thread through a queue, so a slow or unreachable store never stalls the trials (MLflow's
  own HTTP client retries for minutes; if it gives up, the next event catches up).
- After the fact: `python -m tuning.tracking sync FOLDER [--tracking-uri URI]` exports a
  folder: after a crash before anything reached MLflow, after an outage, or to copy a
  finished search to a team server. The driver runs the same export before a search
  (on --resume it ends the runs a crash left open and marks the lost trials) and after it.
  Outcomes: completed / early-stopped (FINISHED), failed (FAILED), interrupted (KILLED: a
  user's stop, or a crashed search not yet resumed) and lost (KILLED: a trial the crash took
  before Tune saved its state; the resumed search replaced it, summaries leave it out).
  A lock file in the folder keeps the live worker and a `sync` from writing at once.
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

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"
SETTINGS_FILE = "tracking.json"
PARENT_FILES = ("search_space.yaml", "dataset_stats.json", "summary.csv", "summary.md")
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
    """A trial configuration as MLflow params: nested dicts flattened with '/', values
    stringified and cut to MLflow's limit. Security: a key whose name contains key, token,
    secret, passw(ord) or credential is dropped with everything under it, so credentials
    that reached a config never end up in the tracking store."""
    params = {}
    for key, value in config.items():
        if _SECRET_NAME.search(str(key)):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            params.update(config_params(value, prefix=f"{name}/"))
        elif (clean := metric_name(name)) is not None:
            params[clean] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return params


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric values of `metrics` (bools and strings dropped) under valid names.
    NaN and inf are kept: MLflow stores NaN as NaN and inf as the largest float."""
    return {name: float(value) for key, value in metrics.items()
            if isinstance(value, Real) and not isinstance(value, bool)
            and (name := metric_name(key)) is not None}


def run_tags(tags: dict) -> dict[str, str]:
    """Tags under valid names, values stringified and cut to MLflow's limit."""
    return {name: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in tags.items()
            if (name := metric_name(key)) is not None}


def _quoted(value: str) -> str:
    """A name safe inside an MLflow filter string (which has no quote escaping)."""
    if "'" in value or '"' in value or "`" in value:
        raise ValueError(f"name {value!r} must not contain quotes")
    return f"'{value}'"


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts when MLflow is used without a server. With a
    database store MLflow's default is ./mlruns of whatever the current directory is; we
    keep them beside the SQLite file (mlflow/artifacts for the default store) or, for
    another database, in the project's mlflow/artifacts. A server or a file store decides
    for itself (None)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0] if "://" in tracking_uri else ""
    if scheme == "sqlite":
        return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()
    if scheme in ("postgresql", "mysql", "mssql"):
        return (PROJECT_ROOT / "mlflow" / "artifacts").as_uri()
    return None


# ---------------------------------------------------------------- the folder

def _epoch(result: dict) -> int:
    return int(result.get("epoch", result.get("training_iteration", 0)))


def epoch_results(results: list[dict]) -> list[dict]:
    """The first report of each epoch, in order: an epoch that Tune ran again (a trial
    restored from an earlier checkpoint after a failure or a crash) counts once."""
    seen, out = set(), []
    for result in results:
        if _epoch(result) not in seen:
            seen.add(_epoch(result))
            out.append(result)
    return out


def read_results(trial_dir: Path) -> list[dict]:
    """A trial's `result.json` (a line cut short by a crash ends it)."""
    path = Path(trial_dir) / "result.json"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def failure_reason(error_file) -> str:
    """The last line of a trial's error file, e.g. 'ValueError: diverged'."""
    path = Path(error_file) if error_file else None
    lines = path.read_text().strip().splitlines() if path and path.exists() else []
    return lines[-1].strip() if lines else "unknown error (Tune wrote no error file)"


def outcome(status: str, last: dict, max_epochs: int | None) -> str:
    """A trial's outcome from its Tune status and last result: it completed when it stopped
    by itself (`finished`, its budget or patience) or reached max_epochs, else ASHA stopped
    it early."""
    if status == "ERROR":
        return "failed"
    if status != "TERMINATED":
        return "interrupted"
    done = last.get("finished") == 1 or (max_epochs is not None and _epoch(last) >= max_epochs)
    return "completed" if done else "early-stopped"


def read_settings(folder: str | Path) -> dict:
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not an experiment folder of run_search.py "
                                f"(no {SETTINGS_FILE})")
    return json.loads(path.read_text())


def write_settings(folder: str | Path, **changes) -> dict:
    """Update the folder's tracking.json (written whole, so a crash leaves the old one)."""
    path = Path(folder) / SETTINGS_FILE
    settings = {**(json.loads(path.read_text()) if path.exists() else {}), **changes}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=2, default=str))
    tmp.replace(path)
    return settings


@contextmanager
def folder_lock(folder: str | Path, timeout: float):
    """One writer per experiment folder at a time (the live worker, a `sync`). flock: the
    kernel drops it when its holder dies, so a crash never leaves it taken."""
    with open(Path(folder) / ".tracking.lock", "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{folder}: another process is writing its MLflow "
                                       f"records (a search still running?)") from None
                time.sleep(0.2)
        yield


# ---------------------------------------------------------------- the replica

class Replica:
    """One search's runs of one stage in an MLflow store, brought up to date idempotently."""

    def __init__(self, settings: dict, tracking_uri: str | None = None):
        self.settings, self.stage = settings, settings.get("stage", "search")
        self.client = MlflowClient(tracking_uri or settings["tracking_uri"])
        self.experiment_id = self._experiment()
        self.parent_id = self._parent()
        children = self._search(f"tags.`mlflow.parentRunId` = '{self.parent_id}' and "
                                f"tags.stage = {_quoted(self.stage)}")
        self._runs = {run.data.tags["trial_id"]: run for run in children}
        # run id -> {metric: last step held}: what each run holds, read once
        self._held = {run.info.run_id: _last_steps(run) for run in [*children, self._parent_run]}

    def _experiment(self) -> str:
        name = self.settings["experiment"]
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        uri = self.client.tracking_uri
        return self.client.create_experiment(name, artifact_location=artifact_location(uri))

    def _search(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string,
                                           max_results=1000, page_token=token)
            runs.extend(page)
            if not (token := page.token):
                return runs

    def _parent(self) -> str:
        s = self.settings
        found = self._search(f"tags.search_id = {_quoted(s['search_id'])} "
                             "and tags.`faerec.role` = 'search'")
        if found:
            self._parent_run = found[0]
        else:
            tags = {**run_tags(s.get("tags", {})), "search_name": s["search"],
                    "search_id": s["search_id"], "faerec.role": "search"}
            self._parent_run = self.client.create_run(self.experiment_id, tags=tags,
                                                      run_name=s["search"])
        run_id = self._parent_run.info.run_id
        self._log_params(self._parent_run, config_params(s.get("params", {})))
        return run_id

    def _log_params(self, run, params: dict[str, str]) -> None:
        held = run.data.params
        changed = sorted(k for k, v in params.items() if held.get(k, v) != v)
        if changed:  # MLflow params are immutable: the first value stays
            logger.warning("run %s keeps its earlier values of params %s", run.info.run_id,
                           changed)
        new = [Param(k, v) for k, v in params.items() if k not in held]
        if new:
            self.client.log_batch(run.info.run_id, params=new)

    def _log_metrics(self, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
        """Log (key, value, step, ms) points at steps after the last one the run holds."""
        held = self._held.setdefault(run_id, {})
        new = [Metric(k, v, ms, step) for k, v, step, ms in points if step > held.get(k, -1)]
        if new:
            self.client.log_batch(run_id, metrics=new)
            for m in new:
                held[m.key] = max(m.step, held.get(m.key, -1))

    # ---- trials

    def open_trial(self, trial_id: str, config: dict, running: bool) -> str:
        """The trial's run, created when missing; RUNNING again when `running`."""
        run = self._runs.get(trial_id)
        if run is None:
            tags = {**run_tags({k: config[k] for k in ("backbone", "method") if k in config}),
                    "trial_id": trial_id, "stage": self.stage, "faerec.role": "trial",
                    "mlflow.parentRunId": self.parent_id}
            run = self.client.create_run(self.experiment_id, tags=tags, run_name=trial_id)
            self._runs[trial_id] = run
        elif running and run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        self._log_params(run, config_params(config))
        run.data.params.update(config_params(config))
        return run.info.run_id

    def log_epochs(self, trial_id: str, results: list[dict]) -> None:
        self._log_metrics(self._runs[trial_id].info.run_id, [
            (k, v, _epoch(r), int(r.get("timestamp", time.time()) * 1000))
            for r in epoch_results(results)
            for k, v in numeric_metrics(r).items() if k.startswith(EPOCH_PREFIXES)])

    def end_trial(self, trial_id: str, results: list[dict], status: str, reason=None) -> None:
        """End the run with the outcome (see `outcome`); the test metrics of its last report
        are logged once, at its last epoch."""
        run_id = self._runs[trial_id].info.run_id
        last = results[-1] if results else {}
        self._log_metrics(run_id, [(k, v, _epoch(last), int(last.get("timestamp", 0) * 1000))
                                   for k, v in numeric_metrics(last).items()
                                   if k.startswith("test/")])
        self._end(trial_id, outcome(status, last, self.settings.get("max_epochs")), reason)

    def _end(self, trial_id: str, result: str, reason: str | None = None) -> None:
        run = self._runs[trial_id]
        tags = run_tags({"outcome": result, **({"failure_reason": reason} if reason else {})})
        if {**run.data.tags, **tags} != run.data.tags or run.info.status != STATUS[result]:
            self.client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.set_terminated(run.info.run_id, STATUS[result])
            self._runs[trial_id] = self.client.get_run(run.info.run_id)

    def mark_lost(self, known: set[str]) -> list[str]:
        """End as KILLED/lost the runs of trials that Tune's saved state does not have."""
        lost = sorted(set(self._runs) - known)
        for trial_id in lost:
            self._end(trial_id, "lost")
        return lost

    # ---- the search

    def end_search(self, folder: Path, result: str, best: dict) -> None:
        """The parent's files (uploaded again only when changed), best metrics, outcome."""
        held = {f.path: f.file_size for f in self.client.list_artifacts(self.parent_id)}
        for name in PARENT_FILES:
            path = folder / name
            if path.is_file() and held.get(name) != path.stat().st_size:
                self.client.log_artifact(self.parent_id, str(path))
        self._log_metrics(self.parent_id, [(k, v, 0, int(time.time() * 1000))
                                           for k, v in numeric_metrics(best).items()])
        run = self.client.get_run(self.parent_id)
        status = {"completed": "FINISHED", "failed": "FAILED"}.get(result, "KILLED")
        if run.data.tags.get("outcome") != result or run.info.status != status:
            self.client.set_tag(self.parent_id, "outcome", result)
            self.client.set_terminated(self.parent_id, status)

    def reopen_search(self) -> None:
        self.client.update_run(self.parent_id, status="RUNNING")


def _last_steps(run) -> dict[str, int]:
    return {m.key: m.step for m in run.data.to_proto().metrics}


# ---------------------------------------------------------------- export a folder

def saved_trials(folder: Path) -> list | None:
    """The trials in Tune's last saved state of the folder; None before its first save (or
    when Tune's storage is remote: then only the live callback writes the trial runs)."""
    if not any(folder.glob("experiment_state-*.json")):
        return None
    return ExperimentAnalysis(str(folder)).trials


def sync(folder: str | Path, tracking_uri: str | None = None, starting: bool = False,
         lock_timeout: float = 60.0) -> Replica:
    """Bring MLflow up to date with the experiment folder; returns the replica. Trials that
    Tune has not ended count as interrupted; runs of trials Tune's state lacks as lost. With
    `starting` (a driver about to run the search) the parent is left RUNNING."""
    folder = Path(folder)
    settings = read_settings(folder)
    with folder_lock(folder, lock_timeout):
        replica = Replica(settings, tracking_uri)
        trials = saved_trials(folder)
        for trial in trials or []:
            trial_dir = folder / Path(trial.path).name
            results = read_results(trial_dir)
            replica.open_trial(trial.trial_id, trial.config, running=False)
            replica.log_epochs(trial.trial_id, results)
            replica.end_trial(trial.trial_id, results, trial.status,
                              failure_reason(trial_dir / "error.txt")
                              if trial.status == "ERROR" else None)
        if trials is not None and (lost := replica.mark_lost({t.trial_id for t in trials})):
            logger.warning("trials lost with a crash (ended KILLED, outcome lost): %s", lost)
        if starting:
            replica.reopen_search()
        elif "params" in settings:  # this folder's stage owns the parent run
            result = settings.get("outcome", "interrupted")
            replica.end_search(folder, "interrupted" if result == "running" else result,
                               settings.get("best", {}))
    return replica


# ---------------------------------------------------------------- live: the Tune callback

class MlflowCallback(tune.Callback):
    """Replicates a running search into MLflow from the driver, without blocking it: each
    Tune event becomes a job on a queue that one worker thread applies in order. A job
    brings a trial's run up to date with every result seen so far, so one that failed
    (store unreachable beyond MLflow's own retries) is made good by the next.

    Tune pickles its callbacks into the experiment folder and `Tuner.restore` unpickles
    them: only the folder and stage are kept; the store comes from the folder's
    tracking.json when the search (re)starts."""

    def __init__(self, folder: str | Path, stage: str = "search", close_timeout_s: float = 60.0):
        self.folder, self.stage, self.close_timeout_s = str(folder), stage, close_timeout_s

    def __getstate__(self):
        return {k: self.__dict__[k] for k in ("folder", "stage", "close_timeout_s")}

    def setup(self, **info):
        self._results, self._jobs = {}, queue.Queue()
        self._worker = threading.Thread(target=self._work, name="mlflow-replica", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        if not (Path(self.folder) / SETTINGS_FILE).is_file():
            logger.warning("%s: no %s, MLflow is not written", self.folder, SETTINGS_FILE)
            return all(iter(self._jobs.get, None))  # drained, not applied
        with folder_lock(self.folder, timeout=float("inf")):
            replica = None
            for job in iter(self._jobs.get, None):
                try:
                    if replica is None:
                        settings = {**read_settings(self.folder), "stage": self.stage}
                        replica = Replica(settings)
                    job(replica)
                except Exception as exc:  # noqa: BLE001 - the folder keeps everything
                    logger.warning("MLflow store not updated (%s); the folder keeps the "
                                   "results and the search's end or `python -m "
                                   "tuning.tracking sync %s` sends them",
                                   str(exc).splitlines()[0][:200] if str(exc) else
                                   type(exc).__name__, self.folder)
                    replica = None  # found again from the store, which may differ now

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id, config = trial.trial_id, dict(trial.config)
        self._jobs.put(lambda r: r.open_trial(trial_id, config, running=True))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        trial_id, config = trial.trial_id, dict(trial.config)
        results = self._results.setdefault(trial_id, [])
        results.append(dict(result))
        snapshot = list(results)

        def job(r: Replica):
            r.open_trial(trial_id, config, running=True)
            r.log_epochs(trial_id, snapshot)
        self._jobs.put(job)

    def _ended(self, trial, status: str) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        snapshot = list(self._results.get(trial_id, [])) or [trial.last_result or {}]
        reason = failure_reason(trial.error_file) if status == "ERROR" else None

        def job(r: Replica):
            r.open_trial(trial_id, config, running=False)
            r.log_epochs(trial_id, snapshot)
            r.end_trial(trial_id, snapshot, status, reason)
        self._jobs.put(job)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "ERROR")

    def on_experiment_end(self, trials, **info):
        """Let the worker finish (up to close_timeout_s; MLflow may be retrying)."""
        self._jobs.put(None)
        self._worker.join(self.close_timeout_s)
        if self._worker.is_alive():
            logger.warning("MLflow store still not updated after %.0f s; the folder keeps "
                           "the results: python -m tuning.tracking sync %s",
                           self.close_timeout_s, self.folder)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("sync", help="export an experiment folder to MLflow")
    export.add_argument("folder", help="the search's experiment folder (<storage>/<name>)")
    export.add_argument("--tracking-uri", help="store to write to (default: the folder's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not (Path(args.folder) / SETTINGS_FILE).is_file():
        parser.error(f"{args.folder}: no {SETTINGS_FILE} (not an experiment folder of "
                     "run_search.py)")
    replica = sync(args.folder, args.tracking_uri)
    print(f"synced {args.folder} to {replica.client.tracking_uri}: experiment "
          f"{replica.experiment_id}, parent run {replica.parent_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
