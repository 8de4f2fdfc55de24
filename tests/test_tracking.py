"""MLflow tracking of a search, against real stores: a SQLite file in tmp_path, a real
`mlflow server` started by mlflow/server.sh, and a tiny real Ray Tune run."""

import json
import math
import os
import pickle
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.tracking import MLflowTuneCallback, SearchTracker, main, sync

ROOT = Path(__file__).resolve().parents[1]
NDCG = "val/overall/ndcg_10"


# ---------------------------------------------------------------- helpers

def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def write_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"search_space.yaml": "metric: val/overall/ndcg_20\n",
             "dataset_stats.json": '{"users": 943}\n',
             "summary.csv": "trial,outcome\nt-done,completed\n",
             "summary.md": "| trial | outcome |\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: folder / name for name in files}


def log_epochs(tracker: SearchTracker, trial: str, epochs) -> None:
    for epoch in epochs:
        tracker.trial_result(trial, {NDCG: 0.1 * epoch, "train/loss": 1.0 / epoch}, step=epoch)


def runs_by_name(client: MlflowClient, experiment: str) -> dict:
    """Every run of the experiment by run name; fails on a run created twice."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"a run was created twice: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def history(client: MlflowClient, run, key: str = NDCG) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def points(client: MlflowClient, run, key: str) -> list[tuple]:
    """Every logged point of a metric; repr() so that NaN equals NaN."""
    return sorted((m.step, m.timestamp, repr(m.value))
                  for m in client.get_metric_history(run.info.run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow/server.sh` on a fixed free port over a SQLite store in `folder`; can be
    stopped and started again on the same port and store (a server blip)."""

    def __init__(self, folder: Path):
        self.port, self.folder = free_port(), folder
        folder.mkdir(exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 90.0) -> None:
        env = {**os.environ, "PORT": str(self.port), "BACKEND_STORE_URI": sqlite_uri(self.folder),
               "ARTIFACTS": str(self.folder / "artifacts")}
        with open(self.folder / "server.log", "a") as log:
            # own session: stop() ends the script's whole process group, workers included
            self.process = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")],
                                            env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not healthy after {timeout} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def rest(self, path: str, body: dict | None = None, **query) -> dict:
        """GET (or POST `body`) on the REST API, without MLflow's client."""
        url = f"{self.url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(query)}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def runs(self, experiment: str) -> dict[str, dict]:
        """Every run of the experiment by run name, read through the REST API."""
        exp = self.rest("experiments/get-by-name", experiment_name=experiment)["experiment"]
        runs = self.rest("runs/search", {"experiment_ids": [exp["experiment_id"]],
                                         "max_results": 1000}).get("runs", [])
        names = [r["info"]["run_name"] for r in runs]
        assert len(names) == len(set(names)), f"a run was created twice: {sorted(names)}"
        return {r["info"]["run_name"]: r for r in runs}

    def steps(self, run: dict, key: str = NDCG) -> list[int]:
        points = self.rest("metrics/get-history", run_id=run["info"]["run_id"],
                           metric_key=key).get("metrics", [])
        return sorted(int(m.get("step", 0)) for m in points)


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def trackers():
    """Makes trackers and closes every one of them, also when a test fails."""
    made = []

    def make(*args, **kwargs) -> SearchTracker:
        made.append(SearchTracker(*args, **kwargs))
        return made[-1]
    yield make
    for tracker in made:
        tracker.close()


# ---------------------------------------------------------------- SQLite store

def simulate_search(tracker: SearchTracker, files: dict[str, Path]) -> str:
    parent = tracker.start_search(
        "search-1", params={"num_samples": 4, "max_epochs": 3, "api_token": "s3cr3t"},
        tags={"dataset": "ml-100k"},
        artifacts={k: files[k] for k in ("search_space.yaml", "dataset_stats.json")})
    configs = {f"t-{kind}": {"backbone": "sasrec", "method": "faerec", "lr": 0.001 * i,
                             "dataset": {"name": "ml-100k", "openai_key": "sk-secret"}}
               for i, kind in enumerate(("done", "asha", "crash", "open"), 1)}
    for trial, config in configs.items():
        tracker.trial_started(trial, config, {"backbone": "sasrec", "method": "faerec"})
    log_epochs(tracker, "t-done", [1, 2, 3])
    log_epochs(tracker, "t-asha", [1, 2])
    log_epochs(tracker, "t-crash", [1])
    log_epochs(tracker, "t-open", [1])
    tracker.trial_result("t-done", {"val/tail/hr@10": 0.5, "val/odd": math.nan,
                                    "val/label": "not a number"}, step=3)
    tracker.trial_finished("t-done", "completed", {"test/overall/ndcg_10": 0.25})
    tracker.trial_finished("t-asha", "early-stopped", {"test/overall/ndcg_10": 0.125})
    tracker.trial_finished("t-crash", "failed", {}, reason="ValueError: loss is NaN")
    tracker.finish_search({"test/overall/ndcg_10": 0.25},
                          {k: files[k] for k in ("summary.csv", "summary.md")})
    return parent


