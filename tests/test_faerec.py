"""FAERec: losses against loop/numpy computations, the curriculum, the gate, the ablation
switches, scoring, and that base and FAERec can overfit a tiny deterministic dataset."""

import math

import numpy as np
import pytest
import torch

from model.errors import ConfigError
from model.faerec import (CurriculumSchedule, FAERecConfig, GatingFusion, feature_alignment_loss,
                          item_alignment_loss)
from model.methods import build_model

from conftest import deterministic_sequences, fit_sequences, hit_rate

N_ITEMS, D, D_LLM, L = 30, 16, 24, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides):
    return FAERecConfig(**{"hidden_size": D, "max_len": L, "proj_hidden": 32, "period": 10, "w_min": 0.6,
                           **overrides})


def tiny_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    llm = torch.randn(N_ITEMS, D_LLM, generator=g)
    centred = llm - llm.mean(0)
    pca = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[:D].T  # (n_items, D)
    popularity = torch.randint(1, 20, (N_ITEMS + 1,), generator=g)
    popularity[0] = 0
    return llm, pca, popularity


def tiny_model(seed=0, **overrides):
    cfg = tiny_config(**overrides)
    llm, pca, popularity = tiny_inputs()
    torch.manual_seed(seed)
    return build_model(cfg, N_ITEMS, llm if cfg.method == "faerec" else None, pca, popularity)


