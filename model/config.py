"""Every setting, typed, in one place, and the one check they all go through.

    model_cfg, train_cfg = settings_from_dict({"tau": 0.1, "preset": "reference_code"}, "x.yaml")
    dataset = from_mapping(DatasetConfig, section, "space.yaml", "dataset", noun="dataset setting")

Each settings class is a dataclass whose fields carry their type and, through `rule(...)`,
their bounds or choices. `check_fields` (run by every class's `__post_init__`) enforces
them; `from_mapping` reads a YAML mapping into a class: unknown keys get a did-you-mean,
missing required keys are named, and every error reads `FILE: YAML.PATH: problem, got VALUE`.
Cross-field rules live in each class's `__post_init__` and raise `Invalid` the same way.

What a dataset format is (the settings it reads, its defaults, its prompt fields) lives
here too; reading the files is `model.datasets`, building sequences `model.data`.
"""

import dataclasses
import difflib
import math
import operator
import os
import string
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from model.errors import ConfigError
from model.urls import endpoint_problem, mask_url
from model.yamlfile import load_yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# The one validation mechanism

class Invalid(ConfigError):
    """A setting's value is wrong: `key` (its external name) and `problem` (what and the value)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


EXTERNAL = {"lambda_": "lambda"}  # `lambda` is a Python keyword: the field is `lambda_`


def rule(default=dataclasses.MISSING, *, ge=None, gt=None, le=None, lt=None,
         choices: tuple | None = None, nonempty: bool = False):
    """A dataclass field whose value `check_fields` keeps within bounds or `choices`."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices,
                                  nonempty=nonempty).items() if v is not None and v is not False}
    return field(default=default, metadata=meta)


_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt),
           "le": ("<=", operator.le), "lt": ("<", operator.lt)}
_KIND = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _convert(value, hint):
    """`value` as the type `hint` names (int is accepted for float, a whole float for int,
    a list for a tuple); raises ValueError(what was expected) when it does not fit."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = next(a for a in args if a is not type(None))
        try:
            return _convert(value, inner)
        except ValueError as e:
            raise ValueError(f"{e} or null") from None
    if typing.get_origin(hint) is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError("expected a list of strings")
    if hint not in _KIND:
        return value  # Any: the class's own rules decide
    ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if hint is int and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise ValueError(f"expected {_KIND[hint]}")
    if hint is float and not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _bounds_problem(value, meta: Mapping) -> str | None:
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    if meta.get("nonempty") and not value:
        return "must not be empty"
    if value is None or isinstance(value, str):
        return None
    bounds = {k: meta[k] for k in _BOUNDS if k in meta}
    if all(_BOUNDS[k][1](value, bound) for k, bound in bounds.items()):
        return None
    return "must be " + " and ".join(f"{_BOUNDS[k][0]} {bound}" for k, bound in bounds.items())


def check_fields(obj) -> None:
    """Type and bounds of every field of the dataclass `obj`; converts in place (3 -> 3.0)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = EXTERNAL.get(f.name, f.name)
        try:
            value = _convert(value, hints[f.name])
        except ValueError as e:
            raise Invalid(key, f"{e}, got {value!r}") from None
        problem = _bounds_problem(value, f.metadata)
        if problem:
            raise Invalid(key, f"{problem}, got {value!r}")
        object.__setattr__(obj, f.name, value)  # also on frozen classes


def where(source: str, *path: str | None) -> str:
    """`source: a.b.c` (no path: the source alone)."""
    dotted = ".".join(p for p in path if p)
    return f"{source}: {dotted}" if dotted else source


def unknown_key(key, allowed, source: str, path: str = "", noun: str = "key") -> ConfigError:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where(source, path)}: unknown {noun} {key!r}{hint}; "
                       f"allowed: {', '.join(allowed)}")


