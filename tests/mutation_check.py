"""Mutation check: does the suite catch plausible bugs in the code behind published numbers?

    python tests/mutation_check.py                 # every mutant: 8 min on 2 cores, 30 when shared
    python tests/mutation_check.py --only fit-no-restore --only fla-mean
    python tests/mutation_check.py --list

Each mutant is one small edit (an exact text replacement) of model/metrics.py,
model/faerec.py, model/train.py or tuning/space.py. The script copies the project's
tracked files to a temporary folder, checks that the matching test files pass there
unchanged, then applies one mutant at a time and runs that file's tests (`-x`: the first
failure kills it). It prints which test killed each mutant and the score: killed / total.
Exit status 1 if any mutant survives or no longer applies. Not part of `make test`.

A mutant whose text is no longer found exactly once ("stale") means the code moved:
update its `find` text, do not drop it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The test file each source file is checked by.
TESTS = {"model/train.py": "tests/test_train.py", "model/faerec.py": "tests/test_faerec.py",
         "model/metrics.py": "tests/test_metrics.py", "tuning/space.py": "tests/test_space.py"}


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str   # relative to the project root
    find: str   # must occur exactly once in the file
    replace: str
    why: str    # the bug it stands for


MUTANTS = [
    # --- model/train.py: what fit() restores, feeds and reports
    Mutant("fit-no-restore", "model/train.py",
           'if state["best_model"] is not None:', "if False:",
           "the best validation state is not restored before the test evaluation"),
    Mutant("fit-best-model-alias", "model/train.py",
           'best_model=copy.deepcopy(model.state_dict()))', "best_model=model.state_dict())",
           "the kept best state is the live weights, so training moves it"),
    Mutant("curriculum-epoch", "model/train.py",
           "train_step(model, optimizer, batch, epoch - 1, autocast)",
           "train_step(model, optimizer, batch, epoch, autocast)",
           "the curriculum is given the 1-based epoch instead of the completed epochs"),
    Mutant("fla-item-counts", "model/train.py",
           "popularity = torch.tensor(inputs.data.train_popularity)",
           "popularity = torch.tensor(inputs.data.item_counts)",
           "FLA groups by counts that include validation and test items (a leak)"),
    Mutant("snapshot-live", "model/train.py",
           'return copy.deepcopy({"model": model.state_dict(),',
           'return dict({"model": model.state_dict(),',
           "snapshot() hands out the live state_dict tensors"),
    Mutant("patience-off-by-one", "model/train.py",
           'stopped_early = state["bad_evals"] >= patience',
           'stopped_early = state["bad_evals"] > patience',
           "early stopping waits one validation too many"),
    Mutant("improvement-on-ties", "model/train.py",
           'if val[train_cfg.select_metric] > state["best_metric"]:',
           'if val[train_cfg.select_metric] >= state["best_metric"]:',
           "a tie counts as an improvement, so a plateau never stops"),
    Mutant("train-includes-val", "model/train.py",
           "return seq[:-2] if len(seq) >= 4", "return seq[:-1] if len(seq) >= 4",
           "training pairs include the validation target (a leak)"),
    Mutant("train-targets-shifted", "model/train.py",
           "self.targets = pad_left([x[1:] for x in train], max_len)",
           "self.targets = pad_left([x[:-1] for x in train], max_len)",
           "each position's target is its own input, not the next item"),
    Mutant("negatives-at-padding", "model/train.py",
           "negatives = self.sample_negatives(rows, targets.shape) * (targets > 0)",
           "negatives = self.sample_negatives(rows, targets.shape)",
           "negatives drawn at padding positions"),
    Mutant("eval-no-seen-mask", "model/train.py",
           "scores[rows, cols] = -torch.inf", "scores[rows, cols] = scores[rows, cols]",
           "items the user has seen are ranked"),
    Mutant("eval-target-masked", "model/train.py",
           "scores[arange, targets] = target_scores", "target_scores = None",
           "a target the user had seen is masked: a guaranteed miss"),
    Mutant("val-groups-see-test", "model/train.py",
           "tail_mask = data.eval_tail_mask(name)", "tail_mask = data.tail_mask",
           "validation head/tail counted with the test items (selection sees test data)"),
    # --- model/faerec.py: the losses and the curriculum
    Mutant("fla-mean", "model/faerec.py",
           "high = popularity > popularity.median()",
           "high = popularity > popularity.float().mean()",
           "popularity split at the mean instead of the median"),
    Mutant("fla-ties-high", "model/faerec.py",
           "high = popularity > popularity.median()",
           "high = popularity >= popularity.median()",
           "items tied at the median go to the high group"),
    Mutant("curriculum-half-period", "model/faerec.py",
           "math.cos(2 * math.pi * epoch / self.period)", "math.cos(math.pi * epoch / self.period)",
           "eq. (11) with the period doubled"),
    Mutant("no-cls-at-w-max", "model/faerec.py",
           "return (self.w_max + self.w_min) / 2", "return self.w_max",
           "w/o CLS fixes w1 at w_max instead of the mean"),
    Mutant("eq12-swapped", "model/faerec.py",
           "align = w1 * ila + (1 - w1) * fla", "align = w1 * fla + (1 - w1) * ila",
           "eq. (12) weights swapped between ILA and FLA"),
    Mutant("infonce-tau", "model/faerec.py",
           "(F.normalize(e_id, dim=-1) / tau)", "(F.normalize(e_id, dim=-1) * tau)",
           "InfoNCE multiplies by the temperature"),
    Mutant("gate-swapped", "model/faerec.py",
           "return g * e_id + (1 - g) * e_llm", "return g * e_llm + (1 - g) * e_id",
           "eq. (4) gate applied to the wrong side"),
    Mutant("std-unbiased", "model/faerec.py",
           "e.var(0, unbiased=False)", "e.var(0, unbiased=True)",
           "eq. (7) with the unbiased variance: C_ii no longer 1 for identical views"),
    Mutant("barlow-diagonal-in-redundancy", "model/faerec.py",
           "lambda_ * (c.pow(2).sum() - on_diag.pow(2).sum())", "lambda_ * c.pow(2).sum()",
           "eq. (9)'s redundancy term includes the diagonal"),
    Mutant("score-weight-swapped", "model/faerec.py",
           "items = (1 - w) * e_id + w * e_llm", "items = w * e_id + (1 - w) * e_llm",
           "score_llm_weight applied to the ID side"),
    Mutant("bce-over-padding", "model/faerec.py",
           "return (loss * real).sum() / real.sum()", "return loss.mean()",
           "BCE averaged over padding positions too"),
    Mutant("align-includes-padding", "model/faerec.py",
           "rows = torch.cat([inverse[0][input_ids != 0], inverse[2][neg_ids != 0]])",
           "rows = torch.cat([inverse[0].flatten(), inverse[2][neg_ids != 0]])",
           "the padding item joins the alignment items"),
    Mutant("bce-items-swapped", "model/faerec.py",
           'scored = f if cfg.bce_items == "fused" else e_id',
           'scored = e_id if cfg.bce_items == "fused" else f',
           "bce_items fused/id swapped"),
    # --- model/metrics.py: the published metrics
    Mutant("rank-ties-against", "model/metrics.py",
           "(top_scores > target).sum(1, keepdim=True)", "(top_scores >= target).sum(1, keepdim=True)",
           "ties counted against the target (and the target against itself)"),
    Mutant("ndcg-log-base", "model/metrics.py",
           "return hit, hit / torch.log2(rank + 2.0)", "return hit, hit / torch.log2(rank + 1.0)",
           "NDCG discount off by one"),
    Mutant("hr-at-k-inclusive", "model/metrics.py",
           "hit = (rank < ks).double()", "hit = (rank <= ks).double()",
           "HR@K counts rank K as a hit"),
    Mutant("tail-head-swapped", "model/metrics.py",
           "torch.stack([torch.ones_like(tail), tail, ~tail]",
           "torch.stack([torch.ones_like(tail), ~tail, tail]",
           "tail and head groups swapped"),
    Mutant("kept-ranks-capped", "model/metrics.py",
           "self.kept.append((scores > target).sum(1))", "self.kept.append(rank[:, 0])",
           "per-user ranks capped at max K instead of exact over all items"),
    # --- tuning/space.py: what the search draws
    Mutant("w-max-whole-range", "tuning/space.py",
           "value = low + w_gap * (w_max.high - low)",
           "value = low + w_gap * (w_max.high - w_max.low)",
           "w_max drawn over its whole range instead of above w_min (piles up at the top)"),
    Mutant("w-max-no-log", "tuning/space.py",
           'if w_max.kind == "loguniform":', "if False:",
           "the log scale dropped for a loguniform w_max"),
    Mutant("w-max-below-w-min", "tuning/space.py",
           "low = max(w_min, w_max.low)", "low = w_max.low",
           "w_max not kept above w_min"),
    Mutant("loguniform-linear", "tuning/space.py",
           "return trial.suggest_float(p.name, p.low, p.high, log=True)",
           "return trial.suggest_float(p.name, p.low, p.high)",
           "a loguniform param drawn on a linear scale"),
    Mutant("w-gap-from-zero", "tuning/space.py",
           'drawn["w_gap"] = trial.suggest_float("w_gap", GAP_MIN, 1.0)',
           'drawn["w_gap"] = trial.suggest_float("w_gap", 0.0, 1.0)',
           "w_gap may be 0: w_max may equal w_min"),
]


def copy_project(dest: Path) -> None:
    """The tracked files as they are on disk now (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(project: Path, test_file: str, timeout: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'timeout' | 'error', first failing test or detail)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
               "-W", "ignore", test_file]
    env = {**os.environ, "PYTHONPATH": str(project)}
    try:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s"
    if done.returncode == 0:
        return "passed", ""
    if done.returncode == 1:
        failed = re.search(r"^FAILED (\S+)", done.stdout, re.MULTILINE)
        return "failed", failed.group(1) if failed else "?"
    return "error", (done.stdout + done.stderr).strip().splitlines()[-1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    if args.list:
        for m in mutants:
            print(f"{m.name:<30} {m.path:<17} {m.why}")
        return 0

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as folder:
        project = Path(folder)
        copy_project(project)
        for test_file in sorted({TESTS[m.path] for m in mutants}):
            outcome, detail = run_tests(project, test_file, args.timeout)
            if outcome != "passed":
                print(f"{test_file} does not pass unmutated ({outcome}: {detail}); stopping")
                return 2
        results = []
        for m in mutants:
            target = project / m.path
            original = target.read_text()
            if original.count(m.find) != 1:
                results.append((m, "stale", f"text found {original.count(m.find)} times"))
            else:
                target.write_text(original.replace(m.find, m.replace))
                try:
                    tic = time.perf_counter()
                    outcome, detail = run_tests(project, TESTS[m.path], args.timeout)
                finally:
                    target.write_text(original)
                verdict = {"failed": "killed", "timeout": "killed (timeout)",
                           "passed": "SURVIVED"}.get(outcome, "error")
                results.append((m, verdict, f"{detail}  [{time.perf_counter() - tic:.0f} s]"))
            print(f"{results[-1][1]:<16} {m.name:<30} {results[-1][2]}", flush=True)

    killed = sum(verdict.startswith("killed") for _, verdict, _ in results)
    print(f"\nmutation score: {killed}/{len(results)} killed "
          f"({time.perf_counter() - started:.0f} s)")
    for m, verdict, detail in results:
        if not verdict.startswith("killed"):
            print(f"  {verdict}: {m.name} ({m.path}): {m.why}; {detail}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
