"""MO-ASHA: the rung rule on its own, and inside a real local Ray Tune run."""

import os
import pickle
import sys
from types import SimpleNamespace

import pytest
import ray
from ray import tune

from tuning.mo_asha import MultiObjectiveASHA

CONTINUE, STOP = "CONTINUE", "STOP"
OBJECTIVES = [("val/overall/ndcg_20", "max"), ("val/tail/ndcg_20", "max")]

# Scripted trials: (overall, tail) per epoch 1..4. Rungs at epochs 1 and 2 (grace 1,
# reduction 2, max_t 4); trials run one at a time in this order.
SCRIPTS = {
    "steady": [(0.5, 0.5)] * 4,
    "dominated": [(0.1, 0.1)] * 4,               # worse than "steady" on both
    # best on tail, worse on overall; its sum 0.95 is below steady's 1.0, so any weighted
    # mean with equal weights, or ASHA on overall alone, would stop it
    "tail_specialist": [(0.05, 0.9)] * 4,
    "fades": [(0.6, 0.6), (0.1, 0.1), (0.1, 0.1), (0.1, 0.1)],  # leads at rung 1, dominated at rung 2
}


def result(epoch, overall, tail):
    return {"epoch": epoch, "val/overall/ndcg_20": overall, "val/tail/ndcg_20": tail}


def feed(scheduler, name, epochs):
    """Report a scripted trial's epochs until the scheduler stops it; the decisions."""
    trial, decisions = SimpleNamespace(trial_id=name), []
    for epoch, values in enumerate(SCRIPTS[name][:epochs], start=1):
        decisions.append(scheduler.on_trial_result(None, trial, result(epoch, *values)))
        if decisions[-1] == STOP:
            break
    return decisions


def test_rungs_follow_grace_period_and_reduction_factor():
    s = MultiObjectiveASHA(OBJECTIVES, max_t=60, grace_period=5, reduction_factor=3)
    assert s.milestones == [5, 15, 45]
    assert MultiObjectiveASHA(OBJECTIVES, max_t=60, grace_period=20, reduction_factor=3).milestones == [20]


def test_rule_on_scripted_trials():
    s = MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2)
    assert feed(s, "steady", 4) == [CONTINUE, CONTINUE, CONTINUE, STOP]  # first at each rung; budget
    assert feed(s, "dominated", 4) == [STOP]
    assert feed(s, "tail_specialist", 4) == [CONTINUE, CONTINUE, CONTINUE, STOP]
    assert feed(s, "fades", 4) == [CONTINUE, STOP]
    assert s.num_stopped == 2  # dominated and fades; the other two ran their budget


def test_top_fraction_is_kept_by_front_then_crowding():
    # one rung at epoch 1 of reduction 3: of n trials the top ceil(n / 3) go on
    s = MultiObjectiveASHA(OBJECTIVES, max_t=9, grace_period=1, reduction_factor=3)
    decide = lambda tid, o, t: s.on_trial_result(None, SimpleNamespace(trial_id=tid), result(1, o, t))
    assert decide("a", 0.5, 0.5) == CONTINUE          # n=1, keep 1
    assert decide("b", 0.4, 0.4) == STOP              # n=2, keep 1, dominated
    assert decide("c", 0.9, 0.1) == CONTINUE          # n=3, keep 1: front {a, c}, both extremes
    # n=4, keep 2: d trades off with both, so the front {a, c, d} has a in its middle:
    # c and d are the extremes (infinite crowding) and go first; a newcomer pushes a back
    assert decide("d", 0.3, 0.8) == CONTINUE
    assert decide("e", 0.2, 0.2) == STOP              # n=5, keep 2: not on the front
    # n=6, keep 2: f joins the front between c and a, finite crowding, behind c and d
    assert decide("f", 0.7, 0.3) == STOP


def test_missing_objective_is_a_clear_error():
    s = MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2)
    with pytest.raises(ValueError, match="val/tail/ndcg_20"):
        s.on_trial_result(None, SimpleNamespace(trial_id="x"),
                          {"epoch": 1, "val/overall/ndcg_20": 0.1})


