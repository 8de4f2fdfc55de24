"""MO-ASHA: asynchronous successive halving that judges trials on several objectives at once.

Schmucker et al. (2021), "Multi-objective Asynchronous Successive Halving": ASHA's rungs,
with the single-metric cut replaced by a ranking that never mixes the objectives. Rungs lie
at grace_period * reduction_factor^k epochs (below max_t). When a trial reaches a rung, its
objective vector is recorded there and the trial goes on only if it ranks among the top
ceil(n / reduction_factor) of the n vectors recorded at that rung (itself included), ranked
by non-dominated sorting and, within a front, by crowding distance (tuning.pareto). A trial
dominated by the others stops; a trial on the front survives however poor its other
objectives are; ties share a position, so the first trial at a rung always goes on.

Like Ray's ASHAScheduler (ray/tune/schedulers/async_hyperband.py, one bracket) this is the
stopping variant: a trial is judged once per rung, on arrival, against the trials recorded
before it. With one objective the ranking is ASHA's quantile cut.

Tune does not save a scheduler's state when it checkpoints an experiment, and
`Tuner.restore` gets the scheduler back by unpickling the object as it was when the Tuner
was built. So with `state_path` the scheduler writes its rungs to that JSON file after each
change and reloads them when unpickled: a resumed search takes the same decisions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from model.cache import atomic_write
from tuning.pareto import MODES, losses, promotion_order


class MultiObjectiveASHA(FIFOScheduler):
    """objectives: [(metric, mode), ...]; time_attr: the reported progress counter (epoch)."""

    def __init__(self, objectives: Sequence[tuple[str, str]], time_attr: str = "epoch",
                 max_t: int = 100, grace_period: int = 1, reduction_factor: float = 3,
                 state_path: str | os.PathLike | None = None):
        if not objectives:
            raise ValueError("MultiObjectiveASHA needs at least one (metric, mode) objective")
        for metric, mode in objectives:
            if mode not in MODES:
                raise ValueError(f"objective {metric!r}: mode must be 'max' or 'min', got {mode!r}")
        if not 0 < grace_period <= max_t:
            raise ValueError(f"need 0 < grace_period <= max_t, got {grace_period} and {max_t}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        super().__init__()
        self.objectives = [(str(m), str(mode)) for m, mode in objectives]
        self.time_attr = time_attr
        self.max_t = max_t
        self.reduction_factor = reduction_factor
        self.milestones = []
        milestone = grace_period
        while milestone < max_t:
            self.milestones.append(milestone)
            milestone *= reduction_factor
        # milestone -> trial_id -> the objective values recorded there (as reported)
        self.rungs: dict[float, dict[str, list[float]]] = {m: {} for m in self.milestones}
        self.num_stopped = 0
        self.state_path = None if state_path is None else str(state_path)
        self._write_state()  # a new search starts empty, whatever an older one left there

    # -- Tune's TrialScheduler interface -------------------------------------------------

    def set_search_properties(self, metric, mode, **spec) -> bool:
        """TuneConfig's metric/mode must be one of the objectives (or absent)."""
        return metric is None or (metric, mode) in self.objectives or (
            mode is None and metric in dict(self.objectives))

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result:
            return TrialScheduler.CONTINUE
        now = result[self.time_attr]
        action = self._judge(trial.trial_id, now, result)
        if now >= self.max_t:
            return TrialScheduler.STOP  # the budget's end: not counted as stopped early
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
            self._write_state()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        # A trial that ends (budget, its own early stopping) still counts at the rung it
        # reached, so later trials are judged against it, as in Ray's ASHA.
        if result and self.time_attr in result:
            self._judge(trial.trial_id, result[self.time_attr], result)

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m:g}: {len(r)} recorded" for m, r in self.rungs.items())
        names = ", ".join(f"{mode} {metric}" for metric, mode in self.objectives)
        return f"Using MO-ASHA ({names}): {self.num_stopped} stopped early; {rungs or 'no rungs'}"

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self._state()))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        expected = self._state()
        for key in ("objectives", "time_attr", "milestones"):
            if state[key] != expected[key]:
                raise ValueError(f"{checkpoint_path}: saved by an MO-ASHA with {key} "
                                 f"{state[key]}, this one has {expected[key]}")
        self.rungs = {m: dict(state["rungs"][str(m)]) for m in self.milestones}
        self.num_stopped = state["num_stopped"]

    def __setstate__(self, state: dict) -> None:
        # Tuner.restore unpickles the scheduler saved with the Tuner, before any trial ran:
        # the rungs recorded since are in the state file.
        self.__dict__.update(state)
        if self.state_path and Path(self.state_path).exists():
            self.restore(self.state_path)

    # -- the rule ------------------------------------------------------------------------

    def _judge(self, trial_id: str, now: float, result: dict) -> str:
        """Record the trial at the highest rung it has reached and not yet been judged at;
        STOP if it is not among the top ceil(n / reduction_factor) there."""
        for milestone in reversed(self.milestones):
            recorded = self.rungs[milestone]
            if now < milestone:
                continue
            if trial_id in recorded:
                return TrialScheduler.CONTINUE  # judged here already (e.g. a resumed trial)
            missing = [metric for metric, _ in self.objectives if metric not in result]
            if missing:
                raise ValueError(f"MO-ASHA: trial {trial_id} reported {self.time_attr}={now} "
                                 f"without the objective {missing[0]!r}")
            recorded[trial_id] = [float(result[metric]) for metric, _ in self.objectives]
            self._write_state()
            values = np.array(list(recorded.values()))  # this trial last
            position = promotion_order(losses(values, [mode for _, mode in self.objectives]))[-1]
            keep = math.ceil(len(recorded) / self.reduction_factor)
            return TrialScheduler.CONTINUE if position < keep else TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def _state(self) -> dict:
        return {"objectives": [list(o) for o in self.objectives], "time_attr": self.time_attr,
                "milestones": self.milestones, "num_stopped": self.num_stopped,
                "rungs": {str(m): r for m, r in self.rungs.items()}}

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        path = Path(self.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # a crash mid-write leaves the previous state whole
        atomic_write(path, lambda f: f.write(json.dumps(self._state()).encode()))