def test_search_is_a_parent_run_with_one_nested_run_per_trial(tmp_path, trackers):
    store = tmp_path / "store"
    tracker = trackers(sqlite_uri(store), "faerec", tmp_path / "journal.jsonl")
    parent_id = simulate_search(tracker, write_files(tmp_path / "files"))
    assert tracker.flush(timeout=60)
    tracker.close()

    client = MlflowClient(sqlite_uri(store))
    runs = runs_by_name(client, "faerec")
    assert sorted(runs) == ["search-1", "t-asha", "t-crash", "t-done", "t-open"]
    parent = runs["search-1"]
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert parent.data.tags["search_name"] == "search-1"
    assert parent.data.tags["faerec.role"] == "search"
    assert parent.data.params == {"num_samples": "4", "max_epochs": "3"}  # no api_token
    assert parent.data.metrics == {"test/overall/ndcg_10": 0.25}
    artifacts = {f.path for f in client.list_artifacts(parent_id)}
    assert artifacts == {"search_space.yaml", "dataset_stats.json", "summary.csv", "summary.md"}
    # artifacts beside the SQLite file, not in ./mlruns of the current directory
    assert parent.info.artifact_uri.startswith((store / "artifacts").as_uri())

    expected = {"t-done": ("FINISHED", "completed"), "t-asha": ("FINISHED", "early-stopped"),
                "t-crash": ("FAILED", "failed"), "t-open": ("KILLED", "interrupted")}
    for trial, (status, outcome) in expected.items():
        run = runs[trial]
        assert (run.info.status, run.data.tags["outcome"]) == (status, outcome), trial
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["trial_id"] == trial
        assert (run.data.tags["backbone"], run.data.tags["method"]) == ("sasrec", "faerec")
        assert set(run.data.params) == {"backbone", "method", "lr", "dataset/name"}
    assert runs["t-crash"].data.tags["failure_reason"] == "ValueError: loss is NaN"
    assert "failure_reason" not in runs["t-done"].data.tags

    done = runs["t-done"]
    assert done.data.params["lr"] == "0.001"
    assert history(client, done) == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert [s for s, _ in history(client, runs["t-asha"])] == [1, 2]
    # test metrics: once, at the trial's last epoch; bad names fixed, strings dropped
    assert history(client, done, "test/overall/ndcg_10") == [(3, 0.25)]
    assert history(client, done, "val/tail/hr_10") == [(3, 0.5)]
    assert math.isnan(done.data.metrics["val/odd"])
    assert "val/label" not in done.data.metrics
    assert "test/overall/ndcg_10" not in runs["t-open"].data.metrics


def test_replaying_a_whole_journal_creates_and_duplicates_nothing(tmp_path, trackers):
    store, journal = tmp_path / "store", tmp_path / "journal.jsonl"
    tracker = trackers(sqlite_uri(store), "faerec", journal)
    simulate_search(tracker, write_files(tmp_path / "files"))
    tracker.close()
    client = MlflowClient(sqlite_uri(store))
    before = runs_by_name(client, "faerec")
    before_points = {(name, key): points(client, run, key)
                     for name, run in before.items() for key in run.data.metrics}

    # As if no operation had been confirmed. Artifact operations are left out: their
    # copies are deleted once uploaded (and uploading a file again just replaces it).
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps(e) + "\n" for e in entries
                              if e.get("op") not in (None, "artifact")))
    assert sync(replay, timeout=60)

    after = runs_by_name(client, "faerec")
    assert sorted(after) == sorted(before)
    for name, run in after.items():
        assert run.info.run_id == before[name].info.run_id
        assert run.info.status == before[name].info.status, name
        assert run.data.params == before[name].data.params
    assert before_points == {(name, key): points(client, run, key)
                             for name, run in after.items() for key in run.data.metrics}


