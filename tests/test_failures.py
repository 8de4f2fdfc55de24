"""Surviving failures, end to end: real `run_search.py` drivers (own process sessions), a
real local Ray, real Optuna, a real MLflow store (SQLite file, or mlflow/server.sh).

1. a trial whose loss turns NaN (learning rate 1e30) fails, is retried, and is marked
   failed in Tune and MLflow; a trial whose worker process is SIGKILLed resumes from its
   checkpoint; the search goes on.
2. the driver SIGKILLed mid-search: `--resume` finishes it without rerunning finished
   trials, continues unfinished ones from their checkpoints and keeps Optuna's state.
3. the MLflow server down for a while mid-search: no epoch lost, none duplicated.
4. Ctrl-C: a clean stop (exit 130, a resume hint, no run left RUNNING); `--resume` ends it.
5. the driver's whole process group SIGKILLed (driver and local Ray, as when a terminal
   closes) at five moments, each followed by `--resume`: one MLflow run per trial of the
   finished search, every epoch once, true statuses; a trial lost with a crash is marked.
6. ASHA resumed after such a kill takes the decisions of an uninterrupted search.

Each search is tiny (ML-100K with random 16-d item vectors, hidden size 8, 4 epochs);
epochs last about a second, long enough to kill something between two of them.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis, ResultGrid

from test_tracking import MlflowServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
METRIC = "val/overall/ndcg_20"
EPOCHS = 4
DRIVER_TIMEOUT_S = 480  # a search here takes 30-90 s, depending on what else the 2 cores run


# ---------------------------------------------------------------- helpers

def write_space(folder: Path, name: str, tracking_uri: str | None = None, params=None,
                **search) -> Path:
    space = {
        "name": name,
        "dataset": "ml-100k",
        "embedding": {"encoder": "random", "dim": 16},
        "search": {"metric": METRIC, "mode": "max", "num_samples": 3, "max_concurrent": 1,
                   "seed": 0, "max_epochs": EPOCHS, "checkpoint_every": 1, "max_failures": 0,
                   "scheduler": {"type": "none"}, "resources": {"cpu": 1, "gpu": 0},
                   "storage_path": str(folder / "results"),
                   "tracking_uri": tracking_uri or f"sqlite:///{folder / 'mlflow.db'}",
                   **search},
        "fixed": {"method": "faerec", "backbone": "sasrec", "hidden_size": 8, "max_len": 20,
                  "proj_hidden": 16},
        "params": params or {"lambda": {"type": "loguniform", "low": 0.001, "high": 0.1}},
        "references": False, "confirm": False,  # the search stage alone
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live processes of session `sid` (zombies left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(rest[3]) == sid and rest[0] != "Z":
            found.append((int(stat.parent.name), name))
    return found


def kill_session(sid: int) -> list[tuple[int, str]]:
    """SIGKILL every process of session `sid`; returns those found."""
    left = session_processes(sid)
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


class Driver:
    """`python run_search.py ...` in its own session, so that the Ray processes it starts
    can be told apart from any other Ray on this machine (they inherit the session)."""

    def __init__(self, folder: Path, args: list[str], label: str):
        self.log = folder / f"{label}.log"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
               # a local Ray of its own, even when a `ray start` cluster runs here
               "RAY_ADDRESS": "local"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "run_search.py", *args], cwd=ROOT,
                                            env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = DRIVER_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_session()
            pytest.fail(f"driver still running after {timeout} s:\n{self.output[-3000:]}")

    def session_ended(self, timeout: float = 15.0) -> bool:
        """Whether every process of the driver's session is gone (within `timeout`)."""
        deadline = time.monotonic() + timeout
        while session_processes(self.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return not session_processes(self.pid)

    def kill_session(self) -> list[tuple[int, str]]:
        """SIGKILL the driver and every process of its session; returns those found."""
        left = kill_session(self.pid)
        self.process.poll()
        return left


@pytest.fixture
def drivers(tmp_path):
    """Starts drivers; whatever is left of them is killed at the end, also on failure."""
    started = []

    def start(args: list[str], label: str) -> Driver:
        started.append(Driver(tmp_path, args, label))
        return started[-1]
    yield start
    for driver in started:
        driver.kill_session()


def rows(trial_dir: Path) -> list[dict]:
    """The results Tune recorded for a trial (the driver writes result.json)."""
    path = trial_dir / "result.json"
    lines = path.read_text().splitlines() if path.exists() else []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def trials(experiment: Path) -> dict[str, list[dict]]:
    return {d.name.removeprefix("trial_"): rows(d) for d in sorted(experiment.glob("trial_*"))}


def wait_until(condition, driver: Driver, what: str, timeout: float = DRIVER_TIMEOUT_S):
    """Poll `condition()` every 0.1 s until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if driver.process.poll() is not None:
            pytest.fail(f"driver exited ({driver.process.returncode}) before {what}:\n"
                        f"{driver.output[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no {what} after {timeout} s:\n{driver.output[-3000:]}")


def one_done_one_running(experiment: Path):
    """(finished trial ids, {running trial id: its last epoch}) once a trial has finished
    and another has reported an epoch (and so checkpointed: checkpoint_every is 1)."""
    done, running = [], {}
    for trial, results in trials(experiment).items():
        if results and results[-1].get("finished") == 1:
            done.append(trial)
        elif results:
            running[trial] = results[-1]["epoch"]
    return (done, running) if done and running else None


def epochs(results: list[dict]) -> list[int]:
    return [r["epoch"] for r in results]


def failures(trial_dir: Path) -> int:
    """How many times Tune saw this trial fail (it appends to error.txt each time)."""
    path = trial_dir / "error.txt"
    return path.read_text().count("Failure # ") if path.exists() else 0


def child_runs(tracking_uri: str, experiment: str) -> tuple[list, dict[str, object]]:
    """(parent runs, {trial_id: child run}); fails when a trial has two runs."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              max_results=1000)
    parents = [r for r in runs if r.data.tags.get("faerec.role") == "search"]
    children = [r for r in runs if r.data.tags.get("faerec.role") == "trial"]
    ids = sorted(r.data.tags["trial_id"] for r in children)
    assert len(ids) == len(set(ids)), f"a trial got a second MLflow run: {ids}"
    return parents, {r.data.tags["trial_id"]: r for r in children}


def steps(tracking_uri: str, run, key: str = METRIC) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run.info.run_id,
                                                                                 key))


