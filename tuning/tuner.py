"""The Tuners, built in one place: Optuna proposes, (MO-)ASHA stops, MLflow records.

`run(space)` prepares the dataset and embeddings once in the driver, puts them in the
object store and runs three stages, each its own Tune experiment and each run tagged with
its stage in MLflow under one parent run:
1. references (`references:`): the plain backbone and FAERec at the paper's defaults,
   same budget and seed; their validation values bound the constraints;
2. the search: Optuna (TPE or NSGA-II, one or several objectives) over Ray Tune, with
   MultiObjectiveASHA stopping weak trials (non-dominated sorting when several);
3. the confirmation (`confirm:`): the search's front (capped) and the references, trained
   again with new seeds, no scheduler; per-user test ranks for the paired tests.
Then the report (tuning.report) in <folder>/report/ and on the parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import pickletools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune import CLIReporter
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from model.config import PROJECT_ROOT, FAERecConfig, TrainConfig
from model.errors import ConfigError
from model.methods import METHODS
from model.train import load_inputs
from model.urls import mask_text
from tuning.cluster import check_cluster, start_ray
from tuning.mo_asha import MultiObjectiveASHA
from tuning.pareto import confirmation_candidates, losses, promotion_order
from tuning.report import SearchRecord, frame_markdown, write_report
from tuning.space import (REFERENCES, SearchSpace, define_by_run, drawn_in_every_trial, make_sampler,
                          methods_drawn, reference_config)
from tuning.stats import paired_tests
from tuning.trainable import RANKS_FILE, best_key, outcome, train_trial
from tuning.tracking import MlflowCallback, sync_search, write_settings

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("test/overall/hr_10", "test/overall/ndcg_10", "test/tail/hr_10",
                   "test/tail/ndcg_10", "test/overall/hr_20")


@dataclass
class SearchOutcome:
    experiment_path: str
    summary: pd.DataFrame            # one row per trial, best validation first
    summary_files: dict[str, Path]   # csv / md
    counts: dict[str, int]           # completed / early-stopped / failed
    parent_run_id: str
    experiment_id: str | None        # MLflow's
    seconds: float
    record: SearchRecord | None = None   # with a confirmation: what the report shows
    report_files: dict[str, Path] = field(default_factory=dict)


def _searched_names(space: SearchSpace) -> list[str]:
    return [p.name for p in space.params if p.kind != "fixed"]


def objective_keys(space: SearchSpace) -> list[tuple[str, str]]:
    """The objectives as the trials report them: (best/val/..., mode)."""
    return [(best_key(metric), mode) for metric, mode in space.search.objectives]


def _outcome(result, max_epochs: int) -> str:
    return "failed" if result.error is not None else outcome(result.metrics or {}, max_epochs)


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id", result.path and Path(result.path).name)


def summarise(results, space: SearchSpace) -> pd.DataFrame:
    """One row per trial: its sampled values, best validation objectives, test metrics;
    best first (one objective: by it; several: Pareto front first, then by crowding)."""
    objectives = objective_keys(space)
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial": _trial_id(r), "outcome": _outcome(r, space.search.max_epochs),
               "epochs": m.get("epoch", 0)}
        row.update({name: (r.config or {}).get(name) for name in _searched_names(space)})
        row.update({key: m.get(key, math.nan) for key, _ in objectives})
        row.update({c: m.get(c, math.nan) for c in SUMMARY_COLUMNS})
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        loss = losses(table[[key for key, _ in objectives]], [mode for _, mode in objectives])
        table = table.iloc[np.argsort(promotion_order(loss), kind="stable")].reset_index(drop=True)
    return table


def local_folder(space: SearchSpace) -> Path:
    """Where the driver writes its own files (summary, tracking.json, dataset stats):
    the experiment folder for local storage, else a folder in the project."""
    storage = space.search.storage_path
    base = Path(storage) if "://" not in storage else PROJECT_ROOT / "results"
    return base / space.name


# The three stages of a search, each its own Tune experiment: references (before), the
# search, the confirmation (after). The search's is the folder itself, as before stages.
STAGE_FOLDERS = {"reference": "references", "search": None, "confirm": "confirm"}


def stage_folder(space: SearchSpace, stage: str) -> Path:
    sub = STAGE_FOLDERS[stage]
    return local_folder(space) / sub if sub else local_folder(space)


def _stage_run_config(space: SearchSpace, stage: str) -> tuple[str, str]:
    """(storage_path, name) of a stage's Tune experiment."""
    sub = STAGE_FOLDERS[stage]
    storage = space.search.storage_path
    return (f"{storage}/{space.name}", sub) if sub else (storage, space.name)


