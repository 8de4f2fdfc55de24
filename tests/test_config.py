"""The one settings home: the reference_code preset, the one validation mechanism's error
messages, and the import graph of model/ and tuning/ (no cycle)."""

import ast
from pathlib import Path

import pytest

from model.config import (PROJECT_ROOT, REFERENCE_CODE, FAERecConfig, TrainConfig,
                          dataset_config_from_dict, embedding_config_from_dict, settings_from_dict)
from model.errors import ConfigError

PAPER_MODEL, PAPER_TRAIN = FAERecConfig(), TrainConfig()
PARTS = {"gate": "code", "input_path": "code", "score_layernorm": True, "bce_items": "id",
         "align_items": "occurrence", "two_item_users": "pair", "batch_all_users": True,
         "min_epochs": 61}


def value(model_cfg, train_cfg, name):
    return getattr(model_cfg, name) if hasattr(model_cfg, name) else getattr(train_cfg, name)


def test_backbone_choices_are_the_backbones():
    from model.backbones import BACKBONES
    from model.config import BACKBONE_NAMES
    assert set(BACKBONE_NAMES) == set(BACKBONES)


def test_defaults_are_the_papers_reading():
    for name, code_choice in PARTS.items():
        assert value(PAPER_MODEL, PAPER_TRAIN, name) != code_choice, name


def test_the_preset_selects_every_part_of_the_authors_code():
    model_cfg, train_cfg = settings_from_dict({"preset": "reference_code"}, "cli")
    for name, code_choice in PARTS.items():
        assert value(model_cfg, train_cfg, name) == code_choice, name
    assert train_cfg.epochs == 500 and train_cfg.patience_min_steps == 0 and train_cfg.patience == 10
    assert set(REFERENCE_CODE) <= set(PARTS) | {"epochs", "patience_min_steps"}
    # the plain backbones start validating later, per backbone (the code's Backbone/ logs)
    for backbone, first in (("sasrec", 201), ("fmlprec", 301), ("lrurec", 101)):
        _, train_cfg = settings_from_dict({"preset": "reference_code", "method": "base",
                                           "backbone": backbone}, "cli")
        assert train_cfg.min_epochs == first
    # the code has no NARM, LightSANs or gMLP: the preset leaves min_epochs alone for them
    _, train_cfg = settings_from_dict({"preset": "reference_code", "method": "base", "backbone": "narm"}, "cli")
    assert train_cfg.min_epochs == 0 and train_cfg.epochs == 500


@pytest.mark.parametrize("name", sorted(PARTS))
def test_each_part_stays_selectable_alone_and_explicit_settings_beat_the_preset(name):
    alone = settings_from_dict({name: PARTS[name]}, "cli")
    for other in PARTS:  # one part changes, the others keep the paper's reading
        expected = PARTS[name] if other == name else value(PAPER_MODEL, PAPER_TRAIN, other)
        assert value(*alone, other) == expected
    paper_value = value(PAPER_MODEL, PAPER_TRAIN, name)
    mixed = settings_from_dict({"preset": "reference_code", name: paper_value}, "cli")
    assert value(*mixed, name) == paper_value
    assert all(value(*mixed, o) == PARTS[o] for o in PARTS if o != name)


def test_the_preset_from_the_command_line_and_a_search_space(tmp_path):
    from model.train import parse_assignments
    assert parse_assignments(["preset=reference_code"], "--set") == {"preset": "reference_code"}
    from tuning.space import define_by_run, load_space, trial_settings
    import optuna
    space = tmp_path / "s.yaml"
    space.write_text("name: p\ndataset: ml-100k\nfixed: {preset: reference_code, input_path: paper}\n"
                     "search: {num_samples: 2, max_epochs: 3}\n"
                     "params: {tau: {type: uniform, low: 0.05, high: 0.2}}\n")
    config = define_by_run(load_space(space))(optuna.create_study().ask())
    model_cfg, train_cfg = settings_from_dict(trial_settings(config), "trial")
    assert model_cfg.gate == "code" and model_cfg.input_path == "paper"  # fixed beats the preset
    assert train_cfg.epochs == 3  # the search's budget beats the preset's 500
    space.write_text(space.read_text().replace("preset: reference_code", "preset: authors"))
    with pytest.raises(ConfigError, match=r"s.yaml: fixed.preset: must be one of reference_code, "
                                          r"got 'authors'"):
        load_space(space)


