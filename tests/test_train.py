"""The training loop: settings, negative sampling, evaluation masking, resume, CLI."""

import dataclasses
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

import model.train
from conftest import leaky_test_items, reference_metrics, reference_ranks
from model.data import DatasetConfig, load_dataset, resolve_dataset
from model.errors import ConfigError
from model.faerec import FAERec
from model.methods import build_model
from model.text import EmbeddingConfig
from model.train import (SETTING_NAMES, EvalSplit, Inputs, TrainBatches, evaluate, fit,
                         load_inputs, main, make_optimizer, settings_from_dict, train_step)


@pytest.fixture
def tiny_inputs(tmp_path, tiny_dataset):
    path, emb = tiny_dataset
    cfg = DatasetConfig(format="faerec", interactions=str(path), embeddings=str(emb),
                        cache_dir=str(tmp_path / "cache"))
    return load_inputs(cfg, EmbeddingConfig(encoder="npy", path=str(emb),
                                            cache_dir=str(tmp_path / "cache")))


SMALL = {"hidden_size": 16, "max_len": 12, "num_layers": 1, "batch_size": 16,
         "eval_batch_size": 7, "patience_min_steps": 0}


def test_settings_accept_every_field_and_name_the_source_on_errors():
    model_cfg, train_cfg = settings_from_dict({"lambda": 0.01, "lr": 1, "epochs": 3.0}, "x.yaml")
    assert model_cfg.lambda_ == 0.01 and train_cfg.lr == 1.0 and train_cfg.epochs == 3
    assert "lambda" in SETTING_NAMES and "lambda_" not in SETTING_NAMES
    with pytest.raises(ConfigError, match=r"x.yaml: unknown setting 'lamda'"):
        settings_from_dict({"lamda": 0.1}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: epochs: expected an integer, got 'ten'"):
        settings_from_dict({"epochs": "ten"}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: .*lr.*-1"):
        settings_from_dict({"lr": -1}, "x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: gating: expected a boolean"):
        settings_from_dict({"gating": "yes"}, "x.yaml")


def test_negatives_never_hit_any_item_of_the_user(tiny_inputs):
    data = tiny_inputs.data
    batches = TrainBatches(data, max_len=12, rng=np.random.default_rng(1))
    users = [u for u, s in enumerate(data.sequences) if len(s) >= 4]
    for inputs, targets, negatives in batches.epoch(8):
        assert ((negatives > 0) == (targets > 0)).all()
        for row_inp, row_neg in zip(inputs, negatives):
            # identify the user by its training input, then check against the whole sequence
            u = next(u for u in users if np.array_equal(
                data.sequences[u][:-3][-12:], row_inp[row_inp > 0]))
            assert not set(row_neg[row_neg > 0]) & set(data.sequences[u].tolist())


def test_device_batches_equal_the_host_ones_and_draw_unseen_negatives(tiny_inputs):
    # The GPU path run on the CPU: same rows in the same order as the host path (one rng),
    # negatives drawn on the device, never an item of the user, zero where the target is padding.
    data = tiny_inputs.data
    host = TrainBatches(data, max_len=12, rng=np.random.default_rng(3))
    device = TrainBatches(data, max_len=12, rng=np.random.default_rng(3), device=torch.device("cpu"))
    seen = set(host.seen_keys.tolist())
    for (hi, ht, _), (di, dt, dn) in zip(host.epoch(8), device.epoch(8), strict=True):
        assert isinstance(dn, torch.Tensor) and np.array_equal(hi, di.numpy()) and np.array_equal(ht, dt.numpy())
        assert ((dn > 0) == (dt > 0)).all() and int(dn.max()) <= data.n_items
        rows = np.array([next(r for r in range(len(host)) if np.array_equal(host.inputs[r], x)) for x in hi])
        keys = rows[:, None] * (data.n_items + 1) + dn.numpy()
        assert not seen & set(keys[dn.numpy() > 0].tolist())


def test_device_negatives_are_uniform_over_the_unseen_items():
    # Row 0 saw items {1, 3, 4} of 6, row 1 saw {2}, row 2 saw all but 6: brute force says
    # row 0 draws 2, 5, 6 a third each, row 1 the five others a fifth each, row 2 only 6.
    from model.train import unseen_tables
    batches = TrainBatches.__new__(TrainBatches)
    batches.n_items = 6
    keys = np.array([1, 3, 4, 7 + 2, 14 + 1, 14 + 2, 14 + 3, 14 + 4, 14 + 5])
    batches.on_device = unseen_tables(keys, 3, 6, torch.device("cpu"))
    batches.generator = torch.Generator().manual_seed(0)
    draws = batches.sample_negatives_on_device(torch.tensor([0, 1, 2]), (3, 30000))
    for row, allowed in enumerate([{2, 5, 6}, {1, 3, 4, 5, 6}, {6}]):
        counts = Counter(draws[row].tolist())
        assert set(counts) == allowed
        assert all(abs(c / 30000 - 1 / len(allowed)) < 0.015 for c in counts.values()), counts


class FixedScores(torch.nn.Module):
    """A stand-in scorer with known scores, to check evaluate()'s masking on its own."""

    def __init__(self, scores):
        super().__init__()
        self.scores, self.next_row = scores, 0

    def item_tables(self):
        return None, None

    def score_all(self, input_ids, items=None, table=None):  # users arrive in order, batch by batch
        rows = slice(self.next_row, self.next_row + len(input_ids))
        self.next_row += len(input_ids)
        return self.scores[rows].clone()


def test_evaluation_never_ranks_seen_items(tiny_inputs):
    data = tiny_inputs.data
    split = EvalSplit.build(data, "test", max_len=12)
    n = len(split.targets)
    # Seen items get the highest scores: unmasked they would push every target down.
    scores = torch.rand(n, data.n_items + 1)
    for i, (row, item) in enumerate(zip(split.seen_rows, split.seen_items)):
        scores[row, item] = 10.0
    scores[:, 0] = -math.inf
    got = evaluate(FixedScores(scores), split, data, "test", batch_size=5, device=torch.device("cpu"))
    hits = 0
    for i in range(n):
        s = scores[i].clone()
        history = set(split.seen_items[split.seen_rows == i].tolist()) - {int(split.targets[i])}
        s[list(history)] = -math.inf
        rank = int((s > s[split.targets[i]]).sum())
        hits += rank < 10
    assert got["test/overall/hr_10"] == pytest.approx(hits / n)


def test_evaluate_keeps_each_users_rank(tiny_inputs):
    """keep_ranks: the target's rank per user equals a stable argsort of the whole masked
    score matrix (ties in the target's favour), with the user's index and tail flag; the
    per-user HR/NDCG average to the metrics evaluate reports."""
    data = tiny_inputs.data
    split = EvalSplit.build(data, "test", max_len=12)
    n = len(split.targets)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 8, (n, data.n_items + 1), generator=gen).float()  # many ties
    scores[:, 0] = -math.inf
    metrics, ranks = evaluate(FixedScores(scores), split, data, "test", batch_size=5,
                              device=torch.device("cpu"), keep_ranks=True)
    masked = scores.numpy().copy()
    masked[split.seen_rows, split.seen_items] = -np.inf
    masked[np.arange(n), split.targets] = scores.numpy()[np.arange(n), split.targets]
    want = []
    for row, target in zip(masked, split.targets):
        row = row.copy()
        row[target] += 0.5  # ties in the target's favour: integer scores, so 0.5 breaks them
        want.append(int(np.flatnonzero(np.argsort(-row, kind="stable") == target)[0]))
    assert ranks.ranks.tolist() == want
    assert max(want) >= 20  # beyond every K
    evaluated = [u for u, seq in enumerate(data.sequences) if len(seq) >= 3]
    assert ranks.users.tolist() == evaluated
    assert ranks.tail.tolist() == [bool(data.tail_mask[data.sequences[u][-1]]) for u in evaluated]
    for k in (5, 10, 20):
        for metric, values in ranks.metrics(k).items():
            assert values.mean() == pytest.approx(metrics[f"test/overall/{metric}"])
            assert values[ranks.tail].mean() == pytest.approx(metrics[f"test/tail/{metric}"])


def test_validation_groups_never_count_a_test_item():
    """Item 3 is head only through its test interactions (hand-worked in test_data);
    under the validation rule item 1 is head. Scores put each validation target first but
    for user 4, whose item 3 scores above its target 2."""
    data = leaky_test_items()
    split = EvalSplit.build(data, "val", max_len=4)
    scores = torch.tensor([[-math.inf, 0.0, 0.9, 0.5, 0.1, 0.1],   # u0: target 2 first
                           [-math.inf, 0.9, 0.0, 0.5, 0.1, 0.1],   # u1: target 1 first
                           [-math.inf, 0.9, 0.1, 0.5, 0.0, 0.1],   # u2: target 1 first
                           [-math.inf, 0.0, 0.5, 0.9, 0.1, 0.1]])  # u4: item 3 above target 2
    got, ranks = evaluate(FixedScores(scores), split, data, "val", batch_size=4,
                          device=torch.device("cpu"), keep_ranks=True)
    assert ranks.users.tolist() == [0, 1, 2, 4] and ranks.ranks.tolist() == [0, 0, 0, 1]
    assert ranks.tail.tolist() == [True, False, False, True]
    assert got["val/tail/hr_5"] == 1.0  # u0 and u4 (rank 1), not u1 and u2
    assert got["val/tail/ndcg_5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert got["val/head/ndcg_5"] == 1.0
    assert got["val/pop_1-4/hr_5"] == 1.0 and len([k for k in got if "/pop_" in k]) == 6
    # the whole-sequence split would have put every validation target in the tail
    assert data.tail_mask[split.targets].all()


def without_times(history):
    return [{k: v for k, v in h.items() if not k.startswith("time/")} for h in history]


def test_resume_from_snapshot_equals_an_uninterrupted_run(tiny_inputs):
    """Snapshots taken at epoch 2, in a run that goes on and in one that ends there, both
    continue exactly. Several seeds, so that some interrupted run's best epoch is not its
    last: its final load_state_dict(best) must not rewrite the snapshot it handed out."""
    interrupted_best = []
    for seed in (1, 3, 7):  # seed 7's 2-epoch run peaks at epoch 1 (asserted below)
        model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 4, "seed": seed}, "test")
        saved = {}

        def keep_epoch_2(name):
            def on_epoch(record, snapshot):
                if record.epoch == 2:
                    saved[name], saved[name + " best epoch"] = snapshot(), record.best_epoch
            return on_epoch

        straight = fit(tiny_inputs, model_cfg, train_cfg, on_epoch=keep_epoch_2("running"))
        first_cfg = settings_from_dict({**SMALL, "epochs": 2, "seed": seed}, "test")[1]
        fit(tiny_inputs, model_cfg, first_cfg, on_epoch=keep_epoch_2("ended"))
        interrupted_best.append(saved["ended best epoch"])
        for name in ("running", "ended"):
            resumed = fit(tiny_inputs, model_cfg, train_cfg, resume=saved[name])
            assert resumed.epochs_run == 4
            for got, want in zip(without_times(resumed.history), without_times(straight.history),
                                 strict=True):
                assert got == pytest.approx(want), (seed, name, want["epoch"])
            assert resumed.best_epoch == straight.best_epoch
            assert resumed.test == pytest.approx(straight.test), (seed, name)
    # the case the aliasing bug broke was exercised; if training changes, pick another seed
    assert min(interrupted_best) < 2, interrupted_best


