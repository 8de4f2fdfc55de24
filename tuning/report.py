"""The report of a search: does a configuration lift tail items without losing overall
accuracy, and is the lift real?

`write_report(record, folder)` writes `report.md` (the answer first: a table of the
confirmed configurations against the base, then the search's facts) and five figures;
`answer_table(record)` is the same table for the terminal. Everything comes from plain
tables in a `SearchRecord`, so the report can be rebuilt from files after the search:

- trials: one row per trial of the search and per reference run. Columns `trial` (an id;
  a reference's is its name, e.g. `base`), `stage` (`search` | `reference`), one column
  per objective, one per searched parameter; optional `outcome`, `epochs`.
- confirmed: one row per (configuration, seed) of the confirmation runs: `configuration`
  (a `trial` of the trials table), `seed`, test metrics (`test/overall/hr_10`, ...,
  `test/coverage_10`, `test/pop_1-4/hr_10`, ...).
- tests: `tuning.stats.paired_tests` of the confirmation's per-user results.
- curves: one row per (configuration, seed, epoch) with validation metrics.

Figures use matplotlib's object API (`Figure`, no pyplot: no global backend or state).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure

from tuning.pareto import hypervolume, losses, pareto_mask
from tuning.stats import mean_std

# The answer table: (test metric, header, how its change is shown, paired test (group, metric))
ANSWER_COLUMNS = (
    ("test/overall/hr_10", "HR@10", "percent", ("overall", "hr_10")),
    ("test/overall/ndcg_10", "NDCG@10", "percent", ("overall", "ndcg_10")),
    ("test/tail/hr_10", "tail HR@10", "ratio", ("tail", "hr_10")),
    ("test/tail/ndcg_10", "tail NDCG@10", "ratio", ("tail", "ndcg_10")),
    ("test/coverage_10", "coverage@10", "percent", None),  # a set-level metric: no per-user test
)
FIGURES = ("pareto_front.png", "history.png", "param_importance.png", "popularity_groups.png",
           "curves.png")
POPULARITY_COLUMN = re.compile(r"test/pop_(.+)/hr_10")
ALPHA = 0.05  # family-wise error rate of the Holm-corrected tests


@dataclass
class SearchRecord:
    name: str
    objectives: list[tuple[str, str]]   # (trials column, "max" | "min"), e.g. best/val/tail/ndcg_20
    params: list[str]                   # searched parameters (trials columns)
    trials: pd.DataFrame
    confirmed: pd.DataFrame
    tests: pd.DataFrame
    curves: pd.DataFrame
    base: str = "base"                  # the configuration everything is compared with...
    bases: dict[str, str] = field(default_factory=dict)  # ...unless this maps each to its own
    facts: dict[str, object] = field(default_factory=dict)  # shown as they are: budget, seeds, command...
    distributions: dict[str, optuna.distributions.BaseDistribution] | None = None  # else inferred
    reference_point: list[float] | None = None  # hypervolume's, in metric units; default below
    labels: dict[str, str] = field(default_factory=dict)  # configuration -> its name in tables

    def label(self, configuration) -> str:
        return self.labels.get(configuration, str(configuration))

    def base_of(self, configuration) -> str | None:
        """The configuration `configuration` is compared with; None for a base."""
        if self.bases:
            return self.bases.get(configuration)
        return None if configuration == self.base else self.base

    def in_order(self, configurations) -> list:
        """Each base, then the configurations compared with it (in their given order)."""
        configurations = list(dict.fromkeys(configurations))
        bases = [c for c in configurations if self.base_of(c) is None]
        ordered = [c for b in bases for c in [b, *(c for c in configurations if self.base_of(c) == b)]]
        return ordered + [c for c in configurations if c not in ordered]


# -- numbers --------------------------------------------------------------------------------

def _p(p: float) -> str:
    return "p n/a" if p is None or math.isnan(p) else f"p={p:.2g}"


def change(value: float, base: float, how: str) -> str:
    """'+6.5%' for overall metrics, '1.33x' for tail metrics (the paper's way of quoting them)."""
    if base == 0 or math.isnan(base) or math.isnan(value):
        return "n/a"
    return f"{(value / base - 1) * 100:+.1f}%" if how == "percent" else f"{value / base:.2f}x"


def _summary(record: SearchRecord) -> pd.DataFrame:
    columns = [c for c, *_ in ANSWER_COLUMNS if c in record.confirmed]
    summary = mean_std(record.confirmed, columns)
    for configuration in summary.index:
        base = record.base_of(configuration)
        if base is not None and base not in summary.index:
            raise ValueError(f"the confirmation has no runs of the base configuration {base!r}")
    return summary.loc[record.in_order(summary.index)]


def _test(record: SearchRecord, configuration: str, test) -> pd.Series | None:
    if test is None or record.tests is None or not len(record.tests):
        return None
    group, metric = test
    t = record.tests
    rows = t[(t.configuration == configuration) & (t.group == group) & (t.metric == metric)]
    return rows.iloc[0] if len(rows) else None


def _answer_cells(record: SearchRecord) -> tuple[list[str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """Header, and per confirmed configuration (each base, then those compared with it): its
    name, its seeds and per column (mean ± std over seeds, change against its base and
    Holm-adjusted p of the paired test; empty for a base)."""
    summary = _summary(record)
    columns = [(c, how, test) for c, _, how, test in ANSWER_COLUMNS if f"{c} mean" in summary]
    header = ["configuration", "seeds"] + [h for c, h, *_ in ANSWER_COLUMNS if f"{c} mean" in summary]
    rows = []
    for configuration, s in summary.iterrows():
        cells = []
        for column, how, test in columns:
            value = f"{s[f'{column} mean']:.4f} ± {s[f'{column} std']:.4f}"
            notes, base = [], record.base_of(configuration)
            if base is not None:
                notes.append(change(s[f"{column} mean"], summary.loc[base, f"{column} mean"], how))
                tested = _test(record, configuration, test)
                if tested is not None:
                    notes.append(_p(tested["p_holm"]))
            cells.append((value, ", ".join(notes)))
        rows.append((record.label(configuration), str(int(s["seeds"])), cells))
    return header, rows


def answer_rows(record: SearchRecord) -> list[list[str]]:
    """Header + one row per confirmed configuration (base first): mean ± std over seeds,
    in brackets the change against the base and the Holm-adjusted p of the paired test."""
    header, rows = _answer_cells(record)
    return [header] + [[name, seeds, *(f"{v} ({n})" if n else v for v, n in cells)]
                       for name, seeds, cells in rows]


def answer_table(record: SearchRecord) -> str:
    """The answer table as aligned text for the terminal: a line of mean ± std per
    configuration and, under it, its change against the base and p-values (so that the
    table fits a 120-column terminal)."""
    header, rows = _answer_cells(record)
    lines = [header]
    for name, seeds, cells in rows:
        lines.append([name, seeds, *(v for v, _ in cells)])
        if any(n for _, n in cells):
            lines.append(["", "", *(n for _, n in cells)])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def verdicts(record: SearchRecord) -> list[str]:
    """One sentence per configuration: is its tail lift real, is overall accuracy kept?

    Tail lift real: tail HR@10 and tail NDCG@10 both higher, both Holm-significant.
    Overall kept: neither overall HR@10 nor NDCG@10 significantly lower.
    """
    summary = _summary(record)
    sentences = []
    for configuration in summary.index:
        base_name = record.base_of(configuration)
        if base_name is None:
            continue
        tests = {test: _test(record, configuration, test) for *_, test in ANSWER_COLUMNS if test}
        if any(t is None for t in tests.values()):
            sentences.append(f"**{record.label(configuration)}**: no paired tests against {record.label(base_name)}.")
            continue
        significant = {k: t["p_holm"] < ALPHA for k, t in tests.items()}
        higher = {k: t["mean_difference"] > 0 for k, t in tests.items()}
        tail = [("tail", "hr_10"), ("tail", "ndcg_10")]
        overall = [("overall", "hr_10"), ("overall", "ndcg_10")]
        tail_real = all(significant[k] and higher[k] for k in tail)
        overall_lost = any(significant[k] and not higher[k] for k in overall)
        mine, base = summary.loc[configuration], summary.loc[base_name]
        tail_hr, overall_hr = "test/tail/hr_10 mean", "test/overall/hr_10 mean"
        whose = "the base's" if base_name == "base" else f"{record.label(base_name)}'s"
        numbers = (f"tail HR@10 {change(mine[tail_hr], base[tail_hr], 'ratio')} {whose} "
                   f"({_p(tests[tail[0]]['p_holm'])}), overall HR@10 "
                   f"{change(mine[overall_hr], base[overall_hr], 'percent')} "
                   f"({_p(tests[overall[0]]['p_holm'])})")
        if tail_real and not overall_lost:
            answer = "lifts tail items without losing overall accuracy, beyond seed and user noise"
        elif tail_real:
            answer = "lifts tail items but loses overall accuracy"
        elif overall_lost:
            answer = "no real tail lift, and loses overall accuracy"
        else:
            answer = "no tail lift beyond noise"
        sentences.append(f"**{record.label(configuration)}**: {numbers}: {answer}.")
    return sentences


# -- the search's front ------------------------------------------------------------------------

def _searched(record: SearchRecord) -> pd.DataFrame:
    t = record.trials
    t = t[t["stage"] == "search"]
    return t[np.isfinite(t[[c for c, _ in record.objectives]].to_numpy(float)).all(1)]


def _modes(record: SearchRecord) -> list[str]:
    return [mode for _, mode in record.objectives]


def front(record: SearchRecord) -> pd.DataFrame:
    """The search's Pareto front (with one objective: its best trials)."""
    t = _searched(record)
    mask = pareto_mask(losses(t[[c for c, _ in record.objectives]], _modes(record)))
    return t[mask]


def reference_point(record: SearchRecord) -> list[float]:
    """Given, or 0 for "max" objectives (our metrics are rates in [0, 1]: a fixed point makes
    hypervolumes of different searches comparable) and the worst value seen for "min" ones."""
    if record.reference_point is not None:
        return list(record.reference_point)
    t = record.trials
    return [0.0 if mode == "max" else float(np.nanmax(t[c])) for c, mode in record.objectives]


def front_hypervolume(record: SearchRecord) -> float:
    t = _searched(record)
    cols = [c for c, _ in record.objectives]
    ref = losses([reference_point(record)], _modes(record))[0]
    return hypervolume(losses(t[cols], _modes(record)), ref)


# -- figures ------------------------------------------------------------------------------------

def _note(fig: Figure, ax, text: str) -> Figure:
    """A panel that says why it has nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def _label(column: str) -> str:
    return column.removeprefix("best/")


def _references(record: SearchRecord) -> pd.DataFrame:
    return record.trials[record.trials["stage"] == "reference"]


REFERENCE_MARKERS = ("*", "D", "P", "X")


def pareto_front_figure(record: SearchRecord) -> Figure:
    """Every pair of objectives: all trials, the front highlighted, references marked,
    confirmed configurations labelled."""
    cols = [c for c, _ in record.objectives]
    pairs = [(i, j) for i in range(len(cols)) for j in range(i + 1, len(cols))] or [(0, None)]
    fig = Figure(layout="constrained", figsize=(6.4 * len(pairs), 5.2))
    t, on_front = _searched(record), front(record)
    confirmed = set(record.confirmed["configuration"]) if record.confirmed is not None else set()
    for k, (i, j) in enumerate(pairs):
        ax = fig.add_subplot(1, len(pairs), k + 1)
        if j is None:  # one objective: the trials ranked, the best highlighted
            order = t.sort_values(cols[0], ascending=record.objectives[0][1] == "min")
            best = order["trial"].isin(on_front["trial"])
            ax.bar(np.arange(len(order)), order[cols[0]],
                   color=np.where(best, "tab:orange", "lightgray"))
            ax.set_xlabel("trials, best first")
            ax.set_ylabel(_label(cols[0]))
            continue
        dominated = t[~t["trial"].isin(on_front["trial"])]
        ax.scatter(dominated[cols[i]], dominated[cols[j]], s=28, c="lightgray",
                   edgecolors="gray", label=f"trials ({len(t)})")
        ax.scatter(on_front[cols[i]], on_front[cols[j]], s=60, c="tab:orange", edgecolors="black",
                   label=f"Pareto front ({len(on_front)})", zorder=3)
        for marker, (_, ref) in zip(REFERENCE_MARKERS, _references(record).iterrows()):
            ax.scatter(ref[cols[i]], ref[cols[j]], marker=marker, s=170, c="tab:blue",
                       edgecolors="black", zorder=4, label=f"reference: {ref['trial']}")
        for _, row in t[t["trial"].isin(confirmed)].iterrows():
            ax.annotate(str(row["trial"]), (row[cols[i]], row[cols[j]]), xytext=(6, 6),
                        textcoords="offset points", fontsize=8)
        ax.set_xlabel(_label(cols[i]))
        ax.set_ylabel(_label(cols[j]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{record.name}: validation objectives of every trial")
    return fig


def history_figure(record: SearchRecord) -> Figure:
    """Each objective in trial order, with the best so far and the references."""
    t = record.trials[record.trials["stage"] == "search"].reset_index(drop=True)
    fig = Figure(layout="constrained", figsize=(6.4 * len(record.objectives), 4.4))
    for k, (col, mode) in enumerate(record.objectives):
        ax = fig.add_subplot(1, len(record.objectives), k + 1)
        values = t[col].to_numpy(float)
        ax.scatter(np.arange(1, len(t) + 1), values, s=22, c="tab:gray", label="trial")
        filled = np.where(np.isnan(values), -np.inf if mode == "max" else np.inf, values)
        best = np.maximum.accumulate(filled) if mode == "max" else np.minimum.accumulate(filled)
        ax.step(np.arange(1, len(t) + 1), np.where(np.isfinite(best), best, np.nan), where="post",
                color="tab:orange", label="best so far")
        for style, (_, ref) in zip(("--", ":", "-."), _references(record).iterrows()):
            ax.axhline(ref[col], linestyle=style, color="tab:blue", label=f"reference: {ref['trial']}")
        ax.set_xlabel("trial (in start order)")
        ax.set_ylabel(f"{_label(col)} ({mode})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record.name}: objectives over trials")
    return fig


def _distribution(values: pd.Series) -> optuna.distributions.BaseDistribution:
    if values.map(lambda v: isinstance(v, (bool, str, np.bool_))).any():
        return optuna.distributions.CategoricalDistribution(sorted(set(values), key=str))
    if pd.api.types.is_integer_dtype(values):
        return optuna.distributions.IntDistribution(int(values.min()), int(values.max()))
    return optuna.distributions.FloatDistribution(float(values.min()), float(values.max()))


def importance_evaluator(evaluator=None):
    """Optuna's fANOVA (seeded) unless another evaluator is given: it splits the variance of
    the objective over all trials, while Optuna's default, PED-ANOVA, looks at the top 10%,
    which is two or three trials in a search of this size."""
    return evaluator or optuna.importance.FanovaImportanceEvaluator(seed=0)


def _quiet_study(direction: str) -> optuna.Study:
    """An in-memory study, without Optuna's "A new study created" log line."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)


def param_importances(record: SearchRecord, evaluator=None) -> pd.DataFrame:
    """Parameter x objective importances by an Optuna evaluator (`importance_evaluator`),
    from an in-memory study per objective built from the trials table. Parameters that took
    one value only are left out, and so are conditional ones (drawn in some trials only,
    e.g. a method's own): fANOVA needs one search space over every trial."""
    t = _searched(record)
    params = [p for p in record.params if t[p].notna().all() and t[p].nunique() > 1]
    dist = {p: (record.distributions or {}).get(p) or _distribution(t[p]) for p in params}
    out = pd.DataFrame(index=params, dtype=float)
    if len(t) < 2 or not params:
        return out
    for col, mode in record.objectives:
        study = _quiet_study(direction="maximize" if mode == "max" else "minimize")
        for _, row in t.iterrows():
            values = {p: (row[p].item() if hasattr(row[p], "item") else row[p]) for p in params}
            study.add_trial(optuna.trial.create_trial(params=values, distributions=dist,
                                                      value=float(row[col])))
        scores = optuna.importance.get_param_importances(
            study, evaluator=importance_evaluator(evaluator), params=params)
        out[col] = pd.Series(scores)
    return out


def param_importance_figure(record: SearchRecord, evaluator=None) -> Figure:
    importances = param_importances(record, evaluator)
    fig = Figure(layout="constrained", figsize=(5.2 * len(record.objectives), 0.5 * max(len(importances), 3) + 1.6))
    for k, (col, _) in enumerate(record.objectives):
        ax = fig.add_subplot(1, len(record.objectives), k + 1)
        if col not in importances or importances[col].isna().all():
            _note(fig, ax, "fewer than 2 finished trials\nor nothing varied")
            continue
        scores = importances[col].sort_values()
        ax.barh(scores.index, scores.to_numpy(), color="tab:blue")
        for y, v in enumerate(scores.to_numpy()):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1.0, scores.max() * 1.15))
        ax.set_xlabel("importance (sums to 1)")
        ax.set_title(_label(col), fontsize=10)
    name = type(importance_evaluator(evaluator)).__name__
    fig.suptitle(f"{record.name}: parameter importance per objective (Optuna {name}, "
                 f"{len(_searched(record))} trials)")
    return fig


def _popularity_columns(table: pd.DataFrame) -> list[str]:
    """test/pop_<group>/hr_10 columns, ordered by the group's lower count (1-4, 5-9, ..., 50+)."""
    found = [c for c in table.columns if POPULARITY_COLUMN.fullmatch(c)]
    first = lambda c: int(re.match(r"\d+", POPULARITY_COLUMN.fullmatch(c).group(1)).group())
    return sorted(found, key=first)


def popularity_groups_figure(record: SearchRecord) -> Figure:
    """HR@10 per target-popularity group, the base against every confirmed configuration
    (as the paper's Fig. 3): bars are means over seeds, whiskers one std."""
    columns = _popularity_columns(record.confirmed)
    summary = mean_std(record.confirmed, columns)
    summary = summary.loc[record.in_order(summary.index)]
    fig = Figure(layout="constrained", figsize=(max(7.0, 1.6 * len(columns) + 2), 4.6))
    ax = fig.add_subplot()
    if not columns:
        return _note(fig, ax, "no test/pop_<group>/hr_10 metrics in the confirmation")
    width = 0.8 / len(summary)
    x = np.arange(len(columns))
    for k, (configuration, s) in enumerate(summary.iterrows()):
        ax.bar(x + (k - (len(summary) - 1) / 2) * width, [s[f"{c} mean"] for c in columns],
               width, yerr=[s[f"{c} std"] for c in columns], capsize=3, label=record.label(configuration),
               hatch="//" if record.base_of(configuration) is None else None)  # a base
    ax.set_xticks(x, [POPULARITY_COLUMN.fullmatch(c).group(1) for c in columns])
    ax.set_xlabel("popularity of the test target (training interactions)")
    ax.set_ylabel("test HR@10")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{record.name}: HR@10 by item popularity, mean ± std over seeds")
    return fig


def _curve_column(record: SearchRecord, objective: str) -> str | None:
    """The per-epoch validation metric behind an objective (best/val/x -> val/x)."""
    for name in (objective.removeprefix("best/"), objective):
        if name in record.curves:
            return name
    return None


def curves_figure(record: SearchRecord) -> Figure:
    """Validation curves of the confirmed configurations and the references: mean over
    seeds, shaded one std."""
    columns = [c for c in (_curve_column(record, o) for o, _ in record.objectives) if c]
    fig = Figure(layout="constrained", figsize=(6.4 * max(len(columns), 1), 4.6))
    if not columns:
        return _note(fig, fig.add_subplot(), "no per-epoch validation metric of the "
                     "objectives in the curves")
    order = record.in_order(record.curves["configuration"])
    for k, column in enumerate(columns):
        ax = fig.add_subplot(1, len(columns), k + 1)
        for configuration in order:
            runs = record.curves[record.curves["configuration"] == configuration]
            if not len(runs):
                continue
            by_epoch = runs.groupby("epoch")[column]
            mean, std = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
            style = dict(linestyle="--") if record.base_of(configuration) is None else {}  # a base
            line, = ax.plot(mean.index, mean.to_numpy(), label=record.label(configuration), **style)
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.15, color=line.get_color())
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record.name}: validation curves (confirmation runs, mean ± std over seeds)")
    return fig


