"""Method-conditional params in a search space: a method's own params exist only in its
trials, `when:` conditions, early errors naming file, field and value, TPE that stays
multivariate (grouped, one model per method), and a tiny conditional search on a real Ray."""

import dataclasses
import json
import logging
import re
import warnings
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from conftest import write_faerec_dataset
from model.errors import ConfigError
from model.train import settings_from_dict
from tuning.space import PROJECT_ROOT, define_by_run, load_space, make_sampler, plan, trial_settings
from tuning.tuner import comparison_bases, confirmed_trials, run

METHODS_YAML = PROJECT_ROOT / "search_spaces" / "methods.yaml"
OWN = {"faerec": {"alpha", "lambda", "tau"}, "base": set(), "llminit": set(),
       "alphafuse": {"alphafuse.null_dim", "alphafuse.id_init"},
       "rlmrec_con": {"rlmrec_con.weight", "rlmrec_con.tau"},
       "rlmrec_gen": {"rlmrec_gen.weight", "rlmrec_gen.tau", "rlmrec_gen.mask_ratio"},
       "llmesr": {"llmesr.alpha"}, "cities": {"cities.pretrain_epochs", "cities.tail_max_count"},
       "melt": {"melt.lamb_u", "melt.lamb_i", "melt.pretrain_epochs", "melt.warmup_epochs"}}


def sampled(space, n, sampler=None):
    """n trials of `space` drawn with TPE and told a score; returns (study, configs)."""
    study = optuna.create_study(direction="maximize", sampler=sampler or make_sampler(space))
    sample, configs = define_by_run(space), []
    for _ in range(n):
        trial = study.ask()
        configs.append(sample(trial))
        study.tell(trial, configs[-1].get("dropout", 0.3))
    return study, configs


def test_each_method_gets_its_own_params_in_its_own_trials():
    space = load_space(METHODS_YAML)
    _, configs = sampled(space, 72)
    assert Counter(c["method"] for c in configs) == {m: 8 for m in OWN}
    every_own = set().union(*OWN.values())
    for config in configs:
        assert set(config) & every_own == OWN[config["method"]], config["method"]
        model_cfg, _ = settings_from_dict(trial_settings(config), "trial")
        assert model_cfg.method == config["method"]
    assert "only when method = rlmrec_gen" in plan(space)


def test_confirm_per_method_picks_the_best_trial_of_each_method():
    space = load_space(METHODS_YAML)
    assert space.confirm.per == ("method",) and space.confirm.top == 1
    table = pd.DataFrame({  # best first overall, as summarise lists them; t6 never validated
        "trial": ["t1", "t2", "t3", "t4", "t5", "t6"],
        "method": ["faerec", "faerec", "melt", "base", "melt", "base"],
        "best/val/overall/ndcg_20": [0.30, 0.29, 0.20, 0.25, 0.22, float("nan")]})
    # by hand: faerec's best is t1, melt's t5 (0.22 > 0.20), base's t4 (t6 has no value)
    assert sorted(confirmed_trials(space, table)) == ["t1", "t4", "t5"]
    two = dataclasses.replace(space, confirm=dataclasses.replace(space.confirm, top=2))
    assert sorted(confirmed_trials(two, table)) == ["t1", "t2", "t3", "t4", "t5"]


def test_lifts_are_tested_against_the_tuned_base_when_the_search_has_one():
    space = load_space(METHODS_YAML)  # confirm.per: method
    table = pd.DataFrame({"trial": ["t1", "t6", "t4", "t2"],  # best first, as summarise lists them
                          "method": ["faerec", "base", "base", "faerec"]})
    references = [{"configuration": "base", "method": "base"},
                  {"configuration": "paper-default", "method": "faerec"}]
    confirmed = [*references, {"configuration": "t4", "method": "base"},
                 {"configuration": "t6", "method": "base"}, {"configuration": "t1", "method": "faerec"}]
    # the better of the two confirmed bases is everyone's base, the defaults' and the other base's
    assert comparison_bases(space, table, confirmed) == {
        "base": "t6", "paper-default": "t6", "t4": "t6", "t1": "t6"}
    no_tuned = [*references, confirmed[-1]]  # no tuned base: the base at its defaults
    assert comparison_bases(space, table, no_tuned) == {"paper-default": "base", "t1": "base"}


def test_each_backbone_is_tested_against_its_own_tuned_base():
    space = load_space(PROJECT_ROOT / "search_spaces" / "backbones.yaml")
    assert space.confirm.per == ("backbone", "method")
    rows = [("n1", "narm", "faerec"), ("s1", "sasrec", "faerec"), ("n2", "narm", "base"),
            ("s2", "sasrec", "base"), ("g1", "gmlp", "faerec")]  # gmlp's base never finished
    table = pd.DataFrame(rows, columns=["trial", "backbone", "method"])
    confirmed = [{"configuration": "base", "method": "base"},  # the references: no backbone given
                 {"configuration": "paper-default", "method": "faerec"},
                 *({"configuration": t, "backbone": b, "method": m} for t, b, m in rows)]
    assert comparison_bases(space, table, confirmed) == {
        "paper-default": "base", "n1": "n2", "s1": "s2", "g1": "base"}
    assert sorted(confirmed_trials(space, table.assign(**{"best/val/overall/ndcg_20": 0.1}))) == \
        ["g1", "n1", "n2", "s1", "s2"]  # the best of each (backbone, method)


