"""The report: numbers checked against independent computations, figures written and readable."""

import math
import statistics

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from tuning.report import (FIGURES, SearchRecord, answer_rows, answer_table, change, curves_figure, front,
                           front_hypervolume, param_importances, pareto_front_figure,
                           popularity_groups_figure, verdicts, write_report)
from tuning.stats import paired_tests

OVERALL, TAIL = "best/val/overall/ndcg_20", "best/val/tail/ndcg_20"
POP_GROUPS = ("1-4", "5-9", "10-19", "20-49", "50+")


def make_record(objectives=((OVERALL, "max"), (TAIL, "max")), seed=0, bases=None) -> SearchRecord:
    """A search of 24 trials where alpha drives the overall objective and lambda the tail one,
    two references, and a confirmation of base, paper default and two front trials:
    `lifter` gains on tail users only, `flat` changes nothing."""
    rng = np.random.default_rng(seed)
    n = 24
    trials = pd.DataFrame({
        "trial": [f"t{i:02d}" for i in range(n)], "stage": "search",
        "lambda": 10 ** rng.uniform(-3, -1, n), "alpha": rng.uniform(0.05, 0.6, n),
        "period": rng.integers(5, 41, n), "align_items": rng.choice(["unique", "occurrence"], n),
        "outcome": rng.choice(["completed", "early-stopped"], n), "epochs": rng.integers(5, 30, n)})
    trials[OVERALL] = 0.15 - 0.1 * (trials["alpha"] - 0.3) ** 2 + rng.normal(0, 1e-4, n)
    trials[TAIL] = 0.02 + 0.01 * np.log10(trials["lambda"] * 1000) + rng.normal(0, 1e-4, n)
    trials.loc[3, [OVERALL, TAIL]] = [0.151, 0.045]   # on the front: the tail end
    trials.loc[7, [OVERALL, TAIL]] = [0.158, 0.030]   # on the front: the overall end
    trials["trial"] = trials["trial"].replace({"t03": "lifter", "t07": "flat"})
    refs = pd.DataFrame({"trial": ["base", "paper-default"], "stage": "reference",
                         OVERALL: [0.14, 0.145], TAIL: [0.015, 0.02],
                         "outcome": "completed", "epochs": 30})
    trials = pd.concat([trials, refs], ignore_index=True)

    users, seeds = 400, (100, 101, 102)
    tail_user = rng.random(users) < 0.25
    lift = {"base": 0.0, "paper-default": 0.05, "lifter": 0.25, "flat": 0.0}
    per_user, per_seed, curves = [], [], []
    for configuration, tail_lift in lift.items():
        for s in seeds:
            hit = rng.random(users) < np.where(tail_user, 0.05 + tail_lift, 0.25)
            ndcg = np.where(hit, 1 / np.log2(rng.integers(0, 10, users) + 2), 0.0)
            per_user.append(pd.DataFrame({"configuration": configuration, "seed": s,
                                          "user": np.arange(users), "tail": tail_user,
                                          "hr_10": hit.astype(float), "ndcg_10": ndcg}))
            row = {"configuration": configuration, "seed": s,
                   "test/overall/hr_10": hit.mean(), "test/overall/ndcg_10": ndcg.mean(),
                   "test/tail/hr_10": hit[tail_user].mean(), "test/tail/ndcg_10": ndcg[tail_user].mean(),
                   "test/coverage_10": rng.uniform(0.3, 0.5)}
            row.update({f"test/pop_{g}/hr_10": rng.uniform(0, 0.4) + (tail_lift if i < 2 else 0)
                        for i, g in enumerate(POP_GROUPS)})
            per_seed.append(row)
            for epoch in range(1, 11):
                curves.append({"configuration": configuration, "seed": s, "epoch": epoch,
                               "val/overall/ndcg_20": 0.15 * (1 - math.exp(-epoch / 3)) + rng.normal(0, 0.003),
                               "val/tail/ndcg_20": (0.02 + tail_lift / 5) * epoch / 10})
    per_user = pd.concat(per_user, ignore_index=True)
    return SearchRecord(
        name="tiny-pareto", objectives=list(objectives),
        params=["lambda", "alpha", "period", "align_items"], trials=trials,
        confirmed=pd.DataFrame(per_seed), tests=paired_tests(per_user, bases or "base"),
        curves=pd.DataFrame(curves), base="base", bases=bases or {},
        facts={"dataset": "synthetic", "command": "pytest", "confirmation seeds": "100, 101, 102"})


