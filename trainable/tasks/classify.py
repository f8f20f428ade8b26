"""The classify task (the default): a BiLSTM student distilled from a teacher's cached logits, on a labelled text
corpus plus an optional transfer set. Metric: validation accuracy (max), or val_loss (min); the report adds the
finalists' no-teacher twins and the KD gain. Training delegates to prepare.py, loop.py (`train_student`) and
teacher.py; this file is the seam's view of them, and the student's export and its runtimes.

An export folder holds `student.pt` (a plain state dict, loadable with torch.load(weights_only=True)),
`student.ts` (TorchScript, for serving without this package; one-layer students), `student.onnx` (the same
graph for ONNX runtimes, when the `onnx` package is installed), with `--int8` `student.int8.ts` (LSTM and Linear
weights dynamically quantised to int8), `tokenizer.json` and the manifest `config.json` (task, architecture,
max length, where it came from and its accuracies; with `--int8` also the int8 copy's accuracy change on the
sweep's validation split).

Labelling goes through `label_texts`: reviews are encoded once, sorted by length and run in batches, so a batch
pads to the longest of similar-length reviews instead of the longest in the file.

Every config names a task, and the default is this one: torch is imported inside the functions that use it, so
loading a config (every command) does not load it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from ..memory import estimate_trial_memory
from . import Task, TaskError, config_from_trial, write_manifest
from . import fmt_number as fmt

# Runtimes `sweep predict/evaluate --runtime` can use, and the export file each one loads (eager: student.pt).
RUNTIMES = ("eager", "torchscript", "int8", "onnx")
RUNTIME_FILES = {"torchscript": "student.ts", "int8": "student.int8.ts", "onnx": "student.onnx"}


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
    metrics = {"val_acc": "max", "val_loss": "min"}
    test_key = "test_acc"
    twin = {"train.alpha": 1.0}
    twin_label = "loss rate 1 (no teacher, no transfer rows)"
    finalist_columns = {"hidden": "student.hidden_dim", "embedding": "student.embedding_dim",
                        "loss rate": "train.alpha", "temperature": "train.temperature"}
    runtimes = RUNTIMES
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
        import numpy as np

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
        if encoded.transfer is not None:
            log(f"student: {len(encoded.train)} labelled + {len(encoded.transfer)} transfer rows per epoch")
        metric, mode = self.objective(metric, mode)
        return train_student(cfg.student, cfg.train, encoded, teacher_logits, num_classes=cfg.data.num_classes,
                             run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                             keep_checkpoints=keep_checkpoints, log=log, metric=metric, mode=mode)

    def run_result(self, result, prepared) -> tuple[dict, str]:
        """`train_student`'s result, with the teacher's paths and scores when there is one."""
        out = dataclasses.asdict(result)
        out.pop("history")
        if prepared.teacher is not None:
            out["teacher"] = {"paths": [str(t.path) for t in prepared.teacher.members], **prepared.teacher.metrics}
        return out, (f"student: val_acc {result.val_acc:.4f} test_acc {result.test_acc:.4f} params {result.params} "
                     f"size {result.size_kb:.1f} KiB, {result.samples_per_s:.0f} samples/s")

    def prepared_lines(self, prepared) -> list[str]:
        if prepared.teacher is None:
            return []
        m = prepared.teacher.metrics
        return [f"teacher: {', '.join(str(t.path) for t in prepared.teacher.members)} (val "
                f"{m.get('val_acc', float('nan')):.4f}, test {m.get('test_acc', float('nan')):.4f})"]

    def report_lines(self, folder: Path, cfg) -> list[str]:
        """The teacher (or ensemble) and the transfer set, from the teacher.json `save_artifacts` wrote."""
        path = folder / "teacher.json"
        teacher = json.loads(path.read_text()) if path.is_file() else {}
        if not teacher:
            return []
        lines = []
        members = teacher.get("members")
        if members:
            lines.append("- teacher: an ensemble of " + ", ".join(
                f"{m['source']} (test acc {fmt(m.get('test_acc'))}, weight {fmt(w, 2)})"
                for m, w in zip(members, teacher.get("weights", [None] * len(members)))))
        if teacher.get("transfer_rows"):
            lines.append(f"- transfer set: {teacher['transfer_rows']} unlabeled rows labelled by the teacher")
        source = "ensemble" if members else cfg.teacher.source
        lines.append(f"- teacher: {source} (val acc {fmt(teacher.get('val_acc'))}, "
                     f"test acc {fmt(teacher.get('test_acc'))})")
        return lines

    def export(self, trial_dir: Path, cfg, row: dict, out: Path, log, state: dict, params: dict | None = None,
               int8: bool = False, **options) -> None:
        """student.pt and tokenizer.json; for a one-layer student also student.ts, student.onnx and (`int8`)
        student.int8.ts; the manifest config.json last."""
        import torch

        from ..cost import quantize_int8, trace_portable
        from ..loop import kept_epoch
        from ..student import BiLSTMClassifier, PortableBiLSTM

        weights, s = state["best_model"], cfg.student
        tok_src = Path(trial_dir).parent / "tokenizers" / f"vocab{cfg.tokenizer.vocab_size}.json"
        model = BiLSTMClassifier(weights["embedding.weight"].shape[0], s.embedding_dim, s.hidden_dim,
                                 cfg.data.num_classes, s.num_layers, s.dropout)
        model.load_state_dict(weights)
        model.eval()
        kept_by = state["metric"]
        meta = {
            "architecture": "BiLSTMClassifier", "vocab_size": model.embedding.num_embeddings,
            "embedding_dim": s.embedding_dim, "hidden_dim": s.hidden_dim, "num_layers": s.num_layers,
            "dropout": s.dropout, "num_classes": cfg.data.num_classes, "max_length": cfg.tokenizer.max_length,
            "sweep": cfg.name, "trial_id": row["trial_id"], "optuna_number": row.get("optuna_number"),
            "metric": kept_by, f"best_{kept_by}": state["best"], "best_epoch": state.get("best_epoch"),
            "val_acc": kept_epoch(state).get("val_acc"), "test_acc": row["test_acc"], "params": row["params"],
            "hyperparameters": params,
        }
        torch.save(weights, out / "student.pt")
        shutil.copyfile(tok_src, out / "tokenizer.json")
        if s.num_layers == 1:
            trace_portable(model).save(str(out / "student.ts"))
            export_onnx(PortableBiLSTM(model).eval(), out / "student.onnx", log)
            if int8:
                quantized = quantize_int8(PortableBiLSTM(model).eval())
                quantized.save(str(out / "student.int8.ts"))
                meta["int8"] = int8_val_change(cfg.data, tok_src, cfg.tokenizer.max_length, model, quantized, log)
        else:
            log("warning: TorchScript, ONNX and int8 copies are made for one-layer students only; "
                "wrote student.pt alone")
        write_manifest(out, self.name, meta)

    def predictor(self, folder: Path, *, runtime: str = "eager", batch_size: int = 512):
        """The export loaded once in `runtime`: texts -> {"text", "label", "probs"} rows."""
        forward, tok, meta = load_runtime(folder, runtime)

        def predict(texts: list[str]) -> list[dict]:
            probs = label_texts(forward, tok, texts, meta["max_length"], batch_size)
            return [{"text": t, "label": int(p.argmax()), "probs": [round(float(x), 4) for x in p]}
                    for t, p in zip(texts, probs)]

        return predict

    def predict(self, folder: Path, texts: list[str]) -> list[dict]:
        return self.predictor(folder)(texts)


TASK = Classify()


# ----------------------------------------------------------------------------- the export and its runtimes


def export_onnx(portable, path: Path, log: Callable[[str], None]) -> bool:
    """student.onnx with dynamic batch and time axes from a `PortableBiLSTM`; False (and a warning) when `onnx` is
    not installed."""
    import torch

    from ..cost import example_batch

    try:
        import onnx
    except ImportError:
        log("warning: onnx is not installed, so no student.onnx was written (pip install 'kd-sweep[tools]')")
        return False
    # The TorchScript-based exporter: the torch.export-based one (the default since torch 2.9) needs onnxscript
    # and gains nothing for two plain LSTMs. Older torch has no `dynamo` argument and only this exporter.
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice and its LSTM batch-size caution
        torch.onnx.export(portable, example_batch(), str(path), input_names=["tokens", "lengths"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"tokens": {0: "batch", 1: "time"}, "lengths": {0: "batch"},
                                        "logits": {0: "batch"}}, **kwargs)
    onnx.checker.check_model(str(path))
    return True


def int8_val_change(data_cfg, tok_path: Path, max_length: int, fp32, int8,
                    log: Callable[[str], None]) -> dict | None:
    """Validation accuracy of the fp32 student and of its int8 copy on the sweep's own validation split (re-read
    from the corpus with the sweep's data settings); None, with a warning, when the corpus is not reachable here."""
    from tokenizers import Tokenizer

    from ..data import DataError, load_corpus

    try:
        val = load_corpus(data_cfg, lambda msg: None, download=False, transfer_rows=0).val
    except (DataError, OSError) as e:
        log(f"warning: the int8 copy's accuracy change was not measured (corpus not readable here: {e})")
        return None
    tok = Tokenizer.from_file(str(tok_path))
    acc = {name: float((label_texts(fn, tok, val.texts, max_length).argmax(1) == val.labels).mean())
           for name, fn in (("fp32", fp32), ("int8", int8))}
    log(f"int8 copy: validation accuracy {acc['int8']:.4f} vs {acc['fp32']:.4f} fp32 on {len(val)} reviews")
    return {"val_rows": len(val), "val_acc_fp32": acc["fp32"], "val_acc_int8": acc["int8"],
            "val_acc_change": acc["int8"] - acc["fp32"]}


