"""The classify task (the default): a BiLSTM student distilled from a teacher's cached logits, on a labelled text
corpus plus an optional transfer set. Metric: validation accuracy (max), or val_loss (min); the report adds the
finalists' no-teacher twins and the KD gain. Everything here delegates to the modules that existed before the task seam
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
               "temperature": "hp:train.temperature", "Acc": "test_acc", "Val Acc": "@best", "Step": "@step",
               "Train Time": "@time", "step_size": "hp:train.step_size", "Params": "params", "Size": "@size",
               "ms/review": "latency_ms", "ms/64 int8": "latency_int8_b64_ms", "Export KB": "export_kb"}

    # The serving cost each trial measures (trainable/cost.py; the int8 figures for one-layer students only).
    measures = ("params", "size_kb", "latency_ms", "latency_b64_ms", "latency_int8_ms", "latency_int8_b64_ms",
                "export_kb", "export_int8_kb")

    plan_keys = ("tokenizer.vocab_size", "student.embedding_dim", "student.hidden_dim", "student.num_layers",
                 "train.batch_size", "train.alpha", "data.transfer_rows", "tokenizer.max_length",
                 "train.eval_batch_size")

    def epoch_rows(self, trial: dict, rows) -> tuple[int, int]:
        """Labelled rows plus, with a teacher (alpha < 1), the trial's share of the transfer set; validation and
        test are evaluated (test only when validation improves: counted every epoch, an upper bound)."""
        transfer = 0
        if trial["train.alpha"] < 1.0:
            take = trial["data.transfer_rows"]
            transfer = (rows.transfer_file if take is None else min(take, rows.transfer_file)) + rows.augmented
        return rows.labelled + transfer, rows.val + rows.test

    def work_per_row(self, trial: dict) -> float:
        """The LSTM's multiply-adds per token, both directions, all layers."""
        h, macs = trial["student.hidden_dim"], 0
        for layer in range(trial["student.num_layers"]):
            inp = trial["student.embedding_dim"] if layer == 0 else 2 * h
            macs += 2 * 4 * h * (inp + h)
        return float(macs)

    def probe_speed(self, cfg, trial: dict, lengths, budget_s: float) -> dict:
        """`train_student` itself (its batching, loss, optimizer, evaluation and a checkpoint) for one epoch on
        random token ids whose lengths are drawn from `lengths`, half the rows without a label (transfer rows):
        first a few batches to gauge the speed, then an epoch of about `budget_s` seconds, timed."""
        import tempfile
        import time

        import numpy as np

        from . import config_from_trial
        from ..data import NO_LABEL, EncodedData, EncodedSplit
        from ..loop import train_student

        tcfg = config_from_trial(cfg.model_dump(exclude={"sweep"}), {**trial, "train.epochs": 1})
        rng = np.random.default_rng(0)
        vocab, C, B = tcfg.tokenizer.vocab_size, tcfg.data.num_classes, tcfg.train.batch_size

        def split(n: int, labelled: bool) -> EncodedSplit:
            lens = rng.choice(lengths, n)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lens, out=offsets[1:])
            labels = rng.integers(0, C, n) if labelled else np.where(rng.random(n) < 0.5, rng.integers(0, C, n),
                                                                     NO_LABEL)
            return EncodedSplit(np.arange(n), labels, rng.integers(5, vocab, int(offsets[-1]), dtype=np.int32),
                                offsets)

        def timed(n_train: int) -> tuple[float, float, float]:
            n_eval = max(64, n_train // 2)
            train = split(n_train, False)
            data = EncodedData(train, split(n_eval // 2, True), split(n_eval - n_eval // 2, True), vocab, "", "probe")
            logits = rng.standard_normal((n_train, C)).astype(np.float32)
            with tempfile.TemporaryDirectory(prefix="kd-probe-") as tmp:
                t0, cpu0 = time.perf_counter(), time.process_time()
                r = train_student(tcfg.student, tcfg.train.model_copy(update={"alpha": 0.5}), data, logits,
                                  num_classes=C, run_dir=tmp, tb_dir=None, log=lambda m: None)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            # Evaluation (validation and test at epoch 1), the checkpoint and the set-up come on top of training.
            return r.train_time_s / n_train, max(wall - r.train_time_s, 0.0) / n_eval, min(1.0, cpu / wall)

        train_s, _, _ = timed(B * 4)  # a few batches: the gauge
        n = int(min(max(B * 8, budget_s / max(train_s, 1e-9)), B * 400))
        train_s, eval_s, share = timed(n)
        threads = tcfg.train.threads or 1
        return {"train_s": train_s, "eval_s": eval_s, "cpu_share": share if threads == 1 else None, "rows": n}

    def gpu_memory(self, cfg, values, rows):
        """The largest student the space can draw (each size at its largest on its own: an upper bound) with the
        most training rows any trial holds on its device (labelled + transfer, when some trial has a teacher)."""
        from ..memory import estimate_trial_memory

        big = lambda key: max(v for v in values(key) if v is not None)  # noqa: E731
        keys = {"vocab_size": "tokenizer.vocab_size", "embedding_dim": "student.embedding_dim",
                "hidden_dim": "student.hidden_dim", "num_layers": "student.num_layers",
                "batch_size": "train.batch_size", "max_length": "tokenizer.max_length",
                "eval_batch_size": "train.eval_batch_size"}
        largest = {name: int(big(key)) for name, key in keys.items()}
        transfer = 0
        if any(a < 1.0 for a in values("train.alpha") if a is not None):
            takes = values("data.transfer_rows")
            take = None if any(t is None for t in takes) else max(takes)
            transfer = (rows.transfer_file if take is None else min(take, rows.transfer_file)) + rows.augmented
        pool = rows.labelled + transfer
        est = estimate_trial_memory(**largest, num_classes=cfg.data.num_classes, pool_rows=pool)
        return {**largest, "pool_rows": pool}, est

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

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log, metric=None,
              mode=None):
        from ..loop import train_student
        from ..prepare import student_inputs

        encoded, teacher_logits = student_inputs(inputs["data"], inputs["logits"], cfg)
        metric, mode = self.objective(metric, mode)
        return train_student(cfg.student, cfg.train, encoded, teacher_logits, num_classes=cfg.data.num_classes,
                             run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                             keep_checkpoints=keep_checkpoints, log=log, metric=metric, mode=mode)


TASK = Classify()