def test_test_metrics_are_those_of_the_best_validation_state(tiny_inputs):
    """fit's test metrics come from the best validation epoch's weights (not the last
    epoch's): they equal a separate evaluation of the snapshot taken at that epoch, and
    the metrics test_on_improvement computed while training."""
    # lr 0.03, seed 0: validation NDCG@20 peaks at epoch 2 of 4 on this data
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 4, "seed": 0, "lr": 0.03}, "test")
    best = {}

    def keep_best(record, snapshot):
        if record.improved:
            best.update(epoch=record.epoch, state=snapshot()["model"])

    result = fit(tiny_inputs, model_cfg, train_cfg, on_epoch=keep_best)
    assert result.best_epoch == best["epoch"] < result.epochs_run  # the case that can go wrong

    data = tiny_inputs.data
    model = build_model(dataclasses.replace(model_cfg, pca_init=False), data.n_items,
                        torch.tensor(tiny_inputs.llm_embeddings), None,
                        torch.tensor(data.train_popularity))
    model.load_state_dict(best["state"])
    expected = reference_metrics(model, data, "test", model_cfg.max_len)
    assert {k: result.test[k] for k in expected} == pytest.approx(expected)
    val = reference_metrics(model, data, "val", model_cfg.max_len)
    assert {k: result.val[k] for k in val} == pytest.approx(val)
    ranks = result.test_ranks
    assert list(zip(ranks.users.tolist(), ranks.ranks.tolist(), ranks.tail.tolist())) == \
        reference_ranks(model, data, "test", model_cfg.max_len)

    during = fit(tiny_inputs, model_cfg, train_cfg, test_on_improvement=True)
    assert during.test == pytest.approx(result.test)
    for name in ("users", "ranks", "tail"):
        assert getattr(during.test_ranks, name).tolist() == getattr(ranks, name).tolist()


