"""The search space: one YAML file, validated once, turned into an Optuna define-by-run function.

    space = load_space("search_spaces/faerec.yaml", overrides={"num_samples": 4})
    print(plan(space))
    OptunaSearch(space=define_by_run(space), sampler=make_sampler(space),
                 metric=..., mode=space.search.mode)

A file has six sections: `name`, `dataset`, `embedding`, `fixed` (settings every trial
shares), `search` (objectives, budget, scheduler, resources, where results go) and `params`
(the searched settings), and two optional ones: `references` (train the plain backbone and
FAERec at the paper's defaults before the search; default true) and `confirm` (train the
best configurations and the references again with new seeds after it). Any mistake is ONE ConfigError raised before Ray starts, naming the
file and the YAML path: `search_spaces/x.yaml: params.tau.low: ...`.

Three things go beyond "draw each param from its range":
- w_max > w_min (the curriculum's bounds, eq. 11). A w_max range that depends on the drawn
  w_min would change the distribution from trial to trial, and multivariate TPE then falls
  back to independent sampling. So when the two ranges overlap, the trial draws a static
  `w_gap` in [GAP_MIN, 1] and w_max = lo + w_gap * (high(w_max) - lo), lo = max(w_min,
  low(w_max)) (on the log scale for a loguniform w_max).
- `ablation`: a Table 3 variant, expanded into the switches it turns off (ABLATIONS).
- params of kind `grid` are not sampled: trial n takes grid combination n mod the grid size,
  so every combination (e.g. every ablation variant) runs equally often.
- conditional params (`when: {method: faerec}`, and a method's own `rlmrec_con.weight`)
  are drawn only in the trials they apply to; see the last section.
A trial's config therefore holds two keys that are not settings (`w_gap`, `ablation`):
`trial_settings(config)` drops them.

Relative paths (`storage_path`, a `sqlite:///` tracking URI, also from overrides) are taken
relative to the project root, so results land in one place wherever the command runs.
Dataset and embedding paths are model.data's and model.text's business.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna

from model.config import (PROJECT_ROOT, SETTING_NAMES, DatasetConfig, EmbeddingConfig, Invalid,
                          check_fields, dataset_config_from_dict, from_mapping, resolve_dataset, rule,
                          settings_from_dict, unknown_key, where)
from model.config import METHOD_SETTINGS, setting_names, settings_to_dict  # methods' own settings
from model.errors import ConfigError
from model.urls import mask_text, mask_url
from model.yamlfile import load_yaml
DEFAULT_STORAGE_PATH = "results"
DEFAULT_TRACKING_URI = "sqlite:///mlflow/mlflow.db"

# What the trainable reports on validation. Test metrics never steer the search.
SEARCH_METRICS = tuple(f"val/{group}/{metric}_{k}" for group in ("overall", "tail", "head")
                       for metric in ("hr", "ndcg") for k in (5, 10, 20))

PARAM_KINDS = ("uniform", "loguniform", "int", "categorical", "grid", "fixed")
SAMPLERS = ("tpe", "nsgaii")

# The references every search is compared with (`references:`, `confirm:`): the backbone
# alone, and FAERec at the paper's defaults (lambda, alpha, tau, w_min, w_max, T of sec. 5).
PAPER_DEFAULTS = {"method": "faerec", "lambda": 0.005, "alpha": 0.2, "tau": 0.05,
                  "w_min": 0.9, "w_max": 1.0, "period": 30}
REFERENCES = {"base": {"method": "base"}, "paper-default": PAPER_DEFAULTS}

# Settings the `search` section owns, so no number can be given twice.
RUN_SETTINGS = {"epochs": "search.max_epochs", "eval_every": "search.eval_every",
                "select_metric": "search.metric", "num_threads": "search.resources.cpu",
                # each trial trains on the device Ray assigns it
                "device": "search.resources.gpu"}

# Paper Table 3: each variant and the switches it turns off.
ABLATIONS: dict[str, dict[str, object]] = {
    "full": {},
    "no_agf": {"gating": False},       # w/o AGF: f = (e_id + e_llm) / 2 instead of the gate
    "no_ila": {"ila": False},          # w/o ILA: no InfoNCE; FLA keeps 1 - w1 <= 1 - w_min (0.1 of alpha)
    "no_fla": {"fla": False},          # w/o FLA: no feature-level alignment
    "no_cls": {"curriculum": False},   # w/o CLS: w1 fixed at (w_max + w_min) / 2
    "no_pg": {"pop_groups": False},    # w/o PG: one popularity group in FLA
    "base": {"method": "base"},        # the backbone alone
}

GAP_MIN = 1e-3  # w_gap's floor: keeps w_max strictly above w_min
NON_SETTING_KEYS = ("w_gap", "ablation", "configuration")  # configuration: a reference's or
                                                          # confirmed trial's name

_OVERRIDES = {"num_samples": ("search", "num_samples"), "max_epochs": ("search", "max_epochs"),
              "tracking_uri": ("search", "tracking_uri"),
              "storage_path": ("search", "storage_path"),
              "dataset": ("dataset",), "name": ("name",)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a folder and an MLflow experiment name


@dataclass(frozen=True)
class ParamSpec:
    """One entry of `params:`; which fields are used depends on `kind`."""
    name: str
    kind: str                          # one of PARAM_KINDS
    low: float | None = None           # uniform, loguniform, int
    high: float | None = None
    step: int = 1                      # int
    choices: tuple[Any, ...] = ()      # categorical, grid
    value: Any = None                  # fixed
    when: tuple = ()                   # ((setting, (value, ...)), ...): drawn only in those trials

    def extremes(self) -> tuple[Any, ...]:
        """The values that bound what this param can take (checked against the settings)."""
        if self.kind in ("uniform", "loguniform", "int"):
            return self.low, self.high
        return (self.value,) if self.kind == "fixed" else self.choices


@dataclass(frozen=True)
class Constraint:
    """A trial is feasible when its best `metric` >= at_least (x the reference `of`'s value)."""
    metric: str                 # one of SEARCH_METRICS
    at_least: float
    of: str | None = None       # a REFERENCES name, or None: at_least is the value itself

    def describe(self) -> str:
        return f"{self.metric} >= {self.at_least:g}" + (f" x {self.of}'s" if self.of else "")


@dataclass(frozen=True)
class SearchSettings:
    objectives: tuple[tuple[str, str], ...]  # (validation metric, mode), one or more
    sampler: str                # "tpe" | "nsgaii"
    constraints: tuple[Constraint, ...]
    num_samples: int            # trials in total
    max_concurrent: int         # trials running at once
    seed: int                   # TPE sampler seed
    max_epochs: int             # epoch budget per trial
    scheduler: str              # "asha" | "none"
    grace_period: int           # asha: epochs before a trial may be stopped
    reduction_factor: float     # asha: about 1/reduction_factor of trials go on at each rung
    cpu: float                  # per trial
    gpu: float                  # per trial; a fraction shares one GPU between trials
    max_failures: int           # retries of a failed trial
    storage_path: str           # absolute: Ray Tune results and checkpoints
    tracking_uri: str           # MLflow store or server; sqlite paths made absolute
    checkpoint_every: int       # epochs
    eval_every: int             # epochs

    @property
    def metric(self) -> str:
        """The first objective: also the metric whose best epoch a trial keeps (select_metric)."""
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]


