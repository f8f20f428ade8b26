"""The Ray Tune trainable: a thin adapter over the config's task (`trainable/tasks/`: its `train`, a plain loop),
and the only Ray import on the trial side.

Per-trial dict -> typed config (once, here) -> the task's `train`, whose per-epoch callback becomes `tune.report`
with the epoch's checkpoint folder. A trial restored by Ray continues from its newest checkpoint in storage,
and the `epoch` it reports (ASHA's time attribute) continues too, unlike Ray's own `training_iteration`.

Ray is handed every checkpoint (so a restored trial gets its result files back) but deletes none: its saved
state names the checkpoint a trial resumes from, that state is written every few seconds, and when Ray pruned old
checkpoints itself (`num_to_keep`) a driver killed between a prune and the next state snapshot resumed the trial
from a folder that was gone ("Could not recover from checkpoint as it does not exist on storage anymore") and
failed it. The adapter prunes instead: all but the newest `keep_checkpoints` are emptied, their folders left as
empty stubs, so a name in Ray's state always exists; the trial itself resumes from its own newest checkpoint.

Failure rules:
- a checkpoint that fails its hash check is skipped for the trial's previous one (or a fresh start), with a
  warning in the trial folder's `warnings.txt`;
- Ray retries every failed trial up to `sweep.max_failures` times, which helps when a worker died; for failures
  a retry cannot fix (a NaN/inf loss, an invalid trial config) the trial leaves a marker, and its retry fails at
  once with the same reason instead of training again.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import ray

from pydantic import ValidationError
from ray import tune

from .config import validation_problem
from .loop import CheckpointError, NonFiniteLossError, load_checkpoint, trial_checkpoints
from .tasks import config_from_trial, train_task

NOT_RETRYABLE = ".not_retryable"  # marker file in the trial folder: the reason a retry cannot help
WHERE = "where.jsonl"  # in the trial folder: one line per epoch, the node it ran on (see `_record_where`)


def _warn(trial_dir: Path, msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)
    with open(trial_dir / "warnings.txt", "a") as f:
        f.write(msg + "\n")


def _record_where(trial_dir: Path, epoch: int) -> None:
    """Where this epoch ran, appended to the trial folder in shared storage once its report (and checkpoint) is
    with Ray, so an epoch appears twice only if it was trained twice after being saved. Ray's result.json has a
    node_ip per row too, but it reaches storage only now and then (copied in the background): when the node dies
    first, the report fills those epochs from the checkpoint's history, which knows nothing of nodes."""
    with open(trial_dir / WHERE, "a") as f:
        f.write(json.dumps({"epoch": epoch, "node_ip": ray.util.get_node_ip_address()}) + "\n")


def _restore_point(trial_dir: Path) -> Path | None:
    """The newest of the trial's checkpoints on storage that passes its hash check.

    Ray persists every checkpoint into the trial's folder, so its own latest (`tune.get_checkpoint()`) is among
    them; the newest by epoch is taken rather than Ray's, because Ray's saved state can lag the checkpoints on
    storage by an epoch (it is copied in the background, and a crash can land in between), and resuming from the
    older one would train an epoch twice."""
    candidates = trial_checkpoints(trial_dir)
    for cand in candidates:
        try:
            load_checkpoint(cand)
        except CheckpointError as e:
            _warn(trial_dir, f"skipping a bad checkpoint: {e}")
            continue
        return cand
    if candidates:
        _warn(trial_dir, "no readable checkpoint left; the trial starts again from epoch 1")
    return None


def _prune_checkpoints(trial_dir: Path, keep: int) -> None:
    """Empty all but the newest `keep` checkpoint folders, keeping each folder as a stub (see the module's
    docstring). meta.json goes first: a folder without one is no checkpoint (`trial_checkpoints`), even half-emptied."""
    for old in trial_checkpoints(trial_dir)[keep:]:
        (old / "meta.json").unlink(missing_ok=True)
        for item in old.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink(missing_ok=True)


def _shared_trial_dir() -> Path:
    """The trial's folder in the sweep's storage (`results_dir`, which every node of a cluster mounts), where Ray
    also persists its checkpoints. Not `get_trial_dir()`: that is a staging folder under the *driver's* Ray temp
    dir, which a trial on another node cannot reach (what it writes there would be lost, and a retry on another
    node would not see it)."""
    storage = tune.get_context().get_storage()
    trial_dir = Path(storage.trial_fs_path)
    trial_dir.mkdir(parents=True, exist_ok=True)
    return trial_dir


def task_trainable(trial: dict, *, base: dict, inputs: dict, keep_checkpoints: int = 2, metric: str | None = None,
                   mode: str | None = None, tb_run: Callable[[str, dict], str] | None = None) -> None:
    """One trial of the base config's task. `inputs` are the task's `trial_inputs` (for classify: the encodings by
    vocab size and the teacher logits), shipped once through the object store. `metric`/`mode`: the sweep's
    (`sweep.metric`), which picks the weights the trial keeps as best (None: the task's first metric).
    `tb_run(trial_id, trial)`: the trial's TensorBoard run folder, relative to the sweep folder (the trial folder's
    parent, in the same shared storage); None: the trial folder's own tb/ (a sweep from before named runs)."""
    trial_dir = _shared_trial_dir()
    tb_dir = trial_dir.parent / tb_run(tune.get_context().get_trial_id(), trial) if tb_run else trial_dir / "tb"
    marker = trial_dir / NOT_RETRYABLE
    if marker.is_file():
        raise NonFiniteLossError(marker.read_text().strip())  # a retry cannot help: fail at once, same reason
    try:
        cfg = config_from_trial(base, trial)
    except ValidationError as e:
        loc, msg = validation_problem(e)
        marker.write_text(f"invalid trial config: {'.'.join(loc)}: {msg}")
        raise
    except ValueError as e:  # the task's checks across sections
        marker.write_text(f"invalid trial config: {e}")
        raise
    work = Path(tempfile.mkdtemp(prefix="kd-trial-"))  # checkpoints are written here, then persisted by Ray

    def report(m: dict, ckpt: Path | None) -> None:
        tune.report(m, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)
        _record_where(trial_dir, int(m["epoch"]))
        if ckpt is not None:
            _prune_checkpoints(trial_dir, keep_checkpoints)

    try:
        resume_from = _restore_point(trial_dir)
        train_task(cfg.task_def, cfg, inputs, metric=metric, mode=mode, run_dir=work, tb_dir=tb_dir,
                   resume_from=resume_from, on_epoch=report, keep_checkpoints=keep_checkpoints, log=lambda msg: None,
                   warn=lambda msg: _warn(trial_dir, msg.removeprefix("warning: ")))
    except NonFiniteLossError as e:
        marker.write_text(str(e))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
