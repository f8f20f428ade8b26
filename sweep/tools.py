"""Daily tools around a sweep and its exported student: the texts `sweep predict --file` labels, the metrics of
`sweep evaluate`, and `sweep dashboard` (optuna-dashboard over the sweep's study).

Bad files raise `DataError` with one line naming the file; the CLI turns it into exit status 2.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from trainable.data import DataError

from .config import ConfigError


def _one_line(e: Exception) -> DataError:
    return DataError(" ".join(str(e).split()))


def read_input_texts(source: str, column: str = "document") -> list[str]:
    """Texts to label from a file or '-' (stdin): one per line, or a TSV/CSV/Parquet with `column`. A first line
    holding a tab is taken for a table header (a TSV without `column` is an error, not reviews)."""
    from trainable.data import read_texts

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
    """The exported model's metrics on a labelled file (NSMC TSV, or CSV/TSV/Parquet with the named columns): a
    student of the classify task, or another task's export whose `predict` labels texts (a transformer teacher).
    `task_file`: the user's `--task` (see `export_task`)."""
    from trainable.config import DataConfig
    from trainable.data import read_table

    from .export import label_texts, load_runtime

    task = export_task(model_dir, task_file)
    if task == "classify":
        forward, tok, meta = load_runtime(model_dir, runtime)
        num_classes = meta["num_classes"]
    else:
        if runtime != "eager":
            raise ConfigError(f"--runtime {runtime}: a {task} export runs in eager PyTorch only")
        num_classes = _export_num_classes(model_dir, task)
    cfg = DataConfig(text_column=text_column, label_column=label_column, id_column=None,
                     num_classes=num_classes, download=False)
    try:
        table = read_table(path, cfg)
    except DataError as e:
        raise _one_line(e) from None
    t0 = time.perf_counter()
    if task == "classify":
        preds = label_texts(forward, tok, table.texts, meta["max_length"], batch_size).argmax(1)
    else:
        preds = np.array([row["label"] for row in task_predict(model_dir, task, table.texts)], dtype=np.int64)
    seconds = time.perf_counter() - t0
    out = {"model": str(model_dir), "file": str(path), "runtime": runtime,
           **classification_metrics(table.labels, preds, num_classes)}
    out["samples_per_s"] = round(len(table) / max(seconds, 1e-9), 1)
    return out


def export_task(model_dir: Path, task_file: str | None = None) -> str:
    """The task an export folder belongs to: its config.json's `task` (a student's has none: classify). Only a
    built-in task is taken from the folder: a task module is code, and a folder we did not write must not choose
    code to run. A custom task's export is opened with the user's own `task_file` (`--task FILE`)."""
    import json

    from trainable.tasks import BUILTIN, is_builtin

    if task_file is not None:
        return task_file
    meta = Path(model_dir) / "config.json"
    if not meta.is_file():
        return "classify"  # load_runtime then says what is missing
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{meta}: expected a JSON object (an export's description), got {type(data).__name__}")
    task = data.get("task", "classify")
    if not is_builtin(task):
        raise ConfigError(f"{meta}: task: {task!r} is not a built-in task ({', '.join(BUILTIN)}); an exported folder "
                          f"cannot choose code to run: pass --task FILE to use a task module you trust")
    return task


def task_predict(model_dir: Path, task: str, texts: list[str]) -> list[dict]:
    from trainable.tasks import TaskError, load_task

    try:
        return load_task(task).predict(Path(model_dir), texts)
    except TaskError as e:
        raise ConfigError(str(e)) from None


def _export_num_classes(model_dir: Path, task: str) -> int:
    """Classes of a non-classify export, as its export.json records them; an export without classes (a language
    model, a tagger) cannot be scored."""
    import json

    path = Path(model_dir) / "export.json"
    n = json.loads(path.read_text(encoding="utf-8")).get("num_classes") if path.is_file() else None
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
    from .tuner import STUDY_FILE

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