@pytest.fixture(scope="module")
def record():
    return make_record()


@pytest.fixture(scope="module")
def written(record, tmp_path_factory):
    return write_report(record, tmp_path_factory.mktemp("report"))


def test_change_formats():
    assert change(0.1909, 0.1792, "percent") == "+6.5%"
    assert change(0.0811, 0.0610, "ratio") == "1.33x"
    assert change(0.1, 0.0, "ratio") == "n/a"


def test_answer_table_cells_match_an_independent_computation(record):
    """Each configuration's line holds mean ± std over seeds; the line under it the change
    against the base and the Holm-adjusted p; within 120 columns."""
    text = answer_table(record)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["configuration", "seeds", "HR@10"]
    named = [l.split()[0] for l in lines[2:] if not l.startswith(" ")]
    assert named == ["base", "paper-default", "lifter", "flat"]
    assert max(map(len, lines)) <= 120
    c = record.confirmed
    for configuration in ("lifter", "flat"):
        at = next(i for i, l in enumerate(lines) if l.startswith(configuration))
        line, notes = lines[at], lines[at + 1]
        for k, (column, how, group, metric) in enumerate((
                ("test/overall/hr_10", "percent", "overall", "hr_10"),
                ("test/overall/ndcg_10", "percent", "overall", "ndcg_10"),
                ("test/tail/hr_10", "ratio", "tail", "hr_10"),
                ("test/tail/ndcg_10", "ratio", "tail", "ndcg_10"))):
            mine = c.loc[c.configuration == configuration, column].tolist()
            base = statistics.mean(c.loc[c.configuration == "base", column])
            p = record.tests.query("configuration == @configuration and group == @group "
                                   "and metric == @metric")["p_holm"].item()
            ratio = statistics.mean(mine) / base
            shown = f"{(ratio - 1) * 100:+.1f}%" if how == "percent" else f"{ratio:.2f}x"
            value = f"{statistics.mean(mine):.4f} ± {statistics.stdev(mine):.4f}"
            assert value in line
            # the note sits under its value, column by column
            assert notes[line.index(value):].startswith(f"{shown}, p={p:.2g}"), (configuration, column)
    base_at = next(i for i, l in enumerate(lines) if l.startswith("base"))
    assert lines[base_at + 1].startswith("paper-default")  # no change of the base against itself


def test_report_table_puts_change_and_p_in_brackets(record):
    rows = answer_rows(record)
    lifter = next(r for r in rows if r[0] == "lifter")
    p = record.tests.query("configuration == 'lifter' and group == 'tail' and metric == 'hr_10'")
    assert lifter[4].endswith(f"x, p={p['p_holm'].item():.2g})")
    assert "(" not in " ".join(next(r for r in rows if r[0] == "base"))


def test_verdicts_tell_a_real_tail_lift_from_noise(record):
    said = dict(v.split(": ", 1) for v in verdicts(record))
    assert said["**lifter**"].endswith("lifts tail items without losing overall accuracy, beyond seed and user noise.")
    assert said["**flat**"].endswith("no tail lift beyond noise.")


def test_front_and_hypervolume_against_brute_force(record):
    t = record.trials[record.trials.stage == "search"]
    pts = t[[OVERALL, TAIL]].to_numpy()
    dominated = [any((q >= p).all() and (q > p).any() for q in pts) for p in pts]
    assert set(front(record)["trial"]) == set(t.loc[~np.array(dominated), "trial"])
    assert {"lifter", "flat"} <= set(front(record)["trial"])
    # reference point 0: the union of rectangles [0, x] x [0, y], by a fine grid
    grid = np.linspace(0, 0.2, 2001)
    xs, ys = np.meshgrid(grid[:-1] + 5e-5, np.linspace(0, 0.06, 2001)[:-1] + 1.5e-5)
    covered = np.zeros_like(xs, dtype=bool)
    for x, y in pts:
        covered |= (xs <= x) & (ys <= y)
    assert front_hypervolume(record) == pytest.approx(covered.sum() * 1e-4 * 3e-5, rel=2e-3)


