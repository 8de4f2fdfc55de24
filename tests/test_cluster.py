"""Beyond one laptop: fractional GPUs, several nodes, `ray job submit`, with real Ray.

- the multi-node storage check (tuning.cluster) on hand-written /proc/mounts lines;
- a two-node `ray.cluster_utils.Cluster` with one logical GPU per node: the check rejects
  local storage and a SQLite store before any trial starts; with the escape hatch, trials
  asking for half a GPU run on both nodes, two at a time per GPU, one device each;
- `cluster/submit_job.sh` against a real `ray start --head` with token authentication.

Ray clusters are started with their own token file and temp folder and stopped by process
id (never `ray stop`, which would stop every Ray on the machine).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_faerec_dataset
from model.errors import ConfigError
from tuning.cluster import (SHARED_STORAGE_ENV, check_shared, mount_of, parse_mounts,
                            tracking_file)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

MOUNTS = parse_mounts("""\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
nas:/export/home /home nfs4 rw,vers=4.2 0 0
/dev/vdb /home/local ext4 rw 0 0
lustre@o2ib:/scratch /scratch lustre rw 0 0
sshfs#me@host:/ /mnt/my\\040share fuse.sshfs rw 0 0
""")


# ------------------------------------------------------------ the check, without Ray

def check(storage, tracking="http://mlflow:5000", nodes=2, env=None):
    check_shared(storage, tracking, nodes, mounts=MOUNTS, environ=env or {})


@pytest.mark.parametrize("storage", [
    "s3://bucket/faerec", "gs://bucket/faerec", "/home/me/results", "/home/me/new/deeper",
    "/scratch/faerec", "/mnt/my share/results", "file:///home/me/results"])
def test_shared_storage_passes(storage):
    check(storage)


@pytest.mark.parametrize("storage,fstype", [
    ("/work/results", "ext4"), ("/home/local/results", "ext4"),
    ("file:///tmp/results", "ext4"), ("/dev/shm/x", "tmpfs")])
def test_local_storage_is_one_error_naming_setting_value_and_remedy(storage, fstype):
    with pytest.raises(ConfigError) as e:
        check(storage)
    msg = str(e.value)
    assert "2 alive nodes" in msg and "search.storage_path" in msg and fstype in msg
    assert storage.removeprefix("file://") in msg
    assert "s3://" in msg and "shared filesystem" in msg and SHARED_STORAGE_ENV in msg
    assert "tracking_uri" not in msg


@pytest.mark.parametrize("uri", ["sqlite:////home/me/mlflow.db", "sqlite:////work/m.db",
                                 "/work/mlruns", "file:///work/mlruns", "mlruns"])
def test_file_tracking_store_is_rejected(uri):
    with pytest.raises(ConfigError) as e:
        check("s3://bucket/x", tracking=uri)
    msg = str(e.value)
    assert f"search.tracking_uri = {uri} " in msg
    assert "mlflow/server.sh" in msg and "--tracking-uri http://" in msg
    assert "storage_path" not in msg


@pytest.mark.parametrize("uri", ["http://10.0.0.5:5000", "https://mlflow.example.org",
                                 "postgresql://me@db/mlflow", "databricks"])
def test_server_tracking_passes(uri):
    assert tracking_file(uri) is None
    check("s3://bucket/x", tracking=uri)


def test_both_problems_in_one_error():
    with pytest.raises(ConfigError) as e:
        check("/work/results", tracking="sqlite:////work/mlflow.db", nodes=3)
    msg = str(e.value)
    assert "3 alive nodes" in msg
    assert msg.count("\n  - ") == 2
    assert "search.storage_path = /work/results" in msg
    assert "search.tracking_uri = sqlite:////work/mlflow.db" in msg


def test_one_node_or_escape_hatch_skip_the_check():
    check("/work/results", tracking="sqlite:////work/mlflow.db", nodes=1)
    check("/work/results", tracking="sqlite:////work/mlflow.db", env={SHARED_STORAGE_ENV: "1"})
    with pytest.raises(ConfigError):
        check("/work/results", env={SHARED_STORAGE_ENV: "0"})


def test_mount_lookup():
    assert mount_of("/home/local/x", MOUNTS).fstype == "ext4"   # nested local disk
    assert mount_of("/home/localx", MOUNTS).fstype == "nfs4"    # a prefix is not a parent
    assert mount_of("/mnt/my share", MOUNTS).fstype == "fuse.sshfs"
    stacked = parse_mounts("/dev/a / ext4 rw 0 0\n/dev/b /data ext4 rw 0 0\n"
                           "nas:/d /data nfs rw 0 0\n")
    assert mount_of("/data/x", stacked).fstype == "nfs"        # the last mount hides the first


# ------------------------------------------------ the recipes, without a cluster

def test_cluster_launcher_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((ROOT / "cluster" / "cluster-launcher.yaml").read_text())
    validate_config(prepare_config(config))
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_kuberay_rayjob_entrypoint_parses_and_keeps_auth():
    import shlex

    import ray
    import run_search
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    python, script, *argv = shlex.split(spec["entrypoint"])
    assert (python, script) == ("python", "/app/run_search.py")
    args = run_search.parse_args(argv)
    assert args.address == "auto"
    assert args.tracking_uri.startswith("http://") and "://" in args.storage_path
    yaml.safe_load(spec["runtimeEnvYAML"])


def test_submit_job_script_requires_where_results_go(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "TRACKING_URI", "MLFLOW_TRACKING_URI", "STORAGE_PATH")}
    done = subprocess.run(["bash", str(ROOT / "cluster" / "submit_job.sh"), "--space", "x.yaml"],
                          env={**env, "RAY_ADDRESS": "http://127.0.0.1:1"},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "TRACKING_URI" in done.stderr and "STORAGE_PATH" in done.stderr


def test_slurm_script_wiring(tmp_path):
    """sbatch's script with stand-in scontrol and srun: the command every node would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (bin_dir / "srun").write_text(
        '#!/bin/sh\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n'
        'echo "mode=$RAY_AUTH_MODE token_len=${#RAY_AUTH_TOKEN}" > "$SRUN_ENV"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "8", "SLURM_SUBMIT_DIR": str(ROOT),
           "TRACKING_URI": "http://mlflow.internal:5000", "STORAGE_PATH": "/scratch/me/faerec",
           "SRUN_ARGS": str(tmp_path / "args"), "SRUN_ENV": str(tmp_path / "env")}
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run(["bash", str(ROOT / "cluster" / "slurm.sbatch"),
                           "--space", "search_spaces/faerec.yaml", "--num-samples", "32"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    sep = args.index("--")
    assert args[:sep] == ["--nodes=2", "--ntasks-per-node=1", "ray", "symmetric-run",
                          "--address", "gpu-a17:6379", "--min-nodes", "2", "--num-cpus", "8"]
    assert args[sep + 1:] == ["python", "run_search.py", "--space", "search_spaces/faerec.yaml",
                              "--num-samples", "32", "--address", "auto",
                              "--tracking-uri", "http://mlflow.internal:5000",
                              "--storage-path", "/scratch/me/faerec"]
    assert (tmp_path / "env").read_text().split() == ["mode=token", "token_len=64"]
    assert not any(len(a) == 64 for a in args)                 # the token is not an argument


# ------------------------------------------------------------- helpers for real Ray

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_space(folder: Path, name: str, search: dict, dataset="ml-100k",
                embedding=None) -> Path:
    """A smoke-sized search: tiny model, random item vectors, no early stopping."""
    space = {
        "name": name,
        "dataset": dataset,
        "embedding": embedding or {"encoder": "random", "dim": 16},
        "search": {"metric": "val/overall/ndcg_20", "mode": "max", "seed": 0,
                   "max_epochs": 2, "checkpoint_every": 2, "max_failures": 0,
                   "scheduler": {"type": "none"},
                   "storage_path": str(folder / "results"),
                   "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", **search},
        "fixed": {"method": "faerec", "backbone": "sasrec", "hidden_size": 8, "max_len": 10,
                  "num_layers": 1, "proj_hidden": 16},
        "params": {"lambda": {"type": "loguniform", "low": 0.001, "high": 0.1}},
        "references": False, "confirm": False,  # the search stage alone
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture
def ray_token(tmp_path):
    """Token authentication on, with a token of this test's own (~/.ray is left alone), for
    this process and the Ray processes it starts. Ray caches the mode and the token per
    process, so both caches are refreshed on the way in and out: other tests in this
    process then see Ray as they left it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    def refresh():
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_ADDRESS",
            "RAY_USAGE_STATS_ENABLED")
    saved = {k: os.environ.pop(k, None) for k in keys}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                      RAY_USAGE_STATS_ENABLED="0")
    refresh()
    yield token
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v
    refresh()


def _small_dataset(folder: Path) -> dict:
    """Space sections for a generated dataset: epochs of a fraction of a second."""
    data, emb = write_faerec_dataset(folder / "data", n_users=200, n_items=80)
    cache = str(folder / "cache")
    return {"dataset": {"format": "faerec", "interactions": str(data), "embeddings": str(emb),
                        "cache_dir": cache},
            "embedding": {"encoder": "auto", "cache_dir": cache}}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at one instant; one ending exactly when another starts does
    not overlap it."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_max_overlap():
    assert max_overlap([(0, 2), (2, 3)]) == 1
    assert max_overlap([(0, 2), (1, 3), (1.5, 1.6), (5, 6)]) == 3


# ------------------------------------------- two nodes, one logical GPU each, real Ray

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_fractional_gpus(tmp_path, ray_token, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster
    from ray.tune import ExperimentAnalysis

    from tuning.space import load_space
    from tuning.tuner import run

    n_trials = 6
    space = load_space(write_space(tmp_path, "twonodes", {
        "num_samples": n_trials, "max_concurrent": n_trials,
        # 2 CPUs per node would fit 4 trials; the half GPU allows only 2.
        "resources": {"cpu": 0.5, "gpu": 0.5}}, **_small_dataset(tmp_path)))

    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    started = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2, num_gpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, configure_logging=False)
        node_ids = {cluster.head_node.node_id, worker.node_id}
        assert len(node_ids) == 2

        # Local storage and a SQLite store: one error, before any trial or MLflow run.
        with pytest.raises(ConfigError) as e:
            run(space)
        msg = str(e.value)
        assert "2 alive nodes" in msg
        assert f"search.storage_path = {space.search.storage_path}" in msg
        assert f"search.tracking_uri = {space.search.tracking_uri}" in msg
        assert not Path(space.search.storage_path).exists()
        assert not (tmp_path / "mlflow.db").exists()

        # tmp_path is seen by both simulated nodes: the escape hatch says so.
        monkeypatch.setenv(SHARED_STORAGE_ENV, "1")
        t0 = time.perf_counter()
        outcome = run(space)
        search_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\ntwo-node run: cluster + search {time.perf_counter() - started:.1f} s, "
          f"search alone {search_s:.1f} s")

    assert outcome.counts == {"completed": n_trials}
    trials = ExperimentAnalysis(outcome.experiment_path).trials
    assert len(trials) == n_trials
    per_gpu: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for t in trials:
        last = t.last_result
        devices = {str(v) for v in
                   _reports(outcome.experiment_path, t.trial_id, "visible_gpus")}
        assert len(devices) == 1, (t.trial_id, devices)   # one device, the same every epoch
        (device,) = devices
        assert device.isdigit(), (t.trial_id, device)     # exactly one GPU id, not "0,1" or ""
        assert last["node_id"] in node_ids
        interval = (t.run_metadata.start_time, t.run_metadata.last_result_time)
        assert interval[0] < interval[1]
        per_gpu.setdefault((last["node_id"], device), []).append(interval)

    assert {node for node, _ in per_gpu} == node_ids, "trials ran on one node only"
    overlaps = {gpu: max_overlap(spans) for gpu, spans in per_gpu.items()}
    assert max(overlaps.values()) <= 2, overlaps      # never a third trial on a GPU
    assert max(overlaps.values()) == 2, overlaps      # and two did share a GPU

    client = MlflowClient(space.search.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("twonodes").experiment_id])
    assert sum(r.data.tags.get("faerec.role") != "search" for r in runs) == n_trials


def _reports(experiment_path: str, trial_id: str, key: str) -> list:
    """Every epoch's value of `key` for one trial, from Tune's result.json."""
    (trial_dir,) = [d for d in Path(experiment_path).iterdir()
                    if d.is_dir() and trial_id in d.name]
    lines = (trial_dir / "result.json").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if line.strip()]


# ------------------------------------------------ ray job submit, real head, token auth

def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (this head's unique temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_job_recipe(tmp_path, ray_token):
    # Short: Ray's Unix socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayt", dir="/tmp")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop(SHARED_STORAGE_ENV, None)
    log = open(tmp_path / "head.log", "w")
    started = time.perf_counter()
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         # Port 0: the head picks free ports itself and reports the dashboard's (no
         # bind-then-release race). Ray refuses 0 for the Ray Client server, which this test
         # never uses: losing its port to another process costs nothing here.
         "--port", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", "0",
         "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", "0",
         "--num-cpus", "2", "--temp-dir", temp_dir],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dashboard = _wait_for_dashboard(head, tmp_path / "head.log")
        up_s = time.perf_counter() - started

        # Token authentication is on: a client without the token is turned away.
        no_token = {k: v for k, v in env.items()
                    if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
        refused = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "list", "--address", dashboard],
            env={**no_token, "HOME": str(tmp_path)}, capture_output=True, text=True,
            timeout=60)
        assert refused.returncode != 0
        assert "authentication" in (refused.stdout + refused.stderr).lower(), refused
        print("\nwithout the token:", (refused.stdout + refused.stderr).strip().splitlines()[-1])

        space = write_space(tmp_path, "jobsmoke", {"num_samples": 2, "max_concurrent": 2,
                                                   "resources": {"cpu": 1, "gpu": 0}},
                            **_small_dataset(tmp_path))
        storage, db = tmp_path / "shared-results", tmp_path / "job-mlflow.db"
        t0 = time.perf_counter()
        job = subprocess.run(
            ["bash", str(ROOT / "cluster" / "submit_job.sh"), "--space", str(space)],
            env={**env, "RAY_ADDRESS": dashboard,
                 "TRACKING_URI": f"sqlite:///{db}", "STORAGE_PATH": str(storage)},
            capture_output=True, text=True, timeout=240)
        job_s = time.perf_counter() - t0
        out = job.stdout + job.stderr
    finally:
        _stop_head(head, temp_dir)
        log.close()
    print(f"\njob submit: head up {up_s:.1f} s, job {job_s:.1f} s, "
          f"all with stop {time.perf_counter() - started:.1f} s")

    assert job.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]
    assert ray_token.read_text() not in out                    # the token is never printed
    summary = (storage / "jobsmoke" / "summary.csv").read_text().splitlines()
    assert len(summary) == 1 + 2
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("jobsmoke").experiment_id])
    roles = sorted(r.data.tags.get("faerec.role", "trial") for r in runs)
    assert len(runs) == 3 and roles.count("search") == 1, roles


def _wait_for_dashboard(process: subprocess.Popen, log: Path, timeout=90.0) -> str:
    """The dashboard's URL, as `ray start` reports it once the head is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}:\n{log.read_text()}")
        found = re.search(r"RAY_API_SERVER_ADDRESS='(http://127\.0\.0\.1:\d+)'", log.read_text())
        if found:
            return found.group(1)
        time.sleep(0.5)
    raise TimeoutError(f"dashboard not up after {timeout} s:\n{log.read_text()}")


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to `ray start --block` shuts its node down; anything left that runs from
    this head's temp dir is killed by id."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=40)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