@dataclass(frozen=True)
class ConfirmSettings:
    top: int                    # configurations of the search confirmed (the front, capped)
    seeds: int                  # new seeds per configuration
    per: tuple[str, ...] = ()   # grid/categorical params: the front of each combination of values


@dataclass(frozen=True)
class SearchSpace:
    name: str
    dataset: DatasetConfig
    embedding: EmbeddingConfig
    fixed: dict[str, Any]              # settings shared by every trial (external names)
    search: SearchSettings
    params: tuple[ParamSpec, ...]
    source: str                        # the YAML file
    overrides: dict[str, Any]          # command-line values that replaced the file's
    references: bool = True            # train REFERENCES before the search
    confirm: ConfirmSettings | None = None  # None: no confirmation (and no report)

    @property
    def label(self) -> str:
        """How messages name this space: the file, and any command-line values applied."""
        return _label(self.source, self.overrides)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


# ------------------------------------------------------------------------- reading YAML

# What the YAML file may hold, section by section (model.config's one check reads each:
# unknown keys, types, bounds; the rules that span fields follow in _parse_*).

@dataclass(frozen=True)
class SpaceFile:
    name: str                          # a folder and an MLflow experiment name
    dataset: Any                       # a built-in name, a dataset YAML, or dataset fields
    embedding: dict | None = None
    fixed: dict | None = None
    search: dict | None = None         # read as SearchSection
    params: dict | None = None         # name -> one of the *Param classes below
    references: bool = True            # REFERENCES trained before the search
    confirm: Any = None                # read as ConfirmSection; false: no confirmation

    def __post_init__(self):
        check_fields(self)
        if not _NAME.fullmatch(self.name):
            raise Invalid("name", f"use letters, digits, '_', '.', '-' (a folder name), got {self.name!r}")


@dataclass(frozen=True)
class SearchSection:
    num_samples: int = rule(ge=1)
    max_epochs: int = rule(ge=1)
    metric: str | None = None          # one objective (default val/overall/ndcg_20)...
    mode: str = "max"
    objectives: list | None = None     # ...or several: [{metric, mode}, ...], read as ObjectiveSection
    sampler: str = rule("tpe", choices=SAMPLERS)
    constraints: list | None = None    # [{metric, at_least, of}, ...], read as ConstraintSection
    max_concurrent: int = rule(1, ge=1)
    seed: int = 0
    scheduler: dict | None = None      # read as SchedulerSection
    resources: dict | None = None      # read as ResourcesSection
    max_failures: int = rule(1, ge=0)
    storage_path: str = rule(DEFAULT_STORAGE_PATH, nonempty=True)
    tracking_uri: str = rule(DEFAULT_TRACKING_URI, nonempty=True)
    checkpoint_every: int = rule(1, ge=1)
    eval_every: int = rule(1, ge=1)

    def __post_init__(self):
        check_fields(self)
        if self.metric is not None and self.objectives is not None:
            raise Invalid("objectives", "give either search.metric or search.objectives, "
                                        f"not both (metric is {self.metric!r})")
        if self.metric is not None:
            _check_metric("metric", self.metric)
        if self.mode != "max":
            raise Invalid("mode", f"must be max (every reported metric is higher-is-better), "
                                  f"got {self.mode!r}")
        for key in ("objectives", "constraints"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, list) or not value):
                raise Invalid(key, f"expected a non-empty list of mappings, got {value!r}")


def _check_metric(key: str, metric: Any) -> None:
    if metric not in SEARCH_METRICS:
        raise Invalid(key, f"{metric!r} is not a validation metric the trainable reports; "
                           "use val/{overall|tail|head}/{hr|ndcg}_{5|10|20}")


