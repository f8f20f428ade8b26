"""Export a sweep's best trial (or one named trial, or every trial on the Pareto front) as the folder its task's
`export` writes: the sweep picks the trial and its checkpoint, the task writes the files and their manifest
(`trainable.tasks.write_manifest`). What a task's export holds, and how it is read back (`predict`, the
runtimes of `sweep predict/evaluate --runtime`), is the task's: the BiLSTM student's is in trainable/tasks/.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from trainable.io import atomic_dir, write_json
from trainable.loop import CheckpointError, load_checkpoint, trial_checkpoints
from trainable.tasks import config_from_trial

from .config import SECOND_OBJECTIVE, ConfigError, metric_of
from .report import (STATUS_FAILED, _candidates, _ranked, collect_trials, constraint_misses, front_members,
                     load_sweep_config)


def _latest_valid_checkpoint(trial_dir: Path, log: Callable[[str], None]) -> dict:
    for ckpt in trial_checkpoints(trial_dir):
        try:
            return load_checkpoint(ckpt)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    raise ConfigError(f"{trial_dir}: no readable checkpoint")


def _is_sweep_folder(path: Path) -> bool:
    return ((path / "config.yaml").is_file() and (path / "optuna.db").exists()) or (path / "tuner.pkl").exists()


def _refuse_out(folder: Path, out: Path, results_dir: Path) -> None:
    """`--out` is replaced whole (with --force): refuse one that is a file, a sweep folder or a part of one, a results
    folder (the sweep's own, or one holding sweeps), or a folder above any of them."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder; give a folder to write the export into")
    target, sweep = out.resolve(), folder.resolve()
    kept = ((sweep, "the sweep folder"), (results_dir.resolve(), "the results folder"),
            (sweep.parent, "the results folder"))
    for how, hit in (("is", lambda path: target == path), ("holds", lambda path: target in path.parents)):
        for path, what in kept:
            if hit(path):
                raise ConfigError(f"--out {out}: {how} {what} {path}; exporting there would replace it (give a "
                                  f"new folder)")
    if sweep in target.parents and out.exists():
        raise ConfigError(f"--out {out}: is a part of the sweep folder {sweep}; give a folder outside it")
    if out.is_dir() and (_is_sweep_folder(out) or any(_is_sweep_folder(c) for c in out.iterdir() if c.is_dir())):
        raise ConfigError(f"--out {out}: is a sweep folder or holds sweeps; give a new folder")


def _trial_row(folder: Path, rows: list[dict], ranked: list[dict], trial: str | None, cfg=None,
               log: Callable[[str], None] = print) -> dict:
    """The row to export: the best (`trial` None; with `sweep.constraints`, the best feasible), else the trial of
    that Ray id or, failing that, of that Optuna trial number (an infeasible one with a warning: asked for by
    name). One line naming what is wrong otherwise."""
    limits = cfg.sweep.constraints if cfg is not None else {}
    if trial is None:
        if not ranked:
            ran = _candidates(rows, metric_of(cfg)[0]) if limits else []
            if ran:
                wanted = ", ".join(f"{k} <= {v:g}" for k, v in limits.items())
                raise ConfigError(f"sweep.constraints: no trial of {folder} meets {wanted} ({len(ran)} ran); export "
                                  f"one anyway with --trial ID (report.md names the best infeasible)")
            raise ConfigError(f"{folder}: no successful trial to export")
        return ranked[0]
    row = next((r for r in rows if r["trial_id"] == trial), None)
    if row is None and trial.isdigit():
        row = next((r for r in rows if r.get("optuna_number") == int(trial)), None)
    if row is None:
        known = ", ".join(r["trial_id"] + (f" (#{r['optuna_number']})" if r.get("optuna_number") is not None else "")
                          for r in rows[:8]) + (" ..." if len(rows) > 8 else "")
        raise ConfigError(f"--trial {trial}: no such trial in {folder} (a Ray trial id or an Optuna trial number; "
                          f"it has: {known or 'none'})")
    if row["status"] == STATUS_FAILED:
        raise ConfigError(f"--trial {trial}: trial {row['trial_id']} failed ({row['error']}); nothing to export")
    if row.get("feasible") is False:
        log(f"warning: trial {row['trial_id']} does not meet sweep.constraints ({constraint_misses(cfg, row)}); "
            f"exporting it as asked")
    return row


def _sweep_trials(folder: Path, out: Path, allow_task_code: bool):
    cfg = load_sweep_config(folder, allow_task_code)  # a task module the folder names runs only when allowed
    _refuse_out(folder, out, Path(cfg.results_dir))
    metric, mode = metric_of(cfg)
    rows = collect_trials(folder, cfg)
    return cfg, metric, mode, rows, _ranked(rows, metric, mode)


def _check_replace(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")


def export_best(folder: Path, out: Path, force: bool = False, log: Callable[[str], None] = print, *,
                int8: bool = False, allow_task_code: bool = False, trial: str | None = None) -> Path:
    """The best search trial's student (or, with `trial`, that trial's: a Ray trial id or an Optuna trial number)
    into the folder `out`, replaced whole."""
    cfg, metric, _, rows, ranked = _sweep_trials(folder, out, allow_task_code)
    row = _trial_row(folder, rows, ranked, trial, cfg, log)
    _check_replace(out, force)
    with atomic_dir(out) as tmp:
        _write_export(folder, cfg, metric, row, tmp, log, int8=int8)
    return out


def export_pareto(folder: Path, out: Path, force: bool = False, log: Callable[[str], None] = print, *,
                  int8: bool = False, allow_task_code: bool = False) -> tuple[Path, list[dict]]:
    """Every trial on the sweep's Pareto front (the report's: `report.front_members`), each exported into its own
    sub-folder of `out` (named by its trial id), with `index.json` listing trial, folder and objective values,
    smallest first. `out` is replaced whole, only once every member is written."""
    cfg, metric, mode, _, ranked = _sweep_trials(folder, out, allow_task_code)
    second = SECOND_OBJECTIVE[cfg.sweep.objectives]
    front = front_members(ranked, metric, mode, second)
    if not front:
        feasible = " that meets sweep.constraints" if cfg.sweep.constraints else ""
        raise ConfigError(f"{folder}: no Pareto front to export (no successful trial{feasible} with {metric} and "
                          f"{second})")
    _check_replace(out, force)
    index = []
    with atomic_dir(out) as tmp:
        for row in front:
            sub = tmp / row["trial_id"]
            sub.mkdir()
            _write_export(folder, cfg, metric, row, sub, log, int8=int8)
            index.append({"trial": row["trial_id"], "optuna_number": row.get("optuna_number"), "folder": sub.name,
                          "values": {f"best_{metric}": row[f"best_{metric}"], second: row[second]},
                          **({cfg.task_def.test_key: row.get(cfg.task_def.test_key)} if cfg.task_def.test_key
                             else {})})
        write_json(tmp / "index.json", {"sweep": cfg.name, "objectives": [f"best_{metric} ({mode})",
                                                                          f"{second} (min)"], "members": index})
    return out, index


def _write_export(folder: Path, cfg, metric: str, best: dict, tmp: Path, log: Callable[[str], None], *,
                  int8: bool) -> None:
    """One trial's export into the (empty, temporary) folder `tmp`, by its task."""
    trial_dir = folder / best["trial_dir"]
    params = json.loads((trial_dir / "params.json").read_text())
    tcfg = config_from_trial(cfg.model_dump(exclude={"sweep"}), params)
    state = _latest_valid_checkpoint(trial_dir, log)
    kept_by = state["metric"]
    if kept_by != metric:  # a sweep run before its metric reached the training loop
        log(f"warning: trial {best['trial_id']} kept its best weights by {kept_by}, not the sweep's {metric}: the "
            f"export holds its best-{kept_by} epoch ({state.get('best_epoch')})")
    cfg.task_def.export(trial_dir, tcfg, best, tmp, log, state=state, params=params, int8=int8)