def results_grid(experiment: Path) -> ResultGrid:
    return ResultGrid(ExperimentAnalysis(str(experiment)))


# ---------------------------------------------------------------- 1. failing trials

def test_failed_trials_are_retried_marked_and_the_search_goes_on(tmp_path, drivers):
    """Grid lr: 0.001 trains; 1e30 makes the loss NaN in epoch 1 (FloatingPointError), on
    every try. The 0.001 trial's worker process is SIGKILLed after an epoch (an OOM kill
    or a lost node): Tune retries it from its last checkpoint."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "failing", num_samples=2, max_concurrent=2, max_failures=1,
                        params={"lr": {"type": "grid", "choices": [0.001, 1.0e+30]}})
    experiment = tmp_path / "results" / "failing"
    driver = drivers(["--space", str(space)], "search")

    def good_trial_mid_run():
        for trial, results in trials(experiment).items():
            if results and results[-1]["config"]["lr"] == 0.001 and not results[-1]["finished"]:
                return trial, results[-1]
    good, last = wait_until(good_trial_mid_run, driver, "an epoch of the lr=0.001 trial")
    os.kill(last["pid"], signal.SIGKILL)
    assert driver.wait() == 0, driver.output[-3000:]
    assert "1 completed, 1 failed" in driver.output

    by_id = trials(experiment)
    bad = next(t for t in by_id if t != good)
    grid = {Path(r.path).name.removeprefix("trial_"): r for r in results_grid(experiment)}
    assert sorted(grid) == sorted([good, bad])
    # the NaN trial: failed in Tune with its reason, after max_failures + 1 tries
    assert isinstance(grid[bad].error, FloatingPointError)
    assert "training loss is nan at epoch 1" in str(grid[bad].error)
    assert failures(experiment / f"trial_{bad}") == 2
    assert by_id[bad] == []
    # the killed trial: one failure, then the retry went on from the checkpoint
    assert grid[good].error is None and grid[good].metrics["finished"] == 1
    assert failures(experiment / f"trial_{good}") == 1
    assert "actor died unexpectedly" in (experiment / f"trial_{good}" / "error.txt").read_text()
    results = by_id[good]
    assert epochs(results) == list(range(1, EPOCHS + 1)), "an epoch was run twice or lost"
    retry = [r for r in results if r["pid"] != last["pid"]]
    assert retry and retry[0]["epoch"] > last["epoch"] >= 1
    assert retry[0]["iterations_since_restore"] == 1  # a restore, not a fresh start

    parents, children = child_runs(uri, "failing")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted([good, bad])
    failed = children[bad]
    assert (failed.info.status, failed.data.tags["outcome"]) == ("FAILED", "failed")
    assert failed.data.tags["failure_reason"] == (
        "FloatingPointError: training loss is nan at epoch 1")
    ok = children[good]
    assert (ok.info.status, ok.data.tags["outcome"]) == ("FINISHED", "completed")
    assert steps(uri, ok) == list(range(1, EPOCHS + 1))  # the same run went on


# ---------------------------------------------------------------- 2. driver killed

def test_resume_after_the_driver_was_killed(tmp_path, drivers):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "killed")
    experiment = tmp_path / "results" / "killed"
    first = drivers(["--space", str(space), "--name", "killed"], "first")
    wait_until(lambda: one_done_one_running(experiment), first,
               "a finished trial and a running one")
    os.kill(first.pid, signal.SIGKILL)
    first.process.wait(30)
    # A local Ray mostly dies with its driver, but its dashboard and runtime-env agents
    # live on as orphans in the driver's session: end them (and only them).
    time.sleep(1)
    first.kill_session()
    before = trials(experiment)
    done, running = one_done_one_running(experiment) or pytest.fail(
        f"the kill came too late: {({t: epochs(r) for t, r in before.items()})}")
    assert len(before) == 2

    second = drivers(["--space", str(space), "--name", "killed", "--resume"], "second")
    assert second.wait() == 0, second.output[-3000:]
    after = trials(experiment)
    assert len(after) == 3, f"Optuna state lost: {len(after)} trials for num_samples 3"
    grid = results_grid(experiment)
    assert len(grid) == 3 and grid.num_terminated == 3 and not grid.errors
    for trial in done:  # kept as it was
        assert after[trial] == before[trial]
    for trial, last_epoch in running.items():  # continued from a checkpoint
        first_pid = before[trial][0]["pid"]
        resumed = [r for r in after[trial] if r["pid"] != first_pid]
        assert resumed[0]["epoch"] > 1 and resumed[0]["iterations_since_restore"] == 1
        assert resumed[0]["epoch"] <= last_epoch + 1  # no epoch skipped
        assert sorted(set(epochs(after[trial]))) == list(range(1, EPOCHS + 1))
    (new,) = set(after) - set(before)
    assert epochs(after[new]) == list(range(1, EPOCHS + 1))
    # a fresh sampler (seed 0) would propose the first trial's value again
    values = [rows_[0]["config"]["lambda"] for rows_ in after.values()]
    assert len(set(values)) == 3, values

    parents, children = child_runs(uri, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == sorted(after)
    for trial, run in children.items():
        assert (run.info.status, run.data.tags["outcome"]) == ("FINISHED", "completed")
        # every epoch once, also those Tune ran again after the restore
        assert steps(uri, run) == list(range(1, EPOCHS + 1)), trial


# ---------------------------------------------------------------- 3. tracking server outage

def test_tracking_server_outage_loses_and_duplicates_no_epoch(tmp_path, drivers):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        # 8 epochs: the server goes down after the first and comes back 2 or more later
        space = write_space(tmp_path, "outage", tracking_uri=server.url, num_samples=2,
                            max_epochs=8)
        experiment = tmp_path / "results" / "outage"
        driver = drivers(["--space", str(space)], "search")

        def reported() -> int:  # epochs checkpointed: seen at once (result.json lags)
            return sum(progress(experiment).values())
        wait_until(lambda: reported() >= 1, driver, "a first epoch")
        server.stop(crash=True)
        down_at = reported()
        wait_until(lambda: reported() >= down_at + 2, driver, "epochs during the outage")
        during = reported() - down_at
        server.start()
        assert driver.wait() == 0, driver.output[-3000:]

        results = trials(experiment)
        print(json.dumps({"epochs reported while the server was down": during}))
        assert len(results) == 2 and during >= 2
        parents, children = child_runs(server.url, "outage")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert sorted(children) == sorted(results)
        for trial, run in children.items():
            every_epoch = list(range(1, 9))
            assert steps(server.url, run) == epochs(results[trial]) == every_epoch, trial
            assert steps(server.url, run, "train/loss") == every_epoch, trial
    finally:
        server.stop()


# ---------------------------------------------------------------- 4. Ctrl-C

def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path, drivers):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "interrupted")
    experiment = tmp_path / "results" / "interrupted"
    first = drivers(["--space", str(space)], "first")
    wait_until(lambda: one_done_one_running(experiment), first,
               "a finished trial and a running one")
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
    assert first.wait() == 130, first.output[-3000:]
    hint = next((line for line in first.output.splitlines()
                 if line.startswith("stopped; continue with: ")), None)
    assert hint and hint.endswith("--resume"), first.output[-3000:]
    assert first.session_ended(), f"outlived a clean stop: {session_processes(first.pid)}"
    done, running = one_done_one_running(experiment) or pytest.fail(
        f"the stop came too late: {({t: epochs(r) for t, r in trials(experiment).items()})}")

    parents, children = child_runs(uri, "interrupted")
    assert [(p.info.status, p.data.tags.get("outcome")) for p in parents] == [
        ("KILLED", "interrupted")]
    assert {t: r.info.status for t, r in children.items()} == {
        **{t: "FINISHED" for t in done}, **{t: "KILLED" for t in running}}
    assert all(children[t].data.tags["outcome"] == "interrupted" for t in running)

    command = shlex.split(hint.removeprefix("stopped; continue with: "))
    assert command[:2] == ["python", "run_search.py"]
    second = drivers(command[2:], "second")
    assert second.wait() == 0, second.output[-3000:]
    after = trials(experiment)
    assert len(after) == 3
    for trial in running:
        assert sorted(set(epochs(after[trial]))) == list(range(1, EPOCHS + 1))
        assert after[trial][0]["pid"] != after[trial][-1]["pid"]  # resumed by the 2nd driver
    parents, children = child_runs(uri, "interrupted")
    assert [(p.info.status, p.data.tags.get("outcome")) for p in parents] == [
        ("FINISHED", "completed")]
    assert sorted(children) == sorted(after)
    assert {r.info.status for r in children.values()} == {"FINISHED"}


# ---------------------------------------------------------------- 5. process group killed

def progress(experiment: Path) -> dict[str, int]:
    """Epochs each trial has checkpointed (checkpoint_every is 1). Trials upload their
    checkpoints to the folder at once, while the driver copies its files (result.json,
    Tune's state) there only every few checkpoints: this is the trials' true progress."""
    return {d.name.removeprefix("trial_"): max(
        (int(c.name.rsplit("_", 1)[1]) + 1 for c in d.glob("checkpoint_*")), default=0)
        for d in experiment.glob("trial_*")}


def kill_points(samples: int) -> list[tuple[str, object]]:
    """(name, condition(progress now, progress when this driver started, folder)), in the
    order a search reaches them; `grew`: trials this driver moved on (a lost one never)."""
    def grew(now, start):
        return {t: n for t, n in now.items() if n > start.get(t, 0)}

    def done(now):
        return sum(n == EPOCHS for n in now.values())
    return [
        ("before the first epoch", lambda now, start, folder:
            (folder / "tuner.pkl").exists() and not any(now.values())),
        ("mid-trial", lambda now, start, folder:
            any(2 <= n < EPOCHS for n in grew(now, start).values())),
        ("just after a trial starts", lambda now, start, folder:
            done(now) >= 1 and 1 in grew(now, start).values()),
        ("during the last trial", lambda now, start, folder: done(now) == samples - 1
            and any(2 <= n < EPOCHS for n in grew(now, start).values())),
        # seen in the results Tune saved with its state, not in the checkpoints: Ray 2.60
        # deletes the checkpoint beyond num_to_keep as it registers a new one, before it
        # saves its state again; a kill in between leaves a state naming a deleted
        # checkpoint, from which the resumed trial cannot restore (Tune's race, not ours)
        ("after the last trial", lambda now, start, folder: sum(
            bool(rows) and rows[-1].get("finished") == 1
            for rows in trials(folder).values()) == samples),
    ]


def mlflow_state(uri: str, experiment: str) -> dict:
    """Per trial run: trial_id, status, outcome, the steps any metric holds twice."""
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    state = {"parents": [(r.info.status, r.data.tags.get("outcome")) for r in runs
                         if r.data.tags.get("faerec.role") == "search"], "trials": []}
    for run in runs:
        if run.data.tags.get("faerec.role") != "trial":
            continue
        doubled = []
        for key in run.data.metrics:
            held = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            doubled += [(key, step) for step in sorted(set(held)) if held.count(step) > 1]
        state["trials"].append({"trial_id": run.data.tags["trial_id"],
                                "status": run.info.status,
                                "outcome": run.data.tags.get("outcome"), "doubled": doubled})
    return state


def test_process_group_killed_at_five_moments_then_resumed(tmp_path, drivers):
    """One search (3 trials, one at a time, no scheduler) whose process group is SIGKILLed
    at each of five moments in turn, every kill followed by `--resume`. After every kill:
    no trial has two runs and no metric a step twice; at the end: exactly one run per
    trial of the finished search, every epoch once, all FINISHED; a run of a trial the
    crash lost (not in Tune's saved state) is KILLED with outcome lost, and is in no summary."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write_space(tmp_path, "group")
    experiment = tmp_path / "results" / "group"
    figures = []
    args = ["--space", str(space)]
    for number, (point, reached) in enumerate(kill_points(3)):
        start = progress(experiment) if experiment.exists() else {}
        driver = drivers(args, f"driver-{number}")

        def at_point():
            now = progress(experiment) if experiment.exists() else {}
            return reached(now, start, experiment) and (now or {"no trial yet": 0})
        now = wait_until(at_point, driver, point)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.process.wait(30)
        driver.kill_session()  # whatever left the group (Ray's agents) but not the session
        state = mlflow_state(uri, "group")
        ids = [t["trial_id"] for t in state["trials"]]
        figures.append({"point": point, "epochs at kill": now, "runs": len(ids),
                        "trials with 2 runs": len(ids) - len(set(ids)),
                        "doubled steps": sum(len(t["doubled"]) for t in state["trials"]),
                        "runs as the kill left them": sorted(
                            f"{t['trial_id']} {t['status']} {t['outcome']}"
                            for t in state["trials"])})
        assert len(ids) == len(set(ids)) and not figures[-1]["doubled steps"], figures
        args = ["--space", str(space), "--resume"]

    final = drivers(args, "final")
    assert final.wait() == 0, final.output[-3000:]
    grid = results_grid(experiment)
    assert len(grid) == 3 and grid.num_terminated == 3 and not grid.errors, [
        error.read_text()[-2000:] for error in experiment.glob("trial_*/error.txt")]
    finished = {Path(r.path).name.removeprefix("trial_") for r in grid}
    state = mlflow_state(uri, "group")
    print(json.dumps({"kills": figures, "final": state}, indent=1))  # the report's figures
    assert state["parents"] == [("FINISHED", "completed")]
    kept = {t["trial_id"]: t for t in state["trials"] if t["outcome"] != "lost"}
    lost = [t for t in state["trials"] if t["outcome"] == "lost"]
    assert sorted(kept) == sorted(finished)  # one run per trial of the finished search
    assert len(kept) + len(lost) == len(state["trials"])
    assert all((t["status"], t["outcome"]) == ("FINISHED", "completed") for t in kept.values())
    assert all(t["status"] == "KILLED" and t["trial_id"] not in finished for t in lost)
    assert not any(t["doubled"] for t in state["trials"])
    for trial_id in kept:
        run = child_runs(uri, "group")[1][trial_id]
        assert steps(uri, run) == list(range(1, EPOCHS + 1)), trial_id
    summary = (experiment / "summary.csv").read_text()
    assert sorted(line.split(",")[0] for line in summary.splitlines()[1:]) == sorted(finished)


# ---------------------------------------------------------------- 6. ASHA after a restore

ASHA_DRIVER = '''
import json, sys, tempfile, time
from pathlib import Path
import ray
from ray import tune
from tuning.mo_asha import MultiObjectiveASHA

def trainable(config):
    """score = x * epoch, 4 epochs of 0.4 s, a checkpoint every epoch. In the first driver,
    the x=0.9 trial holds after its epoch 2: the test kills the driver there, once Tune
    has saved that epoch (a fixed moment, whatever the load of the machine)."""
    start = 1
    if checkpoint := tune.get_checkpoint():
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "e.json").read_text())["epoch"] + 1
    for epoch in range(start, 5):
        time.sleep(0.4)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "e.json").write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch, "score": config["x"] * epoch},
                        checkpoint=tune.Checkpoint.from_directory(folder))
        if HOLD and config["x"] == 0.9 and epoch == 2:
            time.sleep(600)

storage, resume = sys.argv[1], sys.argv[2] == "resume"
HOLD = not resume
ray.init(num_cpus=1, include_dashboard=False)
if resume:
    tuner = tune.Tuner.restore(f"{storage}/asha", trainable, resume_unfinished=True)
else:
    tuner = tune.Tuner(
        trainable, param_space={"x": tune.grid_search([0.5, 0.9, 0.3, 0.2, 0.8])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=1, trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            scheduler=MultiObjectiveASHA([("score", "max")], time_attr="epoch", max_t=4,
                                         grace_period=1, reduction_factor=2,
                                         state_path=f"{storage}/asha_state.json")),
        run_config=tune.RunConfig(name="asha", storage_path=storage,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
tuner.fit()
'''


def test_asha_resumed_after_a_kill_decides_as_an_uninterrupted_search(tmp_path):
    """Five trials, score = x * epoch, rungs at epochs 1 and 2, reduction factor 2. Worked by
    hand, an uninterrupted search stops x=0.3 and x=0.2 at epoch 1 (below the median of the
    rung: 0.7, then 0.5) and runs 0.5, 0.9, 0.8 to epoch 4. The driver is killed once Tune
    has saved the x=0.9 trial's epoch 2, and resumed: that trial goes on from its
    checkpoint (its epochs, not its iterations since the restore, meet the rungs), and the
    rungs hold the records of before the kill (Ray's ASHA restores empty ones, which would
    let x=0.3 run its 4 epochs)."""
    script = tmp_path / "asha_driver.py"
    script.write_text(ASHA_DRIVER)
    storage = tmp_path / "results"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "local",
           "PYTHONPATH": str(ROOT)}

    def start(mode: str) -> subprocess.Popen:
        with open(tmp_path / f"{mode}.log", "w") as log:
            return subprocess.Popen([sys.executable, str(script), str(storage), mode],
                                    env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def by_x() -> dict[float, list[dict]]:
        return {r[0]["config"]["x"]: r for r in trials(storage / "asha").values() if r}

    first = start("first")
    try:
        deadline = time.monotonic() + DRIVER_TIMEOUT_S
        # Tune's saved results (result.json, copied with its state) show 0.5 done, 0.9 at 2.
        while {x: max(epochs(rows)) for x, rows in by_x().items()} != {0.5: 4, 0.9: 2}:
            assert first.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.05)
    finally:
        kill_session(first.pid)  # the driver and its local Ray
        first.wait()
        kill_session(first.pid)

    second = start("resume")
    try:
        assert second.wait(DRIVER_TIMEOUT_S) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    finally:
        kill_session(second.pid)
    results = by_x()
    reached = {x: max(epochs(rows)) for x, rows in results.items()}
    assert reached == {0.5: 4, 0.9: 4, 0.3: 1, 0.2: 1, 0.8: 4}, reached
    resumed = [r for r in results[0.9] if r["iterations_since_restore"] == 1 and r["epoch"] > 1]
    assert resumed, "the x=0.9 trial did not go on from a checkpoint"