def test_resume_reopens_the_same_parent_and_trial_runs(tmp_path, trackers):
    store, journal = tmp_path / "store", tmp_path / "journal.jsonl"
    first = trackers(sqlite_uri(store), "faerec", journal)
    parent_id = first.start_search("search-r", {"num_samples": 2}, {}, {})
    first.trial_started("t-a", {"lr": 0.01}, {})
    log_epochs(first, "t-a", [1])
    first.close()  # interrupted search: every open run ends KILLED

    client = MlflowClient(sqlite_uri(store))
    runs = runs_by_name(client, "faerec")
    assert {n: r.info.status for n, r in runs.items()} == {"search-r": "KILLED", "t-a": "KILLED"}

    second = trackers(sqlite_uri(store), "faerec", journal)
    assert second.start_search("search-r", {"num_samples": 2}, {}, {}, resume=True) == parent_id
    assert client.get_run(parent_id).info.status == "RUNNING"
    second.trial_started("t-a", {"lr": 0.01}, {})  # Tune keeps trial ids across restore
    log_epochs(second, "t-a", [2])
    second.trial_finished("t-a", "completed", {})
    second.trial_started("t-b", {"lr": 0.02}, {})
    log_epochs(second, "t-b", [1])
    second.trial_finished("t-b", "early-stopped", {})
    second.finish_search({}, {})
    assert second.flush(timeout=60)

    runs = runs_by_name(client, "faerec")
    assert sorted(runs) == ["search-r", "t-a", "t-b"]
    assert {n: r.info.status for n, r in runs.items()} == {
        "search-r": "FINISHED", "t-a": "FINISHED", "t-b": "FINISHED"}
    assert [s for s, _ in history(client, runs["t-a"])] == [1, 2]
    assert runs["t-a"].data.tags["mlflow.parentRunId"] == parent_id


# ---------------------------------------------------------------- tracking server

def test_server_outage_delays_but_loses_nothing(tmp_path, server, trackers):
    """Two searches live through one outage of the server: `live` keeps logging and
    catches up by itself when the server is back; `closed` is closed during the outage
    (as a driver that ends or crashes), and the `sync` command replays its journal."""
    live = trackers(server.url, "live", tmp_path / "live.jsonl")
    closed = trackers(server.url, "closed", tmp_path / "closed.jsonl", close_timeout_s=1.0)
    files = write_files(tmp_path / "files")
    for tracker in (live, closed):
        tracker.start_search("search", {"num_samples": 2}, {},
                             {"search_space.yaml": files["search_space.yaml"]})
        tracker.trial_started("t-a", {"lr": 0.01}, {"backbone": "sasrec"})
        log_epochs(tracker, "t-a", [1, 2])
        assert tracker.flush(timeout=30)

    server.stop()
    slowest = 0.0
    for call in (lambda: log_epochs(live, "t-a", [3]),
                 lambda: live.trial_finished("t-a", "completed", {"test/overall/ndcg_10": 0.3}),
                 lambda: live.trial_started("t-b", {"lr": 0.02}, {"backbone": "sasrec"}),
                 lambda: log_epochs(live, "t-b", [1, 2, 3]),
                 lambda: live.trial_finished("t-b", "early-stopped", {}),
                 lambda: live.finish_search({"test/overall/ndcg_10": 0.3},
                                            {"summary.csv": files["summary.csv"]})):
        started = time.monotonic()
        call()
        slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.5, "a call waited for the unreachable server"
    assert not live.flush(timeout=1)

    log_epochs(closed, "t-a", [3])
    closed.trial_finished("t-a", "completed", {})
    closed.trial_started("t-b", {"lr": 0.02}, {})
    log_epochs(closed, "t-b", [1])
    started = time.monotonic()
    closed.close()  # the server did not come back in time: its runs stay open in MLflow
    assert time.monotonic() - started < 15

    server.start()  # same port, same store
    assert live.flush(timeout=60)
    # the command's code in this process (a fresh tracker; a subprocess costs 5 s of imports)
    assert main(["sync", "--journal", str(tmp_path / "closed.jsonl"), "--timeout", "60"]) == 0

    runs = server.runs("live")
    assert sorted(runs) == ["search", "t-a", "t-b"]
    assert {n: r["info"]["status"] for n, r in runs.items()} == {
        "search": "FINISHED", "t-a": "FINISHED", "t-b": "FINISHED"}
    assert server.steps(runs["t-a"]) == [1, 2, 3]
    assert server.steps(runs["t-b"]) == [1, 2, 3]
    assert server.steps(runs["t-a"], "test/overall/ndcg_10") == [3]
    assert tags(runs["t-a"])["mlflow.parentRunId"] == runs["search"]["info"]["run_id"]
    assert tags(runs["t-b"])["outcome"] == "early-stopped"
    assert tags(runs["t-a"])["backbone"] == "sasrec"
    artifacts = server.rest("artifacts/list", run_id=runs["search"]["info"]["run_id"])
    assert sorted(f["path"] for f in artifacts["files"]) == ["search_space.yaml", "summary.csv"]

    runs = server.runs("closed")
    assert sorted(runs) == ["search", "t-a", "t-b"]
    assert {n: r["info"]["status"] for n, r in runs.items()} == {
        "search": "KILLED", "t-a": "FINISHED", "t-b": "KILLED"}
    assert server.steps(runs["t-a"]) == [1, 2, 3]
    assert server.steps(runs["t-b"]) == [1]