def check_keys(cls, data, source: str, path: str = "", noun: str = "key") -> dict[str, str]:
    """`data` is a mapping of `cls`'s fields (external name -> field name, returned)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where(source, path)}: expected a mapping, got {data!r}")
    names = {EXTERNAL.get(f.name, f.name): f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise unknown_key(key, tuple(names), source, path, noun)
    return names


def from_mapping(cls, data, source: str, path: str = "", noun: str = "key"):
    """`cls(**data)` from a YAML mapping, every error naming `source`, the YAML path and the value."""
    names = check_keys(cls, data, source, path, noun)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and EXTERNAL.get(f.name, f.name) not in data:
            raise ConfigError(f"{where(source, path, EXTERNAL.get(f.name, f.name))}: "
                              "missing (required)")
    try:
        return cls(**{names[k]: v for k, v in data.items()})
    except Invalid as e:
        raise ConfigError(f"{where(source, path, e.key)}: {e.problem}") from None


# ---------------------------------------------------------------------------------------
# Model and training settings: one flat namespace, as `--set key=value` and search-space
# params address them.

BACKBONE_NAMES = ("sasrec", "fmlprec", "lrurec", "narm", "lightsans", "gmlp")

# The methods `method` may name, each with its own settings dataclass (None: none beyond
# these), addressed as "<method>.<field>" (e.g. rlmrec_con.weight). model.methods, the
# registry, fills this on import; model/__init__.py imports it, so it is complete before any
# setting is read. (This module cannot import the registry: every method module imports `rule`.)
METHOD_SETTINGS: dict[str, type | None] = {}


@dataclass
class FAERecConfig:
    method: str = "faerec"  # a name of model.methods.METHODS; "base" = the backbone alone on random ID embeddings
    backbone: str = rule("sasrec", choices=BACKBONE_NAMES)
    hidden_size: int = rule(128, ge=1)  # d; also the size of the d x d correlation matrices of FLA
    num_layers: int = rule(2, ge=1)
    num_heads: int = rule(2, ge=1)  # attention heads (SASRec, LightSANs); must divide hidden_size
    k_interests: int = rule(5, ge=1)  # LightSANs: latent interests each prefix is aggregated into (RecBole: 5)
    dropout: float | None = rule(None, ge=0, lt=1)  # backbone dropout; None = 0.4 (faerec) / 0.5 (base), the authors'
    max_len: int = rule(50, ge=1)  # most recent items kept; SASRec's cost grows quadratically in it
    proj_hidden: int = rule(768, ge=1)  # width of the eq. (2) MLP; its first layer is most of FAERec's extra cost
    proj_dropout: float = rule(0.3, ge=0, lt=1)
    gate: str = rule("paper", choices=("paper", "code"))  # "code": GELU + Dropout(0.1) between W1 and W2
    input_path: str = rule("paper", choices=("paper", "code"))  # "code": positions + dropout per branch, gate, norm
    gating: bool = True  # False = w/o AGF: f = (e_id + e_llm) / 2
    pca_init: bool = True  # ID table from PCA of the LLM table (balanced start, sec. 4.1); False = normal(0, 0.02)
    ila: bool = True  # item-level alignment, eq. (5); False = w/o ILA
    fla: bool = True  # feature-level alignment, eqs. (6-10); False = w/o FLA
    curriculum: bool = True  # False = w/o CLS: w1 fixed at (w_max + w_min) / 2
    pop_groups: bool = True  # False = w/o PG: FLA over the batch as one group
    tau: float = rule(0.05, gt=0)  # InfoNCE temperature: lower sharpens on hard negatives, noisier gradients
    lambda_: float = rule(0.005, ge=0)  # Barlow Twins redundancy weight, eq. (9) (external name "lambda")
    alpha: float = rule(0.2, ge=0)  # weight of the alignment loss, eq. (14)
    w_max: float = rule(1.0, ge=0, le=1)  # upper bound of the ILA weight w1, eq. (11)
    w_min: float = rule(0.9, ge=0, le=1)  # lower bound of w1: FLA's weight never exceeds 1 - w_min
    period: int = rule(30, ge=1)  # curriculum period T in epochs
    bce_items: str = rule("fused", choices=("fused", "id"))  # BCE item embeddings: fused, or ID only (the code); paper silent
    score_llm_weight: float = rule(0.5, ge=0, le=1)  # share of proj(e_llm) in the scoring items; 0.5: equal (sec. 4.3)
    score_layernorm: bool = False  # the code's scoring: the trained input LayerNorm on the scoring items
    align_items: str = rule("unique", choices=("unique", "occurrence"))  # distinct items, or every occurrence (the code);
                                                                         # paper silent
    method_settings: Any = None  # the method's own settings (METHOD_SETTINGS); None: its defaults

    def __post_init__(self):
        if self.method not in METHOD_SETTINGS:
            raise Invalid("method", f"must be one of {', '.join(METHOD_SETTINGS)}, got {self.method!r}")
        own = METHOD_SETTINGS[self.method]
        if self.method_settings is None and own is not None:
            self.method_settings = own()
        if not (isinstance(self.method_settings, own) if own else self.method_settings is None):
            raise Invalid("method_settings", f"must be {own.__name__ if own else None} for method "
                                             f"{self.method}, got {self.method_settings!r}")
        if self.dropout is None:
            self.dropout = 0.4 if self.method == "faerec" else 0.5
        check_fields(self)
        if self.backbone in ("sasrec", "lightsans") and self.hidden_size % self.num_heads:
            raise Invalid("num_heads", f"must divide hidden_size {self.hidden_size}, got {self.num_heads!r}")
        if self.w_min > self.w_max:
            raise Invalid("w_min", f"must be in [0, w_max = {self.w_max}], got {self.w_min!r}")
        if hasattr(self.method_settings, "check"):  # the method's rules that involve shared settings
            self.method_settings.check(self)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = rule(200, ge=1)    # upper bound; early stopping usually ends sooner
    min_epochs: int = rule(0, ge=0)  # epochs trained before the first validation (the code's star_test + 1)
    batch_size: int = rule(256, ge=1)
    lr: float = rule(1e-3, gt=0)
    weight_decay: float = rule(0.0, ge=0)
    seed: int = 42
    patience: int = rule(10, ge=1)   # validations without improvement before stopping...
    patience_min_steps: int = rule(400, ge=0)  # ...but never before this many optimiser steps without one:
                                     # ML-100K has 4 steps/epoch, and SASRec sits on a popularity
                                     # plateau (tail HR@10 = 0) for 30+ epochs before it improves
    eval_every: int = rule(1, ge=1)  # validate every k epochs
    select_metric: str = "val/overall/ndcg_20"  # the paper's early-stopping metric
    eval_batch_size: int = rule(512, ge=1)
    num_threads: int = rule(0, ge=0)  # CPU threads for torch; 0 = torch's default
    device: str = "auto"             # auto = cuda when a GPU is visible, else cpu
    autocast: bool = False           # bf16 autocast of the training step (GPUs, CPUs with AMX or
                                     # AVX-512 BF16); evaluation stays float32 so ranks are exact
    two_item_users: str = rule("drop", choices=("drop", "pair"))  # "pair": train them on their one pair (the code)
    batch_all_users: bool = False    # True: users with nothing to train still fill batch rows, as padding
                                     # (the code: Yelp's 15,720 users make 62 batches of 256, not 47)

    def __post_init__(self):
        check_fields(self)
        parts = self.select_metric.split("/")
        if len(parts) != 3 or parts[0] != "val":
            raise Invalid("select_metric", "must be a validation metric like 'val/overall/ndcg_20', "
                                           f"got {self.select_metric!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise Invalid("device", f"must be auto, cpu or cuda[:N], got {self.device!r}")


# The authors' code (ZhifuWei/FAERec), every choice at once; each stays selectable alone,
# and settings given explicitly win over the preset's.
REFERENCE_CODE = {
    "gate": "code",               # models.py: GELU + Dropout(0.1) inside the gate network
    "input_path": "code",         # models.py 32-50
    "score_layernorm": True,      # trainers.py 224-235: LayerNorm(e_id + proj(e_llm)), trained γ, β
    "bce_items": "id",            # trainers.py: positives/negatives scored with ID embeddings
    "align_items": "occurrence",  # every padded position's item, copies masked as negatives
    "two_item_users": "pair",     # datasets.py 83-89
    "batch_all_users": True,      # datasets.py: every user is a row of the DataLoader, even an empty one
    "epochs": 500,                # main.py --epochs
    "patience_min_steps": 0,      # main.py: patience 10 validations, never stretched
}
# main.py validates from 0-based epoch star_test + 1 on: star_test 60 for FAERec (its logs: 45-60),
# 200 / 300 / 100 for plain SASRec / FMLP-Rec / LRURec (Backbone/ logs).
REFERENCE_MIN_EPOCHS = {"faerec": 61, "sasrec": 201, "fmlprec": 301, "lrurec": 101}
PRESETS = ("reference_code",)


def preset_settings(name: str, method: str, backbone: str) -> dict:
    """The settings a preset stands for (the min epochs depend on the model, as in the code)."""
    first = REFERENCE_MIN_EPOCHS.get("faerec" if method == "faerec" else backbone)
    # NARM, LightSANs and gMLP are not in the code's Backbone/: no star_test to copy
    return {**REFERENCE_CODE, **({"min_epochs": first} if first is not None else {})}


_FIELDS = {EXTERNAL.get(f.name, f.name): cls
           for cls in (FAERecConfig, TrainConfig) for f in dataclasses.fields(cls) if f.name != "method_settings"}
SETTING_NAMES: tuple[str, ...] = tuple(sorted([*_FIELDS, "preset"]))  # the settings every method shares


def method_setting_names() -> tuple[str, ...]:
    """Every method's own settings, "<method>.<field>" (e.g. rlmrec_con.weight)."""
    return tuple(f"{method}.{f.name}" for method, cls in METHOD_SETTINGS.items() if cls
                 for f in dataclasses.fields(cls))