@pytest.mark.parametrize("call, message", [
    (lambda: settings_from_dict({"lamda": 0.1}, "x.yaml", "fixed"),
     r"^x.yaml: fixed: unknown setting 'lamda' \(did you mean 'lambda'\?\); allowed: "),
    (lambda: settings_from_dict({"lambda": float("inf")}, "x.yaml", "fixed"),
     r"^x.yaml: fixed.lambda: expected a finite number, got inf$"),
    (lambda: settings_from_dict({"tau": float("nan")}, "x.yaml"),
     r"^x.yaml: tau: expected a finite number, got nan$"),
    (lambda: settings_from_dict({"min_epochs": -1}, "x.yaml"), r"^x.yaml: min_epochs: must be >= 0, got -1$"),
    (lambda: settings_from_dict({"two_item_users": "keep"}, "x.yaml"),
     r"^x.yaml: two_item_users: must be one of drop, pair, got 'keep'$"),
    (lambda: settings_from_dict({"dropout": 1.0}, "x.yaml"), r"^x.yaml: dropout: must be >= 0 and < 1, got 1.0$"),
    (lambda: settings_from_dict({"num_heads": 3}, "x.yaml"),
     r"^x.yaml: num_heads: must divide hidden_size 128, got 3$"),
    (lambda: embedding_config_from_dict({"batchsize": 3}, "s.yaml: embedding"),
     r"^s.yaml: embedding: unknown embedding setting 'batchsize' \(did you mean 'batch_size'\?\)"),
    (lambda: embedding_config_from_dict({"timeout_s": float("-inf")}, "s.yaml"),
     r"^s.yaml: timeout_s: expected a finite number, got -inf$"),
    (lambda: dataset_config_from_dict({"format": "csv", "interactions": "a.csv", "time_colum": "t"}, "d.yaml"),
     r"^d.yaml: dataset: unknown dataset setting 'time_colum' \(did you mean 'time_column'\?\)"),
    (lambda: dataset_config_from_dict({"max_text_chars": 0}, "d.yaml"),
     r"^d.yaml: dataset.max_text_chars: must be >= 1, got 0$"),
])
def test_one_mechanism_names_file_path_value_and_suggests(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def write_space(tmp_path, fixed: str, search: str) -> Path:
    space = tmp_path / "s.yaml"
    space.write_text(f"name: p\ndataset: ml-100k\nfixed: {fixed}\nsearch: {search}\n")
    return space


def test_the_search_space_uses_the_same_mechanism(tmp_path):
    from tuning.space import load_space
    space = write_space(tmp_path, "{lambda: .inf}", "{num_samples: 2, max_epochs: 3, resources: {cpus: 2}}")
    with pytest.raises(ConfigError, match=r"s.yaml: search.resources: unknown key 'cpus' "
                                          r"\(did you mean 'cpu'\?\); allowed: cpu, gpu"):
        load_space(space)
    space.write_text(space.read_text().replace("cpus", "cpu"))
    with pytest.raises(ConfigError, match=r"s.yaml: fixed.lambda: expected a finite number, got inf"):
        load_space(space)


def _project_imports(path: Path) -> set[str]:
    """Every `model.*` / `tuning.*` module a file imports, at any depth (functions and
    TYPE_CHECKING blocks included: a cycle hidden there is still a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
        found |= {n for n in names if n.split(".")[0] in ("model", "tuning") and "." in n}
    return found


def import_graph() -> dict[str, set[str]]:
    return {f"{p.parent.name}.{p.stem}": _project_imports(p)
            for package in ("model", "tuning") for p in sorted((PROJECT_ROOT / package).glob("*.py"))
            if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (depth-first search), or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if cycle := visit(dep):
                return cycle
        path.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "model.datasets" not in graph["model.config"] and "model.data" not in graph["model.datasets"]
    assert graph["model.text"] <= {"model.cache", "model.config", "model.datasets", "model.errors",
                                   "model.urls"}  # urls: a leaf (masking, the endpoint key rule)
    assert not any(m.startswith("tuning") for name, deps in graph.items() if name.startswith("model")
                   for m in deps), "model/ never imports tuning/"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_one():
    graph = import_graph()
    graph["model.config"] = graph["model.config"] | {"model.data"}  # data -> config -> data
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"model.config", "model.data"} <= set(cycle)


def test_asha_must_not_judge_trials_before_their_first_validation(tmp_path):
    from tuning.space import load_space
    space = write_space(tmp_path, "{preset: reference_code}",
                        "{num_samples: 2, max_epochs: 100, scheduler: {type: asha, grace_period: 61}}")
    with pytest.raises(ConfigError, match=r"s.yaml: search.scheduler.grace_period: 61 epochs, but trials "
                                          r"first validate after min_epochs = 61"):
        load_space(space)
    space.write_text(space.read_text().replace("grace_period: 61", "grace_period: 62"))
    assert load_space(space).search.grace_period == 62
