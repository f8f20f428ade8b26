"""TensorBoard as a sweep writes it, for `sweep tensorboard`: every trial's events in `<sweep folder>/tb/<run
name>/`, the sweep's HParams experiment (the table's columns) in `tb/hparams`, and each finalist's KD gain
(`kd/gain`) added to its run by the report.

A run's name says what the run is: the trial's number, then its searched parameters, or, for a finalist's extra
trials, which finalist it measures and with which seed:

    004 hidden_dim=64 embedding_dim=32 alpha=0.5 temperature=4
    011 rerun of 004 seed=1
    012 twin of 004 seed=0 (no teacher)

The number ends the trial's id (`ray_search.FolderSearchGenerator` makes `<prefix>_<number>`), so the name is a
function of the trial's id and config alone: a retried or resumed trial writes into the run it started. Parameters
go by the last part of their key, as in the HParams table; floats with 3 significant digits.

A sweep written before run names keeps its events in each trial folder's `tb/` and its experiment in
`<folder>/hparams`: it keeps that layout when resumed (`legacy_layout`), and is served from the folder itself.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from .counts import OF, ROLE

TB_DIR = "tb"  # in the sweep folder: the logdir `sweep tensorboard` serves
HPARAMS_RUN = "hparams"  # the run (in TB_DIR) that holds the HParams table's columns
# A finalist's KD gain, at its last epoch: the difference of mean test scores (the task's test_key) as the report
# computes it, in that score's own units (classify: accuracy as a fraction, 0.012 = 1.2 points; the report says pt).
KD_GAIN = "kd/gain"
KD_GAIN_FILE = "kd_gain"  # the suffix of the one events file that holds it, replaced whenever the report is built
MAX_NAME = 200  # characters (ASCII only), under the 255 bytes a file name may have


def trial_number(trial_id: str) -> int | None:
    """The number at the end of a trial id (`3f2a1b_00004` -> 4); None for an id without one (a sweep from before
    numbered ids)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if "_" in trial_id and tail.isdigit() else None


def _number(trial_id: str) -> str:
    n = trial_number(trial_id)
    return f"{n:03d}" if n is not None else trial_id


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_name(trial_id: str, config: dict, searched: Iterable[str]) -> str:
    """The TensorBoard run name of the trial `trial_id` with Ray config `config` (dotted keys, plus ROLE/OF for a
    finalist's rerun or twin); `searched`: the space's searched keys (`Space.searched_keys`), in its order."""
    role = config.get(ROLE)
    if role:
        parts = [_number(trial_id), role, "of", _number(str(config.get(OF)))]
        if "train.seed" in config:
            parts.append(f"seed={_value(config['train.seed'])}")
        if role == "twin":
            parts.append("(no teacher)")
    else:
        parts = [_number(trial_id)] + [f"{key.split('.')[-1]}={_value(config[key])}" for key in searched
                                       if "." in key and key in config]
    name = re.sub(r"[^A-Za-z0-9 ._=+()-]", "_", " ".join(parts), flags=re.ASCII)  # no "/": one folder, no subruns
    return name[:MAX_NAME].rstrip(" .")


def run_path(trial_id: str, config: dict, searched: Iterable[str]) -> str:
    """The trial's run folder, relative to the sweep folder (what the trainable is handed: `tb_run`)."""
    return f"{TB_DIR}/{run_name(trial_id, config, searched)}"


def legacy_layout(folder: Path) -> bool:
    """Whether the sweep in `folder` was written before run names: its trials' events in their own folders."""
    return (folder / HPARAMS_RUN).is_dir() or any(folder.glob("trial_*/tb"))


def logdir(folder: Path) -> Path:
    """What `sweep tensorboard` serves: the runs folder, or the sweep folder itself for a sweep from before it."""
    return folder / TB_DIR if (folder / TB_DIR).is_dir() else folder


def find_run(folder: Path, trial_id: str) -> Path | None:
    """The run folder of the trial `trial_id` in the sweep `folder` (either layout), found by its number; None if
    the trial wrote no events."""
    old = folder / f"trial_{trial_id}" / "tb"
    if old.is_dir():
        return old
    n = trial_number(trial_id)
    found = sorted((folder / TB_DIR).glob(f"{n:03d} *")) if n is not None else []
    return found[0] if found else None


def write_kd_gains(folder: Path, finalists: list[dict]) -> list[Path]:
    """Each finalist's KD gain as the scalar `kd/gain` in its own run, at the step of its last epoch, so the
    HParams table shows it beside the finalist's parameters (`report.finalists` entries; only a complete gain:
    every rerun and twin finished, so the value does not change once written). One events file per run under a
    fixed name, replaced whole: a rebuilt report adds no second point. Returns the files written."""
    from trainable.loop import write_scalars_file

    written = []
    for e in finalists:
        run = find_run(folder, e["trial_id"])
        if run is None or e["gain"] is None or e["pending"]:
            continue
        written.append(write_scalars_file(run, KD_GAIN_FILE, {KD_GAIN: e["gain"][0]}, step=int(e["row"]["epochs"])))
    return written