def tiny_batch(seed=0):
    """Left-padded inputs with repeated items, next-item targets, negatives (0 at padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([8, 5, 3, 1])
    ids = torch.randint(1, 12, (4, L + 1), generator=g)  # few distinct ids: duplicates across the batch
    real = torch.arange(L + 1) >= (L + 1 - (lengths + 1))[:, None]
    ids = ids * real
    inputs, positives = ids[:, :-1], ids[:, 1:]
    negatives = torch.randint(1, N_ITEMS + 1, (4, L), generator=g) * (positives > 0)
    return inputs, positives, negatives


# ------------------------------------------------------------------ losses, eqs. (5-10)


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("with_ids", [True, False])
def test_item_alignment_loss_matches_loop(with_ids):
    torch.manual_seed(0)
    e_id, e_llm = torch.randn(7, 5), torch.randn(7, 5)
    ids = [3, 1, 3, 2, 5, 1, 3]
    tau = 0.1
    total = 0.0
    for i in range(7):
        negatives = [j for j in range(7) if j == i or not with_ids or ids[j] != ids[i]]
        denominator = sum(math.exp(cosine(e_id[i].tolist(), e_llm[j].tolist()) / tau) for j in negatives)
        total -= math.log(math.exp(cosine(e_id[i].tolist(), e_llm[i].tolist()) / tau) / denominator)
    got = item_alignment_loss(e_id, e_llm, tau, torch.tensor(ids) if with_ids else None)
    assert got.item() == pytest.approx(total / 7, rel=1e-5)


def barlow_twins_numpy(e_id, e_llm, lam, eps=1e-6):
    z = [(e - e.mean(0)) / np.sqrt(e.var(0) + eps) for e in (e_id, e_llm)]
    c = z[0].T @ z[1] / len(e_id)
    off = c - np.diag(np.diag(c))
    return ((1 - np.diag(c)) ** 2).sum() + lam * (off**2).sum()


def test_feature_alignment_loss_matches_numpy_with_ties_at_the_median():
    rng = np.random.default_rng(0)
    e_id, e_llm = rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) * 3 + 1
    popularity = np.array([1, 5, 3, 3, 3, 9, 3, 2, 7, 3])  # median 3, tied five times
    high = popularity > np.median(popularity)
    assert high.sum() == 3 and (~high).sum() == 7
    want = barlow_twins_numpy(e_id[high], e_llm[high], 0.01) + barlow_twins_numpy(e_id[~high], e_llm[~high], 0.01)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    got = feature_alignment_loss(t(e_id), t(e_llm), 0.01, torch.tensor(popularity))
    assert got.item() == pytest.approx(want, rel=1e-6)
    one_group = feature_alignment_loss(t(e_id), t(e_llm), 0.01, torch.tensor(popularity), grouped=False)
    assert one_group.item() == pytest.approx(barlow_twins_numpy(e_id, e_llm, 0.01), rel=1e-6)
    assert not math.isclose(got.item(), one_group.item(), rel_tol=1e-3)


def test_feature_alignment_loss_even_count_splits_in_halves():
    rng = np.random.default_rng(1)
    e_id, e_llm = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    popularity = np.array([4, 1, 6, 2, 5, 3])
    high = popularity >= 4
    want = barlow_twins_numpy(e_id[high], e_llm[high], 0.005) + barlow_twins_numpy(e_id[~high], e_llm[~high], 0.005)
    got = feature_alignment_loss(torch.tensor(e_id), torch.tensor(e_llm), 0.005, torch.tensor(popularity))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_feature_alignment_splits_at_the_median_not_the_mean():
    """One very popular item drags the mean (15.4) far above the median (3): the split
    must stay at the median, groups worked out by hand."""
    rng = np.random.default_rng(3)
    e_id, e_llm = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    popularity = np.array([1, 2, 2, 3, 4, 100, 5, 6])  # sorted: 1 2 2 3 | 4 5 6 100
    high, low = [4, 5, 6, 7], [0, 1, 2, 3]
    want = barlow_twins_numpy(e_id[high], e_llm[high], 0.01) + barlow_twins_numpy(e_id[low], e_llm[low], 0.01)
    got = feature_alignment_loss(torch.tensor(e_id), torch.tensor(e_llm), 0.01, torch.tensor(popularity))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_feature_alignment_loss_degenerate_groups_stay_finite():
    rng = np.random.default_rng(2)
    e_id, e_llm = torch.tensor(rng.normal(size=(5, 3))), torch.tensor(rng.normal(size=(5, 3)))
    same = feature_alignment_loss(e_id, e_llm, 0.01, torch.full((5,), 4))  # high group empty: one group
    assert same.item() == pytest.approx(barlow_twins_numpy(e_id.numpy(), e_llm.numpy(), 0.01), rel=1e-6)
    single = feature_alignment_loss(e_id, e_llm, 0.01, torch.tensor([1, 1, 1, 1, 9]))  # high group of one: skipped
    assert single.item() == pytest.approx(barlow_twins_numpy(e_id[:4].numpy(), e_llm[:4].numpy(), 0.01), rel=1e-6)
    e_id.requires_grad_()
    feature_alignment_loss(e_id, e_llm, 0.01, torch.tensor([1, 1, 1, 1, 9])).backward()  # the skipped group
    assert torch.isfinite(e_id.grad).all() and e_id.grad[4].abs().sum() == 0  # gives no gradient, not NaN
    constant = feature_alignment_loss(torch.ones(4, 3, dtype=torch.float64), e_llm[:4], 0.01, torch.ones(4), grouped=False)
    assert constant.item() == pytest.approx(3.0)  # z_id = 0 -> C = 0: the invariance term is d


def test_barlow_twins_is_zero_for_identical_decorrelated_views():
    e = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # uncorrelated unit-variance columns
    assert feature_alignment_loss(e, e, 1.0, torch.zeros(4), grouped=False).item() == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------ curriculum, eqs. (11-12)


def test_curriculum_values():
    schedule = CurriculumSchedule(w_max=1.0, w_min=0.6, period=20)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(5) == pytest.approx(0.8)
    assert schedule(10) == pytest.approx(0.6)
    assert schedule(15) == pytest.approx(0.8)
    assert schedule(20) == pytest.approx(1.0)
    fixed = CurriculumSchedule(w_max=1.0, w_min=0.6, period=20, enabled=False)
    assert all(fixed(t) == pytest.approx(0.8) for t in range(25))


# ------------------------------------------------------------------ gate, eqs. (3-4)


@pytest.mark.parametrize("gate", ["paper", "code"])
def test_gate_is_per_dimension_in_unit_interval(gate):
    torch.manual_seed(0)
    fusion = GatingFusion(6, gate).eval()
    e_id, e_llm = torch.randn(9, 6) * 5, torch.randn(9, 6) * 5
    g = fusion.gate(e_id, e_llm)
    assert g.shape == (9, 6) and ((g >= 0) & (g <= 1)).all()
    assert g.std(dim=1).min() > 0  # differs across dimensions, not one scalar per item
    f = fusion(e_id, e_llm)
    torch.testing.assert_close(f, g * e_id + (1 - g) * e_llm)
    assert ((f >= torch.minimum(e_id, e_llm) - 1e-6) & (f <= torch.maximum(e_id, e_llm) + 1e-6)).all()


# ------------------------------------------------------------------ the model


def test_gradients_reach_trainable_parts_but_not_the_llm_table():
    model = tiny_model()
    table = model.llm_embedding.clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.loss(*tiny_batch(), epoch=3)["loss"].backward()
    for name, module in [("projection", model.projection), ("gate", model.fusion), ("id", model.id_embedding),
                         ("backbone", model.backbone)]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert model.id_embedding.weight.grad[0].abs().sum() == 0  # padding row
    assert all(p is not model.llm_embedding for p in model.parameters())
    assert not model.llm_embedding.requires_grad and model.llm_embedding.grad is None
    optimizer.step()
    assert torch.equal(model.llm_embedding, table)
    assert "llm_embedding" not in model.state_dict()


def test_pca_initialisation():
    llm, pca, _ = tiny_inputs()
    model = tiny_model()
    torch.testing.assert_close(model.id_embedding.weight[1:], pca)
    assert (model.id_embedding.weight[0] == 0).all()
    assert torch.equal(model.llm_embedding[1:], llm) and (model.llm_embedding[0] == 0).all()
    random_init = tiny_model(pca_init=False).id_embedding.weight[1:]
    assert random_init.std().item() == pytest.approx(0.02, rel=0.2)


def expected_alignment(model, batch, occurrence=False):
    """ILA and FLA over the batch's real inputs + negatives, items gathered with Python
    sets/lists; FLA's groups split at the lower median by sorting, Barlow Twins in numpy."""
    inputs, _, negatives = batch
    items = [i for i in inputs.flatten().tolist() + negatives.flatten().tolist() if i != 0]
    ids = torch.tensor(items if occurrence else sorted(set(items)))
    e_id, e_llm = model.id_embedding(ids), model.projection(model.llm_embedding[ids])
    cfg = model.cfg
    popularity = model.popularity[ids].tolist()
    median = sorted(popularity)[(len(popularity) - 1) // 2]
    high = [p > median for p in popularity]
    groups = [high, [not h for h in high]] if cfg.pop_groups else [[True] * len(popularity)]
    fla = sum(barlow_twins_numpy(e_id.numpy()[g], e_llm.numpy()[g], cfg.lambda_)
              for g in map(np.array, groups) if g.sum() >= 2)
    return item_alignment_loss(e_id, e_llm, cfg.tau, ids), torch.tensor(fla)


@pytest.mark.parametrize("switches", [{}, {"ila": False}, {"fla": False}, {"ila": False, "fla": False},
                                      {"curriculum": False}, {"pop_groups": False}, {"align_items": "occurrence"}])
def test_each_switch_changes_exactly_its_term(switches):
    model = tiny_model(**switches).eval()  # eval: no dropout, so both computations see the same embeddings
    batch, epoch = tiny_batch(), 3
    with torch.no_grad():
        out = model.loss(*batch, epoch=epoch)
        ila, fla = expected_alignment(model, batch, occurrence=switches.get("align_items") == "occurrence")
    w1 = 0.8 if not switches.get("curriculum", True) else 0.6 + 0.4 * (1 + math.cos(2 * math.pi * epoch / 10)) / 2
    ila = ila.item() if switches.get("ila", True) else 0.0
    fla = fla.item() if switches.get("fla", True) else 0.0
    assert out["w_ila"].item() == pytest.approx(w1)
    assert out["ila"].item() == pytest.approx(ila, rel=1e-5)
    assert out["fla"].item() == pytest.approx(fla, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["rec"].item() + 0.2 * (w1 * ila + (1 - w1) * fla), rel=1e-5)


@pytest.mark.parametrize("bce_items", ["fused", "id"])
def test_rec_loss_matches_loop(bce_items):
    model = tiny_model(bce_items=bce_items).eval()
    inputs, positives, negatives = tiny_batch()
    with torch.no_grad():
        out = model.loss(inputs, positives, negatives, epoch=0)
        h = model.backbone(model.sequence_embeddings(inputs), inputs != 0)
        e_id, _, fused = model.item_embeddings(torch.arange(N_ITEMS + 1))
    items = fused if bce_items == "fused" else e_id
    terms = []
    for b in range(inputs.shape[0]):
        for t in range(L):
            if positives[b, t]:
                p, n = h[b, t] @ items[positives[b, t]], h[b, t] @ items[negatives[b, t]]
                terms.append(-math.log(1 / (1 + math.exp(-p))) - math.log(1 - 1 / (1 + math.exp(-n))))
    assert out["rec"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_without_gating_the_fusion_is_the_mean():
    model = tiny_model(gating=False).eval()
    ids = torch.tensor([1, 4, 4, 9])
    e_id, e_llm, f = model.item_embeddings(ids)
    torch.testing.assert_close(f, (e_id + e_llm) / 2)
    assert model.fusion is None


def test_base_model():
    model = tiny_model(method="base")
    assert model.cfg.dropout == 0.5 and tiny_config().dropout == 0.4
    assert not hasattr(model, "projection") and not hasattr(model, "llm_embedding")
    out = model.loss(*tiny_batch(), epoch=0)
    assert set(out) == {"loss", "rec"} and torch.equal(out["loss"], out["rec"])
    assert set(tiny_model().loss(*tiny_batch(), epoch=0)) == {"loss", "rec", "ila", "fla", "align", "w_ila"}


@pytest.mark.parametrize("overrides", [{"method": "base"}, {}, {"score_llm_weight": 0.3, "score_layernorm": True},
                                       {"score_layernorm": True, "input_path": "code"}])
def test_score_all(overrides):
    model = tiny_model(**overrides).eval()
    inputs = tiny_batch()[0]
    with torch.no_grad():
        if overrides.get("score_layernorm"):  # trained gain and bias, as if learned: scoring must use them
            norm = (model.code_input if overrides.get("input_path") == "code" else model.backbone.input).norm
            gain, bias = torch.rand(D) + 0.5, torch.randn(D)
            norm.weight.copy_(gain), norm.bias.copy_(bias)
        scores = model.score_all(inputs)
        torch.testing.assert_close(model.score_all(inputs, items=model.scoring_items()), scores)
        table, items = model.item_tables()  # evaluation's path: every item embedded once
        torch.testing.assert_close(model.score_all(inputs, items=items, table=table), scores)
        h = model.backbone(model.sequence_embeddings(inputs), inputs != 0)[:, -1]
        if overrides.get("method") == "base":
            items = model.id_embedding.weight
        else:
            w = overrides.get("score_llm_weight", 0.5)
            items = (1 - w) * model.id_embedding.weight + w * model.projection(model.llm_embedding)
            if overrides.get("score_layernorm"):  # the code's LayerNorm(e_id + proj(e_llm)) at w = 0.5, by hand
                x, eps = 2 * items, (1e-12 if overrides.get("input_path") == "code" else 1e-5)
                items = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + eps) * gain + bias
    assert scores.shape == (4, N_ITEMS + 1)
    assert (scores[:, 0] == -torch.inf).all()
    torch.testing.assert_close(scores[:, 1:], (h @ items.T)[:, 1:])


def test_state_dict_round_trip():
    model, other = tiny_model(seed=0), tiny_model(seed=1)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    inputs = tiny_batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.score_all(inputs), other.score_all(inputs))


