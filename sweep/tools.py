"""Daily tools around a sweep and its exported student: the texts `sweep predict --file` labels, the metrics of
`sweep evaluate`, and `sweep dashboard` (optuna-dashboard over the sweep's study).

Bad files raise `DataError` with one line naming the file; the CLI turns it into exit status 2.

sklearn and optuna-dashboard are imported inside `classification_metrics` and `serve_dashboard`, so the other tools do
not load them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from trainable.config import DataConfig
from trainable.data import DataError, read_table, read_texts
from trainable.tasks import BUILTIN, MANIFEST, TaskError, is_builtin, load_task, read_manifest

from .config import ConfigError
from .tuner import STUDY_FILE

if TYPE_CHECKING:
    from trainable.tasks import Task


def _one_line(e: Exception) -> DataError:
    return DataError(" ".join(str(e).split()))


def read_input_texts(source: str, column: str = "document") -> list[str]:
    """Texts to label from a file or '-' (stdin): one per line, or a TSV/CSV/Parquet with `column`. A first line
    holding a tab is taken for a table header (a TSV without `column` is an error, not reviews)."""
    if source != "-":
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    try:
        return read_texts(source, column, tab_means_table=True)
    except DataError as e:
        raise _one_line(e) from None


# ----------------------------------------------------------------------------- evaluate


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro F1 and the confusion matrix (rows: true class,
    columns: predicted), by scikit-learn. A class never predicted has precision 0 (and never present, recall 0)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, preds, labels=classes,
                                                                     zero_division=0)
    per_class = [{"class": c, "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                  "support": int(support[c])} for c in classes]
    return {"rows": int(len(labels)), "accuracy": float(accuracy_score(labels, preds)) if len(labels) else 0.0,
            "classes": per_class, "macro_f1": float(np.mean(f1)),
            "confusion": confusion_matrix(labels, preds, labels=classes).tolist()}


def evaluate(model_dir: Path, path: Path, text_column: str = "document", label_column: str = "label", *,
             runtime: str = "eager", batch_size: int = 512, task_file: str | None = None) -> dict:
    """The exported model's metrics on a labelled file (NSMC TSV, or CSV/TSV/Parquet with the named columns): an
    export whose manifest names its classes (`num_classes`: a student, a transformer teacher), labelled by its
    task's `predict`. `task_file`: the user's `--task` (see `export_task`)."""
    task, label = open_predictor(model_dir, task_file, runtime, batch_size)
    num_classes = _export_num_classes(model_dir, task.name)
    cfg = DataConfig(text_column=text_column, label_column=label_column, id_column=None,
                     num_classes=num_classes, download=False)
    try:
        table = read_table(path, cfg)
    except DataError as e:
        raise _one_line(e) from None
    t0 = time.perf_counter()
    preds = np.array([row["label"] for row in label(table.texts)], dtype=np.int64)
    seconds = time.perf_counter() - t0
    out = {"model": str(model_dir), "file": str(path), "runtime": runtime,
           **classification_metrics(table.labels, preds, num_classes)}
    out["samples_per_s"] = round(len(table) / max(seconds, 1e-9), 1)
    return out


def _manifest(model_dir: Path) -> dict:
    try:
        return read_manifest(Path(model_dir))
    except TaskError as e:
        raise ConfigError(str(e)) from None


def export_task(model_dir: Path, task_file: str | None = None) -> str:
    """The task an export folder belongs to: its manifest's `task` (`trainable.tasks.read_manifest`; a student
    exported before the manifest named it: the default task). Only a built-in task is taken from the folder: a
    task module is code, and a folder we did not write must not choose code to run. A custom task's export is
    opened with the user's own `task_file` (`--task FILE`)."""
    if task_file is not None:
        return task_file
    task = _manifest(model_dir)["task"]
    if not is_builtin(task):
        raise ConfigError(f"{Path(model_dir) / MANIFEST}: task: {task!r} is not a built-in task "
                          f"({', '.join(BUILTIN)}); an exported folder cannot choose code to run: pass --task FILE to "
                          f"use a task module you trust")
    return task


def open_predictor(model_dir: Path, task_file: str | None, runtime: str = "eager",
                   batch_size: int = 512) -> tuple[Task, Callable[[list[str]], list[dict]]]:
    """(the export's task, its `predictor`: texts -> one dict per text) in one of the task's runtimes. The export
    is read here (a missing file is said before any text is); a task's refusal is one line (ConfigError)."""
    name = export_task(model_dir, task_file)
    try:
        task = load_task(name)
        if runtime not in task.runtimes:
            raise TaskError(f"--runtime {runtime}: " + (f"a {name} export runs in eager PyTorch only"
                                                        if tuple(task.runtimes) == ("eager",)
                                                        else f"expected one of {list(task.runtimes)}"))
        predictor = task.predictor(Path(model_dir), runtime=runtime, batch_size=batch_size)
    except TaskError as e:
        raise ConfigError(str(e)) from None

    def predict(texts: list[str]) -> list[dict]:
        try:
            return predictor(texts)
        except TaskError as e:
            raise ConfigError(str(e)) from None

    return task, predict


def _export_num_classes(model_dir: Path, task: str) -> int:
    """The classes an export labels texts with, as its manifest records them; an export without classes (a language
    model, a tagger) cannot be scored."""
    n = _manifest(model_dir).get("num_classes")
    if not n:
        raise ConfigError(f"{model_dir}: this {task} export does not label texts with classes; sweep evaluate scores "
                          "classifiers (a student, or a transformer teacher)")
    return int(n)


def format_evaluation(result: dict) -> str:
    """The metrics as a small text table, then the confusion matrix."""
    lines = [f"{result['file']}: {result['rows']} rows, accuracy {result['accuracy']:.4f}, "
             f"macro F1 {result['macro_f1']:.4f} ({result['runtime']})", "",
             f"{'class':>7} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for c in result["classes"]:
        lines.append(f"{c['class']:>7} {c['precision']:>9.4f} {c['recall']:>7.4f} {c['f1']:>7.4f} {c['support']:>8}")
    n = len(result["confusion"])
    lines += ["", "confusion (rows: true, columns: predicted)",
              " " * 7 + "".join(f"{f'pred {j}':>9}" for j in range(n))]
    for i, row in enumerate(result["confusion"]):
        lines.append(f"{f'true {i}':>7}" + "".join(f"{v:>9}" for v in row))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- dashboard


def serve_dashboard(folder: Path, host: str, port: int, log: Callable[[str], None]) -> None:
    """optuna-dashboard over the sweep's SQLite study; blocks until interrupted."""
    db = folder / STUDY_FILE
    if not db.is_file():
        raise ConfigError(f"{folder}: no Optuna study ({STUDY_FILE} is missing; a sweep writes it when it starts)")
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError("optuna-dashboard is not installed (pip install 'kd-sweep[tools]')") from None
    log(f"Optuna dashboard on http://{host}:{port} (Ctrl-C to stop)")
    try:
        optuna_dashboard.run_server(f"sqlite:///{db.resolve()}", host=host, port=port)
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"{host}:{port}: cannot serve the dashboard ({e.strerror or e}); "
                          "try another --port") from None
