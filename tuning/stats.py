"""Is a lift real? Paired per-user tests against the base, Holm-corrected; mean ± std over seeds.

The confirmation step trains each chosen configuration and the base again with a few new
seeds and evaluates every test user. Its per-user results arrive as one table, a row per
(configuration, seed, user):

    configuration  seed  user  tail   ndcg_10  hr_10
    base           100   17    False  0.0      0.0
    trial_3f2a     100   17    False  0.3869   1.0      ...

`tail` says whether the user's test target is a tail item (the same for every
configuration: the split is fixed). `paired_tests` averages each user's seeds, pairs
every configuration with the base user by user, and runs a two-sided Wilcoxon
signed-rank test on the differences, for all users and for tail users, per metric.

Why Wilcoxon rather than a paired bootstrap: per-user HR@10 is 0/1 and NDCG@10 mostly 0,
so the differences are discrete, heavy-tailed and full of ties; the signed-rank test
handles that (zeros dropped, tie-corrected normal approximation) and is deterministic, so
a rerun of the report gives the same p-values, while a bootstrap's p-value depends on its
seed and resolves nothing below 1 / resamples, which is what Holm's multipliers need.
What it tests is a shift of the per-user differences, not the mean difference: the table
shows the mean difference beside it.

Holm's step-down correction (Holm, 1979) runs over every comparison of the report, so a
report with three configurations, two groups and two metrics corrects for twelve tests.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("ndcg_10", "hr_10")
GROUPS = ("overall", "tail")
TEST_COLUMNS = ("configuration", "base", "group", "metric", "users", "mean_difference",
                "statistic", "p_value", "p_holm")


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values, in the input order: the i-th smallest of m is multiplied by
    (m - i + 1), then made non-decreasing along the sorted order, capped at 1. NaN entries
    (comparisons that could not run) stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    steps = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted[order] = np.minimum(steps, 1.0)
    return adjusted


def wilcoxon_signed_rank(differences) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test of paired differences: (statistic, p-value).

    Differences are rounded to 12 decimals, and zeros dropped (Wilcoxon's convention); exact
    p-values for up to 50 distinct nonzero differences, the tie-corrected normal
    approximation otherwise (scipy's `method="auto"`). No nonzero difference at all is no
    evidence: p = 1.
    """
    d = np.asarray(differences, dtype=float)
    d = np.round(d, 12)  # float noise of averaging seeds makes neither a difference nor a tie-break
    if not np.any(d != 0):
        return 0.0, 1.0
    result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
    return float(result.statistic), float(result.pvalue)


def _check_per_user(per_user: pd.DataFrame, bases: Mapping[str, str], metrics) -> None:
    missing = [c for c in ("configuration", "seed", "user", "tail", *metrics) if c not in per_user]
    if missing:
        raise ValueError(f"per-user results lack the column {missing[0]!r}")
    present = set(per_user["configuration"])
    for base in dict.fromkeys(bases.values()):
        if base not in present:
            raise ValueError(f"per-user results have no rows of the base configuration {base!r}")
    duplicated = per_user.duplicated(["configuration", "seed", "user"])
    if duplicated.any():
        row = per_user[duplicated].iloc[0]
        raise ValueError(f"per-user results: configuration {row['configuration']!r}, seed "
                         f"{row['seed']}, user {row['user']} appears twice")
    tail = per_user.groupby("user")["tail"].nunique()
    if (tail > 1).any():
        raise ValueError(f"per-user results: user {tail[tail > 1].index[0]} is a tail user in "
                         "some rows and not in others (the test split must be the same)")
    users = per_user.groupby("configuration")["user"].apply(frozenset)
    for configuration, base in bases.items():
        seen = users.get(configuration, frozenset())
        if seen != users[base]:
            raise ValueError(f"per-user results: configuration {configuration!r} was evaluated "
                             f"on {len(seen)} users, the base {base!r} on {len(users[base])}; "
                             "paired tests need the same users")


def paired_tests(per_user: pd.DataFrame, base: str | Mapping[str, str], metrics=METRICS,
                 groups=GROUPS) -> pd.DataFrame:
    """Every configuration but the base against the base, per group and metric; or, with a
    mapping configuration -> its own base, each configuration of it against its base.

    One row per (configuration, group, metric) with TEST_COLUMNS: the base, users compared,
    mean of (configuration - base) over users (seeds averaged per user first), the
    Wilcoxon statistic, its p-value and the Holm-adjusted p-value over all rows.
    """
    present = dict.fromkeys(per_user["configuration"])  # a run that saved no ranks is not tested
    bases = ({c: base for c in present if c != base} if isinstance(base, str) else
             {c: b for c, b in base.items() if c in present})
    _check_per_user(per_user, bases, metrics)
    means = per_user.groupby(["configuration", "user"]).agg(
        {"tail": "first", **{m: "mean" for m in metrics}})
    rows = []
    for configuration, base in bases.items():
        reference = means.loc[base]
        values = means.loc[configuration].loc[reference.index]
        for group in groups:
            if group == "overall":
                chosen = np.ones(len(reference), dtype=bool)
            elif group == "tail":
                chosen = reference["tail"].to_numpy(dtype=bool)
            else:
                raise ValueError(f"group must be 'overall' or 'tail', got {group!r}")
            for metric in metrics:
                d = values[metric].to_numpy()[chosen] - reference[metric].to_numpy()[chosen]
                statistic, p = wilcoxon_signed_rank(d) if len(d) else (np.nan, np.nan)
                rows.append({"configuration": configuration, "base": base, "group": group, "metric": metric,
                             "users": len(d), "mean_difference": d.mean() if len(d) else np.nan,
                             "statistic": statistic, "p_value": p})
    table = pd.DataFrame(rows, columns=TEST_COLUMNS[:-1])
    table["p_holm"] = holm(table["p_value"])
    return table


def mean_std(per_seed: pd.DataFrame, columns) -> pd.DataFrame:
    """Per configuration, each column's mean and sample standard deviation over its seeds
    (ddof 1; 0 with one seed): columns '<column> mean', '<column> std', and 'seeds'."""
    grouped = per_seed.groupby("configuration", sort=False)
    out = pd.DataFrame({"seeds": grouped.size()})
    for column in columns:
        out[f"{column} mean"] = grouped[column].mean()
        out[f"{column} std"] = grouped[column].std(ddof=1).fillna(0.0)
    return out
