"""Ray Tune pieces that Ray pickles into the sweep's saved state, so they live at module level: the Optuna
searcher with our pruning and NaN rules, and the progress callback."""
from __future__ import annotations

import math
import sys
import time

import optuna
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from trainable.loop import METRIC


class KDOptunaSearch(OptunaSearch):
    """OptunaSearch that
    - reports our own `epoch` as Optuna's step (Ray's training_iteration restarts at 1 after a restore),
    - never tells Optuna a NaN or infinite value (a failed trial is FAIL, and is never the best),
    - records a trial stopped early (by ASHA, before `max_epochs`) as PRUNED, which keeps its last reported value
      in the study, so TPE learns from it.
    """

    def __init__(self, *args, max_epochs: int, **kwargs):
        self._max_epochs = max_epochs
        super().__init__(*args, **kwargs)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value = result.get(METRIC)
        if isinstance(self.metric, list) or value is None or not math.isfinite(value):
            return
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and trial_id not in self._completed_trials:
            ot_trial.report(value, int(result.get("epoch", 0)))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        State = optuna.trial.TrialState
        multi = isinstance(self.metric, list)
        metrics = self.metric if multi else [self.metric]
        values = [None if not result else result.get(m) for m in metrics]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if error or not finite:
            self._ot_study.tell(ot_trial, state=State.FAIL)
        elif int(result.get("epoch", 0)) < self._max_epochs:
            self._ot_study.tell(ot_trial, state=State.PRUNED)
        else:
            self._ot_study.tell(ot_trial, values if multi else values[0])
        self._completed_trials.add(trial_id)


class Progress(Callback):
    """One line on stderr at most every `every_s`: trials running / finished / stopped early / failed, best so far."""

    def __init__(self, total: int, max_epochs: int, every_s: float = 10.0):
        self.total, self.max_epochs, self.every_s = total, max_epochs, every_s
        self.t0 = time.time()
        self.last = 0.0
        self.best: tuple[float, str, int] | None = None
        self.done: dict[str, str] = {}
        self.running: set[str] = set()

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        counts = {k: sum(1 for v in self.done.values() if v == k) for k in ("finished", "stopped early", "failed")}
        best = f"best {METRIC} {self.best[0]:.4f} ({self.best[1]}, epoch {self.best[2]})" if self.best else "no result yet"
        print(f"[{now - self.t0:5.0f}s] trials: {len(self.running)} running, {counts['finished']} finished, "
              f"{counts['stopped early']} stopped early, {counts['failed']} failed, of {self.total}; {best}",
              file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(METRIC)
        if v is not None and math.isfinite(v) and (self.best is None or v > self.best[0]):
            self.best = (v, trial.trial_id, int(result.get("epoch", 0)))
        self._line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self.done[trial.trial_id] = "finished" if epoch >= self.max_epochs else "stopped early"
        self._line(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done[trial.trial_id] = "failed"
        self._line(force=True)


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default packs every hyperparameter into the name)."""
    return f"trial_{trial.trial_id}"
