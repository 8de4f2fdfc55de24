"""The long-tail baselines (llmesr, cities, melt) end to end: two epochs from
`python -m model.train --method M`, and the training loss falls within one run."""

import json
import math

import pytest

from model.config import settings_from_dict
from model.data import DatasetConfig
from model.text import EmbeddingConfig
from model.train import fit, load_inputs, main

SMALL = {"hidden_size": 16, "max_len": 10, "num_layers": 1, "num_threads": 1, "batch_size": 16}
OWN = {"llmesr": {"llmesr.sim_users": 3},
       # stage 2 from the second epoch; 23 of tiny.txt's 40 items have <= 12 training interactions
       "cities": {"cities.pretrain_epochs": 1, "cities.tail_max_count": 12, "cities.window": 4},
       "melt": {"melt.pretrain_epochs": 1}}


@pytest.mark.parametrize("method", ["llmesr", "cities", "melt"])
def test_trains_end_to_end_from_the_command_line(method, tmp_path, tiny_dataset, capsys):
    path, emb = tiny_dataset
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(f"format: faerec\ninteractions: {path}\nembeddings: {emb}\n"
                         f"cache_dir: {tmp_path / 'cache'}\n")
    settings = {**SMALL, **OWN.get(method, {})}
    flags = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    assert main(["--dataset", str(yaml_path), "--method", method, "--epochs", "2", "--json", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epochs_run"] == 2 and out["settings"]["method"] == method
    assert all(math.isfinite(v) for k, v in out.items() if k.startswith("test/"))
    inputs = load_inputs(DatasetConfig(format="faerec", interactions=str(path), embeddings=str(emb),
                                       cache_dir=str(tmp_path / "cache")),
                         EmbeddingConfig(encoder="npy", path=str(emb), cache_dir=str(tmp_path / "cache")))
    if method == "melt":  # its tail-item overwrite before every epoch makes the BCE jump each
        return            # time (README, MELT); tests/test_melt.py shows its loss falling on a walk
    history = fit(inputs, *settings_from_dict({"method": method, **settings, "epochs": 8}, "test")).history
    first = 1 if method == "cities" else 0  # CITIES' loss is the inference MSE from its stage 2 on
    assert history[-1]["train/loss"] < history[first]["train/loss"]