def test_best_test_ranks_survive_a_checkpoint(tiny_inputs, tmp_path, monkeypatch):
    """With test_on_improvement the snapshot holds the best state's test ranks, readable by
    torch.load(weights_only=True); a run resumed after its best epoch returns them without
    evaluating on test again."""
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 4, "seed": 0, "lr": 0.03}, "test")
    path = tmp_path / "state.pt"

    def save_epoch_3(record, snapshot):
        if record.epoch == 3:
            torch.save(snapshot(), path)

    straight = fit(tiny_inputs, model_cfg, train_cfg, on_epoch=save_epoch_3, test_on_improvement=True)
    assert straight.best_epoch < 3  # epoch 4 does not improve: nothing to evaluate on test
    splits = []
    evaluate_ = model.train.evaluate
    monkeypatch.setattr(model.train, "evaluate", lambda *a, **kw: splits.append(a[3]) or evaluate_(*a, **kw))
    resumed = fit(tiny_inputs, model_cfg, train_cfg, resume=torch.load(path, weights_only=True),
                  test_on_improvement=True)
    assert splits == ["val"]  # epoch 4's validation only
    assert resumed.test == pytest.approx(straight.test)
    for name in ("users", "ranks", "tail"):
        assert getattr(resumed.test_ranks, name).tolist() == getattr(straight.test_ranks, name).tolist()


