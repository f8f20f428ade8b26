"""The sweep's ASHA, as Ray pickles it into the sweep's saved state: rungs rebuilt from the folder after a
restart, finalists' reruns and twins kept out, trials that miss `sweep.constraints` stopped at their first result."""
from __future__ import annotations

import math
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from . import ray_search
from .counts import is_feasible
from .ray_search import ROLE, is_extra
from .results import read_trials


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a driver crash. Ray does not save scheduler state, so a restored sweep would
    start with empty rungs and stop nobody; on its first trial this scheduler replays every result already
    recorded in the experiment folder into the rungs (the value at the first epoch >= each milestone).

    With `constraints` (`sweep.constraints`), a search trial whose measures miss a limit is stopped at that result:
    its cost is measured once, at its first epoch, and does not change, so it can never be the best, and the epochs
    it would train are spent on trials that can. It stays out of the rungs (live and in the replay), so feasible
    trials are judged against each other, not against larger students that could never be shipped."""

    _constraints: dict[str, float] = {}  # (a scheduler pickled before constraints had none)

    def __init__(self, *args, experiment_dir: str, constraints: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._experiment_dir = experiment_dir
        self._replayed = False
        self._constraints = dict(constraints or {})

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if ray_search._resumed_folder is not None:  # unpickled from tuner.pkl by `sweep resume`: replay the folder resumed
            self._experiment_dir = str(ray_search._resumed_folder)

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._replayed:
            self._replayed = True
            self.replay(Path(self._experiment_dir))

    # A finalist's rerun or twin runs every epoch: it is a measurement, not a candidate, and stays out of the rungs.
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if is_extra(trial):
            return TrialScheduler.CONTINUE
        if self._infeasible(result):
            self._num_stopped += 1
            return TrialScheduler.STOP
        return super().on_trial_result(tune_controller, trial, result)

    def _infeasible(self, result: dict | None) -> bool:
        return bool(self._constraints) and self._time_attr in (result or {}) and not is_feasible(self._constraints,
                                                                                                  result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if is_extra(trial) or self._infeasible(result):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)

    def replay(self, folder: Path) -> int:
        n = 0
        for rec in read_trials(folder):  # Ray's rows, filled from the checkpoints where they never arrived
            if rec.params.get(ROLE):
                continue
            rows = [r for r in rec.by_epoch.values() if self._time_attr in r and self._metric in r]
            if not rows or self._infeasible(rows[0]):  # (stopped at its first result, out of the rungs)
                continue
            bracket = self._trial_info.get(rec.trial_id, self._brackets[0])
            for milestone, recorded in bracket._rungs:
                first = next((r for r in rows if r[self._time_attr] >= milestone), None)
                if first is not None and math.isfinite(first[self._metric]):
                    recorded.setdefault(rec.trial_id, self._metric_op * first[self._metric])
                    n += 1
        return n