def setting_names() -> tuple[str, ...]:
    return SETTING_NAMES + method_setting_names()


def settings_from_dict(settings: Mapping, source: str, path: str = ""
                       ) -> tuple[FAERecConfig, TrainConfig]:
    """Validate flat settings once, at the edge; `preset` fills in what is not given.
    Errors name `source`, the YAML `path` of the settings (e.g. "fixed"), the key and the value."""
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{where(source, path)}: expected a mapping, got {settings!r}")
    names = setting_names()
    for key in settings:
        if key not in names:
            raise unknown_key(key, names, source, path, noun="setting")
    settings = dict(settings)
    preset = settings.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{where(source, path, 'preset')}: must be one of "
                              f"{', '.join(PRESETS)}, got {preset!r}")
        base = FAERecConfig.__dataclass_fields__
        method = settings.get("method", base["method"].default)
        backbone = settings.get("backbone", base["backbone"].default)
        settings = {**preset_settings(preset, method, backbone), **settings}
    parts = {cls: {k: v for k, v in settings.items() if _FIELDS.get(k) is cls}
             for cls in (FAERecConfig, TrainConfig)}
    shared = parts[FAERecConfig]
    method = shared.get("method", FAERecConfig.method)
    own = {}  # "<method>.<field>" settings: the chosen method's only
    for key, value in settings.items():
        owner, dot, name = key.partition(".")
        if dot and owner != method:
            raise ConfigError(f"{where(source, path, key)}: is a setting of method {owner}, "
                              f"but method is {method}")
        if dot:
            own[name] = value
    if own:
        shared = {**shared, "method_settings": from_mapping(
            METHOD_SETTINGS[method], own, source, ".".join(filter(None, (path, method))),
            noun=f"setting of method {method}")}
    model_cfg = from_mapping(FAERecConfig, shared, source, path, noun="setting")
    return (model_cfg, from_mapping(TrainConfig, parts[TrainConfig], source, path, noun="setting"))


