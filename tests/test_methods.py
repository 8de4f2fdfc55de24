"""The method registry and the LLM-enhanced baselines (llminit, alphafuse, rlmrec_con,
rlmrec_gen): their settings in the flat namespace, each extra loss against a hand-worked or
loop computation, and that each trains end to end and overfits a tiny set."""

import json
import math

import numpy as np
import pytest
import torch

from model.config import FAERecConfig, settings_from_dict, settings_to_dict
from model.errors import ConfigError
from model.methods import METHODS, build_model
from model.alphafuse import semantic_coordinates
from model.rlmrec import RLMRecCon, RLMRecGen
from model.train import fit, load_inputs, main
from model.data import DatasetConfig
from model.text import EmbeddingConfig

from conftest import deterministic_sequences, fit_sequences, hit_rate

N_ITEMS, D, D_LLM, L = 30, 16, 24, 8
pytestmark = pytest.mark.usefixtures("one_thread")
OURS = ("llminit", "alphafuse", "rlmrec_con", "rlmrec_gen")


def tiny_config(method, **settings):
    return settings_from_dict({"method": method, "hidden_size": D, "max_len": L, "num_layers": 1,
                               **({"alphafuse.null_dim": 8} if method == "alphafuse" else {}),
                               **settings}, "test")[0]


def tiny_model(method, seed=0, **settings):
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(N_ITEMS, D_LLM, generator=g)
    pca = torch.randn(N_ITEMS, D, generator=g) * 0.1
    torch.manual_seed(seed)
    return build_model(tiny_config(method, **settings), N_ITEMS, llm, pca,
                       torch.randint(1, 9, (N_ITEMS + 1,), generator=g))


# ------------------------------------------------------------------ settings


