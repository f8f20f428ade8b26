"""Ray Tune callbacks of a sweep (pickled into its saved state): the progress line, the guard that stops a sweep
whose storage is full or read-only, and the trial folders' names."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from ray.tune import Callback

from .counts import is_feasible, is_finished
from .ray_search import is_extra


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
    """One line on stderr at most every `every_s`: search trials running / finished / stopped early / failed, best
    so far (of the search trials), and, when the sweep has them (`extra` > 0), the finalists' reruns and twins."""

    metric: tuple[str, str] = ("val_acc", "max")  # (name, mode); a class default for states pickled before tasks
    constraints: dict[str, float] = {}  # `sweep.constraints`: the best so far is the best feasible result

    def __init__(self, total: int, max_epochs: int, every_s: float = 10.0, extra: int = 0,
                 metric: tuple[str, str] = ("val_acc", "max"), constraints: dict[str, float] | None = None):
        self.total, self.max_epochs, self.every_s, self.extra, self.metric = total, max_epochs, every_s, extra, metric
        self.constraints = dict(constraints or {})
        self.t0 = time.time()
        self.last = 0.0
        self.best: tuple[float, str, int] | None = None
        self.done: dict[str, str] = {}
        self.running: set[str] = set()
        self.finalist: set[str] = set()  # ids of the finalists' reruns and twins

    def _track(self, trial) -> bool:
        """Whether the trial is a finalist's rerun or twin (remembered, for the counts)."""
        if is_extra(trial):
            self.finalist.add(trial.trial_id)
        return trial.trial_id in self.finalist

    def _line(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        search = [v for t, v in self.done.items() if t not in self.finalist]
        counts = {k: search.count(k) for k in ("finished", "stopped early", "failed")}
        feasible = " feasible" if self.constraints else ""
        best = (f"best{feasible} {self.metric[0]} {self.best[0]:.4f} ({self.best[1]}, epoch {self.best[2]})"
                if self.best else f"no{feasible} result yet")
        finals = ""
        if self.extra:
            done = [v for t, v in self.done.items() if t in self.finalist]
            finals = (f"; finalist trials (reruns, twins): {len(self.running & self.finalist)} running, "
                      f"{len(done) - done.count('failed')} finished, {done.count('failed')} failed, "
                      f"of up to {self.extra}")
        print(f"[{now - self.t0:5.0f}s] trials: {len(self.running - self.finalist)} running, "
              f"{counts['finished']} finished, {counts['stopped early']} stopped early, {counts['failed']} failed, "
              f"of {self.total}{finals}; {best}", file=sys.stderr, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._track(trial)
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric[0])
        if self._track(trial) or not is_feasible(self.constraints, result):
            v = None  # a rerun or twin measures a finalist, and an infeasible trial is never "the best"
        better = v is not None and math.isfinite(v) and (
            self.best is None or (v > self.best[0] if self.metric[1] == "max" else v < self.best[0]))
        if better:
            self.best = (v, trial.trial_id, int(result.get("epoch", 0)))
        self._line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._track(trial)
        self.running.discard(trial.trial_id)
        epoch = int((trial.last_result or {}).get("epoch", 0))
        self.done[trial.trial_id] = "finished" if is_finished(epoch, self.max_epochs) else "stopped early"
        self._line(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._track(trial)
        self.running.discard(trial.trial_id)
        self.done[trial.trial_id] = "failed"
        self._line(force=True)


def trial_dirname(trial) -> str:
    """Short trial folder names (Ray's default packs every hyperparameter into the name)."""
    return f"trial_{trial.trial_id}"