def settings_to_dict(model_cfg: FAERecConfig, train_cfg: TrainConfig) -> dict:
    """The inverse of `settings_from_dict`: the resolved flat settings, for logging."""
    flat = {EXTERNAL.get(f.name, f.name): getattr(cfg, f.name)
            for cfg in (model_cfg, train_cfg) for f in dataclasses.fields(cfg) if f.name != "method_settings"}
    own = model_cfg.method_settings
    return {**flat, **({f"{model_cfg.method}.{k}": v for k, v in dataclasses.asdict(own).items()} if own else {})}


# ---------------------------------------------------------------------------------------
# Item embeddings

ENCODERS = ("auto", "minilm", "sentence-transformers", "npy", "openai", "random")


@dataclass(frozen=True)
class EmbeddingConfig:
    # "auto": the dataset's precomputed .npy if it has one, else minilm
    encoder: str = rule("auto", choices=ENCODERS)
    # sentence-transformers: a local model folder (never downloaded)
    model_path: str | None = None
    # npy: an (n_items, d_llm) file, row i-1 = item i (the paper's itm_emb_np.npy)
    path: str | None = None
    # openai: the full endpoint, e.g. https://api.openai.com/v1/embeddings
    url: str | None = None
    # openai: e.g. text-embedding-3-small (the paper's encoder)
    model: str | None = None
    # openai: the NAME of the variable holding the key; variable unset = no key (local servers)
    api_key_env: str = "OPENAI_API_KEY"
    batch_size: int = rule(64, ge=1)      # texts per forward pass / per request
    max_retries: int = rule(5, ge=0)      # openai: on 429, 5xx, connection errors; waits 0.5 s * 2^n
    timeout_s: float = rule(60.0, gt=0)   # openai: per request
    dim: int = rule(1536, ge=1)           # random: width of the stand-in (ada-002 is 1536-d)
    seed: int = 0                         # random: generator seed
    # None: $FAEREC_CACHE or <repo>/.cache; embeddings go to <cache_dir>/embeddings/
    cache_dir: str | None = None

    def __post_init__(self):
        check_fields(self)
        if self.encoder == "npy" and not (self.path and Path(self.path).is_file()):
            raise Invalid("path", f"encoder npy needs `path`, an existing .npy file, got {self.path!r}")
        if self.encoder == "sentence-transformers" and not (
                self.model_path and Path(self.model_path).is_dir()):
            raise Invalid("model_path", "encoder sentence-transformers needs `model_path`, an "
                                        f"existing model folder, got {self.model_path!r}")
        if self.encoder == "openai":
            if not (self.url and self.url.startswith(("http://", "https://"))):
                raise Invalid("url", "encoder openai needs `url`, an http(s):// embeddings "
                                     f"endpoint, got {mask_url(str(self.url))!r}")
            if not self.model:
                raise Invalid("model", "encoder openai needs `model`, e.g. text-embedding-3-small, "
                                       f"got {self.model!r}")
            problem = endpoint_problem(self.url, self.api_key_env, os.environ)  # key's rules
            if problem:
                raise Invalid(*problem)


