"""MLflow tracking of a search: one parent run per search, one nested child run per trial.

    parent run  (tags search_name, faerec.role=search, outcome; params = search settings;
     │           artifacts: search space YAML, dataset statistics, summary tables;
     │           metrics: the best trial's validation and test metrics)
     ├─ child run per trial (tags trial_id, backbone, method, outcome[, failure_reason],
     │                       mlflow.parentRunId; params = the trial's configuration;
     │                       metrics every epoch with step = epoch, test metrics once)
     └─ ...

Why a background writer: Ray Tune calls its callbacks on the driver's event loop, and a
slow or unreachable tracking server must never stall it; SQLite must also never be written
by two threads at once. So `SearchTracker`'s methods only append an operation to a journal
and a queue; ONE thread applies the operations in order with `MlflowClient`, retrying
with backoff while the store is unreachable (nothing is lost while a server restarts).

Why a journal: every operation is appended to a JSON-lines file before it is attempted and
marked done after it reached the store. After a driver crash, or when the server never came
back before `close()`, the operations not done are replayed by

    python -m tuning.tracking sync --journal PATH [--tracking-uri URI]

(a new `SearchTracker` on the same journal also replays them first, so `--resume` does it
too). Replaying is idempotent: runs are found again by their tags before one is created
(parent: `search_name`; a parent created without resume also by `faerec.op`, the id of the
operation that created it; child: `trial_id` under the parent), params that already exist
are not logged again, and a metric sent twice carries the same (key, value, step, timestamp),
which MLflow's SQL store keeps once. One journal belongs to one experiment; do not run
`sync` on a journal while its search is still running.

Runs never stay RUNNING: `finish_search` ends the trials still open as KILLED, and `close`
(also after an interrupted search) ends every open run as KILLED.

Environment: unless already set, a tracker sets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and
MLFLOW_HTTP_REQUEST_TIMEOUT=10 for the process, so that an outage reaches the writer's own
retry loop within seconds instead of after MLflow's minutes of silent retries.
"""

import argparse
import itertools
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from numbers import Real
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH,
                                     MAX_TAG_VAL_LENGTH, path_not_unique)
from ray import tune

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACKING_URI = f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"

OUTCOME_STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "failed": "FAILED"}
INTERRUPTED = "interrupted"  # outcome tag of a run ended as KILLED by finish_search/close

_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-./: ]")  # MLflow also rejects '@'
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential", re.IGNORECASE)
_MAX_BACKOFF_S = 5.0

# Tune pickles its RunConfig, callbacks included, into tuner.pkl, and `Tuner.restore` takes
# the callbacks from there: a restored MLflowTuneCallback finds the live tracker of its
# journal here (a tracker, with its thread and locks, cannot be pickled).
_OPEN_TRACKERS: dict[Path, "SearchTracker"] = {}


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
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Real) and not isinstance(value, bool):
            if (name := metric_name(key)) is not None:
                out[name] = float(value)
    return out


def run_tags(tags: dict) -> dict[str, str]:
    """Tags under valid names, values stringified and cut to MLflow's limit."""
    return {name: str(value)[:MAX_TAG_VAL_LENGTH] for key, value in tags.items()
            if (name := metric_name(key)) is not None}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _quoted(value: str) -> str:
    """A name safe inside an MLflow filter string (which has no quote escaping)."""
    if "'" in value or '"' in value or "`" in value:
        raise ValueError(f"name {value!r} must not contain quotes")
    return f"'{value}'"