def test_param_importance_finds_what_drives_each_objective(record):
    imp = param_importances(record)
    assert imp[OVERALL].idxmax() == "alpha"
    assert imp[TAIL].idxmax() == "lambda"
    assert imp[OVERALL].sum() == pytest.approx(1.0)


def test_param_importance_leaves_out_a_param_some_trials_lack():
    conditional = make_record()
    searched = conditional.trials["stage"] == "search"
    conditional.trials.loc[searched, "rlmrec_gen.mask_ratio"] = np.where(
        np.arange(searched.sum()) % 2, 0.2, np.nan)  # drawn in every other trial only
    conditional.params = [*conditional.params, "rlmrec_gen.mask_ratio"]
    imp = param_importances(conditional)
    assert "rlmrec_gen.mask_ratio" not in imp.index
    assert imp[OVERALL].idxmax() == "alpha"


def test_report_answers_first_and_writes_every_figure(record, written):
    assert set(written) == {"report.md", *FIGURES}
    md = written["report.md"].read_text()
    lines = md.splitlines()
    assert lines[0].startswith("# tiny-pareto: does a configuration lift tail items")
    assert lines[2].startswith("**Yes**: 1 of 3 configurations")
    first_table = next(i for i, l in enumerate(lines) if l.startswith("| configuration"))
    assert first_table < md.splitlines().index("## The search")
    assert "hypervolume of the front" in md and "- dataset: synthetic" in md
    for name in FIGURES:
        assert f"]({name})" in md
        image = matplotlib.image.imread(written[name])
        assert image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_one_objective_record_reports_too(tmp_path):
    record = make_record(objectives=[(OVERALL, "max")])
    files = write_report(record, tmp_path)
    assert len(front(record)) == 1 and front(record)[OVERALL].item() == record.trials[OVERALL].max()
    assert files["pareto_front.png"].stat().st_size > 10_000


def test_a_base_per_group_orders_compares_and_says_so(tmp_path):
    """Two groups: `flat` is the base of `lifter` (as a backbone's tuned base is of its FAERec),
    `base` that of `paper-default`. Each group's base comes first, each change is against it."""
    record = make_record(bases={"paper-default": "base", "lifter": "flat"})
    rows = answer_rows(record)
    assert [r[0] for r in rows[1:]] == ["base", "paper-default", "flat", "lifter"]
    assert "(" not in " ".join(rows[3])  # flat is a base now: no change against anything
    c = record.confirmed
    tail = {k: statistics.mean(c.loc[c.configuration == k, "test/tail/hr_10"]) for k in ("lifter", "flat")}
    assert f"({tail['lifter'] / tail['flat']:.2f}x, p=" in rows[4][4]
    assert set(zip(record.tests["configuration"], record.tests["base"])) == {
        ("paper-default", "base"), ("lifter", "flat")}
    said = dict(v.split(": ", 1) for v in verdicts(record))
    assert set(said) == {"**paper-default**", "**lifter**"} and "flat's" in said["**lifter**"]
    write_report(record, tmp_path)
    assert "the change against the base of its group" in (tmp_path / "report.md").read_text()


def test_missing_base_is_a_clear_error(record):
    broken = SearchRecord(**{**record.__dict__, "base": "plain"})
    with pytest.raises(ValueError, match="base configuration 'plain'"):
        answer_table(broken)


def test_figures_without_their_data_say_so():
    record = make_record()
    record.confirmed = record.confirmed[[c for c in record.confirmed if "/pop_" not in c]]
    record.curves = record.curves[["configuration", "seed", "epoch"]]
    for fig, note in ((popularity_groups_figure(record), "no test/pop_<group>/hr_10"),
                      (curves_figure(record), "no per-epoch validation metric")):
        assert note in fig.axes[0].texts[0].get_text()


def test_pareto_figure_shows_every_trial_the_front_and_the_references(record):
    ax = pareto_front_figure(record).axes[0]
    sizes = [len(c.get_offsets()) for c in ax.collections]
    assert sizes == [22, 2, 1, 1]  # dominated trials, the front, base, paper default
    front_points = {tuple(p) for p in ax.collections[1].get_offsets().tolist()}
    assert front_points == {(0.151, 0.045), (0.158, 0.030)}
    assert {t.get_text() for t in ax.texts} == {"lifter", "flat"}  # confirmed trials labelled
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "trials (24)", "Pareto front (2)", "reference: base", "reference: paper-default"]