def load_exported(model_dir: Path):
    """(BiLSTMClassifier in eval mode, tokenizers.Tokenizer, manifest) from an export folder; TaskError naming
    the file when it is not one."""
    import torch
    from tokenizers import Tokenizer

    from ..student import BiLSTMClassifier

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise TaskError(f"{model_dir}: not an exported student (no config.json); make one with `sweep export`")
    meta = json.loads(cfg_path.read_text())
    model = BiLSTMClassifier(meta["vocab_size"], meta["embedding_dim"], meta["hidden_dim"], meta["num_classes"],
                             meta["num_layers"], meta["dropout"])
    try:
        model.load_state_dict(torch.load(model_dir / "student.pt", map_location="cpu", weights_only=True))
    except Exception as e:  # weights_only refuses pickles that would run code
        raise TaskError(f"{model_dir / 'student.pt'}: not a plain state dict ({type(e).__name__})") from None
    model.eval()
    return model, Tokenizer.from_file(str(model_dir / "tokenizer.json")), meta


def load_runtime(model_dir: Path, runtime: str = "eager", threads: int | None = None):
    """(forward, tokenizer, manifest) for one of RUNTIMES over an export folder; forward: tokens (B, T) int64,
    lengths (B,) int64 -> logits (B, C). `threads` sets ONNX Runtime's intra-op threads (torch's are
    process-wide: torch.set_num_threads); None: the runtime's default. TaskError for an unknown runtime or a
    missing file."""
    import torch

    model_dir = Path(model_dir)
    model, tok, meta = load_exported(model_dir)
    if runtime == "eager":
        return model, tok, meta
    if runtime not in RUNTIME_FILES:
        raise TaskError(f"--runtime {runtime}: expected one of {list(RUNTIMES)}")
    path = model_dir / RUNTIME_FILES[runtime]
    if not path.is_file():
        how = "sweep export --int8" if runtime == "int8" else "sweep export with onnx installed"
        raise TaskError(f"{path}: not found; the {runtime} runtime needs it (made by `{how}`)")
    if runtime == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise TaskError("onnxruntime is not installed (pip install 'kd-sweep[tools]')") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(tokens, lengths):
            (logits,) = session.run(["logits"], {"tokens": tokens.numpy(), "lengths": lengths.numpy()})
            return torch.from_numpy(logits)

        return forward, tok, meta
    return torch.jit.load(str(path), map_location="cpu"), tok, meta