def _is_transient(exc: Exception) -> bool:
    """Worth retrying: the store is unreachable, timing out, overloaded or locked (HTTP 5xx
    or 429, connection errors, SQLite busy); a 4xx (bad value, missing run) never heals."""
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    # requests' connection errors are OSErrors too; a missing file will not come back
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def limit_mlflow_http_retries() -> None:
    """Make MLflow's own HTTP client fail fast (no retries, 10 s timeout) unless the user set
    MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT: by default it retries 7
    times for about 4 minutes, which would hide an outage from the writer thread, whose own
    retry loop (with backoff, forever, journaled) is what keeps operations safe. This sets
    process environment variables, so it also applies to other MLflow clients here."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


# ---------------------------------------------------------------- journal

class _Journal:
    """Append-only JSON-lines file: one line per operation ({"id", "op", ...}), then
    {"done": id} once it reached the store or {"failed": id, "error": ...} if the store
    refused it for good. Artifacts are copied beside it (`<journal>.files/<op id>/`) when
    the operation is recorded, so a replay uploads the file as it was then."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.files = self.path.with_name(self.path.name + ".files")
        self._lock = threading.Lock()  # the caller and the writer thread both append

    def append(self, entry: dict) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def read(self) -> tuple[list[dict], set[str]]:
        """(every operation in order, ids of those settled: done or failed)."""
        ops, settled = [], set()
        if not self.path.exists():
            return ops, settled
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash mid-write
                logger.warning("%s:%d: unreadable journal line skipped", self.path, number)
                continue
            if "op" in entry:
                ops.append(entry)
            else:
                settled.add(entry.get("done") or entry.get("failed"))
        return ops, settled

    def spool(self, op_id: str, name: str, source: str | Path) -> str:
        target = self.files / op_id / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    def forget_files(self, op_id: str) -> None:
        shutil.rmtree(self.files / op_id, ignore_errors=True)


# ---------------------------------------------------------------- store (writer thread only)

class _Store:
    """Applies journal operations to one MLflow experiment. Each operation is idempotent, so
    an operation retried after a lost response, or replayed from the journal, has no effect
    twice. Used from the writer thread only (SQLite sees one writer)."""

    def __init__(self, tracking_uri: str, experiment_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._client = None  # created on first use: opening SQLite migrates the schema
        self._experiment_id = None
        self._runs = {}  # (search_name, trial_id or None) -> run id

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def apply(self, op: dict) -> str:
        """Apply one operation; returns the id of the run it touched."""
        if op["op"] == "start":
            return self._start(op)
        run_id = self.run_id(op["search"], op["trial"])
        if op["op"] == "artifact":
            self.client.log_artifact(run_id, op["file"], op["path"])
            return run_id
        metrics = [Metric(k, v, ts, step) for k, v, step, ts in op.get("metrics", [])]
        tags = [RunTag(k, v) for k, v in op.get("tags", {}).items()]
        if metrics or tags:
            self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if op["op"] == "end":
            self.client.set_terminated(run_id, op["status"], end_time=op["time"])
        return run_id

    def run_id(self, search: str, trial: str | None) -> str:
        if (search, trial) not in self._runs:
            run = self._find(self._run_filter(search, trial))
            if run is None:
                raise MlflowException(f"no MLflow run for search {search!r} trial {trial!r}",
                                      error_code=RESOURCE_DOES_NOT_EXIST)
            self._runs[(search, trial)] = run.info.run_id
        return self._runs[(search, trial)]

    def _start(self, op: dict) -> str:
        """Find the run again (resume, retry, replay) or create it; set it RUNNING; log the
        params it does not have yet."""
        search, trial = op["search"], op["trial"]
        if trial is None:
            # a new run of this search name: its trials must not land in an older one's runs
            self._runs = {key: run for key, run in self._runs.items() if key[0] != search}
            identity = {"search_name": search, "faerec.role": "search", "faerec.op": op["id"]}
            # resume reuses the latest run of that search; a new search only its own run
            found = self._find(self._run_filter(search, None) if op["resume"]
                               else f"tags.`faerec.op` = {_quoted(op['id'])}")
        else:
            identity = {"trial_id": trial, "mlflow.parentRunId": self.run_id(search, None),
                        "faerec.role": "trial"}
            found = self._find(self._run_filter(search, trial))
        if found is None:
            run = self.client.create_run(self._experiment(), start_time=op["time"],
                                         tags=identity, run_name=trial or search)
            run_id, existing = run.info.run_id, {}
        else:
            run_id, existing = found.info.run_id, found.data.params
            if found.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        changed = sorted(k for k, v in op["params"].items() if existing.get(k, v) != v)
        if changed:  # MLflow params are immutable: the first value stays
            logger.warning("run %s keeps its earlier values of params %s", run_id, changed)
        params = [Param(k, v) for k, v in op["params"].items() if k not in existing]
        tags = [RunTag(k, v) for k, v in op["tags"].items()]
        if params or tags:
            self.client.log_batch(run_id, params=params, tags=tags)
        self._runs[(search, trial)] = run_id
        return run_id

    def _run_filter(self, search: str, trial: str | None) -> str:
        if trial is None:
            return f"tags.search_name = {_quoted(search)} and tags.`faerec.role` = 'search'"
        parent = self.run_id(search, None)
        return f"tags.trial_id = {_quoted(trial)} and tags.`mlflow.parentRunId` = '{parent}'"

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self._experiment()], filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def _experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            self._experiment_id = (experiment.experiment_id if experiment else
                                   self.client.create_experiment(
                                       self.experiment_name,
                                       artifact_location=artifact_location(self.tracking_uri)))
        return self._experiment_id


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts when MLflow is used without a server. With a
    database store MLflow's default is ./mlruns of whatever the current directory is; we
    keep them beside the SQLite file (mlflow/artifacts for the default store) or, for
    another database, in the project's mlflow/artifacts. A server or a file store decides
    for itself (None)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0] if "://" in tracking_uri else ""
    if scheme == "sqlite":
        database = Path(tracking_uri[len("sqlite:///"):]).resolve()
        return (database.parent / "artifacts").as_uri()
    if scheme in ("postgresql", "mysql", "mssql"):
        return (PROJECT_ROOT / "mlflow" / "artifacts").as_uri()
    return None