def test_curriculum_weight_follows_the_epochs_inside_fit(tiny_inputs):
    """Eq. (11) with t = completed epochs: w1 = (w_max - w_min)(1 + cos(2 pi t / T)) / 2 + w_min,
    here w_max 1, w_min 0.6, T 4: t = 0..4 -> 1, 0.8, 0.6, 0.8, 1 (hand-worked). The loss
    weighs the two alignment terms by it (eqs. 12, 14), averaged over the epoch's steps."""
    model_cfg, train_cfg = settings_from_dict(
        {**SMALL, "epochs": 5, "w_max": 1.0, "w_min": 0.6, "period": 4, "alpha": 0.5,
         "patience": 10}, "test")
    records = []
    fit(tiny_inputs, model_cfg, train_cfg, on_epoch=lambda record, snapshot: records.append(record))
    weights = [r.metrics["train/w_ila"] for r in records]
    assert weights == pytest.approx([1.0, 0.8, 0.6, 0.8, 1.0])
    for r, w in zip(records, weights):
        m = r.metrics
        assert m["train/loss"] == pytest.approx(
            m["train/rec"] + 0.5 * (w * m["train/ila"] + (1 - w) * m["train/fla"]), rel=1e-5)


def test_feature_alignment_popularity_counts_training_interactions_only(tiny_inputs, monkeypatch):
    """The FLA groups split items by how often training saw them: validation and test
    items must not count (that would leak the held-out targets into training)."""
    given = []
    original = FAERec.__init__

    def record_popularity(self, cfg, n_items, llm_embeddings, pca=None, train_popularity=None):
        given.append(torch.as_tensor(train_popularity).clone())
        original(self, cfg, n_items, llm_embeddings, pca, train_popularity)

    monkeypatch.setattr(FAERec, "__init__", record_popularity)
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 1}, "test")
    fit(tiny_inputs, model_cfg, train_cfg)
    data = tiny_inputs.data
    training, whole = Counter(), Counter()
    for seq in data.sequences:
        training.update(seq[:-2].tolist())  # the last two items are validation and test targets
        whole.update(seq.tolist())
    expected = [training[i] for i in range(data.n_items + 1)]
    assert expected != [whole[i] for i in range(data.n_items + 1)]  # the leak would show
    (popularity,) = given
    assert popularity.tolist() == expected