def test_a_method_setting_belongs_to_its_method():
    model_cfg, _ = settings_from_dict({"method": "rlmrec_gen", "rlmrec_gen.mask_ratio": 0.3}, "x.yaml")
    assert model_cfg.method_settings.mask_ratio == 0.3 and model_cfg.method_settings.tau == 0.2
    with pytest.raises(ConfigError, match=r"x.yaml: fixed.rlmrec_con.tau: is a setting of method "
                                          r"rlmrec_con, but method is faerec"):
        settings_from_dict({"rlmrec_con.tau": 0.1}, "x.yaml", "fixed")
    with pytest.raises(ConfigError, match=r"x.yaml: rlmrec_con.tau: must be > 0, got 0"):
        settings_from_dict({"method": "rlmrec_con", "rlmrec_con.tau": 0}, "x.yaml")
    with pytest.raises(ConfigError, match=r"unknown setting 'rlmrec_con.weigth' \(did you mean "
                                          r"'rlmrec_con.weight'\?\)"):
        settings_from_dict({"method": "rlmrec_con", "rlmrec_con.weigth": 0.1}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: alphafuse.null_dim: must be <= hidden_size = 32, got 64"):
        settings_from_dict({"method": "alphafuse", "hidden_size": 32}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: method: must be one of faerec, base, llminit.*got 'rlmrec'"):
        settings_from_dict({"method": "rlmrec"}, "x.yaml")


def test_method_settings_round_trip_and_defaults():
    model_cfg, train_cfg = settings_from_dict({"method": "alphafuse", "alphafuse.cover": True}, "x")
    flat = settings_to_dict(model_cfg, train_cfg)
    assert flat["alphafuse.cover"] is True and flat["alphafuse.null_dim"] == 64
    assert "method_settings" not in flat and not any(k.startswith("rlmrec") for k in flat)
    assert settings_from_dict(flat, "again") == (model_cfg, train_cfg)
    assert FAERecConfig(method="rlmrec_con").method_settings == METHODS["rlmrec_con"].settings()
    assert FAERecConfig(method="base").method_settings is None


def test_the_command_line_offers_the_registry(capsys):
    with pytest.raises(SystemExit):
        main(["--method", "nope"])
    err = capsys.readouterr().err
    assert all(name in err for name in METHODS)


# ------------------------------------------------------------------ losses by hand


def test_rlmrec_con_alignment_by_hand():
    """Two items, σ↓ = identity: e1 = (1, 0), e2 = (0, 1); σ↓(s1) = (2, 0), σ↓(s2) = (1, 1).
    cos: e1·s1 = 1, e1·s2 = 1/√2, e2·s1 = 0, e2·s2 = 1/√2; τ = 0.5."""
    cfg = settings_from_dict({"method": "rlmrec_con", "hidden_size": 2, "num_heads": 1,
                              "rlmrec_con.tau": 0.5}, "t")[0]
    model = RLMRecCon(cfg, 2, torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    model.down = torch.nn.Identity()
    with torch.no_grad():
        model.id_embedding.weight[1:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    row1 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(r / 0.5)))
    row2 = -math.log(math.exp(r / 0.5) / (math.exp(0 / 0.5) + math.exp(r / 0.5)))
    assert model.alignment_loss(torch.tensor([1, 2])).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)


def infonce_loop(anchors, targets, tau, item_ids=None):
    """-log softmax over the targets, one anchor at a time; other copies of the same item skipped."""
    total = 0.0
    for i, a in enumerate(anchors.tolist()):
        sims = {j: float(np.dot(a, t) / np.linalg.norm(a) / np.linalg.norm(t)) / tau
                for j, t in enumerate(targets.tolist())
                if j == i or item_ids is None or item_ids[j] != item_ids[i]}
        total += -sims[i] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / len(anchors)


def test_rlmrec_con_aligns_the_batch_distinct_items():
    model = tiny_model("rlmrec_con", **{"rlmrec_con.weight": 0.3})
    inputs = torch.tensor([[0, 0, 3, 5, 3], [0, 7, 5, 9, 2]])
    positives = torch.tensor([[0, 0, 5, 3, 4], [0, 5, 9, 2, 11]])
    negatives = torch.tensor([[0, 0, 20, 21, 20], [0, 22, 1, 23, 24]])
    torch.manual_seed(0)
    parts = model.loss(inputs, positives, negatives, epoch=0)
    ids = sorted(set(torch.cat([inputs, positives, negatives]).flatten().tolist()) - {0})
    with torch.no_grad():
        e_id = model.id_embedding.weight[ids]
        mapped = model.down(model.llm_embedding[ids])
    assert parts["align"].item() == pytest.approx(infonce_loop(e_id, mapped, 0.2), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(parts["rec"].item() + 0.3 * parts["align"].item(), rel=1e-6)


def test_rlmrec_gen_reconstruction_by_loop():
    """σ↑ = identity; outputs at 4 masked positions, item 3 masked twice (not its own negative)."""
    cfg = settings_from_dict({"method": "rlmrec_gen", "hidden_size": 4, "num_heads": 1}, "t")[0]
    g = torch.Generator().manual_seed(0)
    model = RLMRecGen(cfg, 5, torch.randn(5, 4, generator=g))
    model.up = torch.nn.Identity()
    h = torch.randn(4, 4, generator=g)
    items = torch.tensor([3, 1, 3, 5])
    expected = infonce_loop(h, model.llm_embedding[items], 0.2, items.tolist())
    assert model.reconstruction_loss(h, items).item() == pytest.approx(expected, rel=1e-5)
    assert model.reconstruction_loss(h[:1], items[:1]).item() == 0.0  # one masked position: nothing to contrast


def test_rlmrec_gen_masks_input_positions():
    """mask_ratio near 1: every real input position shows the mask token, so an item that is
    only ever an input gets no gradient; near 0: nothing is masked, the loss is base's."""
    inputs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 1]])
    positives = torch.tensor([[0, 2, 3, 7], [5, 6, 1, 8]])
    negatives = torch.tensor([[0, 20, 21, 22], [23, 24, 25, 26]])
    model = tiny_model("rlmrec_gen", **{"rlmrec_gen.mask_ratio": 0.999999, "dropout": 0.0})
    torch.manual_seed(0)
    model.loss(inputs, positives, negatives, epoch=0)["loss"].backward()
    grad = model.id_embedding.weight.grad
    assert grad[4].abs().sum() == 0 and grad[7].abs().sum() > 0  # 4: input only; 7: a positive
    assert model.mask_token.grad.abs().sum() > 0

    model = tiny_model("rlmrec_gen", **{"rlmrec_gen.mask_ratio": 1e-9, "dropout": 0.0})
    base = tiny_model("base", dropout=0.0)
    base.load_state_dict(model.state_dict(), strict=False)
    parts = model.loss(inputs, positives, negatives, epoch=0)
    assert parts["recon"].item() == 0.0
    assert parts["loss"].item() == pytest.approx(base.loss(inputs, positives, negatives, 0)["loss"].item(), rel=1e-6)