@pytest.mark.parametrize("field, value", [("backbone", "gru"), ("method", "llm"), ("tau", 0.0), ("w_min", 1.2),
                                          ("dropout", 1.0), ("proj_dropout", -0.1), ("hidden_size", 0),
                                          ("num_heads", 3), ("lambda_", -1.0), ("align_items", "all"),
                                          ("score_llm_weight", 1.5)])
def test_config_validation_names_field_and_value(field, value):
    with pytest.raises(ConfigError) as info:
        FAERecConfig(**{field: value})
    assert field.rstrip("_") in str(info.value) and repr(value) in str(info.value)


def test_build_model_needs_its_inputs():
    llm, pca, popularity = tiny_inputs()
    with pytest.raises(ValueError):
        build_model(tiny_config(), N_ITEMS, None, pca, popularity)
    with pytest.raises(ValueError):
        build_model(tiny_config(), N_ITEMS, llm, None, popularity)
    with pytest.raises(ValueError):
        build_model(tiny_config(), N_ITEMS, llm[:-1], pca, popularity)
    with pytest.raises(ValueError):
        build_model(tiny_config(), N_ITEMS, llm, pca, None)
    build_model(tiny_config(pca_init=False), N_ITEMS, llm, None, popularity)


# ------------------------------------------------------------------ it learns


