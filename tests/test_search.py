"""The search end to end: real Ray (local), real Optuna, real ASHA, a real MLflow store."""

import csv
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

import run_search
from model.data import SequenceData, load_dataset, resolve_dataset
from model.train import Inputs
from conftest import write_faerec_dataset
from tuning.space import load_space
from tuning.tuner import build_tuner, run, summarise

ROOT = Path(__file__).resolve().parent.parent


def write_space(folder: Path, data: Path, emb: Path, **search) -> Path:
    """A tiny search: the bad learning rate comes last, so ASHA has good trials to compare
    it with when it reaches the first rung (grace period 2 epochs)."""
    space = {
        "name": "tiny",
        "dataset": {"format": "faerec", "interactions": str(data), "embeddings": str(emb),
                    "cache_dir": str(folder / "cache")},
        "embedding": {"encoder": "auto", "cache_dir": str(folder / "cache")},
        "search": {"metric": "val/overall/ndcg_20", "mode": "max", "num_samples": 4,
                   "max_concurrent": 1, "seed": 0, "max_epochs": 6, "checkpoint_every": 2,
                   "max_failures": 0,
                   "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2},
                   "resources": {"cpu": 1, "gpu": 0},
                   "storage_path": str(folder / "results"),
                   "tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", **search},
        "fixed": {"method": "faerec", "backbone": "sasrec", "hidden_size": 16, "max_len": 12,
                  "num_layers": 1, "batch_size": 16, "proj_hidden": 16},
        "params": {"lr": {"type": "grid", "choices": [0.01, 0.005, 0.003, 1.0e-7]},
                   "tau": {"type": "loguniform", "low": 0.02, "high": 0.5}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, local_ray):
    folder = tmp_path_factory.mktemp("search")
    data, emb = write_faerec_dataset(folder / "data")
    space = load_space(write_space(folder, data, emb))
    return space, run(space)


def test_every_trial_runs_and_reports_to_mlflow(finished_search):
    space, outcome = finished_search
    assert len(outcome.summary) == 4
    assert set(outcome.summary["outcome"]) <= {"completed", "early-stopped"}

    client = MlflowClient(space.search.tracking_uri)
    experiment = client.get_experiment_by_name(space.name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_id == outcome.parent_run_id
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "search_space.yaml", "dataset_stats.json", "summary.csv", "summary.md"}
    # the best trial's validation and test metrics on the parent
    assert "test/tail/ndcg_10" in parent.data.metrics

    by_trial = {row.trial: row for row in outcome.summary.itertuples()}
    for child in children:
        row = by_trial[child.data.tags["trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["outcome"] == row.outcome
        assert child.data.params["lr"] == str(row.lr)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/tail/ndcg_10")]
        assert steps == list(range(1, row.epochs + 1))  # one point per epoch, step = epoch
        assert "test/overall/hr_10" in child.data.metrics  # the best state's, logged once


def test_asha_stops_the_trial_with_a_useless_learning_rate(finished_search):
    _, outcome = finished_search
    table = outcome.summary
    bad = table[table["lr"] == 1.0e-7].iloc[0]
    assert bad["outcome"] == "early-stopped" and bad["epochs"] == 2
    assert (table["outcome"] == "completed").any()
    assert table.iloc[-1]["lr"] == 1.0e-7 or bad["best val/overall/ndcg_20"] <= \
        table["best val/overall/ndcg_20"].max()


def test_summary_files_hold_every_trial_best_validation_first(finished_search):
    _, outcome = finished_search
    with open(outcome.summary_files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    best = [float(r["best val/overall/ndcg_20"]) for r in rows]
    assert best == sorted(best, reverse=True)
    assert "test/tail/ndcg_10" in rows[0]
    assert outcome.summary_files["md"].read_text().startswith("| trial |")


def test_trials_get_the_dataset_through_the_object_store(tmp_path, local_ray):
    """The dataset exists only in the driver's memory: no file a trial could read."""
    data_path, emb = write_faerec_dataset(tmp_path / "data")
    space = load_space(write_space(tmp_path, data_path, emb, scheduler={"type": "none"},
                                   max_epochs=1))
    on_disk = load_dataset(space.dataset)
    in_memory = SequenceData(name="in-memory", n_items=on_disk.n_items,
                             sequences=[s.copy() for s in on_disk.sequences],
                             user_ids=on_disk.user_ids, item_ids=on_disk.item_ids,
                             item_texts=None, embeddings_path=None)
    inputs = Inputs(in_memory, np.load(emb))
    for path in (data_path, emb):
        path.unlink()
    results = build_tuner(space, inputs, resume=False).fit()
    assert not results.errors
    assert list(summarise(results, space)["epochs"]) == [1, 1, 1, 1]


def test_dry_run_validates_and_prints_the_plan_without_starting_ray(tmp_path, capsys):
    code = run_search.main(["--space", str(ROOT / "search_spaces/faerec.yaml"), "--dry-run",
                            "--storage-path", str(tmp_path / "results")])
    out = capsys.readouterr().out
    assert code == 0
    assert "trials" in out and str(tmp_path / "results") in out and "mlflow" in out.lower()
    assert not (tmp_path / "results").exists()


def test_a_bad_space_is_refused_before_ray_starts(tmp_path, capsys):
    bad = yaml.safe_load((ROOT / "search_spaces/smoke.yaml").read_text())
    bad["params"]["lambda"]["low"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    was_running = ray.is_initialized()
    code = run_search.main(["--space", str(path)])
    assert code == 2
    assert "params.lambda.low" in capsys.readouterr().err
    assert ray.is_initialized() == was_running


def test_a_torn_state_save_is_set_aside_and_the_one_before_restores(finished_search, tmp_path):
    """A kill while Tune copies its state can leave the newest searcher-state-*.pkl empty,
    and Tune restores from the newest save: Optuna's restore then fails with EOFError."""
    import shutil

    from ray.tune.search.optuna import OptunaSearch

    from tuning.tuner import set_aside_torn_state

    space, outcome = finished_search
    folder = tmp_path / "experiment"
    shutil.copytree(outcome.experiment_path, folder)
    saved = sorted(folder.glob("searcher-state-*.pkl"))
    assert saved, "the search saved no searcher state"
    session = saved[-1].name[len("searcher-state-"):-len(".pkl")]
    later = "9999-12-31_23-59-59"  # a newer session whose copy was cut short
    for f in list(folder.glob(f"*{session}*")):
        shutil.copyfile(f, folder / f.name.replace(session, later))
    (folder / f"searcher-state-{later}.pkl").write_bytes(b"")
    with pytest.raises(EOFError):
        OptunaSearch().restore_from_dir(str(folder))

    set_aside_torn_state(folder)

    assert not list(folder.glob(f"[!t]*-{later}.*"))
    assert (folder / f"torn-searcher-state-{later}.pkl").exists()
    assert (folder / f"torn-experiment_state-{later}.json").exists()
    restored = OptunaSearch()
    restored.restore_from_dir(str(folder))
    assert len(restored._ot_study.trials) == space.search.num_samples
    set_aside_torn_state(folder)  # a complete newest save is left alone
    assert (folder / f"experiment_state-{session}.json").exists()