def embedding_config_from_dict(d: Mapping, source: str) -> EmbeddingConfig:
    """Validate the `embedding:` settings once; errors name `source`, the field and the value."""
    return from_mapping(EmbeddingConfig, d, source, noun="embedding setting")


# ---------------------------------------------------------------------------------------
# Datasets: what each format is

FORMATS = ("ml-100k", "faerec", "amazon", "yelp", "csv")
# The settings each format reads, beyond the common ones. A setting given for a format
# that ignores it is reported: it is almost always a mistake in the file.
COMMON_SETTINGS = {"format", "name", "min_sequence_length", "max_text_chars", "cache_dir"}
_FILTERS_AND_PROMPT = {"min_user_interactions", "min_item_interactions", "prompt_template"}
FORMAT_SETTINGS = {
    "ml-100k": _FILTERS_AND_PROMPT,
    # no filters: they would renumber the items and break the alignment with the .npy rows
    "faerec": {"interactions", "embeddings"},
    "amazon": _FILTERS_AND_PROMPT | {"interactions", "items"},
    "yelp": _FILTERS_AND_PROMPT | {"interactions", "items", "date_start", "date_end"},
    "csv": _FILTERS_AND_PROMPT | {"interactions", "items", "user_column", "item_column",
                                  "time_column", "item_id_column", "text_columns", "separator"},
}
FORMAT_DEFAULTS = {
    "amazon": {"min_user_interactions": 5, "min_item_interactions": 5},
    "yelp": {"min_user_interactions": 5, "min_item_interactions": 5,
             "date_start": "2000-01-01", "date_end": "2019-12-31"},
}
# what a custom prompt_template may use in the formats with a fixed metadata layout
FORMAT_FIELDS = {
    "ml-100k": {"title", "year", "genres"},
    "amazon": {"title", "brand", "price", "categories", "description"},
    "yelp": {"name", "categories", "type", "is_open", "review_count", "city", "state",
             "stars", "address"},
}
PATH_SETTINGS = ("interactions", "items", "embeddings", "cache_dir")
SHIPPED_DATASETS = PROJECT_ROOT / "search_spaces" / "datasets"  # `--dataset beauty` = beauty.yaml