@dataclass(frozen=True)
class ObjectiveSection:
    metric: str
    mode: str = "max"

    def __post_init__(self):
        check_fields(self)
        _check_metric("metric", self.metric)
        if self.mode != "max":
            raise Invalid("mode", f"must be max (every reported metric is higher-is-better), "
                                  f"got {self.mode!r}")


@dataclass(frozen=True)
class ConstraintSection:
    metric: str
    at_least: float = rule(gt=0)
    of: str | None = None              # a REFERENCES name

    def __post_init__(self):
        check_fields(self)
        _check_metric("metric", self.metric)
        if self.of is not None and self.of not in REFERENCES:
            raise Invalid("of", f"must be one of {', '.join(REFERENCES)} (or left out: "
                                f"at_least is then the value itself), got {self.of!r}")


@dataclass(frozen=True)
class ConfirmSection:
    top: int = rule(3, ge=1)           # the search's front capped at top (one objective: the top)
    seeds: int = rule(3, ge=1)         # new seeds per configuration
    per: Any = None                    # a grid/categorical param (e.g. method) or a list of
                                       # them: the top of each value (combination)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class SchedulerSection:
    # asha: successive halving over the objectives (MO-ASHA, tuning.mo_asha); mo_asha: the same
    type: str = rule("none", choices=("asha", "mo_asha", "none"))
    grace_period: int | None = rule(None, ge=1)  # required with asha
    reduction_factor: float = rule(3.0, gt=1)

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class ResourcesSection:
    cpu: float = rule(1.0, gt=0)
    gpu: float = rule(0.0, ge=0)

    def __post_init__(self):
        check_fields(self)
        if self.gpu > 1 and not self.gpu.is_integer():
            raise Invalid("gpu", f"must be a fraction in [0, 1] or a whole number, got {self.gpu}")


@dataclass(frozen=True)
class RangeParam:                      # uniform, loguniform
    type: str
    low: float
    high: float

    def __post_init__(self):
        check_fields(self)
        if self.type == "loguniform" and self.low <= 0:
            raise Invalid("low", f"a log range must be > 0, got {self.low:g}")
        if self.low >= self.high:
            raise Invalid("low", f"must be below high ({self.high}), got {self.low}")


@dataclass(frozen=True)
class IntParam:
    type: str
    low: int
    high: int
    step: int = rule(1, ge=1)

    def __post_init__(self):
        check_fields(self)
        if self.low >= self.high:
            raise Invalid("low", f"must be below high ({self.high}), got {self.low}")
        if (self.high - self.low) % self.step:
            raise Invalid("high", f"high - low ({self.high - self.low}) must be a multiple of "
                                  f"step ({self.step})")


@dataclass(frozen=True)
class ChoicesParam:                    # categorical, grid
    type: str
    choices: list

    def __post_init__(self):
        if not isinstance(self.choices, list) or not self.choices:
            raise Invalid("choices", f"expected a non-empty list, got {self.choices!r}")
        if any(not isinstance(c, (str, int, float, bool)) for c in self.choices):
            raise Invalid("choices", "each choice must be a string, number or boolean, got "
                                     f"{self.choices!r}")
        if len(set(map(repr, self.choices))) < len(self.choices):
            raise Invalid("choices", f"has duplicates: {self.choices!r}")


@dataclass(frozen=True)
class FixedParam:
    type: str
    value: Any


PARAM_CLASSES = {"uniform": RangeParam, "loguniform": RangeParam, "int": IntParam,
                 "categorical": ChoicesParam, "grid": ChoicesParam, "fixed": FixedParam}


def _read_yaml(path: Path) -> dict:
    raw = load_yaml(path, "search space")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections "
                          f"{', '.join(SpaceFile.__dataclass_fields__)}, "
                          f"got {type(raw).__name__}")
    return raw


