"""tuning.space: every shipped space loads, each mistake is one error naming its YAML path,
and the define-by-run function keeps w_max > w_min inside a static (multivariate) space."""

import logging
import math
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from scipy import stats

from model.errors import ConfigError
from model.train import settings_from_dict
from tuning.space import (ABLATIONS, GAP_MIN, PROJECT_ROOT, define_by_run, load_space,
                          make_sampler, plan, reference_config, trial_settings)

SHIPPED = sorted((PROJECT_ROOT / "search_spaces").glob("*.yaml"))
N_SAMPLED = 200


def valid_space() -> dict:
    """A small valid space; each test breaks one thing in it."""
    return {
        "name": "t",
        "dataset": "ml-100k",
        "embedding": {"encoder": "random", "dim": 8},
        "fixed": {"backbone": "sasrec", "hidden_size": 16},
        "search": {"num_samples": 4, "max_epochs": 10,
                   "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 3},
                   "resources": {"cpu": 1, "gpu": 0}},
        "params": {"tau": {"type": "loguniform", "low": 0.02, "high": 0.5},
                   "alpha": {"type": "uniform", "low": 0.1, "high": 0.5},
                   "period": {"type": "int", "low": 5, "high": 40},
                   "dropout": {"type": "categorical", "choices": [0.2, 0.4]},
                   "w_min": {"type": "uniform", "low": 0.1, "high": 0.9},
                   "w_max": {"type": "uniform", "low": 0.1, "high": 1.0}},
    }


