"""Confirmation statistics against independent computations: Holm by hand and by its
step-down definition, Wilcoxon by enumeration and by the written-out normal approximation,
per-user pairing by explicit loops, mean ± std by the standard library."""

import itertools
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from tuning.stats import holm, mean_std, paired_tests, wilcoxon_signed_rank


def test_holm_worked_example():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06
    # (never below the step before); back in input order:
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])      # capped at 1
    out = holm([0.01, np.nan, 0.02])                                # NaN: not in the family
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert np.isnan(out[1])


def test_holm_rejects_exactly_what_the_step_down_procedure_rejects():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.random(rng.integers(1, 12)) ** 3
        alpha = rng.choice([0.01, 0.05, 0.1])
        rejected = set()  # Holm (1979): walk up the sorted p-values, stop at the first failure
        for i, j in enumerate(sorted(range(len(p)), key=lambda j: p[j])):
            if p[j] > alpha / (len(p) - i):
                break
            rejected.add(j)
        assert set(np.flatnonzero(holm(p) <= alpha)) == rejected


def test_wilcoxon_matches_exhaustive_sign_flips():
    d = np.array([0.31, -0.12, 0.55, 0.08, -0.02, 0.44, 0.27, -0.19, 0.6])  # distinct, nonzero
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = min(ranks[d > 0].sum(), ranks[d < 0].sum())
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(d))]
    expected = np.mean([min(t, ranks.sum() - t) <= observed for t in totals])
    statistic, p = wilcoxon_signed_rank(d)
    assert statistic == observed
    assert p == pytest.approx(expected)


def test_wilcoxon_with_ties_and_zeros_matches_the_normal_approximation_by_hand():
    rng = np.random.default_rng(1)
    d = rng.choice([-1, -1 / 3, 0, 0, 0, 1 / 3, 2 / 3, 1], size=400)  # seeds-averaged HR@10 gaps
    nz = d[d != 0]
    n = len(nz)
    a = np.abs(nz)
    ranks = np.array([(a < v).sum() + ((a == v).sum() + 1) / 2 for v in a])  # average ranks
    w_plus = ranks[nz > 0].sum()
    ties = sum(t ** 3 - t for t in np.unique(a, return_counts=True)[1])
    var = n * (n + 1) * (2 * n + 1) / 24 - ties / 48
    z = (w_plus - n * (n + 1) / 4) / math.sqrt(var)
    _, p = wilcoxon_signed_rank(d)
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)


def test_wilcoxon_without_any_difference_is_no_evidence():
    assert wilcoxon_signed_rank([0.0, 0.0, 0.0]) == (0.0, 1.0)


def per_user_table(rng, users=300, seeds=(0, 1, 2), lifts=None):
    """Per-user HR@10 / NDCG@10 of several configurations: `lifts` adds to the hit
    probability of tail users (and a little to the others)."""
    tail = rng.random(users) < 0.3
    rows = []
    for configuration, (tail_lift, head_lift) in (lifts or {}).items():
        for seed in seeds:
            p = np.where(tail, 0.1 + tail_lift, 0.3 + head_lift)
            hit = rng.random(users) < p
            ndcg = np.where(hit, 1 / np.log2(rng.integers(0, 10, users) + 2), 0.0)
            rows += [{"configuration": configuration, "seed": seed, "user": u, "tail": bool(tail[u]),
                      "hr_10": float(hit[u]), "ndcg_10": float(ndcg[u])} for u in range(users)]
    return pd.DataFrame(rows)


def test_paired_tests_pair_users_with_seeds_averaged():
    rng = np.random.default_rng(2)
    table = per_user_table(rng, lifts={"base": (0, 0), "lifts_tail": (0.4, 0.0),
                                       "same": (0, 0)})
    table = table.sample(frac=1.0, random_state=0)  # row order must not matter
    out = paired_tests(table, base="base")
    assert len(out) == 2 * 2 * 2  # configurations x groups x metrics
    assert set(out["base"]) == {"base"}
    check_rows_by_loops(table, out)
    np.testing.assert_allclose(out["p_holm"], holm(out["p_value"]))  # one family: the report
    tail_hr = out[(out.configuration == "lifts_tail") & (out.group == "tail") & (out.metric == "hr_10")]
    assert tail_hr["mean_difference"].item() > 0.2 and tail_hr["p_holm"].item() < 1e-6
    assert (out[out.configuration == "same"]["p_holm"] > 0.01).all()