# ---------------------------------------------------------------- tracker

class SearchTracker:
    """Records a search in MLflow without ever blocking the caller on the store (except
    `start_search`, which waits for the parent run and so fails fast on a wrong URI).

    Usage (the search driver):
        tracker = SearchTracker(uri, experiment, journal)
        parent_run_id = tracker.start_search(name, params, tags, artifacts, resume)
        ... Tune runs with MLflowTuneCallback(tracker, max_epochs) ...
        tracker.finish_search(best_metrics, {"summary.csv": path}, failed=False)
        tracker.close()
    """

    def __init__(self, tracking_uri: str, experiment_name: str, journal_path: str | Path,
                 *, close_timeout_s: float = 30.0, start_timeout_s: float = 60.0):
        limit_mlflow_http_retries()
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.close_timeout_s, self.start_timeout_s = close_timeout_s, start_timeout_s
        self._journal = _Journal(journal_path)
        self.journal_path = self._journal.path
        self._store = _Store(tracking_uri, experiment_name)
        self._lock = threading.Lock()  # orders journal lines and queue entries alike
        self._cond = threading.Condition()  # queue, results and counters
        self._wake = threading.Event()  # cuts a retry backoff short (flush, close)
        self._search = None  # name of the search this tracker started last
        self._open = set()  # (search, trial or None) of runs started and not ended
        self._last_step = {}  # (search, trial) -> last epoch logged, for final metrics
        self._results = {}  # op id -> run id, or the exception that refused it
        self._failed = 0
        self._closing = self._abandon = self._closed = False

        ops, settled = self._journal.read()
        for op in ops:
            self._track(op)
        self._queue = deque(op for op in ops if op["id"] not in settled)
        if self._queue:
            logger.info("replaying %d tracking operations left in %s",
                        len(self._queue), self._journal.path)
        self._thread = threading.Thread(target=self._write_loop, name="mlflow-writer",
                                        daemon=True)
        self._thread.start()
        _OPEN_TRACKERS[self.journal_path] = self

    # ---- the search

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment's id, known once `start_search` has returned."""
        return self._store._experiment_id

    def start_search(self, search_name: str, params: dict, tags: dict,
                     artifacts: dict[str, str | Path], resume: bool = False) -> str:
        """Create (or, with resume, reopen) the search's parent run and wait for it; returns
        its run id. `artifacts` maps a name in the run (may contain '/') to a local file.
        Raises TimeoutError when the store cannot be reached within start_timeout_s."""
        _quoted(search_name)
        with self._lock:
            self._search = search_name
            start = self._submit("start", None, params=config_params(params),
                                 tags=run_tags(tags), resume=resume,
                                 tracking_uri=self.tracking_uri,
                                 experiment=self.experiment_name)
            self._submit_artifacts(artifacts)
        with self._cond:
            if not self._cond.wait_for(lambda: start in self._results, self.start_timeout_s):
                raise TimeoutError(f"MLflow store {self.tracking_uri} unreachable for "
                                   f"{self.start_timeout_s:.0f} s")
            result = self._results[start]
        if isinstance(result, Exception):
            raise result
        return result

    def trial_started(self, trial_id: str, config: dict, tags: dict) -> None:
        """Open the trial's child run (reopen it when the trial id already has one)."""
        _quoted(trial_id)
        with self._lock:
            self._submit("start", trial_id, params=config_params(config), tags=run_tags(tags))

    def trial_result(self, trial_id: str, metrics: dict[str, float], step: int) -> None:
        """Log one epoch: the numeric `metrics` at `step`. A result for a trial that was
        ended (a retried trial after a failure) reopens its run."""
        points = self._points(metrics, step)
        with self._lock:
            self._reopen(trial_id)
            if points:
                self._submit("log", trial_id, metrics=points)

    def trial_finished(self, trial_id: str, outcome: str, final_metrics: dict[str, float],
                       reason: str | None = None) -> None:
        """End the trial's run: outcome completed | early-stopped (FINISHED) | failed
        (FAILED, with `reason` as failure_reason); `final_metrics` (the test metrics) are
        logged once, at the trial's last epoch."""
        if outcome not in OUTCOME_STATUS:
            raise ValueError(f"outcome {outcome!r} is not one of {sorted(OUTCOME_STATUS)}")
        tags = {"outcome": outcome}
        if reason is not None:
            tags["failure_reason"] = reason
        with self._lock:
            self._reopen(trial_id)
            step = self._last_step.get((self._search, trial_id), 0)
            self._submit("end", trial_id, status=OUTCOME_STATUS[outcome], tags=run_tags(tags),
                         metrics=self._points(final_metrics, step))

    def finish_search(self, metrics: dict[str, float], artifacts: dict[str, str | Path],
                      failed: bool = False) -> None:
        """End the search: trials still open become KILLED; the parent gets `metrics` (the
        best trial's), the `artifacts` files, and FINISHED (or FAILED)."""
        with self._lock:
            self._end_open_trials(self._search)
            self._submit_artifacts(artifacts)
            # outcome replaces the 'interrupted' that close() left on a since-resumed parent
            self._submit("end", None, status="FAILED" if failed else "FINISHED",
                         tags={"outcome": "failed" if failed else "completed"},
                         metrics=self._points(metrics, 0))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every operation so far was applied; True when all reached the store
        (False on timeout or when the store refused one for good)."""
        self._wake.set()
        with self._cond:
            self._cond.wait_for(lambda: not self._queue or self._abandon, timeout)
            return not self._queue and self._failed == 0

    def close(self) -> None:
        """End every run still open as KILLED (an interrupted search), wait up to
        close_timeout_s for the queue, then stop the writer. Whatever did not reach the
        store stays in the journal for `python -m tuning.tracking sync`."""
        with self._lock:
            if self._closed:
                return
            for search in sorted({s for s, _ in self._open}):
                self._end_open_trials(search)
                if (search, None) in self._open:
                    self._submit("end", None, search=search, status="KILLED",
                                 tags={"outcome": INTERRUPTED})
            self._closing = True  # the writer exits once the queue is empty
        if not self.flush(self.close_timeout_s):
            with self._cond:
                left = len(self._queue)
            if left:
                logger.warning("%d tracking operations did not reach %s; replay them with: "
                               "python -m tuning.tracking sync --journal %s", left,
                               self.tracking_uri, self._journal.path)
        with self._cond:
            self._abandon = True
            self._cond.notify_all()
        self._wake.set()
        self._thread.join(timeout=1.0)
        self._closed = True
        if _OPEN_TRACKERS.get(self.journal_path) is self:
            del _OPEN_TRACKERS[self.journal_path]

    # ---- recording operations (caller side, under self._lock)

    def _submit(self, kind: str, trial: str | None, search: str | None = None,
                op_id: str | None = None, **fields) -> str:
        if self._closed or self._closing:
            raise RuntimeError("SearchTracker is closed")
        search = search or self._search
        if search is None:
            raise RuntimeError("start_search must come first")
        op = {"id": op_id or uuid.uuid4().hex, "op": kind, "search": search, "trial": trial,
              "time": _now_ms(), **fields}
        self._journal.append(op)  # journaled BEFORE it is attempted
        self._track(op)
        with self._cond:
            self._queue.append(op)
            self._cond.notify_all()
        return op["id"]

    def _submit_artifacts(self, artifacts: dict[str, str | Path]) -> None:
        for name, source in artifacts.items():
            op_id = uuid.uuid4().hex  # chosen first: the file's copy is kept under it
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self._submit("artifact", None, op_id=op_id, path=folder,
                         file=self._journal.spool(op_id, name, source))

    def _reopen(self, trial_id: str) -> None:
        if (self._search, trial_id) not in self._open:
            self._submit("start", trial_id, params={}, tags={})

    def _end_open_trials(self, search: str) -> None:
        for trial in sorted(t for s, t in self._open if s == search and t is not None):
            self._submit("end", trial, search=search, status="KILLED",
                         tags={"outcome": INTERRUPTED})

    def _points(self, metrics: dict, step: int) -> list[list]:
        now = _now_ms()  # journaled, so a replay sends the very same point
        return [[k, v, int(step), now] for k, v in numeric_metrics(metrics).items()]

    def _track(self, op: dict) -> None:
        """Keep which runs are open and each trial's last epoch (also from the journal)."""
        key = (op["search"], op["trial"])
        if op["op"] == "start":
            self._open.add(key)
        elif op["op"] == "end":
            self._open.discard(key)
        if op["op"] == "log" and op["metrics"]:
            self._last_step[key] = max(step for _, _, step, _ in op["metrics"])

    # ---- the writer thread

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing or self._abandon)
                if not self._queue or self._abandon:
                    return
                op = self._queue[0]
            if not self._apply_with_retry(op):
                return
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _apply_with_retry(self, op: dict) -> bool:
        """Apply `op`, retrying transient failures with backoff; False when abandoned."""
        for attempt in itertools.count():
            try:
                result = self._store.apply(op)
                break
            except Exception as exc:  # noqa: BLE001 - classified right below
                if not _is_transient(exc):
                    self._refused(op, exc)
                    return True
                if attempt == 0:
                    logger.warning("MLflow store unreachable (%s); operations stay queued "
                                   "and are retried", str(exc).splitlines()[0][:200])
                self._wake.clear()
                self._wake.wait(min(0.5 * 2 ** attempt, _MAX_BACKOFF_S))
                with self._cond:
                    if self._abandon:
                        return False
        self._journal.append({"done": op["id"]})
        if op["op"] == "artifact":
            self._journal.forget_files(op["id"])
        with self._cond:
            self._results[op["id"]] = result
        if attempt:
            logger.info("MLflow store reachable again")
        return True

    def _refused(self, op: dict, exc: Exception) -> None:
        logger.error("MLflow refused %s of %s/%s: %s", op["op"], op["search"], op["trial"], exc)
        self._journal.append({"failed": op["id"], "error": str(exc)[:1000]})
        with self._cond:
            self._failed += 1
            self._results[op["id"]] = exc