def _experiment_path(space: SearchSpace, stage: str) -> str:
    return "/".join(_stage_run_config(space, stage))


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that gives Optuna each finished trial's constraint values, threshold -
    value (<= 0: feasible; a value the trial never reported counts as 0), before it tells
    the objectives (Ray's OptunaSearch tells those only). Optuna 5's samplers (TPE and
    NSGA-II) read them from the trial (`Trial.set_constraint`, which replaces the
    deprecated `constraints_func`): infeasible trials rank behind every feasible one."""

    def __init__(self, *args, constraints: list[tuple[str, float]], **kwargs):
        super().__init__(*args, **kwargs)
        self.constraints = list(constraints)  # (reported key, threshold)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            for key, threshold in self.constraints:
                value = (result or {}).get(key)
                value = 0.0 if value is None or math.isnan(value) else float(value)
                self._ot_trials[trial_id].set_constraint(key, threshold - value)
        super().on_trial_complete(trial_id, result=result, error=error)


def constraint_thresholds(space: SearchSpace, references: pd.DataFrame | None) -> list[float]:
    """Each constraint's bound in metric units: at_least, times the reference's validation
    value when it names one."""
    thresholds = []
    for c in space.search.constraints:
        if c.of is None:
            thresholds.append(c.at_least)
            continue
        row = references[references["trial"] == c.of] if references is not None else []
        value = row.iloc[0][best_key(c.metric)] if len(row) else math.nan
        if math.isnan(value):
            raise ConfigError(f"{space.label}: search.constraints: the reference {c.of!r} has no "
                              f"validation {c.metric} (did it fail?); no bound to search under")
        thresholds.append(c.at_least * value)
    return thresholds


def make_searcher(space: SearchSpace, thresholds: list[float]) -> OptunaSearch:
    keys = [key for key, _ in objective_keys(space)]
    modes = [mode for _, mode in objective_keys(space)]
    several = len(keys) > 1
    common = dict(space=define_by_run(space), sampler=make_sampler(space),
                  metric=keys if several else keys[0], mode=modes if several else modes[0])
    if not space.search.constraints:
        return OptunaSearch(**common)
    return ConstrainedOptunaSearch(**common, constraints=[
        (best_key(c.metric), threshold) for c, threshold in zip(space.search.constraints, thresholds)])


def make_scheduler(space: SearchSpace):
    s = space.search
    if s.scheduler != "asha":
        return FIFOScheduler()
    # Epochs are the time unit; a trial is judged only after grace_period epochs. Built for
    # a new search only: its constructor empties the state file, which a restored one (from
    # tuner.pkl) reloads instead, so a resumed search keeps its rungs (Tune saves none).
    return MultiObjectiveASHA(objective_keys(space), time_attr="epoch", max_t=s.max_epochs,
                              grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                              state_path=local_folder(space) / ASHA_STATE)


ASHA_STATE = "asha_state.json"


# What Tune saves together under one session string, and how each is written (Ray 2.60's
# search_gen_state-*.json holds a pickle despite its name).
STATE_FILES = {"experiment_state-{}.json": "json", "search_gen_state-{}.json": "pickle",
               "searcher-state-{}.pkl": "pickle", "callback-states-{}.pkl": "pickle"}


def _complete(path: Path, kind: str) -> bool:
    """Whether a state file reads to its end (pickles walked opcode by opcode: nothing loaded)."""
    try:
        if kind == "json":
            json.loads(path.read_text())
        else:
            with path.open("rb") as f:
                for _ in pickletools.genops(f):
                    pass
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def set_aside_torn_state(experiment: Path) -> None:
    """A kill while Tune copies its state into the experiment folder can leave the newest save
    torn (seen in the group-kill test: an empty searcher-state-*.pkl, on which
    `Tuner.restore` fails with EOFError). Rename such a save to torn-*: Tune then restores the
    save before it, and the trials that started since are marked lost by the sync."""
    for state in sorted(experiment.glob("experiment_state-*.json"), reverse=True):
        session = state.name[len("experiment_state-"):-len(".json")]
        files = {experiment / name.format(session): kind for name, kind in STATE_FILES.items()}
        files = {f: kind for f, kind in files.items() if f.exists()}
        if all(_complete(f, kind) for f, kind in files.items()):
            return
        for f in files:
            f.rename(f.with_name(f"torn-{f.name}"))
        logger.warning("--resume: Tune's state saved at %s is incomplete (killed while it was "
                       "written); resuming from the save before it", session)


def can_resume(space: SearchSpace, stage: str = "search") -> bool:
    """Whether Tune saved a state of this stage to continue from (a crash can come before
    its first)."""
    path = _experiment_path(space, stage)
    return tune.Tuner.can_restore(path) and (
        "://" in path or any(Path(path).glob("experiment_state-*.json")))


def _trainable(space: SearchSpace, inputs, save_ranks: bool = False):
    s = space.search
    return tune.with_resources(
        tune.with_parameters(train_trial, inputs=inputs, checkpoint_every=s.checkpoint_every,
                             save_ranks=save_ranks),
        {"cpu": s.cpu, "gpu": s.gpu})


def _run_config(space: SearchSpace, stage: str, callbacks, reporter) -> tune.RunConfig:
    storage, name = _stage_run_config(space, stage)
    return tune.RunConfig(
        name=name, storage_path=storage, callbacks=list(callbacks),
        failure_config=tune.FailureConfig(max_failures=space.search.max_failures),
        # num_to_keep >= 2: with 1, Ray floods the log with snapshot warnings.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        progress_reporter=reporter, verbose=1)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(space: SearchSpace, inputs, resume: bool, callbacks=(),
                thresholds: list[float] = ()) -> tune.Tuner:
    """The search's Tuner, new or restored (a restored one keeps its first callbacks)."""
    s = space.search
    trainable = _trainable(space, inputs)
    if resume:
        return tune.Tuner.restore(_experiment_path(space, "search"), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    keys = objective_keys(space)
    columns = {"epoch": "epoch"}
    columns.update({key: key.removeprefix("best/val/") for key, _ in keys})  # one per objective
    # Ray's "current best trial" line fails on a param its trial lacks: conditional ones left out
    reporter = CLIReporter(parameter_columns=[n for n in _searched_names(space)
                                              if n in drawn_in_every_trial(space)],
                           metric_columns=columns,
                           max_report_frequency=30, sort_by_metric=len(keys) == 1)
    # Tune's own metric is one metric: with several objectives the searcher and MO-ASHA
    # carry them, and the summary ranks the trials by Pareto front.
    metric, mode = keys[0] if len(keys) == 1 else (None, None)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=metric, mode=mode,
                                    search_alg=make_searcher(space, list(thresholds)),
                                    scheduler=make_scheduler(space), num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=_run_config(space, "search", callbacks, reporter))


class GivenConfigs(Searcher):
    """Suggests the given configurations, each once, in order (Tune's grid and variant
    generators would nest them under a key or need every key in every configuration)."""

    def __init__(self, configs: list[dict]):
        super().__init__()
        self.configs, self.given = list(configs), 0

    def suggest(self, trial_id: str):
        if self.given == len(self.configs):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.configs[self.given - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        pass

    def save(self, checkpoint_path: str):
        # a pickle, as Tune's own searchers write this file (set_aside_torn_state reads it so)
        Path(checkpoint_path).write_bytes(pickle.dumps({"configs": self.configs, "given": self.given}))

    def restore(self, checkpoint_path: str):
        self.__dict__.update(pickle.loads(Path(checkpoint_path).read_bytes()))


def build_fixed_tuner(space: SearchSpace, inputs, stage: str, configs: list[dict],
                      resume: bool, callbacks=()) -> tune.Tuner:
    """A stage that trains given configurations (references, confirmation): each to its
    budget, no early stopping by a scheduler; the confirmation keeps per-user test ranks."""
    trainable = _trainable(space, inputs, save_ranks=stage == "confirm")
    if resume:
        return tune.Tuner.restore(_experiment_path(space, stage), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    reporter = CLIReporter(parameter_columns=["configuration", "seed"],
                           metric_columns={"epoch": "epoch", **{
                               key: key.removeprefix("best/val/") for key, _ in objective_keys(space)}},
                           max_report_frequency=30)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=GivenConfigs(configs), scheduler=FIFOScheduler(),
            num_samples=len(configs), max_concurrent_trials=space.search.max_concurrent,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname),
        run_config=_run_config(space, stage, callbacks, reporter))


def confirmation_seeds(space: SearchSpace) -> list[int]:
    """New seeds: the seed every trial of the search (and the references) trained with, + 1..n."""
    first = space.fixed.get("seed", TrainConfig.__dataclass_fields__["seed"].default) + 1
    return [first + i for i in range(space.confirm.seeds)]


def confirmed_trials(space: SearchSpace, table: pd.DataFrame) -> list[str]:
    """The search's front capped at confirm.top (one objective: the top); with confirm.per,
    that of each value of the param (e.g. the best trial of every method)."""
    keys = objective_keys(space)
    cols = [key for key, _ in keys]
    finished = table[np.isfinite(table[cols].to_numpy(float)).all(1)]
    per = list(space.confirm.per)
    groups = [g for _, g in finished.groupby(per, sort=False)] if per else [finished]
    return [trial for g in groups for trial in g.iloc[confirmation_candidates(
        losses(g[cols], [mode for _, mode in keys]), space.confirm.top)]["trial"]]


def confirmation_configs(space: SearchSpace, results, table: pd.DataFrame) -> list[dict]:
    """The trials `confirmed_trials` picks and the references, each with every confirmation seed."""
    chosen = confirmed_trials(space, table)
    config_of = {_trial_id(r): r.config for r in results}
    return [{**config, "seed": seed} for seed in confirmation_seeds(space) for config in [
        *(reference_config(space, name) for name in REFERENCES),
        *({**config_of[trial], "configuration": trial} for trial in chosen)]]


def reference_rows(results, space: SearchSpace) -> pd.DataFrame:
    """The references as rows of the trials table (trial = the reference's name)."""
    rows = []
    for r in results:
        m, config = r.metrics or {}, r.config or {}
        rows.append({"trial": config["configuration"], "stage": "reference",
                     "outcome": _outcome(r, space.search.max_epochs), "epochs": m.get("epoch", 0),
                     **{name: config.get(name) for name in _searched_names(space)},
                     **{key: m.get(key, math.nan) for key, _ in objective_keys(space)},
                     **{c: m.get(c, math.nan) for c in SUMMARY_COLUMNS}})
    return pd.DataFrame(rows)


def per_user_results(results) -> pd.DataFrame:
    """configuration, seed, user, tail, ndcg_10, hr_10: one row per test user of every
    confirmation run that saved its ranks (tuning.stats.paired_tests' input)."""
    frames = []
    for r in results:
        if r.checkpoint is None:
            continue
        with r.checkpoint.as_directory() as folder:
            path = Path(folder) / RANKS_FILE
            if not path.exists():
                continue
            from model.metrics import UserRanks  # issue 8, model side
            ranks = UserRanks.load(path)
        per_user = ranks.metrics(10)
        frames.append(pd.DataFrame({
            "configuration": r.config["configuration"], "seed": r.config["seed"],
            "user": ranks.users, "tail": ranks.tail,
            "ndcg_10": per_user["ndcg_10"], "hr_10": per_user["hr_10"]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _confirmed_tables(results) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run: configuration, seed, test metrics of its best state;
    one row per (run, epoch): its validation metrics)."""
    runs, curves = [], []
    for r in results:
        if r.error is not None:
            continue
        who = {"configuration": r.config["configuration"], "seed": r.config["seed"]}
        runs.append({**who, **{k: v for k, v in (r.metrics or {}).items() if k.startswith("test/")}})
        history = r.metrics_dataframe
        if history is not None and "epoch" in history:
            val = history[["epoch", *[c for c in history if c.startswith("val/")]]]
            curves.append(val.drop_duplicates("epoch", keep="last").assign(**who))
    return pd.DataFrame(runs), (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """The searched ranges, so that importance evaluators see the real ones."""
    out = {}
    for p in space.params:
        if p.kind in ("uniform", "loguniform"):
            out[p.name] = optuna.distributions.FloatDistribution(p.low, p.high,
                                                                 log=p.kind == "loguniform")
        elif p.kind == "int":
            out[p.name] = optuna.distributions.IntDistribution(p.low, p.high, step=p.step)
        elif p.kind in ("categorical", "grid"):
            out[p.name] = optuna.distributions.CategoricalDistribution(list(p.choices))
    return out


def comparison_bases(space: SearchSpace, table: pd.DataFrame, configs: list[dict]) -> dict[str, str]:
    """Given the confirmation runs' configs: each configuration that is not a base -> the one
    it is tested against. That is the search's best confirmed `method: base` trial with the
    same values of confirm.per's other params (a base tuned with the same budget as the rest:
    `methods.yaml` confirms every method's best, `backbones.yaml` every backbone's base and
    FAERec), else the `base` reference at its default settings."""
    others = [p for p in space.confirm.per if p != "method"]
    group = {c["configuration"]: tuple(c.get(p) for p in others) for c in configs}
    tuned = {c["configuration"] for c in configs
             if c.get("method") == "base" and c["configuration"] not in REFERENCES}
    base_of_group = {}
    for trial in table["trial"]:  # best first: the first tuned base of a group is its base
        if trial in tuned:
            base_of_group.setdefault(group[trial], trial)
    bases = {configuration: base_of_group.get(key, "base") for configuration, key in group.items()}
    return {configuration: base for configuration, base in bases.items() if configuration != base}


def build_record(space: SearchSpace, table: pd.DataFrame, references: pd.DataFrame | None,
                 confirmed, facts: dict) -> SearchRecord:
    runs, curves = _confirmed_tables(confirmed)
    # the references, then the front in the summary's order, whatever order Tune lists runs in
    rank = {name: i for i, name in enumerate([*REFERENCES, *table["trial"]])}
    runs = runs.sort_values(["configuration", "seed"], key=lambda c: c.map(rank)
                            if c.name == "configuration" else c, ignore_index=True)
    bases = comparison_bases(space, table, [r.config for r in confirmed])
    per_user = per_user_results(confirmed)
    tests = paired_tests(per_user, bases) if len(per_user) else pd.DataFrame()
    trials = pd.concat([table.assign(stage="search"),
                        *([references] if references is not None else [])], ignore_index=True)
    per = list(space.confirm.per)
    labels = {row["trial"]: " ".join(str(row[p]) for p in [*per, "trial"])
              for _, row in table.iterrows()} if per else {}
    return SearchRecord(name=space.name, objectives=objective_keys(space),
                        params=_searched_names(space), trials=trials, confirmed=runs,
                        tests=tests, curves=curves, bases=bases, facts=facts,
                        distributions=distributions(space), labels=labels)


def _facts(space: SearchSpace, inputs, table: pd.DataFrame, seconds: dict[str, float]) -> dict:
    s = space.search
    stopped = int((table["outcome"] == "early-stopped").sum()) if len(table) else 0
    return {
        "space": space.label, "dataset": inputs.data.name,
        "budget": f"{s.num_samples} trials, up to {s.max_epochs} epochs each, patience "
                  f"{space.fixed.get('patience', TrainConfig.__dataclass_fields__['patience'].default)}",
        "sampler": f"{s.sampler} (seed {s.seed})",
        "scheduler": (f"{'MO-ASHA' if len(s.objectives) > 1 else 'ASHA'}, grace period "
                      f"{s.grace_period}, reduction factor {s.reduction_factor:g}: {stopped} "
                      "trials stopped early" if s.scheduler == "asha" else "none"),
        "constraints": ", ".join(c.describe() for c in s.constraints) or "none",
        "training seed of the search and references": space.fixed.get(
            "seed", TrainConfig.__dataclass_fields__["seed"].default),
        "confirmation seeds": confirmation_seeds(space) if space.confirm else "none",
        "wall time": ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()),
    }


def _fit_fixed(space: SearchSpace, inputs, stage: str, configs: list[dict], resume: bool):
    """Run (or, resumed, finish or read back) a references or confirmation stage."""
    folder = stage_folder(space, stage)
    if resume and "://" not in space.search.storage_path:
        set_aside_torn_state(folder)
    tuner = build_fixed_tuner(space, inputs, stage, configs, resume and can_resume(space, stage),
                              [MlflowCallback(folder, stage)])
    results = tuner.fit()
    if results.num_terminated + results.num_errors < len(configs):
        raise KeyboardInterrupt  # Tune caught a Ctrl-C and saved its state
    return results


def _need_llm(space: SearchSpace) -> bool:
    # the references include FAERec; otherwise the methods the search can draw decide
    return (space.references or space.confirm is not None
            or any(METHODS[m].needs_llm_table(FAERecConfig(method=m)) for m in methods_drawn(space)))


def run(space: SearchSpace, resume: bool = False, address: str | None = None) -> SearchOutcome:
    started = time.perf_counter()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter shows our chosen columns
    # Short epochs checkpoint often; Ray's "snapshotting may become a bottleneck" notice
    # about that is noise at this scale.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    s = space.search
    if not ray.is_initialized():
        start_ray(address)
    check_cluster(space)  # before any file, MLflow run or trial: one error if not multi-node-safe
    # a dataset no trial could use is one message before any results folder or MLflow run
    inputs = load_inputs(space.dataset, space.embedding, need_llm=_need_llm(space))
    folder = local_folder(space)
    folder.mkdir(parents=True, exist_ok=True)
    stats_file = folder / "dataset_stats.json"
    stats_file.write_text(json.dumps(inputs.data.stats(), indent=2, default=str))

    earlier = folder / "tracking.json"
    search_id = (json.loads(earlier.read_text())["search_id"] if resume and earlier.exists()
                 else uuid.uuid4().hex)  # a new search of an old name gets a new parent run
    if resume and "://" not in s.storage_path:
        set_aside_torn_state(Path(s.storage_path) / space.name)
    resume_search = resume and can_resume(space)
    if resume and not resume_search:
        if not earlier.exists():
            raise ConfigError(f"--resume: no search named {space.name!r} under "
                              f"{s.storage_path}")
        logger.warning("--resume: the search %r stopped before Tune saved any state of its "
                       "search stage; starting that stage again", space.name)
    # The folder is the record of truth; MLflow is brought up to date from it. The space
    # goes to MLflow too: a copy with credentials in a URI masked.
    (folder / "search_space.yaml").write_text(
        mask_text(Path(space.source).read_text(encoding="utf-8")))
    common = dict(tracking_uri=s.tracking_uri, experiment=space.name, search=space.name,
                  search_id=search_id, max_epochs=s.max_epochs)
    write_settings(
        folder, **common, stage="search", outcome="running", best={},
        tags={"dataset": inputs.data.name},
        params={"num_samples": s.num_samples, "max_epochs": s.max_epochs,
                "objectives": ", ".join(f"{mode} {m}" for m, mode in s.objectives),
                "sampler": s.sampler, "scheduler": s.scheduler, "grace_period": s.grace_period,
                "reduction_factor": s.reduction_factor, "cpu_per_trial": s.cpu,
                "gpu_per_trial": s.gpu, "max_concurrent": s.max_concurrent, "seed": s.seed,
                "constraints": ", ".join(c.describe() for c in s.constraints) or "none",
                "references": space.references,
                "confirm": (f"top {space.confirm.top}, {space.confirm.seeds} seeds"
                            if space.confirm else "none"),
                "dataset": inputs.data.name, "search_space": space.label})
    stages = [stage for stage, on in (("reference", space.references),
                                      ("confirm", space.confirm is not None)) if on]
    for stage in stages:  # each stage's runs under the same parent, tagged with the stage
        stage_folder(space, stage).mkdir(parents=True, exist_ok=True)
        write_settings(stage_folder(space, stage), **common, stage=stage)
    # fails early on a wrong URI; ends the runs a crash left RUNNING
    replica = sync_search(folder, starting=True)

    best, files, result, seconds = {}, {}, "failed", {}
    record, report_files, table, references = None, {}, pd.DataFrame(), None
    experiment_path = _experiment_path(space, "search")
    try:
        if space.references:
            tic = time.perf_counter()
            configs = [reference_config(space, name) for name in REFERENCES]
            references = reference_rows(_fit_fixed(space, inputs, "reference", configs, resume),
                                        space)
            seconds["references"] = time.perf_counter() - tic
        tic = time.perf_counter()
        tuner = build_tuner(space, inputs, resume_search, [MlflowCallback(folder)],
                            constraint_thresholds(space, references))
        results = tuner.fit()
        if results.num_terminated + results.num_errors < s.num_samples:
            # Tune catches the first Ctrl-C itself: it stops the trials, saves its state and
            # returns normally; a search that ran fewer trials to the end was interrupted.
            raise KeyboardInterrupt
        seconds["search"] = time.perf_counter() - tic
        experiment_path = results.experiment_path
        table = summarise(results, space)
        files = {"csv": folder / "summary.csv", "md": folder / "summary.md"}
        table.to_csv(files["csv"], index=False)
        files["md"].write_text(frame_markdown(table) + "\n")
        if len(table):
            first = next(r for r in results if _trial_id(r) == table.iloc[0]["trial"])
            best = {k: v for k, v in (first.metrics or {}).items()
                    if isinstance(v, (int, float)) and k.startswith(("best/", "test/"))}
        if space.confirm is not None and len(table):
            tic = time.perf_counter()
            confirmed = _fit_fixed(space, inputs, "confirm",
                                   confirmation_configs(space, results, table), resume)
            seconds["confirmation"] = time.perf_counter() - tic
            record = build_record(space, table, references, confirmed,
                                  _facts(space, inputs, table, seconds))
            report_files = write_report(record, folder / "report")
        result = "completed"
    except KeyboardInterrupt:
        result = "interrupted"
        raise
    finally:
        write_settings(folder, outcome=result, best=best)
        try:  # waits (as long as MLflow's client retries) for a store that was unreachable
            sync_search(folder, wait_s=300)  # the search's folder last: it ends the parent run
        except Exception as exc:  # noqa: BLE001 - the folder keeps everything
            logger.warning("MLflow not updated (%s); send the results later with: "
                           "python -m tuning.tracking sync %s", exc, folder)
    counts = table["outcome"].value_counts().to_dict() if len(table) else {}
    return SearchOutcome(experiment_path, table, files, counts, replica.parent_id,
                         replica.experiment_id, time.perf_counter() - started, record,
                         report_files)
