"""Optuna samplers by name, without Ray: the sweep's searcher (`sweep/tuner.py`) and the search replay
(`bench/search_replay.py`) build them here, so a replayed method is the sampler a sweep runs."""
from __future__ import annotations

import optuna

SAMPLERS = ("tpe", "random", "grid", "qmc", "gp")
RAY_TRIAL_ATTR = "ray_trial_id"  # the user attr of an Optuna trial that names its Ray trial (set by the searcher)


class SweepGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler (grid points in a seeded random order), minus its `study.stop()` once the grid is used
    up: that call is only allowed inside `study.optimize`, and Ray (asking and telling) already stops after
    `num_samples` = the grid's size."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def startup_trials(num_samples: int) -> int:
    """Random trials before a model-based sampler starts modelling: a third of a small sweep, at most 10."""
    return min(10, max(4, num_samples // 3))


def make_sampler(kind: str, seed: int, *, num_samples: int, grid: dict[str, list] | None = None):
    """The Optuna sampler named by `sweep.searcher`. `grid` ({name: choices}) is needed for "grid"."""
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(num_samples))
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup_trials(num_samples))
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if kind == "grid":
        if grid is None:
            raise ValueError("the grid sampler needs the grid")
        return SweepGridSampler(grid, seed=seed)
    raise ValueError(f"unknown searcher {kind!r}; expected one of {', '.join(SAMPLERS)}")