def label_texts(forward, tok, texts: list[str], max_length: int, batch_size: int = 512):
    """Class probabilities (N, C) float32 in input order. Reviews are sorted by length and run `batch_size` at a
    time, so each batch pads only to the longest of similar-length reviews."""
    import numpy as np
    import torch

    from ..data import EncodedSplit, encode_texts

    tokens, offsets = encode_texts(tok, texts, max_length)
    n = len(texts)
    encoded = EncodedSplit(np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64), tokens, offsets)
    order = np.argsort(encoded.lengths, kind="stable")
    probs = None
    with torch.no_grad():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            part = encoded.take(idx)
            logits = forward(torch.from_numpy(part.padded()), torch.from_numpy(part.lengths))  # (B, C)
            if probs is None:
                probs = np.empty((n, logits.shape[1]), dtype=np.float32)
            probs[idx] = torch.softmax(logits.float(), dim=1).numpy()
    return probs if probs is not None else np.empty((0, 0), dtype=np.float32)


def predict(model_dir: Path, texts: list[str], *, batch_size: int = 512,
            runtime: str = "eager") -> list[tuple[str, int, list[float]]]:
    """(text, label, probabilities) per text, from an export folder."""
    rows = TASK.predictor(Path(model_dir), runtime=runtime, batch_size=batch_size)(texts)
    return [(r["text"], r["label"], r["probs"]) for r in rows]
