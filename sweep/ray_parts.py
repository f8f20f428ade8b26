"""Ray Tune pieces that Ray pickles into the sweep's saved state, so they live at module level: the Optuna
searcher with our pruning and NaN rules, and the progress callback."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import optuna
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler
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
        self._completed_trials.add(trial_id)
        if self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished():
            return  # told before a crash that came before Ray's next state snapshot
        if error or not finite:
            self._ot_study.tell(ot_trial, state=State.FAIL)
        elif int(result.get("epoch", 0)) < self._max_epochs:
            self._ot_study.tell(ot_trial, state=State.PRUNED)
        else:
            self._ot_study.tell(ot_trial, values if multi else values[0])

    def restore(self, checkpoint_path: str) -> None:
        """After a crash, Optuna trials asked after Ray's last state snapshot belong to no Ray trial: mark them
        failed, so no trial is left RUNNING in the study."""
        super().restore(checkpoint_path)
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if frozen._trial_id not in known:
                self._ot_study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a driver crash. Ray does not save scheduler state, so a restored sweep would
    start with empty rungs and stop nobody; on its first trial this scheduler replays every result already
    recorded in the experiment folder into the rungs (the value at the first epoch >= each milestone)."""

    def __init__(self, *args, experiment_dir: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._experiment_dir = experiment_dir
        self._replayed = False

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not self._replayed:
            self._replayed = True
            self.replay(Path(self._experiment_dir))

    def replay(self, folder: Path) -> int:
        n = 0
        for rfile in folder.glob("*/result.json"):
            rows = []
            for line in rfile.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
            rows = sorted((r for r in rows if self._time_attr in r and self._metric in r), key=lambda r: r[self._time_attr])
            if not rows:
                continue
            tid = rows[-1]["trial_id"]
            bracket = self._trial_info.get(tid, self._brackets[0])
            for milestone, recorded in bracket._rungs:
                first = next((r for r in rows if r[self._time_attr] >= milestone), None)
                if first is not None and math.isfinite(first[self._metric]):
                    recorded.setdefault(tid, self._metric_op * first[self._metric])
                    n += 1
        return n


STORAGE_ERRORS = {"No space left on device": "no space left on device",
                  "database or disk is full": "no space left on device",  # SQLite's words (the Optuna study)
                  "Disk quota exceeded": "disk quota exceeded",
                  "Read-only file system": "read-only file system",
                  "attempt to write a readonly database": "read-only file system"}


def storage_problem(text: str) -> str | None:
    """The storage failure named in an error text (a full disk, a read-only mount), in one wording, if any."""
    text = text.lower()
    return next((plain for words, plain in STORAGE_ERRORS.items() if words.lower() in text), None)


class StorageFailure(RuntimeError):
    """The results folder cannot be written: retrying trials cannot help, the sweep must stop."""


class StorageGuard(Callback):
    """Stops the sweep at the first trial that failed because the storage is full or read-only, instead of
    letting Ray burn every trial's retries on it. The last saved state and checkpoints stay as they were (writes
    to the storage are atomic), so `sweep resume` continues once the storage is fixed."""

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)

    @staticmethod
    def _check(trial) -> None:
        try:
            text = Path(trial.error_file).read_text(errors="replace") if trial.error_file else ""
        except OSError:
            return
        problem = storage_problem(text)
        if problem:
            raise StorageFailure(problem)


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


class SweepGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its `study.stop()` once the grid is used up: that call is only allowed inside
    `study.optimize`, and Ray (asking and telling) already stops after `num_samples` = the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        pass