@pytest.mark.parametrize("backbone", ["sasrec", "fmlprec", "lrurec"])
@pytest.mark.parametrize("method", ["base", "faerec"])
def test_overfits_a_tiny_deterministic_dataset(method, backbone):
    seqs = deterministic_sequences(N_ITEMS, L + 1)
    model = tiny_model(method=method, backbone=backbone, dropout=0.1, proj_dropout=0.1)
    assert hit_rate(model, seqs[:, :-1], seqs[:, -1]) <= 0.5
    fit_sequences(model, seqs, N_ITEMS)
    assert hit_rate(model, seqs[:, :-1], seqs[:, -1]) >= 0.9


@pytest.mark.parametrize("backbone", ["sasrec", "lrurec"])
def test_reference_input_path_by_hand(backbone):
    """input_path "code" (the authors' models.py 32-50): LayerNorm(gate(e_id + pos, proj(e_llm) + pos)),
    dropout on each branch before the gate; the backbone takes that sequence as it is."""
    model = tiny_model(input_path="code", backbone=backbone).eval()
    inputs = tiny_batch()[0]
    with torch.no_grad():
        norm = model.code_input.norm
        norm.weight.copy_(torch.rand(D) + 0.5), norm.bias.copy_(torch.randn(D))  # as if trained
        e_id = model.id_embedding(inputs)
        e_llm = model.projection(model.llm_embedding[inputs])
        if backbone == "sasrec":  # position embedding indexed by recency: column L-1 is the most recent item
            position = model.code_input.position.weight[torch.arange(L - 1, -1, -1)]
            e_id, e_llm = e_id + position, e_llm + position
        g = torch.sigmoid(model.fusion.W2(model.fusion.W1(torch.cat([e_id, e_llm], -1))))
        x = g * e_id + (1 - g) * e_llm
        x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-12)
        expected = (x * norm.weight + norm.bias) * (inputs != 0).unsqueeze(-1)
        torch.testing.assert_close(model.sequence_embeddings(inputs), expected)
        # the backbone no longer adds positions or normalises: its input layer only masks
        x = torch.randn(4, L, D)
        torch.testing.assert_close(model.backbone.input(x, inputs != 0), x * (inputs != 0).unsqueeze(-1))
        # the loss feeds the backbone the same sequence as scoring does
        assert torch.isfinite(model.loss(*tiny_batch(), epoch=0)["loss"])
    model.train()  # dropout acts on each branch: two passes differ
    assert not torch.equal(model.sequence_embeddings(inputs), model.sequence_embeddings(inputs))
