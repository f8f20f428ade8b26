"""The Ray Tune trainable: a thin adapter over `trainable.loop.train_student`, and the only Ray import on the
trial side.

Per-trial dict -> typed config (once, here) -> the plain loop, whose per-epoch callback becomes `tune.report`
with the epoch's checkpoint folder. A trial restored by Ray continues from `tune.get_checkpoint()`, and the
`epoch` it reports (ASHA's time attribute) continues too, unlike Ray's own `training_iteration`.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from ray import tune

from .config import config_from_trial
from .data import EncodedData
from .loop import EpochMetrics, train_student


def distill_trainable(trial: dict, *, base: dict, data: dict[int, EncodedData], logits: np.ndarray | None,
                      num_classes: int, keep_checkpoints: int = 2) -> None:
    cfg = config_from_trial(base, trial)
    encoded = data[cfg.tokenizer.vocab_size]
    work = Path(tempfile.mkdtemp(prefix="kd-trial-"))  # checkpoints are written here, then persisted by Ray
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(work / "restored")))

    def report(m: EpochMetrics, ckpt: Path | None) -> None:
        metrics = asdict(m)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    try:
        train_student(cfg.student, cfg.train, encoded, logits if cfg.train.alpha < 1.0 else None,
                      num_classes=num_classes, run_dir=work, tb_dir=Path(tune.get_context().get_trial_dir()) / "tb",
                      resume_from=resume_from, on_epoch=report, keep_checkpoints=keep_checkpoints,
                      log=lambda msg: None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