# ---------------------------------------------------------------- Ray Tune adapter

class MLflowTuneCallback(tune.Callback):
    """Forwards Tune's driver-side trial events to a SearchTracker (which only enqueues).

    Per epoch it logs the numeric results whose names start with `metric_prefixes`, at
    step = the reported `epoch` (else Tune's training_iteration). When a trial ends, the
    `test/` values of its last result are logged once. A trial is "completed" when its
    last result says `finished: 1` (it stopped by itself: budget or its own patience) or
    reached `max_epochs`; otherwise the scheduler (ASHA) stopped it: "early-stopped".

    Pickled (Tune saves it in tuner.pkl) it keeps only its tracker's journal path; after
    `Tuner.restore` it uses the open SearchTracker of that journal, so create the tracker
    before the restored Tuner runs.
    """

    def __init__(self, tracker: SearchTracker, max_epochs: int,
                 metric_prefixes=("train/", "val/", "time/")):
        self._tracker, self.journal_path = tracker, tracker.journal_path
        self.max_epochs, self.metric_prefixes = max_epochs, tuple(metric_prefixes)

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> SearchTracker:
        if self._tracker is None:
            self._tracker = _OPEN_TRACKERS.get(self.journal_path)
            if self._tracker is None:
                raise RuntimeError(f"no open SearchTracker with journal {self.journal_path}: "
                                   "create it before running a restored Tuner")
        return self._tracker

    def on_trial_start(self, iteration, trials, trial, **info):
        tags = {k: trial.config[k] for k in ("backbone", "method") if k in trial.config}
        self.tracker.trial_started(trial.trial_id, trial.config, tags)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k.startswith(self.metric_prefixes)}
        self.tracker.trial_result(trial.trial_id, metrics, step=_epoch(result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ended_itself = last.get("finished") == 1 or _epoch(last) >= self.max_epochs
        test = {k: v for k, v in last.items() if k.startswith("test/")}
        self.tracker.trial_finished(trial.trial_id,
                                    "completed" if ended_itself else "early-stopped", test)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.tracker.trial_finished(trial.trial_id, "failed", {}, reason=_failure_reason(trial))


def _epoch(result: dict) -> int:
    return int(result.get("epoch", result.get("training_iteration", 0)))


def _failure_reason(trial) -> str:
    """The last line of the trial's error file, e.g. 'ValueError: diverged' (Tune 2.60 keeps
    the traceback in `trial.error_file`; a Trial has no error message attribute)."""
    path = trial.error_file
    lines = Path(path).read_text().strip().splitlines() if path and Path(path).exists() else []
    return lines[-1].strip() if lines else "unknown error (Tune wrote no error file)"


# ---------------------------------------------------------------- command line

def sync(journal_path: str | Path, tracking_uri: str | None = None,
         timeout: float = 300.0) -> bool:
    """Replay the journal's operations not yet done, end its runs still open as KILLED,
    and report whether everything reached the store."""
    ops, _ = _Journal(journal_path).read()
    starts = [op for op in ops if op["op"] == "start" and op["trial"] is None]
    if not starts:
        raise ValueError(f"{journal_path}: no search in this journal")
    tracker = SearchTracker(tracking_uri or starts[-1]["tracking_uri"],
                            starts[-1]["experiment"], journal_path, close_timeout_s=timeout)
    tracker.close()
    return tracker.flush(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.tracking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("sync", help="replay a journal's pending operations")
    replay.add_argument("--journal", required=True, help="the search's *.jsonl journal")
    replay.add_argument("--tracking-uri", help="store to write to (default: the journal's)")
    replay.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to keep retrying an unreachable store (default 300)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not Path(args.journal).is_file():
        parser.error(f"no journal at {args.journal}")
    ok = sync(args.journal, args.tracking_uri, args.timeout)
    print("journal synced" if ok else "some operations did not reach the store (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