def test_training_rows_pair_each_input_with_the_next_item(tiny_inputs):
    """Every user with a training pair appears once per epoch: input seq[:-3], target
    seq[1:-2] (each target is the item after its input), both cut to the last max_len
    items and left-padded at the same positions."""
    data, max_len = tiny_inputs.data, 6  # shorter than most sequences: the cut is exercised

    def padded(items):
        items = items[-max_len:]
        return (0,) * (max_len - len(items)) + tuple(items)

    expected = Counter((padded(s[:-3].tolist()), padded(s[1:-2].tolist()))
                       for s in data.sequences if len(s) >= 4)
    batches = TrainBatches(data, max_len=max_len, rng=np.random.default_rng(0))
    got = Counter()
    for inputs, targets, _ in batches.epoch(7):
        got.update((tuple(i.tolist()), tuple(t.tolist())) for i, t in zip(inputs, targets))
    assert any(len(s) - 3 > max_len for s in data.sequences)
    assert got == expected


def test_bf16_autocast_step_stays_close_to_float32(tiny_inputs):
    """The autocast option: same losses as float32 up to bf16 rounding, float32 parameters."""
    data = tiny_inputs.data
    model_cfg, train_cfg = settings_from_dict({**SMALL, "dropout": 0.0, "proj_dropout": 0.0,
                                                "autocast": True}, "test")
    batch = [torch.as_tensor(a) for a in next(TrainBatches(data, 12, np.random.default_rng(0)).epoch(16))]
    parts = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = build_model(model_cfg, data.n_items, torch.tensor(tiny_inputs.llm_embeddings),
                            torch.randn(data.n_items, 16), torch.tensor(data.train_popularity))
        parts[autocast] = train_step(model, make_optimizer(model, train_cfg), batch, 0, autocast)
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    for k in ("rec", "ila", "fla"):
        assert parts[True][k].dtype == torch.float32
        assert parts[True][k].item() == pytest.approx(parts[False][k].item(), rel=0.05), k
    assert parts[True]["rec"].item() != parts[False]["rec"].item()  # bf16 really ran


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench/gpu_check.sh runs it)")
def test_gpu_base_step_never_waits_for_the_host(tiny_inputs):
    """The GPU path: batches drawn on the device, SASRec on the whole padded batch, loss parts
    kept there: a plain SASRec step syncs nothing (FAERec's distinct items still do, once)."""
    data, device = tiny_inputs.data, torch.device("cuda")
    model_cfg, train_cfg = settings_from_dict({**SMALL, "method": "base"}, "test")
    model = build_model(model_cfg, data.n_items).to(device)
    optimizer = make_optimizer(model, train_cfg)
    batches = TrainBatches(data, 12, np.random.default_rng(0), device=device).epoch(16)
    train_step(model, optimizer, next(batches), 0)  # first call: lazy CUDA initialisation
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_step(model, optimizer, next(batches), 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_every_epoch_is_reported_and_patience_spans_min_steps(tiny_inputs):
    seen = []
    # lr ~ 0: validation never improves after epoch 1. Patience 1 alone would stop at
    # epoch 2, but 12 optimiser steps without improvement need ceil(12 / steps) epochs.
    steps = math.ceil(len(TrainBatches(tiny_inputs.data, 12, np.random.default_rng(0))) / 16)
    model_cfg, train_cfg = settings_from_dict(
        {**SMALL, "epochs": 30, "patience": 1, "patience_min_steps": 12, "lr": 1e-9}, "test")
    result = fit(tiny_inputs, model_cfg, train_cfg, on_epoch=lambda r, s: seen.append(r))
    assert [r.epoch for r in seen] == list(range(1, result.epochs_run + 1))
    assert result.stopped_early and seen[-1].final
    assert steps >= 2 and result.best_epoch == 1
    assert result.epochs_run - result.best_epoch == max(1, math.ceil(12 / steps))
    assert all("val/overall/ndcg_20" in r.metrics and "train/loss" in r.metrics for r in seen)
    assert "train/w_ila" in seen[0].metrics


def test_nan_loss_stops_with_a_clear_error(tiny_inputs):
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 2, "lr": 1e30}, "test")
    with pytest.raises(FloatingPointError, match="training loss"):
        fit(tiny_inputs, model_cfg, train_cfg)


