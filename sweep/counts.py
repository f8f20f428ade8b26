"""How many trials a sweep runs, and what its space can draw: the numbers the tuner launches and the planner,
the GPU sizing and the report count with. No Ray here.

Optuna is imported inside the one function that needs it, so counting trials loads nothing heavy."""
from __future__ import annotations

import math
from typing import Any

from .config import Config

# The undotted trial-config keys of a finalist's extra trial (config_from_trial ignores them): its role, "rerun" or
# "twin", and the finalist's trial id. Search trials carry neither. Set by the searcher (ray_search), read by the
# report, the scheduler's replay and the TensorBoard run names (sweep/tb.py).
ROLE, OF = "kd_role", "kd_of"

# FinalistSearch's decisions (sweep/ray_search.py), in the sweep folder: the finalists (best first) and the
# reruns/twins of each; the expected-trial count and the report read it instead of choosing the finalists again
# (here, not beside FinalistSearch, so that `sweep report` and `export` read it without importing Ray Tune).
FINALISTS_FILE = "finalists.json"


def num_samples(cfg: Config, space) -> int:
    """Search trials: `sweep.num_samples`, else the whole grid (grid searcher) or 16."""
    if cfg.sweep.num_samples is not None:
        return cfg.sweep.num_samples
    return space.grid_size() if cfg.sweep.searcher == "grid" else 16


def is_finished(epochs, max_epochs: int, *, failed: bool = False) -> bool:
    """Whether a trial is finished: it did not fail and trained every epoch (`train.epochs`); one that ended
    sooner without failing was stopped early (ASHA). The one definition that the progress line, Optuna (COMPLETE
    or PRUNED), the finalists, the expected-trial count and the report's status use."""
    return not failed and (epochs or 0) >= max_epochs


def constraint_values(limits: dict[str, float], result: dict | None) -> dict[str, float]:
    """Per constraint, how far a trial's measure is over its limit, relative to the limit: measure / limit - 1
    (<= 0: met). The one definition of feasibility that Optuna's samplers (through `Trial.set_constraint`), the
    finalists and the report use. Relative, so that the samplers' sum of violations weighs a latency in ms and a
    size in KiB alike. A measure the trial lacks (it failed before measuring, or a two-layer student has no int8
    copy) counts as not met, as if it were twice the limit (1.0)."""
    out = {}
    for key, limit in limits.items():
        v = (result or {}).get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        out[key] = v / limit - 1.0 if ok else 1.0
    return out


def is_feasible(limits: dict[str, float], result: dict | None) -> bool:
    """Whether a trial's measures meet every `sweep.constraints` limit (always, with no constraints)."""
    return all(v <= 0.0 for v in constraint_values(limits, result).values())


def finalist_count(cfg: Config) -> int:
    """The most extra trials after the search: per finalist N - 1 reruns and N twins (N = finalist_seeds)."""
    if cfg.sweep.objectives != "accuracy" or not cfg.task_def.twin:  # no single "best", or no teacher to switch off
        return 0
    return cfg.sweep.twins * (2 * cfg.sweep.finalist_seeds - 1)


def twin_base(cfg: Config) -> dict[str, Any]:
    """The sweep config's own values at the keys a twin changes (`Task.twin`): a trial that samples none of them
    has these."""
    raw = cfg.model_dump()
    return {k: dump_get(raw, k) for k in cfg.task_def.twin}


def finalist_split(cfg: Config) -> tuple[int, int]:
    """(reruns, twins) among the `finalist_count` extra trials, at most."""
    n = finalist_count(cfg)
    if not n:
        return 0, 0
    seeds = cfg.sweep.finalist_seeds
    reruns = cfg.sweep.twins * (seeds - 1)
    return reruns, n - reruns


def dump_get(raw: dict, key: str) -> Any:
    """The value at a dotted key of a nested mapping (None when absent)."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def trial_values(cfg: Config, space, key: str) -> list:
    """Every value `key` can take in a trial: the space's values (a numeric parameter's bounds), and the config's
    own value when some trial may leave the key alone (no fixed value, no unconditional parameter or bundle)."""
    base = dump_get(cfg.model_dump(), key)
    if space is None:
        return [base]
    values = space.values_of(key, numeric_ok=True)
    always = key in space.fixed or any(
        p.when is None and (name == key or (isinstance(p.choices, dict) and all(key in c for c in p.choices.values())))
        for name, p in space.params.items())
    return values if always and values else values + [base]


def largest(cfg: Config, space, key: str):
    values = [v for v in trial_values(cfg, space, key) if v is not None]
    return max(values) if values else None


def smallest(cfg: Config, space, key: str):
    values = [v for v in trial_values(cfg, space, key) if v is not None]
    return min(values) if values else None


def sample_trials(cfg: Config, space, keys: list[str], n: int = 200, seed: int = 0) -> list[dict]:
    """`n` trial configs drawn at random from the space (Optuna's random sampler over the space's own
    define-by-run, so conditions and log scales hold), as {dotted key: value} over the config's values."""
    base = cfg.model_dump()
    if space is None:
        return [{k: dump_get(base, k) for k in keys}]
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        fn = space.define_by_run()
        out = []
        for _ in range(n):
            trial = study.ask()
            overrides = fn(trial)
            study.tell(trial, 0.0)
            out.append({k: overrides.get(k, dump_get(base, k)) for k in keys})
    finally:
        optuna.logging.set_verbosity(verbosity)
    return out