def template_fields(template: str) -> set[str]:
    """The `{field}` names used by a prompt template (`{{`/`}}` are literal braces)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"prompt template {template!r} is malformed: {e}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        # only plain `{column}` is supported: positional, attribute and format specs would
        # make a column name do something surprising
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"prompt template {template!r}: placeholder {{{name}}} "
                              "must be a plain column name like {title}")
        names.add(name)
    return names


def _iso_date(value: str | None) -> bool:
    try:
        return value is None or date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


@dataclass(frozen=True)
class DatasetConfig:
    """Where a dataset lies and how to read it. Build it with `dataset_config_from_dict` or
    `resolve_dataset`: they also fill in the format's defaults and resolve relative paths."""
    format: str = rule("ml-100k", choices=FORMATS)  # ml-100k (embedded) | faerec | amazon | yelp | csv
    name: str = ""  # shown in logs and MLflow; "": the interactions file name, or the format
    interactions: str | None = None  # faerec .txt, Amazon/Yelp review dump, or table
    items: str | None = None  # Amazon metadata, Yelp business dump, or item table (csv)
    embeddings: str | None = None  # faerec: precomputed (n_items, d) .npy, row i-1 = item i
    user_column: str = "user_id"  # csv column names
    item_column: str = "item_id"
    time_column: str | None = "timestamp"  # numbers or dates; None: the rows are in time order
    item_id_column: str | None = None  # item id column of the items table; None: item_column
    text_columns: tuple[str, ...] = ()  # csv prompt "column: value; ..."; () = all but the id
    prompt_template: str | None = None  # "{field}" placeholders; None: the format's own
    separator: str | None = None  # csv/tsv separator; None: from the extension
    min_user_interactions: int = rule(0, ge=0)  # one filter pass (paper: 5 for Amazon)
    min_item_interactions: int = rule(0, ge=0)
    min_sequence_length: int = rule(3, ge=3)  # shorter users are not evaluated (the paper: 3);
                                              # validation needs one history item before 2 targets
    date_start: str | None = None  # yelp: first and last review day kept (YYYY-MM-DD)
    date_end: str | None = None
    max_text_chars: int = rule(4095, ge=1)  # the paper cuts prompts here
    cache_dir: str | None = None  # None: $FAEREC_CACHE, else <repo>/.cache

    def __post_init__(self):
        check_fields(self)
        if not self.name:  # reviews_Beauty.json.gz -> reviews_Beauty
            name = Path(self.interactions).name.split(".")[0] if self.interactions else self.format
            object.__setattr__(self, "name", name)  # frozen: the one way to set a default
        for key in ("date_start", "date_end"):
            if not _iso_date(getattr(self, key)):
                raise Invalid(key, f"is not a YYYY-MM-DD date, got {getattr(self, key)!r}")
        if self.date_start and self.date_end and self.date_start > self.date_end:
            raise Invalid("date_start", f"is after date_end = {self.date_end!r}, "
                                        f"got {self.date_start!r}")
        if self.format == "csv" and self.items is None and (self.prompt_template or self.text_columns):
            raise Invalid("prompt_template", "and text_columns need dataset.items (the table "
                                             "holding the item text)")
        if self.prompt_template and self.text_columns:
            raise Invalid("prompt_template", "give dataset.prompt_template or "
                                             "dataset.text_columns, not both")
        try:
            used = template_fields(self.prompt_template or "")
            template_fields("; ".join(f"{{{c}}}" for c in self.text_columns))  # they become fields
        except ConfigError as e:
            raise Invalid("prompt_template", f"(or text_columns): {e}") from None
        allowed = FORMAT_FIELDS.get(self.format)
        if allowed is not None and not used <= allowed:
            raise Invalid("prompt_template", f"uses {{{sorted(used - allowed)[0]}}}; format "
                                             f"{self.format!r} has: {', '.join(sorted(allowed))}")