# -- report.md -------------------------------------------------------------------------------

def _markdown(rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(cell(v) for v in rows[0]) + " |",
             "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def frame_markdown(table: pd.DataFrame) -> str:
    """A table as Markdown: floats to 4 significant digits, NaN as "–"."""
    return _markdown([list(table.columns)] + table.values.tolist())


def report_markdown(record: SearchRecord) -> str:
    cols = [c for c, _ in record.objectives]
    order = list(dict.fromkeys(record.confirmed["configuration"]))
    confirmed_trials = record.trials[record.trials["trial"].isin(order)].sort_values(
        "trial", key=lambda trials: trials.map(order.index))
    found = verdicts(record)
    good = [v for v in found if "without losing overall accuracy" in v]
    headline = (f"**Yes**: {len(good)} of {len(found)} configurations lift tail items without "
                "losing overall accuracy, and the lift is beyond noise." if good else
                f"**No** configuration of {len(found)} lifts tail items beyond noise without "
                "losing overall accuracy.")
    seeds = sorted(record.confirmed["seed"].unique().tolist())
    parts = [
        f"# {record.name}: does a configuration lift tail items without losing overall accuracy?",
        headline, "\n".join(f"- {v}" for v in found),
        _markdown(answer_rows(record)),
        f"Test metrics at each run's best validation epoch, mean ± std over seeds {seeds}; "
        f"in brackets the change against {_against(record)} (% for overall metrics, x for tail "
        "ones) and the Holm-adjusted p-value of a two-sided Wilcoxon signed-rank test over "
        "test users (each user's seeds averaged) against the base, corrected over all "
        f"{len(record.tests) if record.tests is not None else 0} comparisons of this report "
        f"(alpha {ALPHA}). Coverage@10 is a property of the whole ranking: no per-user test.",
        "## Confirmed configurations",
        frame_markdown(confirmed_trials[["trial", "stage", *record.params, *cols]]),
        "## The search",
        "\n".join(f"- {k}: {v}" for k, v in record.facts.items()),
        _search_facts(record),
        "## Figures",
        "\n\n".join(f"![{f.removesuffix('.png')}]({f})" for f in FIGURES),
    ]
    if record.tests is not None and len(record.tests):
        parts[-2:-2] = ["## Paired tests against the base", frame_markdown(record.tests)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _against(record: SearchRecord) -> str:
    """What the brackets of the answer table compare with, in words."""
    bases = list(dict.fromkeys(record.bases.values())) if record.bases else [record.base]
    if len(bases) > 1:
        return ("the base of its group (the search's best `method: base` trial with the same "
                "values of confirm.per: the first row of each group)")
    tuned = "" if bases[0] == "base" else " (the search's best base, trained like the others)"
    return f"`{record.label(bases[0])}`{tuned}"


def _search_facts(record: SearchRecord) -> str:
    t = record.trials
    cols = [c for c, _ in record.objectives]
    counts = t.groupby(["stage", "outcome"]).size() if "outcome" in t else t.groupby("stage").size()
    lines = ["- objectives: " + ", ".join(f"{mode} `{c}`" for c, mode in record.objectives),
             "- runs: " + ", ".join(f"{' '.join(map(str, np.atleast_1d(k)))}: {n}"
                                    for k, n in counts.items())]
    if "epochs" in t:
        lines.append(f"- epochs trained in the search: {int(t.loc[t['stage'] == 'search', 'epochs'].sum())}")
    ref = reference_point(record)
    lines.append(f"- hypervolume of the front: {front_hypervolume(record):.6g} (reference point "
                 f"{', '.join(f'{v:g}' for v in ref)} in objective units)")
    on_front = front(record)
    lines.append(f"\nPareto front of the search ({len(on_front)} of {len(_searched(record))} trials):\n")
    lines.append(frame_markdown(on_front[["trial", *record.params, *cols]]))
    return "\n".join(lines)


def write_report(record: SearchRecord, folder: str | Path, evaluator=None) -> dict[str, Path]:
    """report.md and the five figures in `folder`; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"pareto_front.png": pareto_front_figure(record), "history.png": history_figure(record),
               "param_importance.png": param_importance_figure(record, evaluator),
               "popularity_groups.png": popularity_groups_figure(record),
               "curves.png": curves_figure(record)}
    files = {}
    for name, fig in figures.items():
        files[name] = folder / name
        fig.savefig(files[name], dpi=120)
    report = folder / "report.md"
    report.write_text(report_markdown(record))
    return {"report.md": report, **files}
