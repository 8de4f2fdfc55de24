"""The search end to end: real Ray (local), real Optuna, real ASHA, a real MLflow store."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

import run_search
from conftest import reference_metrics, write_faerec_dataset
from model.data import SequenceData, load_dataset
from model.methods import build_model
from model.train import Inputs, load_inputs, settings_from_dict
from tuning.pareto import losses, pareto_mask
from tuning.report import FIGURES, answer_table
from tuning.space import load_space, trial_settings
from tuning.tuner import SUMMARY_COLUMNS, build_tuner, local_folder, run, summarise

ROOT = Path(__file__).resolve().parent.parent


def write_space(folder: Path, data: Path, emb: Path, top: dict | None = None, **search) -> Path:
    """A tiny search: the bad learning rate comes last, so ASHA has good trials to compare
    it with when it reaches the first rung (grace period 2 epochs). No references and no
    confirmation unless `top` (top-level sections) asks for them."""
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
        "references": False, "confirm": False, **(top or {}),
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
    best = outcome.summary.iloc[0]
    assert parent.data.metrics["best/val/overall/ndcg_20"] == pytest.approx(
        best["best/val/overall/ndcg_20"])
    for key in SUMMARY_COLUMNS:
        assert parent.data.metrics[key] == pytest.approx(best[key]), key

    by_trial = {row["trial"]: row for row in outcome.summary.to_dict("records")}
    for child in children:
        row = by_trial[child.data.tags["trial_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["outcome"] == row["outcome"]
        assert child.data.params["lr"] == str(row["lr"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/tail/ndcg_10")]
        assert steps == list(range(1, row["epochs"] + 1))  # one point per epoch, step = epoch
        for key in SUMMARY_COLUMNS:  # the best state's test metrics, as in the summary
            assert child.data.metrics[key] == pytest.approx(row[key]), key


def test_asha_stops_the_trial_with_a_useless_learning_rate(finished_search):
    _, outcome = finished_search
    table = outcome.summary
    bad = table[table["lr"] == 1.0e-7].iloc[0]
    assert bad["outcome"] == "early-stopped" and bad["epochs"] == 2
    assert (table["outcome"] == "completed").any()
    # it was stopped for being worse: it never learnt, so every other trial validates higher
    others = table[table["lr"] != 1.0e-7]["best/val/overall/ndcg_20"]
    assert bad["best/val/overall/ndcg_20"] < others.min()


def test_each_trials_test_metrics_are_those_of_its_best_validation_state(finished_search):
    """The test metrics a trial reports (summary and MLflow) equal a separate evaluation of
    the best state saved in its last checkpoint, and that state is the one whose
    validation metric is the best of the trial's per-epoch curve."""
    space, outcome = finished_search
    metric = space.search.metric
    inputs = load_inputs(space.dataset, space.embedding)
    data = inputs.data
    client = MlflowClient(space.search.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(space.name).experiment_id])
    children = {r.data.tags["trial_id"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    for row in outcome.summary.to_dict("records"):
        folder = Path(outcome.experiment_path) / f"trial_{row['trial']}"
        last = max(folder.glob("checkpoint_*"))
        saved = torch.load(last / "state.pt", weights_only=True)["loop"]
        config = json.loads((folder / "params.json").read_text())
        model_cfg, _ = settings_from_dict(trial_settings(config), "trial")
        model = build_model(dataclasses.replace(model_cfg, pca_init=False), data.n_items,
                            torch.tensor(inputs.llm_embeddings), None,
                            torch.tensor(data.train_popularity))
        model.load_state_dict(saved["best_model"])

        curve = client.get_metric_history(children[row["trial"]].info.run_id, metric)
        val = reference_metrics(model, data, "val", model_cfg.max_len)[metric]
        assert val == pytest.approx(max(m.value for m in curve)), row["trial"]
        assert val == pytest.approx(row[f"best/{metric}"])
        test = reference_metrics(model, data, "test", model_cfg.max_len)
        for key in SUMMARY_COLUMNS:
            assert row[key] == pytest.approx(test[key]), (row["trial"], key)


def test_summary_files_hold_every_trial_best_validation_first(finished_search):
    _, outcome = finished_search
    with open(outcome.summary_files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    best = [float(r["best/val/overall/ndcg_20"]) for r in rows]
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


def test_a_bad_space_is_refused_before_ray_starts(tmp_path):
    """In a fresh interpreter: this module's own Ray would hide a stray ray.init here."""
    bad = yaml.safe_load((ROOT / "search_spaces/smoke.yaml").read_text())
    bad["params"]["lambda"]["low"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    script = ("import sys, ray, run_search\n"
              "code = run_search.main(['--space', sys.argv[1]])\n"
              "print('ray started' if ray.is_initialized() else 'ray not started')\n"
              "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "params.lambda.low" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ray not started"


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


# ---------------------------------------------------------------- two objectives, all stages

OBJECTIVES = ["best/val/overall/ndcg_20", "best/val/tail/ndcg_20"]


@pytest.fixture(scope="module")
def pareto_search(tmp_path_factory, local_ray):
    """Every stage of a two-objective search on the tiny dataset: references, 4 trials under
    MO-ASHA and a constraint against the base, confirmation of the front (at most 2) and the
    references with 2 new seeds, the report."""
    folder = tmp_path_factory.mktemp("pareto")
    data, emb = write_faerec_dataset(folder / "data")
    path = write_space(
        folder, data, emb, top={"references": True, "confirm": {"top": 2, "seeds": 2},
                                "name": "tiny-pareto"},
        metric=None, objectives=[{"metric": "val/overall/ndcg_20", "mode": "max"},
                                 {"metric": "val/tail/ndcg_20", "mode": "max"}],
        constraints=[{"metric": "val/overall/ndcg_20", "at_least": 0.5, "of": "base"}],
        max_epochs=3, max_concurrent=2,
        scheduler={"type": "mo_asha", "grace_period": 1, "reduction_factor": 2})
    text = yaml.safe_load(path.read_text())
    text["search"].pop("metric")
    path.write_text(yaml.safe_dump(text))
    space = load_space(path)
    return space, run(space)


def test_every_stage_is_in_mlflow_under_one_parent_with_its_tag(pareto_search):
    space, outcome = pareto_search
    client = MlflowClient(space.search.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(space.name).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [outcome.parent_run_id]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert all(c.data.tags["mlflow.parentRunId"] == outcome.parent_run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in [*parents, *children])
    by_stage = {}
    for c in children:
        by_stage.setdefault(c.data.tags["stage"], []).append(c)
    references = {r.data.tags["configuration"]: r for r in by_stage["reference"]}
    assert sorted(references) == ["base", "paper-default"]
    assert references["base"].data.params["method"] == "base"
    assert references["paper-default"].data.params["lambda"] == "0.005"
    assert len(by_stage["search"]) == 4
    confirmed = {(c.data.tags["configuration"], c.data.tags["seed"]) for c in by_stage["confirm"]}
    front = set(outcome.record.confirmed["configuration"]) - {"base", "paper-default"}
    assert 1 <= len(front) <= 2
    # one run per (configuration, seed); new seeds: the search trained with 42 (the default)
    assert confirmed == {(c, s) for c in ["base", "paper-default", *front] for s in ("43", "44")}
    assert len(by_stage["confirm"]) == len(confirmed)
    search_ids = {c.data.tags["trial_id"] for c in by_stage["search"]}
    assert front <= search_ids
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert artifacts == {f"report/{name}" for name in ("report.md", *FIGURES)}


def test_confirmed_configurations_are_the_searchs_front_retrained(pareto_search):
    space, outcome = pareto_search
    table = outcome.summary
    values = table[OBJECTIVES].to_numpy(float)
    front = set(table["trial"][pareto_mask(losses(values, ["max", "max"]))])
    confirmed = set(outcome.record.confirmed["configuration"]) - {"base", "paper-default"}
    assert confirmed <= front and len(confirmed) == min(2, len(front))
    # the summary lists the front first
    assert set(table["trial"][:len(front)]) == front
    # each confirmation run trained its trial's configuration, with a confirmation seed
    confirm = Path(local_folder(space)) / "confirm"
    trials = {Path(t).name: json.loads((Path(t) / "params.json").read_text())
              for t in confirm.glob("trial_*")}
    searched = {Path(t).name.removeprefix("trial_"): json.loads((Path(t) / "params.json").read_text())
                for t in Path(local_folder(space)).glob("trial_*")}
    for config in trials.values():
        if config["configuration"] in searched:
            original = searched[config["configuration"]]
            assert (config["lr"], config["tau"]) == (original["lr"], original["tau"])
        assert config["seed"] in (43, 44) and config["epochs"] == space.search.max_epochs


def test_the_constraint_reaches_optuna_against_the_bases_validation_value(pareto_search):
    from ray.tune.search.optuna import OptunaSearch

    space, outcome = pareto_search
    base = outcome.record.trials.set_index("trial").loc["base", OBJECTIVES[0]]
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(local_folder(space)))
    told = [t for t in searcher._ot_study.trials if t.values is not None]
    assert len(told) == space.search.num_samples
    for trial in told:
        overall = trial.values[0]  # the constraint's metric is also the first objective
        # what the samplers read: threshold - value, <= 0 when feasible
        assert trial.constraints == pytest.approx({OBJECTIVES[0]: 0.5 * base - overall})


def test_the_report_answers_in_files_and_terminal(pareto_search, capsys):
    space, outcome = pareto_search
    folder = local_folder(space) / "report"
    assert outcome.report_files["report.md"] == folder / "report.md"
    for name in FIGURES:
        assert (folder / name).stat().st_size > 1000, name
    report = (folder / "report.md").read_text()
    assert report.startswith(f"# {space.name}: does a configuration lift tail items")
    table = answer_table(outcome.record)
    for configuration in outcome.record.confirmed["configuration"].unique():
        assert configuration in report and configuration in table
    assert max(len(line) for line in table.splitlines()) <= 120
    refs = outcome.record.trials[outcome.record.trials["stage"] == "reference"]
    assert sorted(refs["trial"]) == ["base", "paper-default"]
    assert np.isfinite(refs[OBJECTIVES].to_numpy(float)).all()


def test_a_resumed_finished_search_reads_its_stages_back(pareto_search):
    """--resume after the end: every stage's Tune experiment is restored, nothing trains
    again, MLflow gets no new run, and the same answer comes out."""
    space, outcome = pareto_search
    client = MlflowClient(space.search.tracking_uri)
    experiment = client.get_experiment_by_name(space.name).experiment_id
    before = {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])}
    again = run(space, resume=True)
    assert again.parent_run_id == outcome.parent_run_id
    after = {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])}
    assert after == before
    assert list(again.summary["trial"]) == list(outcome.summary["trial"])
    assert answer_table(again.record) == answer_table(outcome.record)


def test_paired_tests_come_from_each_confirmation_runs_saved_ranks(pareto_search):
    """Each confirmation run keeps its users' test ranks in its last checkpoint; they
    reproduce the run's reported test metrics, and the report's Wilcoxon tests are those
    of tuning.stats over exactly these per-user values."""
    from model.metrics import UserRanks
    from tuning.stats import paired_tests
    from tuning.trainable import RANKS_FILE

    space, outcome = pareto_search
    record = outcome.record
    compared = set(record.confirmed["configuration"]) - {"base"}
    assert set(record.tests["configuration"]) == compared
    assert len(record.tests) == 4 * len(compared)  # overall/tail x hr_10/ndcg_10
    rows = []
    for trial in sorted((local_folder(space) / "confirm").glob("trial_*")):
        config = json.loads((trial / "params.json").read_text())
        ranks = UserRanks.load(max(trial.glob("checkpoint_*")) / RANKS_FILE)
        reported = record.confirmed[(record.confirmed["configuration"] == config["configuration"])
                                    & (record.confirmed["seed"] == config["seed"])].iloc[0]
        per_user = ranks.metrics(10)
        assert per_user["hr_10"].mean() == pytest.approx(reported["test/overall/hr_10"])
        assert per_user["ndcg_10"][ranks.tail].mean() == pytest.approx(reported["test/tail/ndcg_10"])
        rows.append(pd.DataFrame({"configuration": config["configuration"], "seed": config["seed"],
                                  "user": ranks.users, "tail": ranks.tail, **per_user}))
    again = paired_tests(pd.concat(rows, ignore_index=True), base="base")
    key = ["configuration", "group", "metric"]
    mine = record.tests.sort_values(key).reset_index(drop=True)
    assert np.allclose(mine["p_holm"], again.sort_values(key).reset_index(drop=True)["p_holm"])
    assert "p=" in answer_table(record)
