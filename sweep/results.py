"""The one reader of what Ray and our trials leave in a sweep folder: each trial's `params.json`, its `result.json`
rows (one per epoch) filled from its checkpoints' metric history where Ray's rows never arrived, and the trials'
statuses from Ray's newest experiment state. The report, `sweep export` (through the report's rows) and the
resumed ASHA scheduler's replay all read trials here.

Why not Ray's `ExperimentAnalysis`/`ResultGrid`: loading a folder with them decodes its experiment state with
`cloudpickle` (ray.tune.utils.serialization: "equivalent to arbitrary code execution"), and `sweep report`/`export`
must open a folder we did not write without running it. This reader parses JSON only and takes two plain fields
of Ray's state (`trial_id`, `status`); checkpoints load with `weights_only=True`. The running sweep, in-process,
reads its own results from the ResultGrid that `Tuner.fit` returns (sweep/tuner.py).
"""
from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path


@dataclasses.dataclass
class TrialRecord:
    """One trial folder: `params` (the sampled config, with kd_role/kd_of for a finalist's rerun or twin),
    `by_epoch` (epoch -> that epoch's reported metrics: Ray's rows, else the checkpoint history's), and `last_row`,
    Ray's last row (its wall time, {} if none)."""

    folder: Path
    trial_id: str
    params: dict
    by_epoch: dict[int, dict]
    last_row: dict

    @property
    def epochs(self) -> int:
        return max(self.by_epoch) if self.by_epoch else 0

    @property
    def last(self) -> dict:
        return self.by_epoch[self.epochs] if self.by_epoch else {}


def ray_statuses(folder: Path) -> dict[str, str]:
    """trial_id -> Ray status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) from the newest experiment state."""
    states = sorted(glob.glob(str(folder / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for item in data.get("trial_data", []):
        try:
            trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
            out[trial["trial_id"]] = trial.get("status", "")
        except (KeyError, TypeError, json.JSONDecodeError, IndexError):
            continue
    return out


def checkpoint_epoch(tdir: Path) -> int:
    """The newest epoch among the trial's checkpoints, from their small meta.json (0 if none). More than result.json
    holds when the trial went on after the driver died: resumed, it starts after that epoch and may report nothing."""
    epochs = [0]
    for meta in tdir.glob("checkpoint_*/meta.json"):
        try:
            epochs.append(int(json.loads(meta.read_text())["epoch"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return max(epochs)


def fill_from_checkpoint(tdir: Path, by_epoch: dict[int, dict]) -> None:
    """Epochs missing from Ray's result.json are taken from the metric history the newest readable checkpoint
    carries. Ray copies result.json to storage in the background; when the driver dies or the storage fails before
    a copy, the resumed trial continues from its newest checkpoint, past the rows that never arrived."""
    from trainable.loop import CheckpointError, load_checkpoint, trial_checkpoints

    for ckpt in trial_checkpoints(tdir):
        try:
            history = load_checkpoint(ckpt).get("history", [])
        except (CheckpointError, OSError, RuntimeError):
            continue
        for m in history:
            by_epoch.setdefault(int(m["epoch"]), m)
        return


def read_trial(tdir: Path) -> TrialRecord:
    """The trial in folder `tdir` (it has a params.json)."""
    params = json.loads((tdir / "params.json").read_text())
    rows = []
    rfile = tdir / "result.json"
    if rfile.is_file():
        for ln in rfile.read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                pass  # a line cut by a crash
    trial_id = (rows[-1].get("trial_id") if rows else None) or tdir.name.removeprefix("trial_")
    # A resumed trial repeats no epoch, but keep the last report of each epoch to be safe.
    by_epoch = {int(r["epoch"]): r for r in rows if "epoch" in r}
    if (by_epoch and len(by_epoch) < max(by_epoch)) or checkpoint_epoch(tdir) > max(by_epoch, default=0):
        fill_from_checkpoint(tdir, by_epoch)
    return TrialRecord(tdir, trial_id, params, dict(sorted(by_epoch.items())), rows[-1] if rows else {})


def read_trials(folder: Path) -> list[TrialRecord]:
    """Every trial folder of the sweep folder `folder`, by folder name."""
    return [read_trial(p.parent) for p in sorted(folder.glob("*/params.json"))]