def test_tpe_is_grouped_one_model_per_method(caplog):
    """Optuna names each method's draws apart; with group=True the last trial of every method
    is sampled from a joint model of all its params; without it (the check can fail) the
    conditional params fall back to independent sampling."""
    space = load_space(METHODS_YAML, overrides={"num_samples": 90})
    assert make_sampler(space)._group and make_sampler(space)._multivariate

    def run_with(group):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # warn_independent_sampling's deprecation, group's "experimental"
            sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, constant_liar=True,
                                                 group=group, warn_independent_sampling=True)
        caplog.clear()
        optuna.logging.enable_propagation()
        try:
            with caplog.at_level(logging.WARNING, logger="optuna"):
                study, _ = sampled(space, 90, sampler)
        finally:
            optuna.logging.disable_propagation()
        warned = [r.getMessage() for r in caplog.records if "sampled independently" in r.getMessage()]
        return study, sampler, warned

    study, sampler, warned = run_with(group=True)
    assert warned == []
    last = {}
    for trial in study.trials:
        last[next(iter(trial.params)).split("/")[0].split(".")[0]] = trial
    assert set(last["base"].params) == {"base/dropout"}
    assert set(last["rlmrec_con"].params) == {"rlmrec_con/dropout", "rlmrec_con.weight", "rlmrec_con.tau"}
    joint = sampler.infer_relative_search_space(study, study.trials[-1])
    assert all(set(t.params) <= set(joint) for t in last.values())
    groups = [set(g) for g in sampler._search_space_group.search_spaces]
    assert {"faerec/dropout", "faerec/alpha", "faerec/lambda", "faerec/tau"} in groups

    _, _, warned = run_with(group=False)
    assert warned and any("rlmrec_gen.mask_ratio" in w for w in warned)


def space_dict(**params) -> dict:
    return {"name": "t", "dataset": "ml-100k", "embedding": {"encoder": "random", "dim": 8},
            "fixed": {"hidden_size": 16},
            "search": {"num_samples": 2, "max_epochs": 3},
            "params": {"method": {"type": "grid", "choices": ["base", "rlmrec_con"]},
                       "rlmrec_con.tau": {"type": "uniform", "low": 0.1, "high": 0.5},
                       "tau": {"type": "uniform", "low": 0.1, "high": 0.5, "when": {"method": "base"}},
                       **params}}


@pytest.mark.parametrize("change, expected", [
    (lambda s: s["params"]["tau"].update(when={"methd": "base"}),
     r"X: params.tau.when: unknown setting 'methd' \(did you mean 'method'\?\)"),
    (lambda s: s["params"]["tau"].update(when={"method": ["base", "faerec"]}),
     r"X: params.tau.when.method: no trial has method = 'faerec' \(method takes: base, rlmrec_con\)"),
    (lambda s: s["params"]["tau"].update(when="base"),
     r"X: params.tau.when: expected a mapping of setting -> value or list of values.*got 'base'"),
    (lambda s: s["params"]["tau"].update(when={"dropout": 0.2}) or s["params"].update(
        dropout={"type": "uniform", "low": 0.1, "high": 0.5}),
     r"X: params.tau.when.dropout: a condition reads a categorical, grid or fixed param"),
    (lambda s: s["params"]["rlmrec_con.tau"].update(when={"method": "rlmrec_con"}),
     r"X: params.rlmrec_con.tau.when.method: rlmrec_con.tau is a setting of method rlmrec_con"),
    (lambda s: s["params"].update({"rlmrec_gen.tau": {"type": "uniform", "low": 0.1, "high": 0.5}}),
     r"X: params.rlmrec_gen.tau: no trial runs method rlmrec_gen, whose setting it is "
     r"\(method takes: base, rlmrec_con\)"),
    (lambda s: s["fixed"].update({"alphafuse.cover": True}),
     r"X: fixed.alphafuse.cover: a setting of method alphafuse, which no trial runs"),
    (lambda s: s["params"]["rlmrec_con.tau"].update(low=-0.1),
     r"X: params\.\w+: rlmrec_con.tau: must be > 0, got -0.1"),
    (lambda s: s["params"].update({"method": {"type": "grid", "choices": ["base", "alphafuse"]},
                                   "rlmrec_con.tau": {"type": "fixed", "value": 0.2},
                                   "alphafuse.null_dim": {"type": "categorical", "choices": [8, 32]}}),
     r"X: params.rlmrec_con.tau: no trial runs method rlmrec_con"),
    (lambda s: s["params"].update({"method": {"type": "grid", "choices": ["base", "alphafuse"]},
                                   "alphafuse.null_dim": {"type": "categorical", "choices": [8, 32]}})
     or s["params"].pop("rlmrec_con.tau"),
     r"X: params.alphafuse.null_dim: alphafuse.null_dim: must be <= hidden_size = 16, got 32"),
])
def test_each_conditional_mistake_is_one_early_error(tmp_path, change, expected):
    space = space_dict()
    change(space)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_space(path)
    assert re.search(expected, str(e.value).replace(str(path), "X")), str(e.value)