def check_rows_by_loops(table, out):
    """Each test row against an independent pairing: explicit loops over users and seeds."""
    tail_users = sorted(table.loc[table["tail"], "user"].unique())
    for row in out.itertuples():
        chosen = tail_users if row.group == "tail" else sorted(table["user"].unique())
        diffs = []
        for u in chosen:
            mine = table[(table.configuration == row.configuration) & (table.user == u)]
            base = table[(table.configuration == row.base) & (table.user == u)]
            diffs.append(mine[row.metric].mean() - base[row.metric].mean())
        assert row.users == len(chosen)
        assert row.mean_difference == pytest.approx(np.mean(diffs))
        assert (row.statistic, row.p_value) == pytest.approx(wilcoxon_signed_rank(diffs))


def test_paired_tests_with_a_base_per_configuration():
    """Two groups (two backbones, say), each configuration against its own group's base;
    Holm corrects over both groups' tests."""
    rng = np.random.default_rng(4)
    table = per_user_table(rng, lifts={"base_a": (0, 0), "a_lift": (0.4, 0.0),
                                       "base_b": (0.3, 0.1), "b_same": (0.3, 0.1)})
    out = paired_tests(table, {"a_lift": "base_a", "b_same": "base_b", "gone": "base_a"})
    assert set(zip(out["configuration"], out["base"])) == {("a_lift", "base_a"), ("b_same", "base_b")}
    check_rows_by_loops(table, out)  # 'gone' has no runs: not tested
    np.testing.assert_allclose(out["p_holm"], holm(out["p_value"]))
    assert (out[out.configuration == "b_same"]["p_holm"] > 0.01).all()  # the same as its base
    with pytest.raises(ValueError, match="base configuration 'base_c'"):
        paired_tests(table, {"a_lift": "base_c"})


def test_paired_tests_refuse_unpaired_inputs():
    rng = np.random.default_rng(3)
    table = per_user_table(rng, users=20, lifts={"base": (0, 0), "other": (0, 0)})
    with pytest.raises(ValueError, match="base configuration 'nope'"):
        paired_tests(table, base="nope")
    with pytest.raises(ValueError, match="'other' was evaluated on 19 users"):
        paired_tests(table[~((table.configuration == "other") & (table.user == 0))], base="base")
    with pytest.raises(ValueError, match="appears twice"):
        paired_tests(pd.concat([table, table.iloc[:1]]), base="base")
    flipped = table.copy()
    flipped.loc[flipped.index[0], "tail"] = not flipped.loc[flipped.index[0], "tail"]
    with pytest.raises(ValueError, match="tail user in some rows"):
        paired_tests(flipped, base="base")
    with pytest.raises(ValueError, match="'hr_10'"):
        paired_tests(table.drop(columns="hr_10"), base="base")


def test_mean_std_over_seeds():
    per_seed = pd.DataFrame({"configuration": ["b", "a", "a", "a", "b", "c"],
                             "seed": [0, 0, 1, 2, 1, 0],
                             "test/overall/hr_10": [0.2, 0.11, 0.13, 0.12, 0.24, 0.5]})
    out = mean_std(per_seed, ["test/overall/hr_10"])
    assert list(out.index) == ["b", "a", "c"]  # first appearance order
    a = [0.11, 0.13, 0.12]
    assert out.loc["a", "test/overall/hr_10 mean"] == pytest.approx(statistics.mean(a))
    assert out.loc["a", "test/overall/hr_10 std"] == pytest.approx(statistics.stdev(a))
    assert out.loc["b", "test/overall/hr_10 std"] == pytest.approx(statistics.stdev([0.2, 0.24]))
    assert out.loc["c", "test/overall/hr_10 std"] == 0.0 and out.loc["c", "seeds"] == 1