# ---------------------------------------------------------------- Ray Tune

@pytest.fixture
def local_ray():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_tune_callback_records_each_trial(tmp_path, local_ray, trackers):
    from ray import tune

    def trainable(config):
        """3 'epochs' of made-up metrics; config["kind"] picks how the trial ends. Defined
        here so that Ray pickles it by value (workers cannot import this test module)."""
        for epoch in (1, 2, 3):
            if config["kind"] == "broken" and epoch == 2:
                raise ValueError("loss diverged")
            tune.report({"epoch": epoch, NDCG: 0.1 * epoch, "train/loss": 1.0 / epoch,
                         "time/epoch_s": 0.01, "test/overall/ndcg_10": 0.05 * epoch,
                         "note": "text", "finished": float(epoch == 3),
                         "halt": float(config["kind"] == "halted" and epoch == 2)})

    store = tmp_path / "store"
    tracker = trackers(sqlite_uri(store), "tune", tmp_path / "journal.jsonl")
    parent_id = tracker.start_search("search-t", {}, {}, {})
    tuner = tune.Tuner(
        trainable,
        param_space={"kind": tune.grid_search(["ok", "halted", "broken"]),
                     "backbone": "sasrec", "method": "faerec"},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name="t", storage_path=str(tmp_path / "ray"),
            stop=lambda trial_id, result: result["halt"] == 1,  # stands in for ASHA
            failure_config=tune.FailureConfig(max_failures=1),  # broken fails twice
            callbacks=[MLflowTuneCallback(tracker, max_epochs=3)]))
    results = tuner.fit()
    # Tuner.restore takes the callback from tuner.pkl: unpickled, it finds the live tracker
    restored = pickle.loads(pickle.dumps(tuner._local_tuner.get_run_config().callbacks[0]))
    assert restored.tracker is tracker
    assert len(results.errors) == 1
    tracker.finish_search({}, {})
    assert tracker.flush(timeout=60)

    client = MlflowClient(sqlite_uri(store))
    runs = {r.data.params["kind"]: r for r in client.search_runs(
        [client.get_experiment_by_name("tune").experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}'")}
    assert sorted(runs) == ["broken", "halted", "ok"]
    outcome = {kind: (r.info.status, r.data.tags["outcome"]) for kind, r in runs.items()}
    assert outcome == {"ok": ("FINISHED", "completed"), "halted": ("FINISHED", "early-stopped"),
                       "broken": ("FAILED", "failed")}
    assert runs["broken"].data.tags["failure_reason"] == "ValueError: loss diverged"
    # the retry after the first failure went on in the SAME run: epoch 1 twice
    assert [s for s, _ in history(client, runs["broken"])] == [1, 1]
    ok = runs["ok"]
    assert ok.data.tags["trial_id"] and ok.data.tags["backbone"] == "sasrec"
    assert [s for s, _ in history(client, ok)] == [1, 2, 3]
    assert [s for s, _ in history(client, ok, "time/epoch_s")] == [1, 2, 3]
    assert history(client, ok, "test/overall/ndcg_10") == [(3, pytest.approx(0.15))]
    assert history(client, runs["halted"], "test/overall/ndcg_10") == [(2, 0.1)]
    assert not {"note", "halt", "finished", "epoch"} & set(ok.data.metrics)