def _label(source: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return source
    # masked: the label reaches the plan, logs and MLflow params (tracking_uri=postgresql://u:pw@...)
    return mask_text(f"{source} (with {', '.join(f'{k}={v!r}' for k, v in overrides.items())})")


def _apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Command-line values replace the file's."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            raise ConfigError(f"unknown override {key!r}; allowed: {', '.join(_OVERRIDES)}")
        *parents, leaf = _OVERRIDES[key]
        node = raw
        for parent in parents:
            if node.get(parent) is None:
                node[parent] = {}
            node = node[parent]
            if not isinstance(node, dict):  # the section check reports the bad section
                break
        else:
            node[leaf] = value
    return raw


def _project_path(path: str) -> str:
    return str((PROJECT_ROOT / Path(path).expanduser()).resolve())


def _absolute_storage(path: str) -> str:
    return path if "://" in path else _project_path(path)  # s3://... goes to Ray unchanged


def _absolute_uri(uri: str) -> str:
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + _project_path(uri[len(prefix):])
    return uri


# ------------------------------------------------------------------------- validation

def _check_setting_name(name: Any, source: str, path: str) -> None:
    if name in RUN_SETTINGS:
        raise ConfigError(f"{where(source, path, str(name))}: set by {RUN_SETTINGS[name]}, not here")
    if name not in setting_names():
        raise unknown_key(name, setting_names(), source, path, noun="setting")


def _parse_dataset(value: Any, source: str, base_dir: Path) -> DatasetConfig:
    """Relative paths in a space file are relative to that file's folder."""
    if isinstance(value, str):  # a built-in name or a dataset YAML
        if value.endswith((".yaml", ".yml")) and not Path(value).is_absolute():
            value = str(base_dir / value)
        try:
            return resolve_dataset(value)
        except ConfigError as e:
            raise ConfigError(f"{source}: dataset: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: dataset: expected a built-in name, a dataset YAML path "
                          f"or a mapping of dataset fields, got {value!r}")
    return dataset_config_from_dict(value, source=source, base_dir=base_dir)


def _parse_embedding(value: dict, source: str, base_dir: Path) -> EmbeddingConfig:
    paths = {k: str(base_dir / v) for k, v in value.items()
             if k in ("path", "model_path") and isinstance(v, str) and not Path(v).is_absolute()}
    return from_mapping(EmbeddingConfig, {**value, **paths}, source, "embedding")


def _parse_objectives(s: SearchSection, source: str) -> tuple[tuple[str, str], ...]:
    if s.objectives is None:
        return ((s.metric or "val/overall/ndcg_20", s.mode),)
    objectives = []
    for i, raw in enumerate(s.objectives):
        o = from_mapping(ObjectiveSection, raw, source, f"search.objectives[{i}]")
        if o.metric in dict(objectives):
            raise ConfigError(f"{where(source, f'search.objectives[{i}].metric')}: {o.metric!r} "
                              "is already an objective")
        objectives.append((o.metric, o.mode))
    return tuple(objectives)


def _parse_search(raw: dict | None, source: str) -> SearchSettings:
    s = from_mapping(SearchSection, raw or {}, source, "search")
    scheduler = from_mapping(SchedulerSection, s.scheduler or {}, source, "search.scheduler")
    resources = from_mapping(ResourcesSection, s.resources or {}, source, "search.resources")
    constraints = tuple(Constraint(c.metric, c.at_least, c.of) for c in (
        from_mapping(ConstraintSection, raw_c, source, f"search.constraints[{i}]")
        for i, raw_c in enumerate(s.constraints or [])))
    kind = "asha" if scheduler.type == "mo_asha" else scheduler.type
    grace_period = scheduler.grace_period
    if grace_period is None:
        if kind == "asha":
            raise ConfigError(f"{where(source, 'search.scheduler.grace_period')}: missing (required)")
        grace_period = 1
    if grace_period > s.max_epochs:
        raise ConfigError(f"{where(source, 'search.scheduler.grace_period')}: {grace_period} epochs "
                          f"exceeds search.max_epochs ({s.max_epochs}): no trial could be stopped early")
    if kind == "asha" and s.eval_every != 1:
        raise ConfigError(f"{where(source, 'search.eval_every')}: must be 1 with scheduler asha "
                          f"(asha compares trials every epoch), got {s.eval_every}")
    return SearchSettings(
        objectives=_parse_objectives(s, source), sampler=s.sampler, constraints=constraints,
        num_samples=s.num_samples, max_concurrent=s.max_concurrent,
        seed=s.seed, max_epochs=s.max_epochs, scheduler=kind, grace_period=grace_period,
        reduction_factor=scheduler.reduction_factor, cpu=resources.cpu, gpu=resources.gpu,
        max_failures=s.max_failures, storage_path=_absolute_storage(s.storage_path),
        tracking_uri=_absolute_uri(s.tracking_uri), checkpoint_every=s.checkpoint_every,
        eval_every=s.eval_every)


def _parse_confirm(raw: Any, source: str) -> ConfirmSettings | None:
    if raw is False:
        return None
    c = from_mapping(ConfirmSection, {} if raw is None else raw, source, "confirm")
    per = () if c.per is None else (c.per,) if isinstance(c.per, str) else c.per
    if not isinstance(per, (list, tuple)) or not all(isinstance(p, str) for p in per):
        raise ConfigError(f"{where(source, 'confirm.per')}: expected a param's name or a list "
                          f"of names, got {c.per!r}")
    return ConfirmSettings(top=c.top, seeds=c.seeds, per=tuple(per))


def _confirmed_description(space: SearchSpace) -> str:
    c = space.confirm
    what = (f"front (at most {c.top})" if len(space.search.objectives) > 1 else
            "best trial" if c.top == 1 else f"top {c.top} trials")
    return what + (f" of each {' and '.join(c.per)}" if c.per else "")


def _check_confirm_per(space: SearchSpace) -> None:
    """confirm.per groups the search's trials by params every trial draws from a list."""
    chosen = {p.name: p for p in space.params if p.kind in ("grid", "categorical") and not p.when}
    names = space.confirm.per if space.confirm else ()
    for k, per in enumerate(names):
        if per in names[:k]:
            raise ConfigError(f"{where(space.label, 'confirm.per')}: names {per!r} twice")
        if per not in chosen:
            raise ConfigError(f"{where(space.label, 'confirm.per')}: must name a grid or categorical "
                              f"param that every trial draws ({', '.join(chosen) or 'this space has none'}), "
                              f"got {per!r}")


def _parse_param(name: Any, spec: Any, source: str) -> ParamSpec:
    path = f"params.{name}"
    if name != "ablation":
        _check_setting_name(name, source, "params")
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in PARAM_KINDS:
        raise ConfigError(f"{source}: {path}.type: must be one of {', '.join(PARAM_KINDS)}, "
                          f"got {kind!r}")
    p = from_mapping(PARAM_CLASSES[kind], spec, source, path)
    if kind == "fixed":
        return ParamSpec(name, kind, value=p.value)
    if kind in ("categorical", "grid"):
        return ParamSpec(name, kind, choices=tuple(p.choices))
    return ParamSpec(name, kind, low=p.low, high=p.high, step=getattr(p, "step", 1))


def _check_ablation(space: SearchSpace) -> None:
    ablation = space.param("ablation")
    if ablation is None:
        return
    where = f"{space.label}: params.ablation"
    if ablation.kind not in ("categorical", "grid", "fixed"):
        raise ConfigError(f"{where}.type: must be categorical, grid or fixed, got {ablation.kind!r}")
    for variant in ablation.extremes():
        if variant not in ABLATIONS:
            raise ConfigError(f"{where}: unknown variant {variant!r}; known: {', '.join(ABLATIONS)}")
    for variant in ablation.extremes():
        for switch in ABLATIONS[variant]:
            if switch in space.fixed or space.param(switch):
                section = "fixed" if switch in space.fixed else "params"
                raise ConfigError(f"{where}: variant {variant!r} sets {switch!r}, which "
                                  f"{section}.{switch} also sets; keep one")


def _where(space: SearchSpace, name: str) -> str:
    if space.param(name):
        return f"params.{name}"
    return f"fixed.{name}" if name in space.fixed else f"{name} (default)"


def _bounds(space: SearchSpace, name: str) -> tuple[float, float]:
    """The smallest and largest value `name` takes in any trial."""
    param = space.param(name)
    if param is None:
        value = space.fixed.get(name, getattr(_defaults(), name))
        values: tuple[Any, ...] = (value,)
    else:
        values = param.extremes()
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise ConfigError(f"{space.label}: {_where(space, name)}: must be numbers, got {values!r}")
    return min(values), max(values)


def _defaults():
    model_cfg, _ = settings_from_dict({}, source="defaults")
    return model_cfg


def _derived_w_max(space: SearchSpace) -> ParamSpec | None:
    """w_max's param when its range overlaps w_min's values, so it is drawn above w_min."""
    w_max = space.param("w_max")
    if w_max is None or w_max.kind not in ("uniform", "loguniform"):
        return None
    return w_max if w_max.low <= _bounds(space, "w_min")[1] else None


def _check_curriculum_bounds(space: SearchSpace) -> None:
    """Every trial must get w_min < w_max (eq. 11), or the space is rejected now."""
    min_low, min_high = _bounds(space, "w_min")
    max_low, max_high = _bounds(space, "w_max")
    where = f"{space.label}: {_where(space, 'w_min')} / {_where(space, 'w_max')}"
    if min_low >= max_high:
        raise ConfigError(f"{where}: unsatisfiable: w_min >= {min_low} can never be below "
                          f"w_max <= {max_high}")
    if min_high >= max_high:
        raise ConfigError(f"{where}: w_min can reach {min_high}, but w_max must exceed it and "
                          f"goes up to {max_high} only: lower w_min's upper bound")
    if max_low <= min_high and _derived_w_max(space) is None:
        raise ConfigError(f"{where}: w_max's values start at {max_low}, not above w_min's "
                          f"largest ({min_high}): give w_max a uniform or loguniform range "
                          "(drawn above w_min) or values above w_min's")


def _grid(space: SearchSpace) -> tuple[ParamSpec, ...]:
    return tuple(p for p in space.params if p.kind == "grid")


def _check_grid(space: SearchSpace) -> None:
    size = math.prod(len(p.choices) for p in _grid(space))
    if space.search.num_samples % size:
        raise ConfigError(f"{space.label}: search.num_samples: {space.search.num_samples} is not "
                          f"a multiple of the grid size {size}, so the grid combinations "
                          "would not run equally often")


def _typical_value(param: ParamSpec) -> float:
    """A float inside a float range, off any whole number, as suggest_float returns."""
    middle = (param.low + param.high) / 2
    return math.nextafter(middle, param.high) if float(middle).is_integer() else middle


def _check_values(space: SearchSpace) -> None:
    """Every param's extreme values, within a whole trial config, pass the settings check."""
    derived = _derived_w_max(space)
    candidates = {}
    for p in space.params:
        if p is derived:
            candidates["w_gap"] = (GAP_MIN, 1.0)
        elif p.kind in ("uniform", "loguniform"):
            candidates[p.name] = (p.low, p.high, _typical_value(p))
        else:
            candidates[p.name] = p.extremes()
    base = {name: values[0] for name, values in candidates.items()}
    for name, values in candidates.items():
        path = "params.w_max" if name == "w_gap" else f"params.{name}"
        for value in values:
            config = _trial_config(space, {**base, name: value, **_satisfying(space, name)})
            _, train_cfg = settings_from_dict(trial_settings(config), source=f"{space.label}: {path}")
            _check_first_validation(space, train_cfg.min_epochs)


def _check_first_validation(space: SearchSpace, min_epochs: int) -> None:
    """ASHA compares trials at grace_period epochs: they must have validated by then."""
    s = space.search
    if s.scheduler == "asha" and min_epochs >= s.grace_period:
        raise ConfigError(f"{space.label}: search.scheduler.grace_period: {s.grace_period} epochs, "
                          f"but trials first validate after min_epochs = {min_epochs} (set by "
                          f"{_where(space, 'min_epochs')} or a preset): raise grace_period above it")


# ------------------------------------------------------------------------- public API

def load_space(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML. `overrides` (from the command line) may set
    num_samples, max_epochs, dataset (a name or YAML path), tracking_uri, storage_path, name."""
    raw = _read_yaml(Path(path))
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    raw = _apply_overrides(raw, given)
    source = _label(str(path), given)  # every error names the file and the overrides
    top = from_mapping(SpaceFile, raw, source)
    fixed = top.fixed or {}
    for setting in fixed:
        _check_setting_name(setting, source, "fixed")
    folder = Path(path).resolve().parent
    space = SearchSpace(
        name=top.name,
        dataset=_parse_dataset(top.dataset, source, folder),
        embedding=_parse_embedding(top.embedding or {}, source, folder),
        fixed=dict(fixed),
        search=_parse_search(top.search, source),
        params=tuple(_parse_conditional_param(n, spec, source) for n, spec in (top.params or {}).items()),
        source=str(path), overrides=given, references=top.references,
        confirm=_parse_confirm(top.confirm, source))
    for p in space.params:
        if p.name in space.fixed:
            raise ConfigError(f"{source}: params.{p.name}: also set in fixed.{p.name}; keep one")
    for i, c in enumerate(space.search.constraints):
        if c.of and not space.references:
            raise ConfigError(f"{where(source, f'search.constraints[{i}].of')}: {c.of!r} needs "
                              "the references, but the space sets references: false")
    _check_ablation(space)
    _check_conditions(space)
    _check_confirm_per(space)
    _check_curriculum_bounds(space)  # before the settings check, which would name one side only
    _check_first_validation(space, settings_from_dict(_shared_fixed(space), source, "fixed")[1].min_epochs)
    _check_grid(space)
    _check_values(space)
    return space


def _suggest(trial: optuna.Trial, p: ParamSpec, name: str | None = None) -> Any:
    name = name or p.name  # Optuna's name for it
    if p.kind == "uniform":
        return trial.suggest_float(name, p.low, p.high)
    if p.kind == "loguniform":
        return trial.suggest_float(name, p.low, p.high, log=True)
    if p.kind == "int":
        return trial.suggest_int(name, p.low, p.high, step=p.step)
    if p.kind == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    return p.value


def _grid_values(grid: tuple[ParamSpec, ...], trial_number: int) -> dict[str, Any]:
    """Combination `trial_number` mod the grid size; the last grid param varies fastest."""
    values, index = {}, trial_number
    for p in reversed(grid):
        index, position = divmod(index, len(p.choices))
        values[p.name] = p.choices[position]
    return values


def _w_max_above(w_min: float, w_gap: float, w_max: ParamSpec) -> float:
    low = max(w_min, w_max.low)
    if w_max.kind == "loguniform":
        value = math.exp(math.log(low) + w_gap * (math.log(w_max.high) - math.log(low)))
    else:
        value = low + w_gap * (w_max.high - low)
    return min(value, w_max.high)  # rounding must not step past the user's bound


def shared_config(space: SearchSpace) -> dict[str, Any]:
    """What every run of the space shares: the budget, the selection metric, fixed settings."""
    s = space.search
    return {"epochs": s.max_epochs, "eval_every": s.eval_every, "select_metric": s.metric,
            "num_threads": max(1, int(s.cpu)), **space.fixed}


def reference_config(space: SearchSpace, name: str) -> dict[str, Any]:
    """A reference's full flat config: the shared settings with REFERENCES[name] on top."""
    config = {**shared_config(space), **REFERENCES[name], "configuration": name}
    # a fixed setting of another method ("llmesr.alpha") is not the reference's to take
    return of_method(config, config["method"])


def _trial_config(space: SearchSpace, drawn: Mapping[str, Any]) -> dict[str, Any]:
    """The full flat config of a trial from its drawn values (w_gap, ablation included)."""
    config = {**shared_config(space), **drawn}
    config.update(ABLATIONS.get(config.get("ablation"), {}))
    derived = _derived_w_max(space)
    if derived is not None and "w_gap" in config:
        w_min = config.get("w_min", _defaults().w_min)
        config["w_max"] = _w_max_above(w_min, config["w_gap"], derived)
    return _without_inactive(space, config)


class DefineByRun:
    """Optuna define-by-run function: draws one trial's params and returns its full flat
    config (fixed settings, derived w_max, ablation switches). Every param keeps the same
    distribution in every trial, so multivariate TPE models them jointly; a conditional param
    is drawn only in the trials its condition holds in (see "method-conditional params").
    A class rather than a closure: Ray pickles the searcher, this function included, to
    resume a search."""

    def __init__(self, space: SearchSpace):
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        space = self.space
        derived = _derived_w_max(space)
        drawn = _grid_values(_grid(space), trial.number)
        context = {**space.fixed, **ABLATIONS.get(drawn.get("ablation"), {})}
        for p in sorted(space.params, key=lambda p: bool(_condition(p))):  # conditions read unconditional params
            if p.kind == "grid" or not _holds(p, {**context, **drawn}):
                continue
            if p is derived:
                drawn["w_gap"] = trial.suggest_float(_optuna_name(space, "w_gap", drawn), GAP_MIN, 1.0)
            else:
                drawn[p.name] = _suggest(trial, p, _optuna_name(space, p.name, drawn))
        return _trial_config(space, drawn)


def define_by_run(space: SearchSpace) -> Callable[[optuna.Trial], dict[str, Any]]:
    return DefineByRun(space)


def trial_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model/training settings of a trial config: without `w_gap`, `ablation` and the
    per-method Optuna names Ray adds (`<method>/<param>`, which Ray nests under `<method>`)."""
    return {k: v for k, v in config.items()
            if k not in NON_SETTING_KEYS and k.split("/")[0] not in METHOD_SETTINGS}


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    """TPE (one or several objectives) or NSGA-II. Constraints reach either through the
    trials (tuning.tuner.ConstrainedOptunaSearch)."""
    s = space.search
    if s.sampler == "nsgaii":
        # Optuna's default population (50) would leave a search of a few dozen trials random
        return optuna.samplers.NSGAIISampler(seed=s.seed, population_size=nsga_population(s))
    # constant_liar: running trials count as pending, so concurrent trials spread out.
    # group: conditional params (drawn in some trials only) stay in joint models, see below.
    with warnings.catch_warnings():  # group is "experimental" in Optuna 5; it is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True,
                                          group=True)


def nsga_population(s: SearchSettings) -> int:
    """About four generations in the search, between 4 and Optuna's default 50."""
    return max(4, min(50, s.num_samples // 4))


def _describe(space: SearchSpace, p: ParamSpec, conditional: bool = True) -> str:
    per_method = p.kind != "grid" and _optuna_name(space, p.name, {"method": "m"}) != p.name
    if conditional and (_condition(p) or per_method):
        return _describe(space, p, False) + "".join(
            f"; only when {k} = {'/'.join(map(str, v))}" for k, v in _condition(p).items()) + (
            "; a TPE model per method" if per_method else "")
    if p is _derived_w_max(space):
        scale = " (log scale)" if p.kind == "loguniform" else ""
        return (f"{p.kind} (w_min, {p.high}]: from max(w_min, {p.low}) up to {p.high} "
                f"by w_gap in [{GAP_MIN}, 1]{scale}")
    if p.kind in ("uniform", "loguniform"):
        return f"{p.kind} [{p.low}, {p.high}]"
    if p.kind == "int":
        return f"int [{p.low}, {p.high}]" + (f" step {p.step}" if p.step != 1 else "")
    if p.kind == "categorical":
        return "one of " + ", ".join(map(str, p.choices))
    if p.kind == "grid":
        return "each in turn: " + ", ".join(map(str, p.choices))
    return f"= {p.value}"


def plan(space: SearchSpace) -> str:
    """What a run of this space would do, for --dry-run."""
    s = space.search
    dataset = space.dataset.name or space.dataset.format
    if s.scheduler == "asha":
        scheduler = (f"{'MO-ASHA' if len(s.objectives) > 1 else 'ASHA'}: every trial runs "
                     f"{s.grace_period} epochs, then about 1/{s.reduction_factor:g} go on at "
                     "each rung" + (" (non-dominated sorting, then crowding distance)"
                                    if len(s.objectives) > 1 else ""))
    else:
        scheduler = "none: every trial runs until max_epochs or early stopping"
    width = max((len(p.name) for p in space.params), default=0)
    lines = [
        f"Search {space.name!r} from {space.label}",
        f"  dataset:    {dataset} (format {space.dataset.format}); "
        f"item embeddings: {space.embedding.encoder}",
        f"  objectives: {', '.join(f'{mode} {m}' for m, mode in s.objectives)} (validation; "
        "test metrics never steer the search)",
        *([f"  constraints: {', '.join(c.describe() for c in s.constraints)}"]
          if s.constraints else []),
        f"  trials:     {s.num_samples}, at most {s.max_concurrent} at once, up to "
        f"{s.max_epochs} epochs each; Optuna "
        + (f"NSGA-II (population {nsga_population(s)}, seed {s.seed})" if s.sampler == "nsgaii"
           else f"TPE (multivariate, seed {s.seed})"),
        f"  scheduler:  {scheduler}",
        f"  resources:  {s.cpu:g} CPU, {s.gpu:g} GPU per trial "
        f"({s.cpu * s.max_concurrent:g} CPU, {s.gpu * s.max_concurrent:g} GPU at full concurrency)",
        f"  failures:   retried up to {s.max_failures} times; checkpoint every "
        f"{s.checkpoint_every} epochs",
        "  fixed:      " + (", ".join(f"{k}={v}" for k, v in space.fixed.items()) or "(none)"),
        "  params:" + ("" if space.params else "     (none)"),
        *(f"    {p.name:<{width}}  {_describe(space, p)}" for p in space.params),
        "  references: " + ("base and paper-default (FAERec at the paper's defaults), same "
                            "budget, before the search" if space.references else "none"),
        "  confirm:    " + (f"the search's {_confirmed_description(space)} and the references, {space.confirm.seeds} new seeds each, full budget; "
                            "then the report" if space.confirm else "none (no report)"),
        f"  results:    {mask_url(s.storage_path)}/{space.name} (Ray Tune)",
        f"  MLflow:     {mask_url(s.tracking_uri)} (experiment {space.name!r})",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------- methods

def methods_drawn(space: SearchSpace) -> tuple[str, ...]:
    """Every method some trial of `space` may run (params.method, fixed.method, ablation's)."""
    param = space.param("method")
    drawn = list(param.extremes()) if param else [space.fixed.get("method", _defaults().method)]
    ablation = space.param("ablation")
    for variant in ablation.extremes() if ablation else ():
        drawn.append(ABLATIONS[variant].get("method", drawn[0]))
    return tuple(dict.fromkeys(drawn))


# ------------------------------------------------------------------------- method-conditional params
#
# A param exists only in the trials its condition holds in: `when: {setting: value or
# [values]}` in its YAML entry, and, implied by its name, `method: M` for a method's own
# setting `M.x` (e.g. rlmrec_con.weight). A condition reads a setting that is a categorical,
# grid or fixed param without a condition of its own, a fixed setting or a default
# (ablation variants count). Multivariate TPE stays multivariate: make_sampler's group=True
# splits the params into the groups that occur together in trials and models each group
# jointly (Optuna's multivariate TPE for define-by-run conditional spaces); without it, any
# param missing from some trials would be sampled independently. When `method` is a grid
# param (every method the same number of trials), each param a trial draws that is not a
# method's own is named `<method>/<param>` in Optuna, so each method's TPE model learns from
# its own trials only: one study per method, inside the one study.

def _parse_conditional_param(name: Any, spec: Any, source: str) -> ParamSpec:
    when = spec.get("when") if isinstance(spec, dict) else None
    if when is None:
        return _parse_param(name, spec, source)
    p = _parse_param(name, {k: v for k, v in spec.items() if k != "when"}, source)
    path = f"params.{name}.when"
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{where(source, path)}: expected a mapping of setting -> value or list "
                          f"of values, e.g. {{method: faerec}}, got {when!r}")
    conditions = []
    for key, values in when.items():
        if key not in SETTING_NAMES:
            raise unknown_key(key, SETTING_NAMES, source, path, noun="setting")
        if key == "method" and "." in str(name):
            raise ConfigError(f"{where(source, path, key)}: {name} is a setting of method "
                              f"{str(name).split('.')[0]}, which its name says already")
        values = values if isinstance(values, list) else [values]
        if not values or any(not isinstance(v, (str, int, float, bool)) for v in values):
            raise ConfigError(f"{where(source, path, key)}: expected a value or a non-empty list "
                              f"of values, got {when[key]!r}")
        conditions.append((key, tuple(values)))
    return dataclasses.replace(p, when=tuple(conditions))


def _condition(p: ParamSpec) -> dict[str, tuple]:
    """setting -> the values under which `p` is drawn; {}: always."""
    owner, dot, _ = p.name.partition(".")
    return {**dict(p.when), **({"method": (owner,)} if dot else {})}


@functools.cache
def _default_settings() -> dict[str, Any]:
    return settings_to_dict(*settings_from_dict({}, "defaults"))


def _default_setting(key: str) -> Any:
    return _default_settings()[key]


def _holds(p: ParamSpec, config: Mapping[str, Any]) -> bool:
    return all(config.get(k, _default_setting(k)) in values for k, values in _condition(p).items())


def _possible_values(space: SearchSpace, key: str) -> tuple:
    """The values the setting `key` takes in some trial."""
    param = space.param(key)
    values = list(param.extremes()) if param else [space.fixed.get(key, _default_setting(key))]
    ablation = space.param("ablation")
    values += [ABLATIONS[v][key] for v in (ablation.extremes() if ablation else ()) if key in ABLATIONS[v]]
    return tuple(dict.fromkeys(values))


def _check_conditions(space: SearchSpace) -> None:
    for p in space.params:
        for key, values in _condition(p).items():
            path = f"{space.label}: params.{p.name}" + (f".when.{key}" if key in dict(p.when) else "")
            param = space.param(key)
            if param is not None and (param.kind not in ("categorical", "grid", "fixed") or _condition(param)):
                raise ConfigError(f"{path}: a condition reads a categorical, grid or fixed param "
                                  f"without a condition of its own; params.{key} is not one")
            possible = _possible_values(space, key)
            for value in values:
                if value not in possible:
                    what = (f"runs method {value}, whose setting it is" if path.endswith(p.name)
                            else f"has {key} = {value!r}")
                    raise ConfigError(f"{path}: no trial {what} ({key} takes: "
                                      f"{', '.join(map(str, possible))})")
    methods = methods_drawn(space)
    for key in space.fixed:
        owner, dot, _ = key.partition(".")
        if dot and owner not in methods:
            raise ConfigError(f"{space.label}: fixed.{key}: a setting of method {owner}, which no "
                              f"trial runs (method takes: {', '.join(methods)})")


def of_method(settings: Mapping[str, Any], method: str) -> dict[str, Any]:
    """`settings` less those of other methods: "melt.e_max" stays only when method is melt."""
    return {k: v for k, v in settings.items() if k.partition(".")[0] in (k, method)}


def _shared_fixed(space: SearchSpace) -> dict[str, Any]:
    """The fixed settings, less the method settings of methods other than the fixed one."""
    return of_method(space.fixed, space.fixed.get("method", _default_setting("method")))


def _without_inactive(space: SearchSpace, config: dict[str, Any]) -> dict[str, Any]:
    """`config` less the params whose condition fails in it, and the fixed settings of other methods."""
    for p in space.params:
        if not _holds(p, config):
            config.pop(p.name, None)
            if p is _derived_w_max(space):
                config.pop("w_gap", None)
    return of_method(config, config.get("method", _default_setting("method")))


def _satisfying(space: SearchSpace, name: str) -> dict[str, Any]:
    """Drawn values under which param `name` (w_gap: w_max) is drawn, to check its values."""
    p = _derived_w_max(space) if name == "w_gap" else space.param(name)
    drawn = {}
    for key, values in _condition(p).items():
        param = space.param(key)
        if param is not None and set(values) & set(param.extremes()):
            drawn[key] = next(v for v in values if v in param.extremes())
        elif space.param("ablation") and key not in space.fixed:
            drawn["ablation"] = next((v for v in space.param("ablation").extremes()
                                      if ABLATIONS[v].get(key) in values), drawn.get("ablation"))
    return drawn


def _optuna_name(space: SearchSpace, name: str, drawn: Mapping[str, Any]) -> str:
    """`<method>/<name>` when `method` is a grid param and `name` is no method's own setting."""
    method = space.param("method")
    if method is None or method.kind != "grid" or "." in name:
        return name
    return f"{drawn['method']}/{name}"


def drawn_in_every_trial(space: SearchSpace) -> tuple[str, ...]:
    """The names of the params without a condition."""
    return tuple(p.name for p in space.params if not _condition(p))