def test_cli_prints_one_json_object(tmp_path, tiny_dataset, capsys):
    path, emb = tiny_dataset
    yaml_path = tmp_path / "tiny.yaml"
    yaml_path.write_text(f"format: faerec\ninteractions: {path}\nembeddings: {emb}\n"
                         f"cache_dir: {tmp_path / 'cache'}\n")
    code = main(["--dataset", str(yaml_path), "--backbone", "SASRec", "--method", "base",
                 "--epochs", "2", "--set", "hidden_size=8", "--set", "max_len=10", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epochs_run"] == 2 and out["settings"]["method"] == "base"
    # the same run in process: the CLI prints fit's own test metrics
    model_cfg, train_cfg = settings_from_dict(
        {"backbone": "sasrec", "method": "base", "epochs": 2, "hidden_size": 8, "max_len": 10},
        "test")
    inputs = load_inputs(resolve_dataset(str(yaml_path)), EmbeddingConfig(), need_llm=False)
    result = fit(inputs, model_cfg, train_cfg)
    assert {k: v for k, v in out.items() if k.startswith("test/")} == pytest.approx(result.test)


def test_min_epochs_trains_that_many_epochs_before_the_first_validation(tiny_inputs):
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 5, "min_epochs": 3, "patience": 1}, "t")
    result = fit(tiny_inputs, model_cfg, train_cfg)
    validated = [h["epoch"] for h in result.history if "val/overall/ndcg_20" in h]
    assert validated == [4, 5][:len(validated)] and validated  # never before epoch 4; patience cannot
    assert result.best_epoch >= 4                              # stop a run it has not validated yet
    model_cfg, train_cfg = settings_from_dict({**SMALL, "epochs": 3, "min_epochs": 10}, "t")
    result = fit(tiny_inputs, model_cfg, train_cfg)  # a budget below min_epochs still validates at its end
    assert [h["epoch"] for h in result.history if "val/overall/ndcg_20" in h] == [3]


def test_two_item_users_train_on_their_one_pair(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("1 5 6\n2 1 2 3 4 5\n3 7 8 9\n4 9 1\n")  # users 1 and 4: two items each
    data = load_dataset(DatasetConfig(format="faerec", interactions=str(path), cache_dir=str(tmp_path)))
    dropped = TrainBatches(data, max_len=4, rng=np.random.default_rng(0))
    paired = TrainBatches(data, max_len=4, rng=np.random.default_rng(0), two_item_users="pair")
    # user 2: seq[:-2] = 1 2 3 -> input 1 2, target 2 3
    assert dropped.inputs.tolist() == [[0, 0, 1, 2]] and dropped.targets.tolist() == [[0, 0, 2, 3]]
    assert sorted(map(tuple, paired.inputs.tolist())) == [(0, 0, 0, 5), (0, 0, 0, 9), (0, 0, 1, 2)]
    pairs = {tuple(i): tuple(t) for i, t in zip(paired.inputs.tolist(), paired.targets.tolist())}
    assert pairs[(0, 0, 0, 5)] == (0, 0, 0, 6) and pairs[(0, 0, 0, 9)] == (0, 0, 0, 1)  # items[0] -> items[1]
    for _, targets, negatives in paired.epoch(8):  # their negatives avoid both their items
        assert ((negatives > 0) == (targets > 0)).all()
        row = targets.tolist().index([0, 0, 0, 6])
        assert negatives[row, -1] not in (5, 6)
    # 3-item users train on nothing in either mode (the code's datasets.py does the same)...
    assert (0, 7, 8) not in pairs and len(paired) == 3
    # ...but the code still gives them a batch row, all padding: more rows, same pairs
    every = TrainBatches(data, max_len=4, rng=np.random.default_rng(0), two_item_users="pair",
                         batch_all_users=True)
    assert len(every) == 4 and sorted(map(tuple, every.inputs.tolist()))[0] == (0, 0, 0, 0)
    assert {tuple(i) for i in every.inputs.tolist()} - {(0, 0, 0, 0)} == set(pairs)
    rows = [r for batch in every.epoch(1) for r in batch[0].tolist()]
    assert len(rows) == 3 and [0, 0, 0, 0] not in rows  # a batch of padding only is skipped
