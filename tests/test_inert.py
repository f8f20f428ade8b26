"""Folders we did not write are data (issue 23, items 2 and 3).

A received exported model or sweep folder runs no code it names: a task module (.py) runs only with the user's
`--task FILE` (predict, evaluate) or `--allow-task-code` (report, export, resume). The task file used here writes
a marker file when it is imported, so "it ran" is a file on disk. Refusals are in-process calls of the real CLI
on small hand-made folders: they come before any model or Ray state is read.

A sweep folder moved or copied resumes from its own study (the Optuna storage is pickled by file name and
re-pointed at the folder being resumed), and the stamped config's relative paths are read from the directory
the sweep was launched in, wherever resume/report/export run from.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sweep.cli import main

TASK_SOURCE = '''
from pathlib import Path

Path({marker!r}).write_text("the task module ran")

from trainable.tasks import Task


class Marker(Task):
    name = "marker"
    metrics = {{"score": "max"}}

    def predict(self, folder, texts):
        return [{{"text": t, "label": 0}} for t in texts]


TASK = Marker()
'''


@pytest.fixture
def task_file(tmp_path) -> tuple[Path, Path]:
    """(a task module that writes a marker file when imported, the marker's path)."""
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil_task.py"
    path.write_text(TASK_SOURCE.format(marker=str(marker)))
    return path, marker


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- exported folders


def _export_folder(tmp_path: Path, task: str) -> Path:
    folder = tmp_path / "received_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"task": task}))
    (folder / "export.json").write_text(json.dumps({"num_classes": 2}))
    return folder


def _labelled(tmp_path: Path) -> Path:
    path = tmp_path / "labelled.tsv"
    path.write_text("id\tdocument\tlabel\n1\tgood\t1\n2\tbad\t0\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_exported_folder_naming_a_task_file_runs_nothing(command, task_file, tmp_path, capsys):
    path, marker = task_file
    folder = _export_folder(tmp_path, str(path))
    args = [command, str(folder), "good movie"] if command == "predict" else [command, str(folder),
                                                                              str(_labelled(tmp_path))]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert str(folder / "config.json") in line and "task" in line and str(path) in line and "--task" in line
    assert not marker.exists()


@pytest.mark.parametrize("task", ["evil_task.py", "received_model.evil"])
def test_exported_folder_naming_a_relative_file_or_a_module_runs_nothing(task, task_file, tmp_path, capsys,
                                                                         monkeypatch):
    # From the folder's parent (or inside it), a relative file or a dotted module would import the file beside it.
    path, marker = task_file
    folder = _export_folder(tmp_path, task)
    (folder / "evil.py").write_text(path.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["predict", str(folder), "good movie"]) == 2
    assert task in _one_error_line(capsys)
    assert not marker.exists()


def test_the_users_own_task_file_runs_on_an_export(task_file, tmp_path, capsys):
    path, marker = task_file
    folder = _export_folder(tmp_path, "marker")
    assert main(["predict", str(folder), "good movie", "--task", str(path)]) == 0
    assert marker.exists()
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rows == [{"text": "good movie", "label": 0}]
    assert main(["evaluate", str(folder), str(_labelled(tmp_path)), "--task", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.5


def test_builtin_tasks_are_still_read_from_an_export(tmp_path):
    from sweep.tools import export_task

    assert export_task(_export_folder(tmp_path, "lm")) == "lm"  # an lm export names its task; predict reads it


# ----------------------------------------------------------------------------- sweep folders


def _sweep_folder(tmp_path: Path, task: str) -> Path:
    folder = tmp_path / "received_sweep"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": task, "name": "received_sweep"}))
    (folder / "tuner.pkl").write_bytes(b"not read: the task check comes first")
    return folder


@pytest.mark.parametrize("command", ["report", "export", "resume"])
def test_sweep_folder_naming_a_task_file_runs_nothing(command, task_file, tmp_path, capsys):
    path, marker = task_file
    folder = _sweep_folder(tmp_path, str(path))
    args = [command, str(folder)] + (["--out", str(tmp_path / "out")] if command == "export" else [])
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert str(folder / "config.yaml") in line and str(path) in line and "--allow-task-code" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["report", "export", "resume"])
def test_allow_task_code_runs_the_sweeps_task_file(command, task_file, tmp_path, capsys):
    # With the flag the task module is loaded. The hand-made folder has no trials and no study, so export and
    # resume then stop on that (one line); report writes an empty report.
    path, marker = task_file
    folder = _sweep_folder(tmp_path, str(path))
    args = [command, str(folder), "--allow-task-code"] + (["--out", str(tmp_path / "out")]
                                                          if command == "export" else [])
    rc = main(args)
    assert marker.exists()
    assert rc == (0 if command == "report" else 2)