@pytest.mark.parametrize("kwargs, message", [
    ({"objectives": []}, "at least one"),
    ({"objectives": [("m", "maximise")]}, "mode must be"),
    ({"objectives": OBJECTIVES, "grace_period": 10, "max_t": 5}, "grace_period"),
    ({"objectives": OBJECTIVES, "reduction_factor": 1}, "reduction_factor"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiObjectiveASHA(**kwargs)


def test_tune_config_metric_must_be_an_objective():
    s = MultiObjectiveASHA(OBJECTIVES)
    assert s.set_search_properties(None, None)
    assert s.set_search_properties("val/tail/ndcg_20", "max")
    assert not s.set_search_properties("val/tail/ndcg_20", "min")
    assert not s.set_search_properties("val/overall/hr_10", "max")


def test_unpickled_scheduler_takes_the_same_decisions(tmp_path):
    """Tuner.restore unpickles the scheduler as built; the state file brings its rungs back."""
    path = tmp_path / "mo_asha.json"
    original = MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2,
                                  state_path=path)
    as_built = pickle.dumps(original)  # what the Tuner saves before any trial runs
    feed(original, "steady", 4)
    feed(original, "tail_specialist", 4)
    feed(original, "fades", 1)  # interrupted after epoch 1
    restored = pickle.loads(as_built)
    assert restored.rungs == original.rungs and restored.num_stopped == original.num_stopped
    for s in (original, restored):
        s.decisions = [feed(s, "dominated", 4),
                       s.on_trial_result(None, SimpleNamespace(trial_id="fades"), result(2, 0.1, 0.1))]
    assert restored.decisions == original.decisions == [[STOP], STOP]
    # save/restore of the TrialScheduler interface: same state, and a mismatch is refused
    original.save(str(tmp_path / "saved.json"))
    other = MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2)
    other.restore(str(tmp_path / "saved.json"))
    assert other.rungs == original.rungs
    with pytest.raises(ValueError, match="milestones"):
        MultiObjectiveASHA(OBJECTIVES, max_t=8, grace_period=1, reduction_factor=2).restore(
            str(tmp_path / "saved.json"))


def test_a_new_search_starts_from_empty_rungs(tmp_path):
    path = tmp_path / "mo_asha.json"
    feed(MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2,
                            state_path=path), "steady", 2)
    fresh = MultiObjectiveASHA(OBJECTIVES, max_t=4, grace_period=1, reduction_factor=2,
                               state_path=path)
    assert feed(fresh, "dominated", 1) == [CONTINUE]  # alone at the rung, not behind "steady"


def scripted_trial(config):
    """Reports its script; with `crash_once` = (name, marker file), that trial's first
    attempt dies before epoch 2."""
    who, marker = config.get("crash_once", (None, None))
    for epoch, (overall, tail) in enumerate(SCRIPTS[config["name"]], start=1):
        if config["name"] == who and epoch == 2 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("the driver's machine went away")
        tune.report(result(epoch, overall, tail))


@pytest.fixture(scope="module")
def local_ray():
    # Ray's workers cannot import this test module: ship the scripted trainable by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def scripted_tuner(tmp_path, names, crash_once=None):
    scheduler = MultiObjectiveASHA(OBJECTIVES, time_attr="epoch", max_t=4, grace_period=1,
                                   reduction_factor=2, state_path=tmp_path / "mo_asha.json")
    space = {"name": tune.grid_search(names)}
    if crash_once:
        space["crash_once"] = crash_once
    return tune.Tuner(scripted_trial, param_space=space,
                      tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                      run_config=tune.RunConfig(name="mo", storage_path=str(tmp_path / "results")))


@pytest.mark.slow
def test_real_tune_run_stops_the_dominated_and_keeps_the_tail_specialist(tmp_path, local_ray):
    results = scripted_tuner(tmp_path, list(SCRIPTS)).fit()
    assert not results.errors
    epochs = {r.config["name"]: r.metrics["epoch"] for r in results}
    assert epochs == {"steady": 4, "dominated": 1, "tail_specialist": 4, "fades": 2}
    name = {r.metrics["trial_id"]: r.config["name"] for r in results}

    # what Tuner.restore would get back: the scheduler pickled with the Tuner, plus the file
    with open(tmp_path / "results" / "mo" / "tuner.pkl", "rb") as f:
        restored = ray.cloudpickle.loads(f.read())["_tune_config"].scheduler
    assert {m: {name[t] for t in r} for m, r in restored.rungs.items()} == {
        1: {"steady", "dominated", "tail_specialist", "fades"}, 2: {"steady", "tail_specialist", "fades"}}
    assert restored.on_trial_result(None, SimpleNamespace(trial_id="late"),
                                    result(1, 0.3, 0.3)) == STOP


@pytest.mark.slow
def test_a_restored_search_takes_the_same_decisions(tmp_path, local_ray):
    """"fades" dies after its epoch 1 (recorded at rung 1); Tuner.restore reruns it from
    scratch. With the rungs restored it is judged at epoch 2 against "steady" and
    "tail_specialist" and stopped, as in the uninterrupted run; a scheduler that forgot
    them would find rung 2 empty and let it run to the budget."""
    names = ["steady", "tail_specialist", "fades"]
    first = scripted_tuner(tmp_path, names, crash_once=("fades", str(tmp_path / "crashed"))).fit()
    assert [r.config["name"] for r in first if r.error] == ["fades"]
    path = str(tmp_path / "results" / "mo")
    resumed = tune.Tuner.restore(path, trainable=scripted_trial, resume_errored=True).fit()
    assert not resumed.errors
    assert {r.config["name"]: r.metrics["epoch"] for r in resumed} == {
        "steady": 4, "tail_specialist": 4, "fades": 2}
