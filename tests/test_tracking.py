"""MLflow as a replica of Tune's experiment folder, against real stores: SQLite files in
tmp_path, a real `mlflow server` started by mlflow/server.sh, and small real Tune runs."""

import json
import math
import os
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.tracking import MlflowCallback, main, sync, write_settings

ROOT = Path(__file__).resolve().parents[1]
NDCG = "val/overall/ndcg_10"


# ---------------------------------------------------------------- helpers

def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def runs_by_name(client: MlflowClient, experiment: str) -> dict:
    """Every run of the experiment by run name; fails on a run created twice."""
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"a run was created twice: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def history(client: MlflowClient, run, key: str = NDCG) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def snapshot(client: MlflowClient, experiment: str) -> dict:
    """Everything a sync may change, run by run: status, end time, params, tags, every
    metric point, artifacts."""
    out = {}
    for name, run in runs_by_name(client, experiment).items():
        points = {key: sorted((m.step, m.timestamp, repr(m.value)) for m in
                              client.get_metric_history(run.info.run_id, key))
                  for key in run.data.metrics}
        out[name] = (run.info.status, run.info.end_time, run.data.params, run.data.tags,
                     points, sorted(f.path for f in client.list_artifacts(run.info.run_id)))
    return out


class MlflowServer:
    """`mlflow/server.sh` over a SQLite store in `folder`; can be stopped and started again
    on the same port and store (a server blip). The port is picked free and bound by the
    server itself: should another process take it between the pick and the bind, the
    server exits and start() retries on a new port (the first start only)."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, None, None
        folder.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        for _ in range(3 if self.port is None else 1):
            port = self.port or _free_port()
            if self._start(port, timeout):
                self.port = port
                return
        raise RuntimeError(f"mlflow server did not start:\n{self.log()}")

    def log(self) -> str:
        return (self.folder / "server.log").read_text()[-3000:]

    def _start(self, port: int, timeout: float) -> bool:
        env = {**os.environ, "PORT": str(port), "BACKEND_STORE_URI": sqlite_uri(self.folder),
               "ARTIFACTS": str(self.folder / "artifacts")}
        with open(self.folder / "server.log", "a") as log:
            # own session: stop() ends the script's whole process group, workers included
            self.process = subprocess.Popen(["bash", str(ROOT / "mlflow" / "server.sh")],
                                            env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False  # e.g. the port was taken meanwhile
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                            timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout} s:\n{self.log()}")

    def stop(self, crash: bool = False) -> None:
        """End the server and its workers; `crash`: at once (SIGKILL), as an outage does."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
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


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "server")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def search_folder(tmp_path: Path, tracking_uri: str, online: bool = True) -> Path:
    """A finished search as run_search.py leaves it: Tune's experiment folder with three
    trials (completed, stopped early, failed twice), tracking.json and the parent's files;
    MLflow written live by the callback, then brought up to date by sync (not `online`:
    the store is down, as the driver's syncs would fail, they are left out)."""
    from ray import tune

    def trainable(config):
        """3 'epochs' of made-up metrics; config["kind"] picks how the trial ends. Defined
        here so that Ray pickles it by value (workers cannot import this test module)."""
        for epoch in (1, 2, 3):
            if config["kind"] == "broken" and epoch == 2:
                raise ValueError("loss diverged")
            tune.report({"epoch": epoch, NDCG: 0.1 * epoch, "train/loss": 1.0 / epoch,
                         "val/odd": math.nan, "val/tail/hr@10": 0.5, "time/epoch_s": 0.01,
                         "test/overall/ndcg_10": 0.05 * epoch, "note": "text",
                         "finished": float(epoch == 3),
                         "halt": float(config["kind"] == "halted" and epoch == 2)})

    folder = tmp_path / "ray" / "search-t"
    folder.mkdir(parents=True)
    write_settings(folder, tracking_uri=tracking_uri, experiment="tune", search="search-t",
                   search_id="id-1", stage="search", max_epochs=3, outcome="running",
                   best={}, tags={"dataset": "ml-100k"},
                   params={"num_samples": 3, "max_epochs": 3, "api_token": "s3cr3t"})
    files = {"search_space.yaml": "metric: val/overall/ndcg_20\n",
             "dataset_stats.json": '{"users": 943}\n'}
    for name, text in files.items():
        (folder / name).write_text(text)
    if online:
        sync(folder, starting=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"kind": tune.grid_search(["ok", "halted", "broken"]),
                     "backbone": "sasrec", "method": "faerec",
                     "dataset": {"name": "ml-100k", "openai_key": "sk-secret"}},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name="search-t", storage_path=str(tmp_path / "ray"),
            stop=lambda trial_id, result: result["halt"] == 1,  # stands in for ASHA
            failure_config=tune.FailureConfig(max_failures=1),  # broken fails twice
            callbacks=[MlflowCallback(folder)]))
    assert len(tuner.fit().errors) == 1
    (folder / "summary.csv").write_text("trial,outcome\n")
    write_settings(folder, outcome="completed", best={"test/overall/ndcg_10": 0.15})
    if online:
        sync(folder)
    return folder


# ---------------------------------------------------------------- the contract

@pytest.fixture(scope="module")
def finished(tmp_path_factory, local_ray) -> tuple[Path, Path]:
    """(experiment folder, SQLite store folder) of one finished search. Tests read the store
    or export the folder to stores of their own: none changes it."""
    tmp_path = tmp_path_factory.mktemp("finished")
    return search_folder(tmp_path, sqlite_uri(tmp_path / "store")), tmp_path / "store"


