"""The classify task (the default): a BiLSTM student distilled from a teacher's cached logits, on a labelled text
corpus plus an optional transfer set. Metric: validation accuracy (max); the report adds the finalists' no-teacher
twins and the KD gain. Everything here delegates to the modules that existed before the task seam
(prepare.py, loop.py, teacher.py); this file is the seam's view of them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import Task


def needs_teacher(base_alpha: float, space) -> bool:
    """Whether any trial can have a loss rate below 1. Alpha == 1 everywhere is plain cross-entropy: then no trial
    needs the teacher, and none is trained. Alpha can come from the base config, the space's fixed values, a
    `train.alpha` parameter, or a bundle choice that sets it."""
    if space is None:
        return base_alpha < 1.0
    param = space.params.get("train.alpha")
    if param is not None:  # every trial gets its alpha from the parameter
        return param.type != "categorical" or any(a < 1.0 for a in param.choices)
    alphas = [space.fixed.get("train.alpha", base_alpha)]
    alphas += [c["train.alpha"] for p in space.params.values() if isinstance(p.choices, dict)
               for c in p.choices.values() if "train.alpha" in c]
    return any(a < 1.0 for a in alphas)


def vocab_sizes(cfg, space) -> list[int]:
    """Every student vocab size the space can draw: one encoding each, made once."""
    sizes = space.values_of("tokenizer.vocab_size") if space is not None else []
    return sorted(set(sizes or [cfg.tokenizer.vocab_size]))


def transfer_rows(cfg, space) -> int | None:
    """The most transfer-file rows any trial takes (None: all): prepared once, each trial takes its first rows."""
    values = space.values_of("data.transfer_rows", numeric_ok=True) if space is not None else []
    values = values or [cfg.data.transfer_rows]
    return None if any(v is None for v in values) else max(values)


class Classify(Task):
    name = "classify"
    uses = ("data", "tokenizer", "teacher", "student", "train")
    metrics = {"val_acc": "max", "val_loss": "min"}
    test_key = "test_acc"
    twins = True
    description = "distil a teacher into a BiLSTM text classifier"
    model_label = "BiLSTM"
    # The original study's table, in its order ("@": computed by the report).
    columns = {"vocab size": "hp:tokenizer.vocab_size", "hidden dim": "hp:student.hidden_dim",
               "embedding dim": "hp:student.embedding_dim", "loss rate": "hp:train.alpha",
               "temperature": "hp:train.temperature", "Acc": "test_acc", "Val Acc": "best_val_acc", "Step": "@step",
               "Train Time": "@time", "step_size": "hp:train.step_size", "Params": "params", "Size": "@size"}

    def check(self, cfg) -> None:
        init = cfg.student.init_from
        if init is not None and cfg.tokenizer.file is None:
            raise ValueError(f"student.init_from: the student must use the language model's tokenizer; set "
                             f"tokenizer.file: {init}/tokenizer.json")

    def prepare(self, cfg, log, space=None):
        from ..prepare import prepare

        return prepare(cfg, log, vocab_sizes=vocab_sizes(cfg, space), need_teacher=needs_teacher(cfg.train.alpha, space),
                       transfer_rows=transfer_rows(cfg, space))

    def trial_inputs(self, prepared) -> dict:
        logits = prepared.logits
        if logits is not None:  # trials need only the rows they train on
            logits = {k: v for k, v in logits.items() if k in ("train", "transfer")}
        return {"data": prepared.encoded, "logits": logits}

    def save_artifacts(self, folder: Path, prepared) -> None:
        """The student tokenizers and the teacher's metrics, so the sweep folder is self-contained."""
        from ..io import atomic_path, write_json

        tok_dir = folder / "tokenizers"
        tok_dir.mkdir(exist_ok=True)
        for vocab, enc in prepared.encoded.items():
            with atomic_path(tok_dir / f"vocab{vocab}.json") as tmp:
                shutil.copyfile(enc.tokenizer_file, tmp)
        if prepared.teacher is not None:
            write_json(folder / "teacher.json", {
                "paths": [str(t.path) for t in prepared.teacher.members],
                "checkpoint_hashes": [t.checkpoint_hash for t in prepared.teacher.members],
                **prepared.teacher.metrics,
                "transfer_rows": len(prepared.corpus.transfer) if prepared.corpus.transfer is not None else 0})

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log):
        from ..loop import train_student
        from ..prepare import student_inputs

        encoded, teacher_logits = student_inputs(inputs["data"], inputs["logits"], cfg)
        return train_student(cfg.student, cfg.train, encoded, teacher_logits, num_classes=cfg.data.num_classes,
                             run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                             keep_checkpoints=keep_checkpoints, log=log)


TASK = Classify()