def write(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def error_of(tmp_path: Path, change) -> str:
    space = valid_space()
    change(space)
    path = write(tmp_path, space)
    with pytest.raises(ConfigError) as e:
        load_space(path)
    return str(e.value).replace(str(path), "X")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_space_loads(path):
    space = load_space(path)
    assert space.params, "a shipped space searches something"
    config = define_by_run(space)(optuna.create_study().ask())
    settings_from_dict(trial_settings(config), source=str(path))


def test_the_default_space_is_the_papers():
    space = load_space(PROJECT_ROOT / "search_spaces" / "faerec.yaml")
    assert space.dataset.format == "ml-100k"
    assert space.fixed["backbone"] == "sasrec" and space.fixed["method"] == "faerec"
    kinds = {p.name: (p.kind, p.low, p.high) for p in space.params}
    assert kinds["lambda"] == ("loguniform", 0.001, 0.1)
    assert kinds["alpha"] == ("uniform", 0.05, 0.6)
    assert kinds["tau"] == ("loguniform", 0.02, 0.5)
    assert kinds["w_min"] == ("uniform", 0.1, 0.9)
    assert kinds["w_max"][2] == 1.0
    assert kinds["period"] == ("int", 5, 40)
    assert space.search.objectives == (("val/overall/ndcg_20", "max"), ("val/tail/ndcg_20", "max"))
    assert space.search.scheduler == "asha" and space.references and space.confirm is not None


BREAKS = [
    ("unknown top-level key", lambda s: s.update(serch={}),
     "X: unknown key 'serch' (did you mean 'search'?); allowed: name, dataset"),
    ("unknown search key", lambda s: s["search"].update(samples=3),
     "X: search: unknown key 'samples'"),
    ("unknown scheduler key", lambda s: s["search"]["scheduler"].update(grace_periods=2),
     "X: search.scheduler: unknown key 'grace_periods' (did you mean 'grace_period'?)"),
    ("unknown param", lambda s: s["params"].update(tauu={"type": "fixed", "value": 1}),
     "X: params: unknown setting 'tauu' (did you mean 'tau'?)"),
    ("unknown fixed setting", lambda s: s["fixed"].update(hiden_size=8),
     "X: fixed: unknown setting 'hiden_size' (did you mean 'hidden_size'?)"),
    ("setting owned by search", lambda s: s["fixed"].update(epochs=3),
     "X: fixed.epochs: set by search.max_epochs"),
    ("set twice", lambda s: s["fixed"].update(tau=0.1),
     "X: params.tau: also set in fixed.tau"),
    ("unknown param type", lambda s: s["params"]["tau"].update(type="normal"),
     "X: params.tau.type: must be one of uniform, loguniform, int, categorical, grid, fixed"),
    ("key of another type", lambda s: s["params"]["tau"].update(choices=[1]),
     "X: params.tau: unknown key 'choices'"),
    ("bad number", lambda s: s["params"]["tau"].update(high="big"),
     "X: params.tau.high: expected a number, got 'big'"),
    ("low >= high", lambda s: s["params"]["alpha"].update(low=0.5),
     "X: params.alpha.low: must be below high (0.5), got 0.5"),
    ("log range touching 0", lambda s: s["params"]["tau"].update(low=0),
     "X: params.tau.low: a log range must be > 0, got 0"),
    ("categorical without choices", lambda s: s["params"]["dropout"].update(choices=[]),
     "X: params.dropout.choices: expected a non-empty list"),
    ("int with a float bound", lambda s: s["params"]["period"].update(low=5.5),
     "X: params.period.low: expected an integer, got 5.5"),
    ("int step not dividing", lambda s: s["params"]["period"].update(step=4),
     "X: params.period.high: high - low (35) must be a multiple of step (4)"),
    ("float range for an int setting", lambda s: s["params"].update(
        num_layers={"type": "uniform", "low": 1, "high": 3}), "X: params.num_layers: num_layers"),
    ("value the setting rejects", lambda s: s["params"].update(
        gating={"type": "categorical", "choices": [True, "maybe"]}), "X: params.gating: gating"),
    ("bad fixed value", lambda s: s["fixed"].update(hidden_size="wide"),
     "X: fixed.hidden_size: expected an integer, got 'wide'"),
    ("metric not reported", lambda s: s["search"].update(metric="val/overall/ndcg_50"),
     "X: search.metric: 'val/overall/ndcg_50' is not a validation metric"),
    ("test metric", lambda s: s["search"].update(metric="test/overall/ndcg_20"),
     "X: search.metric: 'test/overall/ndcg_20' is not a validation metric"),
    ("bad mode", lambda s: s["search"].update(mode="maximise"), "X: search.mode: must be max"),
    ("cpu 0", lambda s: s["search"]["resources"].update(cpu=0),
     "X: search.resources.cpu: must be > 0, got 0"),
    ("gpu 1.5", lambda s: s["search"]["resources"].update(gpu=1.5),
     "X: search.resources.gpu: must be a fraction in [0, 1] or a whole number, got 1.5"),
    ("negative gpu", lambda s: s["search"]["resources"].update(gpu=-1),
     "X: search.resources.gpu"),
    ("no trials", lambda s: s["search"].update(num_samples=0),
     "X: search.num_samples: must be >= 1, got 0"),
    ("bool for an int", lambda s: s["search"].update(num_samples=True),
     "X: search.num_samples: expected an integer, got True"),
    ("missing budget", lambda s: s["search"].pop("max_epochs"),
     "X: search.max_epochs: missing (required)"),
    ("grace period over budget", lambda s: s["search"]["scheduler"].update(grace_period=11),
     "X: search.scheduler.grace_period: 11 epochs exceeds search.max_epochs (10)"),
    ("asha without grace period", lambda s: s["search"]["scheduler"].pop("grace_period"),
     "X: search.scheduler.grace_period: missing (required)"),
    ("asha with sparse validation", lambda s: s["search"].update(eval_every=2),
     "X: search.eval_every: must be 1 with scheduler asha"),
    ("bad scheduler", lambda s: s["search"]["scheduler"].update(type="hyperband"),
     "X: search.scheduler.type: must be one of asha, mo_asha, none, got 'hyperband'"),
    ("metric and objectives", lambda s: s["search"].update(
        metric="val/overall/ndcg_20", objectives=[{"metric": "val/tail/ndcg_20"}]),
     "X: search.objectives: give either search.metric or search.objectives, not both"),
    ("objectives not a list", lambda s: s["search"].update(objectives="val/tail/ndcg_20"),
     "X: search.objectives: expected a non-empty list of mappings, got 'val/tail/ndcg_20'"),
    ("empty objectives", lambda s: s["search"].update(objectives=[]),
     "X: search.objectives: expected a non-empty list of mappings, got []"),
    ("objective not reported", lambda s: s["search"].update(objectives=[
        {"metric": "val/overall/ndcg_20"}, {"metric": "val/tail/recall_20"}]),
     "X: search.objectives[1].metric: 'val/tail/recall_20' is not a validation metric"),
    ("objective on test", lambda s: s["search"].update(objectives=[
        {"metric": "test/tail/ndcg_20"}]),
     "X: search.objectives[0].metric: 'test/tail/ndcg_20' is not a validation metric"),
    ("objective twice", lambda s: s["search"].update(objectives=[
        {"metric": "val/tail/ndcg_20"}, {"metric": "val/tail/ndcg_20", "mode": "max"}]),
     "X: search.objectives[1].metric: 'val/tail/ndcg_20' is already an objective"),
    ("objective mode", lambda s: s["search"].update(objectives=[
        {"metric": "val/tail/ndcg_20", "mode": "min"}]),
     "X: search.objectives[0].mode: must be max (every reported metric is higher-is-better), got 'min'"),
    ("objective key", lambda s: s["search"].update(objectives=[{"metrc": "val/tail/ndcg_20"}]),
     "X: search.objectives[0]: unknown key 'metrc' (did you mean 'metric'?)"),
    ("bad sampler", lambda s: s["search"].update(sampler="cmaes"),
     "X: search.sampler: must be one of tpe, nsgaii, got 'cmaes'"),
    ("constraint of nothing known", lambda s: s["search"].update(constraints=[
        {"metric": "val/overall/ndcg_20", "at_least": 0.98, "of": "sasrec"}]),
     "X: search.constraints[0].of: must be one of base, paper-default (or left out: at_least is then "
     "the value itself), got 'sasrec'"),
    ("constraint bound", lambda s: s["search"].update(constraints=[
        {"metric": "val/overall/ndcg_20", "at_least": -1}]),
     "X: search.constraints[0].at_least: must be > 0, got -1"),
    ("constraint metric", lambda s: s["search"].update(constraints=[
        {"metric": "test/overall/ndcg_20", "at_least": 0.1}]),
     "X: search.constraints[0].metric: 'test/overall/ndcg_20' is not a validation metric"),
    ("constraint without its reference", lambda s: (s.update(references=False), s["search"].update(
        constraints=[{"metric": "val/overall/ndcg_20", "at_least": 0.98, "of": "base"}])),
     "X: search.constraints[0].of: 'base' needs the references, but the space sets references: false"),
    ("references not a bool", lambda s: s.update(references="yes"),
     "X: references: expected a boolean, got 'yes'"),
    ("confirm seeds", lambda s: s.update(confirm={"top": 3, "seeds": 0}),
     "X: confirm.seeds: must be >= 1, got 0"),
    ("confirm key", lambda s: s.update(confirm={"tops": 3}),
     "X: confirm: unknown key 'tops' (did you mean 'top'?)"),
    ("confirm not a mapping", lambda s: s.update(confirm=3),
     "X: confirm: expected a mapping, got 3"),
    ("confirm per a float param", lambda s: s.update(confirm={"per": "lambda"}),
     "X: confirm.per: must name a grid or categorical param that every trial draws (dropout), "
     "got 'lambda'"),
    ("confirm per a list naming one twice", lambda s: s.update(confirm={"per": ["dropout", "dropout"]}),
     "X: confirm.per: names 'dropout' twice"),
    ("confirm per not a name", lambda s: s.update(confirm={"per": 3}),
     "X: confirm.per: expected a param's name or a list of names, got 3"),
    ("bad name", lambda s: s.update(name="a/b"), "X: name: use letters, digits"),
    ("bad embedding", lambda s: s["embedding"].update(encoder="word2vec"), "X: embedding.encoder: must be one of auto"),
    ("bad dataset field", lambda s: s.update(dataset={"format": "ml-100k", "colour": 1}),
     "X: dataset: "),
    ("unknown dataset", lambda s: s.update(dataset="no-such-dataset"), "X: dataset: "),
    ("grid not filled evenly", lambda s: s["params"].update(
        ablation={"type": "grid", "choices": ["full", "no_ila", "no_fla"]}),
     "X: search.num_samples: 4 is not a multiple of the grid size 3"),
    ("unknown ablation", lambda s: s["params"].update(
        ablation={"type": "categorical", "choices": ["full", "w/o AGF"]}),
     "X: params.ablation: unknown variant 'w/o AGF'"),
    ("ablation switch set twice", lambda s: (s["fixed"].update(ila=True), s["params"].update(
        ablation={"type": "categorical", "choices": ["full", "no_ila"]})),
     "X: params.ablation: variant 'no_ila' sets 'ila', which fixed.ila also sets"),
]


@pytest.mark.parametrize("change, expected", [b[1:] for b in BREAKS], ids=[b[0] for b in BREAKS])
def test_each_mistake_is_one_error_naming_its_path(tmp_path, change, expected):
    assert expected in error_of(tmp_path, change)


def set_w(w_min, w_max):
    """A param spec (a mapping) goes under params, a plain number under fixed, None nowhere."""
    def change(space):
        for name, value in (("w_min", w_min), ("w_max", w_max)):
            space["params"].pop(name)
            if value is not None:
                space["params" if isinstance(value, dict) else "fixed"][name] = value
    return change


def uniform(low, high):
    return {"type": "uniform", "low": low, "high": high}


@pytest.mark.parametrize("change, expected", [
    (set_w(uniform(0.6, 0.8), uniform(0.2, 0.5)),
     "X: params.w_min / params.w_max: unsatisfiable: w_min >= 0.6 can never be below w_max <= 0.5"),
    (set_w(uniform(0.1, 1.0), uniform(0.5, 1.0)),
     "X: params.w_min / params.w_max: w_min can reach 1.0, but w_max must exceed it"),
    (set_w(0.9, 0.5), "X: fixed.w_min / fixed.w_max: unsatisfiable"),
    (set_w({"type": "fixed", "value": 0.7}, {"type": "fixed", "value": 0.7}),
     "X: params.w_min / params.w_max: unsatisfiable"),
    (set_w(0.95, uniform(0.1, 0.9)), "X: fixed.w_min / params.w_max"),
    (set_w(uniform(0.5, 1.0), None), "X: params.w_min / w_max (default): w_min can reach 1.0"),
    (set_w(uniform(0.1, 0.6), {"type": "categorical", "choices": [0.5, 1.0]}),
     "X: params.w_min / params.w_max: w_max's values start at 0.5, not above w_min's largest"),
    (set_w(uniform(0.1, 0.6), {"type": "categorical", "choices": ["high"]}),
     "X: params.w_max: must be numbers"),
], ids=["ranges apart", "w_min reaches w_max's top", "both fixed", "both fixed params",
        "fixed w_min above searched w_max", "default w_max", "categorical overlap", "strings"])
def test_unsatisfiable_curriculum_bounds_are_rejected(tmp_path, change, expected):
    assert expected in error_of(tmp_path, change)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: t\nsearch:\n  num_samples: [1, 2\n  max_epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: YAML syntax error"):
        load_space(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_space(tmp_path / "missing.yaml")


def in_range(value, p) -> bool:
    if p.kind in ("uniform", "loguniform", "int"):
        return p.low <= value <= p.high
    return value in p.choices


def sample_trials(space, n: int, sampler) -> tuple[optuna.Study, list[dict]]:
    """Ask/tell like Ray's OptunaSearch: two trials in flight at a time, a smooth objective."""
    sample = define_by_run(space)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    configs = []
    for _ in range(n // 2):
        pending = [study.ask() for _ in range(2)]
        for trial in pending:
            config = sample(trial)
            configs.append(config)
            study.tell(trial, -(math.log(config["tau"]) + 3) ** 2 - (config["w_max"] - 0.8) ** 2)
    return study, configs


def test_sampled_configs_keep_w_max_above_w_min_and_stay_in_range(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(write(tmp_path, valid_space()))
    _, configs = sample_trials(space, N_SAMPLED, make_sampler(space))
    assert len(configs) == N_SAMPLED
    w_max = space.param("w_max")
    for config in configs:
        assert config["w_min"] < config["w_max"] <= w_max.high
        assert GAP_MIN <= config["w_gap"] <= 1
        for p in space.params:
            assert in_range(config[p.name], p), (p.name, config[p.name])
        assert config["hidden_size"] == 16 and config["epochs"] == 10  # fixed and budget
        settings_from_dict(trial_settings(config), source="trial")
    # The draws reach across the ranges, not just inside a corner of them.
    assert min(c["w_max"] for c in configs) < 0.5 and max(c["w_max"] for c in configs) > 0.95


def test_loguniform_w_max_above_a_fixed_w_min(tmp_path):
    space = valid_space()
    space["params"].pop("w_min")
    space["fixed"]["w_min"] = 0.3
    space["params"]["w_max"] = {"type": "loguniform", "low": 0.1, "high": 1.0}
    space = load_space(write(tmp_path, space))
    _, configs = sample_trials(space, 40, make_sampler(space))
    assert all(0.3 < c["w_max"] <= 1.0 for c in configs)


def test_w_max_is_drawn_directly_when_its_range_lies_above_w_min(tmp_path):
    space = valid_space()
    space["params"]["w_max"] = uniform(0.95, 1.0)
    space = load_space(write(tmp_path, space))
    config = define_by_run(space)(optuna.create_study().ask())
    assert "w_gap" not in config and 0.95 <= config["w_max"] <= 1.0


def w_space(tmp_path, w_max: dict, w_min=0.3):
    """valid_space with this w_max param and w_min fixed (a number) or searched (a dict)."""
    space = valid_space()
    space["params"].pop("w_min")
    space["params" if isinstance(w_min, dict) else "fixed"]["w_min"] = w_min
    space["params"]["w_max"] = w_max
    return load_space(write(tmp_path, space))


LOG_01_1 = {"type": "loguniform", "low": 0.1, "high": 1.0}
LOG_001_064 = {"type": "loguniform", "low": 0.01, "high": 0.64}


# w_max = low + w_gap (high - low), low = max(w_min, w_max's low); on a log scale for a
# loguniform w_max. Values worked by hand.
@pytest.mark.parametrize("w_min, drawn, w_max, expected", [
    (0.3, {"w_gap": 0.25}, uniform(0.1, 1.0), 0.475),           # 0.3 + 0.25 * 0.7
    (0.3, {"w_gap": 1.0}, uniform(0.1, 1.0), 1.0),
    (0.3, {"w_gap": GAP_MIN}, uniform(0.1, 1.0), 0.3007),
    (uniform(0.1, 0.6), {"w_min": 0.2, "w_gap": 0.5}, uniform(0.5, 0.9), 0.7),  # 0.5 + 0.5 * 0.4
    (uniform(0.1, 0.6), {"w_min": 0.55, "w_gap": 0.5}, uniform(0.5, 0.9), 0.725),
    (0.3, {"w_gap": 0.5}, LOG_01_1, math.sqrt(0.3)),
    (0.04, {"w_gap": 0.5}, LOG_001_064, 0.16),                  # sqrt(0.04 * 0.64)
    (0.04, {"w_gap": 0.25}, LOG_001_064, 0.08),                 # 0.04 * 16 ** 0.25
], ids=["uniform", "top", "floor", "w_max's own low", "searched w_min", "log", "log 2",
        "log quarter"])
def test_w_max_mapping_is_exact(tmp_path, w_min, drawn, w_max, expected):
    space = w_space(tmp_path, w_max, w_min)
    trial = optuna.trial.FixedTrial({"tau": 0.1, "alpha": 0.2, "period": 10, "dropout": 0.2,
                                     **drawn})
    config = define_by_run(space)(trial)
    assert config["w_max"] == pytest.approx(expected, rel=1e-12)
    assert config["w_min"] == drawn.get("w_min", w_min)


def test_w_max_stays_above_w_min_at_the_lowest_w_gap_a_sampler_can_draw(tmp_path):
    space = w_space(tmp_path, uniform(0.1, 1.0), 0.3)
    drawn = {"tau": 0.1, "alpha": 0.2, "period": 10, "dropout": 0.2}
    trial = optuna.trial.FixedTrial({**drawn, "w_gap": 0.5})
    define_by_run(space)(trial)
    lowest = trial.distributions["w_gap"].low  # what define_by_run declares to Optuna
    config = define_by_run(space)(optuna.trial.FixedTrial({**drawn, "w_gap": lowest}))
    assert config["w_max"] > config["w_min"] == 0.3


@pytest.mark.parametrize("kind", ["uniform", "loguniform"])
def test_w_max_is_spread_evenly_above_w_min(tmp_path, kind):
    """With w_gap drawn at random, w_max above a fixed w_min 0.3 is uniform on (0.3, 1]
    (on the log scale for loguniform): no pile-up at 1.0, no linear draw of a log range."""
    space = w_space(tmp_path, {"type": kind, "low": 0.1, "high": 1.0})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sample = define_by_run(space)
    drawn = [sample(study.ask())["w_max"] for _ in range(600)]
    assert sum(w == 1.0 for w in drawn) <= 1 and min(drawn) > 0.3
    scale = math.log if kind == "loguniform" else float
    low, high = scale(0.3), scale(1.0)
    position = [(scale(w) - low) / (high - low) for w in drawn]  # uniform on [GAP_MIN, 1]
    assert stats.kstest(position, stats.uniform(GAP_MIN, 1 - GAP_MIN).cdf).pvalue > 0.01


def test_loguniform_params_are_drawn_on_a_log_scale(tmp_path):
    """tau is loguniform on [0.02, 0.5]: log(tau) is uniform on [log 0.02, log 0.5]."""
    space = load_space(write(tmp_path, valid_space()))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    sample = define_by_run(space)
    drawn = [math.log(sample(study.ask())["tau"]) for _ in range(400)]
    low, high = math.log(0.02), math.log(0.5)
    assert stats.kstest(drawn, stats.uniform(low, high - low).cdf).pvalue > 0.01


def test_the_default_space_keeps_w_max_off_its_top(tmp_path):
    """The default space, both bounds searched: w_max hits 1.0 only when w_gap is 1."""
    space = load_space(PROJECT_ROOT / "search_spaces" / "faerec.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    sample = define_by_run(space)
    configs = [sample(study.ask()) for _ in range(300)]
    assert sum(c["w_max"] == 1.0 for c in configs) <= 1
    for c in configs:
        low = max(c["w_min"], space.param("w_max").low)
        assert c["w_max"] == pytest.approx(low + c["w_gap"] * (1.0 - low), rel=1e-12)


def independent_fallbacks(space, sample_fn, caplog) -> tuple[list[str], set[str]]:
    """Run 30 trials; return Optuna's independent-sampling warnings and the parameters
    that multivariate TPE left out of its joint model.

    Optuna 5 logs the fallback through the `optuna` logger only when the (deprecated)
    warn_independent_sampling=True is passed, so this sampler turns it on; otherwise it is
    the sampler make_sampler builds."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation of that argument
        sampler = optuna.samplers.TPESampler(seed=space.search.seed, multivariate=True,
                                             constant_liar=True, warn_independent_sampling=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            for _ in range(30):
                trial = study.ask()
                config = sample_fn(trial)
                study.tell(trial, -(config["w_max"] - config["w_min"] - 0.3) ** 2)
    finally:
        optuna.logging.disable_propagation()
    warned = [r.getMessage() for r in caplog.records if "sampled independently" in r.getMessage()]
    joint = sampler.infer_relative_search_space(study, study.trials[-1])
    return warned, set(study.trials[-1].params) - set(joint)


def test_tpe_stays_multivariate(tmp_path, caplog):
    space = load_space(PROJECT_ROOT / "search_spaces" / "faerec.yaml")
    assert make_sampler(space)._multivariate  # the settings the check below uses
    warned, left_out = independent_fallbacks(space, define_by_run(space), caplog)
    assert warned == [] and left_out == set()


def test_a_naive_dependent_range_does_fall_back(tmp_path, caplog):
    """The check above can fail: w_max drawn from (w_min, 1] is sampled independently."""
    space = load_space(PROJECT_ROOT / "search_spaces" / "faerec.yaml")

    def naive(trial):
        w_min = trial.suggest_float("w_min", 0.1, 0.9)
        return {"w_min": w_min, "w_max": trial.suggest_float("w_max", w_min, 1.0)}

    warned, left_out = independent_fallbacks(space, naive, caplog)
    assert left_out == {"w_max"}
    assert warned and all("`w_max`" in message for message in warned)


def test_grid_runs_every_ablation_variant_equally_often(tmp_path):
    space = load_space(PROJECT_ROOT / "search_spaces" / "ablations.yaml",
                       overrides={"num_samples": 14})
    sample = define_by_run(space)
    study = optuna.create_study(sampler=make_sampler(space))
    configs = [sample(study.ask()) for _ in range(14)]
    assert [c["ablation"] for c in configs] == list(ABLATIONS) * 2
    for config in configs:
        for switch, value in ABLATIONS[config["ablation"]].items():
            assert config[switch] == value
        settings_from_dict(trial_settings(config), source="trial")
    assert sum(c.get("gating") is False for c in configs) == 2


def test_two_grid_params_cover_their_product(tmp_path):
    space = valid_space()
    space["search"]["num_samples"] = 6
    space["params"]["ablation"] = {"type": "grid", "choices": ["full", "no_fla", "no_pg"]}
    space["params"]["seed"] = {"type": "grid", "choices": [1, 2]}
    space = load_space(write(tmp_path, space))
    sample = define_by_run(space)
    study = optuna.create_study()
    pairs = [(c["ablation"], c["seed"]) for c in (sample(study.ask()) for _ in range(6))]
    assert sorted(pairs) == sorted((a, s) for a in ("full", "no_fla", "no_pg") for s in (1, 2))


def test_overrides_replace_the_files_values(tmp_path):
    path = write(tmp_path, valid_space())
    dataset_yaml = tmp_path / "data.yaml"
    dataset_yaml.write_text(yaml.safe_dump({"dataset": {"format": "ml-100k"}}))
    space = load_space(path, overrides={
        "num_samples": 3, "max_epochs": 5, "name": "other", "dataset": str(dataset_yaml),
        "tracking_uri": "http://127.0.0.1:5000", "storage_path": str(tmp_path / "runs"),
        "seed": None})  # None: not given on the command line
    assert space.source == str(path)  # still the file: the tracker stores it as an artifact
    assert "num_samples=3" in plan(space) and "seed" not in space.overrides
    s = space.search
    assert (s.num_samples, s.max_epochs, space.name) == (3, 5, "other")
    assert s.tracking_uri == "http://127.0.0.1:5000"
    assert s.storage_path == str(tmp_path / "runs")
    assert define_by_run(space)(optuna.create_study().ask())["epochs"] == 5
    assert "w_gap" not in trial_settings({"w_gap": 0.5, "ablation": "full", "tau": 0.1})


def test_bad_overrides_are_reported_as_overrides(tmp_path):
    path = write(tmp_path, valid_space())
    with pytest.raises(ConfigError, match=r"\(with num_samples=0\): search.num_samples: must be >= 1"):
        load_space(path, overrides={"num_samples": 0})
    with pytest.raises(ConfigError, match=r"grace_period: 2 epochs exceeds search.max_epochs \(1\)"):
        load_space(path, overrides={"max_epochs": 1})
    with pytest.raises(ConfigError, match="unknown override 'epochs'"):
        load_space(path, overrides={"epochs": 3})


def test_relative_paths_are_taken_from_the_project_root(tmp_path):
    space = valid_space()
    space["search"].update(storage_path="out/runs", tracking_uri="sqlite:///db/m.db")
    s = load_space(write(tmp_path, space)).search
    assert s.storage_path == str(PROJECT_ROOT / "out" / "runs")
    assert s.tracking_uri == f"sqlite:///{PROJECT_ROOT}/db/m.db"
    defaults = load_space(write(tmp_path, valid_space())).search
    assert defaults.tracking_uri == f"sqlite:///{PROJECT_ROOT}/mlflow/mlflow.db"
    assert defaults.storage_path == str(PROJECT_ROOT / "results")
    space["search"].update(storage_path="s3://bucket/runs")
    assert load_space(write(tmp_path, space)).search.storage_path == "s3://bucket/runs"


def test_plan_says_what_would_run(tmp_path):
    space = valid_space()
    space["search"]["resources"] = {"cpu": 2, "gpu": 0.5}
    space["search"]["max_concurrent"] = 2
    text = plan(load_space(write(tmp_path, space)))
    assert "trials:     4, at most 2 at once, up to 10 epochs each" in text
    assert "2 CPU, 0.5 GPU per trial" in text
    assert "ASHA: every trial runs 2 epochs" in text
    assert "tau" in text and "loguniform [0.02, 0.5]" in text
    assert "w_max" in text and "(w_min, 1.0]" in text
    assert f"{PROJECT_ROOT}/results/t (Ray Tune)" in text
    assert f"sqlite:///{PROJECT_ROOT}/mlflow/mlflow.db (experiment 't')" in text


def test_ray_optuna_search_gets_settings_plus_the_two_labels():
    """What a trial really receives: Ray's OptunaSearch merges the drawn values (w_gap
    included) with the returned config; trial_settings leaves only settings. No Ray started."""
    ray = pytest.importorskip("ray")
    from ray.tune.search.optuna import OptunaSearch

    for name in ("faerec.yaml", "ablations.yaml"):
        space = load_space(PROJECT_ROOT / "search_spaces" / name)
        searcher = OptunaSearch(space=define_by_run(space), metric="m", mode="max",
                                sampler=make_sampler(space))
        config = searcher.suggest("trial_1")
        assert set(config) - set(trial_settings(config)) <= {"w_gap", "ablation"}
        model_cfg, _ = settings_from_dict(trial_settings(config), source=name)
        assert model_cfg.w_min < model_cfg.w_max
    assert not ray.is_initialized()


def test_several_objectives_constraints_and_stages_are_read(tmp_path):
    space = valid_space()
    space["search"].update(
        objectives=[{"metric": "val/overall/ndcg_20", "mode": "max"}, {"metric": "val/tail/hr_10"}],
        sampler="nsgaii", num_samples=24,
        constraints=[{"metric": "val/overall/ndcg_20", "at_least": 0.98, "of": "base"},
                     {"metric": "val/tail/hr_10", "at_least": 0.01}])
    space["confirm"] = {"top": 2, "seeds": 4}
    loaded = load_space(write(tmp_path, space))
    s = loaded.search
    assert s.objectives == (("val/overall/ndcg_20", "max"), ("val/tail/hr_10", "max"))
    assert (s.metric, s.mode) == ("val/overall/ndcg_20", "max")  # the first picks the best epoch
    assert [(c.metric, c.at_least, c.of) for c in s.constraints] == [
        ("val/overall/ndcg_20", 0.98, "base"), ("val/tail/hr_10", 0.01, None)]
    assert loaded.references and (loaded.confirm.top, loaded.confirm.seeds) == (2, 4)
    sampler = make_sampler(loaded)
    assert isinstance(sampler, optuna.samplers.NSGAIISampler)
    assert define_by_run(loaded)(optuna.create_study().ask())["select_metric"] == "val/overall/ndcg_20"
    text = plan(loaded)
    assert "objectives: max val/overall/ndcg_20, max val/tail/hr_10" in text
    assert "NSGA-II (population 6, seed 0)" in text and "MO-ASHA" in text
    assert "constraints: val/overall/ndcg_20 >= 0.98 x base's, val/tail/hr_10 >= 0.01" in text
    assert "2 new seeds" not in text and "4 new seeds each" in text


def test_one_metric_still_works_and_stages_default_on(tmp_path):
    space = valid_space()
    space["search"].update(metric="val/tail/ndcg_10")
    loaded = load_space(write(tmp_path, space))
    assert loaded.search.objectives == (("val/tail/ndcg_10", "max"),)
    assert isinstance(make_sampler(loaded), optuna.samplers.TPESampler)
    assert loaded.references and (loaded.confirm.top, loaded.confirm.seeds) == (3, 3)
    space["search"].pop("metric")
    space.update(references=False, confirm=False)
    loaded = load_space(write(tmp_path, space))
    assert loaded.search.objectives == (("val/overall/ndcg_20", "max"),)
    assert not loaded.references and loaded.confirm is None
    assert "references: none" in plan(loaded) and "confirm:    none" in plan(loaded)


def test_references_are_the_backbone_alone_and_the_papers_defaults(tmp_path):
    space = valid_space()
    space["fixed"].update(tau=0.3, seed=7)
    space["params"].pop("tau")
    loaded = load_space(write(tmp_path, space))
    base = reference_config(loaded, "base")
    paper = reference_config(loaded, "paper-default")
    assert base["method"] == "base" and base["seed"] == 7 and base["epochs"] == 10
    assert base["hidden_size"] == 16  # the fixed settings every run shares
    model_cfg, _ = settings_from_dict(trial_settings(paper), source="paper")
    # the paper's sec. 5 values, whatever the space fixes
    assert (model_cfg.lambda_, model_cfg.alpha, model_cfg.tau, model_cfg.w_min, model_cfg.w_max,
            model_cfg.period) == (0.005, 0.2, 0.05, 0.9, 1.0, 30)
    assert model_cfg.method == "faerec" and paper["configuration"] == "paper-default"
    assert "configuration" not in trial_settings(paper)