def test_search_is_a_parent_run_with_one_nested_run_per_trial(finished):
    _, store = finished
    client = MlflowClient(sqlite_uri(store))
    runs = runs_by_name(client, "tune")
    parent = runs.pop("search-t")
    assert parent.info.status == "FINISHED" and parent.data.tags["outcome"] == "completed"
    assert parent.data.tags["search_name"] == "search-t"
    assert parent.data.tags["dataset"] == "ml-100k"
    assert parent.data.params == {"num_samples": "3", "max_epochs": "3"}  # no api_token
    assert parent.data.metrics == {"test/overall/ndcg_10": 0.15}
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"search_space.yaml", "dataset_stats.json", "summary.csv"}
    # artifacts beside the SQLite file, not in ./mlruns of the current directory
    assert parent.info.artifact_uri.startswith((store / "artifacts").as_uri())

    by_kind = {r.data.params["kind"]: r for r in runs.values()}
    assert sorted(by_kind) == ["broken", "halted", "ok"]
    expected = {"ok": ("FINISHED", "completed"), "halted": ("FINISHED", "early-stopped"),
                "broken": ("FAILED", "failed")}
    for kind, (status, result) in expected.items():
        run = by_kind[kind]
        assert (run.info.status, run.data.tags["outcome"]) == (status, result), kind
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["trial_id"] == run.info.run_name
        assert run.data.tags["stage"] == "search"
        assert (run.data.tags["backbone"], run.data.tags["method"]) == ("sasrec", "faerec")
        assert set(run.data.params) == {"kind", "backbone", "method", "dataset/name"}
    assert by_kind["broken"].data.tags["failure_reason"] == "ValueError: loss diverged"
    assert "failure_reason" not in by_kind["ok"].data.tags

    ok = by_kind["ok"]
    assert history(client, ok) == [(1, 0.1), (2, 0.2), (3, pytest.approx(0.3))]
    assert [s for s, _ in history(client, ok, "time/epoch_s")] == [1, 2, 3]
    assert [s for s, _ in history(client, by_kind["halted"])] == [1, 2]
    # the retry after the first failure ran epoch 1 again: MLflow holds it once
    assert [s for s, _ in history(client, by_kind["broken"])] == [1]
    # test metrics: once, at the trial's last epoch; bad names fixed, strings dropped
    assert history(client, ok, "test/overall/ndcg_10") == [(3, pytest.approx(0.15))]
    assert history(client, by_kind["halted"], "test/overall/ndcg_10") == [(2, 0.1)]
    assert history(client, ok, "val/tail/hr_10") == [(1, 0.5), (2, 0.5), (3, 0.5)]
    assert math.isnan(ok.data.metrics["val/odd"])
    assert not {"note", "halt", "finished", "epoch"} & set(ok.data.metrics)


def test_sync_copies_a_folder_anywhere_and_twice_changes_nothing(tmp_path, finished):
    """The folder exported to a second store (a team server later, or after a crash before
    anything reached MLflow) holds the same records; a second sync changes nothing."""
    folder, store = finished
    live, copy = sqlite_uri(store), sqlite_uri(tmp_path / "copy")
    # the command's code in this process (a subprocess costs seconds of imports)
    assert main(["sync", str(folder), "--tracking-uri", copy]) == 0
    first = snapshot(MlflowClient(copy), "tune")
    live_records = snapshot(MlflowClient(live), "tune")
    sync(folder)  # to the folder's own store, which the live callback wrote
    assert snapshot(MlflowClient(copy), "tune") == first
    assert snapshot(MlflowClient(live), "tune") == live_records

    def comparable(records):  # run ids and end times differ between stores
        return {name: (status, params, {k: v for k, v in tags.items()
                                        if k != "mlflow.parentRunId"},
                       {k: [(s, v) for s, _, v in p] for k, p in points.items()}, files)
                for name, (status, _, params, tags, points, files) in records.items()}
    assert comparable(first) == comparable(live_records)
    with pytest.raises(SystemExit):
        main(["sync", str(tmp_path / "nowhere")])


def test_runs_of_trials_a_crash_lost_are_marked_lost(tmp_path, finished):
    """A run whose trial is not in Tune's saved state (started just before a crash, then
    replaced by the resumed search) ends KILLED with outcome lost."""
    folder, _ = finished
    store = sqlite_uri(tmp_path / "store")
    sync(folder, store)
    client = MlflowClient(store)
    parent = runs_by_name(client, "tune")["search-t"]
    orphan = client.create_run(parent.info.experiment_id, run_name="gone_00009", tags={
        "trial_id": "gone_00009", "stage": "search", "faerec.role": "trial",
        "mlflow.parentRunId": parent.info.run_id})
    sync(folder, store)
    lost = client.get_run(orphan.info.run_id)
    assert (lost.info.status, lost.data.tags["outcome"]) == ("KILLED", "lost")
    others = [r for n, r in runs_by_name(client, "tune").items() if n not in ("gone_00009",)]
    assert all(r.data.tags["outcome"] != "lost" for r in others)


# ---------------------------------------------------------------- tracking server outage

def test_sync_after_an_outage_sends_what_the_server_missed(tmp_path, local_ray, server):
    """The server is down for a whole search (the live callback's writes fail: MLflow gives
    up after its retries, cut here to none so that the test is quick); once it is back,
    `sync` sends everything once."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # this test process only
    try:
        server.stop()
        folder = search_folder(tmp_path, server.url, online=False)
        server.start()  # same port, same store
        assert main(["sync", str(folder)]) == 0
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    client = MlflowClient(server.url)
    runs = runs_by_name(client, "tune")
    assert len(runs) == 4 and runs["search-t"].info.status == "FINISHED"
    by_kind = {r.data.params.get("kind"): r for r in runs.values()}
    assert [s for s, _ in history(client, by_kind["ok"])] == [1, 2, 3]
    assert by_kind["broken"].info.status == "FAILED"