def test_fixed_method_settings_apply_to_their_method_only(tmp_path):
    space = space_dict()
    space["fixed"]["rlmrec_con.weight"] = 0.5
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space))
    _, configs = sampled(load_space(path), 2)
    by_method = {c["method"]: c for c in configs}
    assert by_method["rlmrec_con"]["rlmrec_con.weight"] == 0.5 and "tau" not in by_method["rlmrec_con"]
    assert "rlmrec_con.weight" not in by_method["base"] and "tau" in by_method["base"]
    for config in configs:
        settings_from_dict(trial_settings(config), "trial")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_a_conditional_search_on_real_ray(tmp_path, local_ray):
    data, emb = write_faerec_dataset(tmp_path / "data")
    space = {
        "name": "conditional",
        "dataset": {"format": "faerec", "interactions": str(data), "embeddings": str(emb),
                    "cache_dir": str(tmp_path / "cache")},
        "embedding": {"encoder": "auto", "cache_dir": str(tmp_path / "cache")},
        "search": {"num_samples": 6, "max_concurrent": 2, "max_epochs": 2, "max_failures": 0,
                   "scheduler": {"type": "none"}, "resources": {"cpu": 1, "gpu": 0},
                   "storage_path": str(tmp_path / "results"),
                   "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "fixed": {"backbone": "sasrec", "hidden_size": 16, "max_len": 12, "num_layers": 1,
                  "batch_size": 16, "proj_hidden": 16},
        "confirm": {"top": 1, "seeds": 1, "per": "method"},  # each method's best, one seed
        "params": {"method": {"type": "grid", "choices": ["faerec", "base", "rlmrec_gen"]},
                   "dropout": {"type": "uniform", "low": 0.1, "high": 0.5},
                   "tau": {"type": "loguniform", "low": 0.02, "high": 0.5, "when": {"method": "faerec"}},
                   "rlmrec_gen.mask_ratio": {"type": "uniform", "low": 0.1, "high": 0.3}},
    }
    path = tmp_path / "conditional.yaml"
    path.write_text(yaml.safe_dump(space))
    outcome = run(load_space(path))
    assert len(outcome.summary) == 6 and set(outcome.summary["outcome"]) == {"completed"}
    configs = [json.loads(p.read_text()) for p in Path(outcome.experiment_path).glob("trial_*/params.json")]
    assert Counter(c["method"] for c in configs) == {"faerec": 2, "base": 2, "rlmrec_gen": 2}
    for config in configs:
        own = {"faerec": {"tau"}, "base": set(), "rlmrec_gen": {"rlmrec_gen.mask_ratio"}}
        assert {"tau", "rlmrec_gen.mask_ratio"} & set(config) == own[config["method"]]
        assert settings_from_dict(trial_settings(config), "trial")[0].method == config["method"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("conditional").experiment_id])
    children = [r for r in runs if r.data.tags.get("stage") == "search"]
    assert Counter(r.data.params["method"] for r in children) == {"faerec": 2, "base": 2, "rlmrec_gen": 2}
    assert all(r.data.metrics["test/overall/ndcg_10"] >= 0 for r in children)
    assert (Path(outcome.experiment_path) / "report" / "param_importance.png").is_file()
    # the confirmation: each method's best search trial (by validation) and the references
    search = outcome.summary
    best = {m: g.sort_values("best/val/overall/ndcg_20").iloc[-1]["trial"] for m, g in search.groupby("method")}
    confirmed = [r for r in runs if r.data.tags.get("stage") == "confirm"]
    assert Counter(r.data.tags["configuration"] for r in confirmed) == Counter(
        [*best.values(), "base", "paper-default"])
    report = (Path(outcome.experiment_path) / "report" / "report.md").read_text()
    assert all(f"{m} {t}" in report for m, t in best.items())  # rows named by method
    # every lift is tested against the tuned base (the search's best base), the defaults' included
    assert f"change against `base {best['base']}`" in report
    tests = outcome.record.tests
    assert set(tests["configuration"]) == {best["faerec"], best["rlmrec_gen"], "base", "paper-default"}
    assert set(tests["base"]) == {best["base"]}