def dataset_config_from_dict(d, source: str, base_dir: str | Path | None = None) -> DatasetConfig:
    """Validated `DatasetConfig` from a YAML section; `source` names it in errors. Relative
    paths resolve against `base_dir` (the YAML file's folder), else the working directory."""
    path = "dataset"
    check_keys(DatasetConfig, d, source, path, noun="dataset setting")
    fmt = d.get("format", "ml-100k")
    if fmt in FORMATS:
        for key in sorted(set(d) - COMMON_SETTINGS - FORMAT_SETTINGS[fmt]):
            if d[key] is not None:
                raise ConfigError(f"{where(source, path, key)}: is not used by format {fmt!r} "
                                  f"(it reads: {', '.join(sorted(FORMAT_SETTINGS[fmt]))}), "
                                  f"got {d[key]!r}")
        if fmt != "ml-100k" and d.get("interactions") is None:
            raise ConfigError(f"{where(source, path, 'interactions')}: format {fmt!r} needs "
                              "a file path, got None")
    values = {**(FORMAT_DEFAULTS.get(fmt, {}) if isinstance(fmt, str) else {}), **d}
    for key in PATH_SETTINGS:
        if isinstance(values.get(key), str):
            values[key] = str(Path(base_dir or ".", values[key]).expanduser())
    return from_mapping(DatasetConfig, values, source, path, noun="dataset setting")


def resolve_dataset(arg: str) -> DatasetConfig:
    """`--dataset` value: "ml-100k", the name of a file in search_spaces/datasets/, or a path
    to a YAML file holding the dataset settings at top level or under a `dataset:` key."""
    if arg == "ml-100k":
        return dataset_config_from_dict({"format": "ml-100k"}, "--dataset ml-100k")
    path = Path(arg)
    if path.suffix not in (".yaml", ".yml") and (SHIPPED_DATASETS / f"{arg}.yaml").is_file():
        path = SHIPPED_DATASETS / f"{arg}.yaml"
    if not path.is_file():
        names = ["ml-100k"] + sorted(p.stem for p in SHIPPED_DATASETS.glob("*.yaml"))
        raise ConfigError(f"--dataset {arg!r}: no such YAML file, and not a built-in dataset "
                          f"({', '.join(names)})")
    doc = load_yaml(path, "dataset file")
    section = doc.get("dataset", doc) if isinstance(doc, dict) else doc
    if isinstance(section, str):  # `dataset: ml-100k` or `dataset: other.yaml` in a search space
        return resolve_dataset(str(path.parent / section) if section.endswith((".yaml", ".yml"))
                               else section)
    return dataset_config_from_dict(section or {}, str(path), base_dir=path.parent)