def test_alphafuse_semantic_coordinates_by_hand():
    """Four items on two axes of a 3-d language space: variance 6 along x (±3), 2/3 along y (±1)
    (unbiased, n - 1 = 3), none along z. The top-2 directions are x and y."""
    llm = torch.tensor([[3.0, 0, 0], [-3.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0]])
    z = semantic_coordinates(llm, 2, standardize=False)
    z = z * torch.sign(z.abs().max(0).values * z[[0, 2]].diagonal())  # SVD's sign is arbitrary
    torch.testing.assert_close(z, torch.tensor([[3.0, 0], [-3, 0], [0, 1], [0, -1]]))
    w = semantic_coordinates(llm, 4, standardize=True)  # columns past the rank (z; the 4th) stay 0
    w = w * torch.sign(w[0, 0]) * torch.tensor([1.0, float(torch.sign(w[2, 1])), 1, 1])
    s = 1 / math.sqrt(6), 1 / math.sqrt(2 / 3)
    torch.testing.assert_close(w, torch.tensor([[3 * s[0], 0, 0, 0], [-3 * s[0], 0, 0, 0],
                                                [0, s[1], 0, 0], [0, -s[1], 0, 0]]))


def test_alphafuse_matches_numpy_and_learns_only_in_the_null_space():
    """Their recipe in numpy (np.cov, np.linalg.svd, U[:, :d] diag(S^-1/2)), equal up to each
    column's sign; the item embedding adds e only to the last null_dim coordinates."""
    model = tiny_model("alphafuse", **{"alphafuse.id_init": "normal"})
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(N_ITEMS, D_LLM, generator=g).double().numpy()
    U, S, _ = np.linalg.svd(np.cov(raw - raw.mean(0), rowvar=False))
    expected = (raw - raw.mean(0)) @ U[:, :D] @ np.diag(np.sqrt(1 / S[:D]))
    z = model.semantic[1:].numpy()
    signs = np.sign((z * expected).sum(0))
    np.testing.assert_allclose(z * signs, expected, rtol=1e-4, atol=1e-4)
    f = model.item_embeddings(torch.arange(N_ITEMS + 1))
    e = model.id_embedding.weight
    torch.testing.assert_close(f[:, :D - 8], model.semantic[:, :D - 8])
    torch.testing.assert_close(f[:, D - 8:], model.semantic[:, D - 8:] + e)
    assert "semantic" not in dict(model.named_parameters()) and e.shape == (N_ITEMS + 1, 8)
    covered = tiny_model("alphafuse", **{"alphafuse.cover": True, "alphafuse.id_init": "normal"})
    torch.testing.assert_close(covered.item_embeddings(torch.tensor([3]))[0, D - 8:],
                               covered.id_embedding.weight[3])


def test_llminit_starts_from_the_pca_table():
    model = tiny_model("llminit")
    g = torch.Generator().manual_seed(0)
    torch.randn(N_ITEMS, D_LLM, generator=g)
    torch.testing.assert_close(model.id_embedding.weight[1:], torch.randn(N_ITEMS, D, generator=g) * 0.1)
    assert model.id_embedding.weight[0].abs().sum() == 0


# ------------------------------------------------------------------ it learns


@pytest.mark.parametrize("method", OURS)
def test_overfits_a_tiny_deterministic_dataset(method):
    seqs = deterministic_sequences(N_ITEMS, L + 1)
    model = tiny_model(method, dropout=0.1)
    assert hit_rate(model, seqs[:, :-1], seqs[:, -1]) <= 0.5
    losses = fit_sequences(model, seqs, N_ITEMS)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert hit_rate(model, seqs[:, :-1], seqs[:, -1]) >= 0.9


@pytest.mark.parametrize("method", OURS)
def test_trains_end_to_end_from_the_command_line(method, tmp_path, tiny_dataset, capsys):
    path, emb = tiny_dataset
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(f"format: faerec\ninteractions: {path}\nembeddings: {emb}\n"
                         f"cache_dir: {tmp_path / 'cache'}\n")
    small = ["--set", "hidden_size=16", "--set", "max_len=10", "--set", "num_layers=1",
             "--set", "num_threads=1", "--set", "batch_size=16"]
    if method == "alphafuse":
        small += ["--set", "alphafuse.null_dim=8"]
    assert main(["--dataset", str(yaml_path), "--method", method, "--epochs", "2", "--json", *small]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epochs_run"] == 2 and out["settings"]["method"] == method
    assert all(math.isfinite(v) for k, v in out.items() if k.startswith("test/"))
    # the loss falls over a few epochs of the same run in process
    settings = {"method": method, "hidden_size": 16, "max_len": 10, "num_layers": 1, "batch_size": 16,
                "epochs": 8, **({"alphafuse.null_dim": 8} if method == "alphafuse" else {})}
    inputs = load_inputs(DatasetConfig(format="faerec", interactions=str(path), embeddings=str(emb),
                                       cache_dir=str(tmp_path / "cache")),
                         EmbeddingConfig(encoder="npy", path=str(emb), cache_dir=str(tmp_path / "cache")))
    history = fit(inputs, *settings_from_dict(settings, "test")).history
    assert history[-1]["train/loss"] < history[0]["train/loss"]
