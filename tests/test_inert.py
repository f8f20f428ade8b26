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


# ----------------------------------------------------------------------------- moved and copied sweep folders


def _x_space(trial):
    trial.suggest_float("x", 0.0, 1.0)


def _searcher(folder: Path, storage=None):
    from sweep.ray_search import KDOptunaSearch, SweepStudy

    return KDOptunaSearch(space=_x_space, metric="val_acc", mode="max", study_name="s", max_epochs=1,
                          storage=storage if storage is not None else SweepStudy(folder / "optuna.db"))


def _states(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return sorted(s for (s,) in con.execute("select state from trials"))


def test_a_copied_sweeps_study_is_its_own_and_a_moved_one_opens(tmp_path):
    """The searcher as Ray saves it (tuner.pkl, searcher-state-*.pkl: pickles), unpickled while a copy is
    resumed, writes into the copy's optuna.db, never the original's; and unpickles after the original is gone."""
    import pickle
    import shutil

    from sweep.ray_search import resuming

    original = tmp_path / "original"
    original.mkdir()
    searcher = _searcher(original)
    searcher.suggest("t1")  # a trial asked before the "crash"
    saved = pickle.dumps(searcher)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    with resuming(copy):
        resumed = pickle.loads(saved)
    resumed.on_trial_complete("t1", {"val_acc": 0.5, "epoch": 1})
    resumed.suggest("t2")
    assert _states(copy / "optuna.db") == ["COMPLETE", "RUNNING"]
    assert _states(original / "optuna.db") == ["RUNNING"]  # the original's study is untouched

    moved = tmp_path / "moved"
    original.rename(moved)
    with resuming(moved):
        resumed = pickle.loads(saved)
    resumed.on_trial_complete("t1", {"val_acc": 0.7, "epoch": 1})
    assert _states(moved / "optuna.db") == ["COMPLETE"]
    assert not original.exists()


def test_asha_replays_the_folder_resumed(tmp_path):
    import pickle
    from types import SimpleNamespace

    from sweep.ray_scheduler import ResumableASHA
    from sweep.ray_search import resuming

    asha = ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=4, grace_period=1,
                         reduction_factor=2, experiment_dir=str(tmp_path / "original"))
    saved = pickle.dumps(asha)  # as in tuner.pkl
    moved = tmp_path / "moved"
    (moved / "trial_a").mkdir(parents=True)
    (moved / "trial_a" / "params.json").write_text("{}")  # Ray writes it as the trial starts
    (moved / "trial_a" / "result.json").write_text(json.dumps({"trial_id": "a", "epoch": 1, "val_acc": 0.6}))
    with resuming(moved):
        resumed = pickle.loads(saved)
    resumed.on_trial_add(None, SimpleNamespace(trial_id="b"))
    rung_1 = dict(resumed._brackets[0]._rungs)[1]
    assert rung_1 == {"a": 0.6}


def test_a_sweep_saved_before_ray_parts_was_split_still_unpickles(tmp_path):
    """Ray's saved state names each pickled class by module: a sweep saved before sweep/ray_parts.py was split into
    ray_search, ray_scheduler and ray_callbacks names `sweep.ray_parts.*`, and `sweep resume` must still load it."""
    import pickle

    from sweep.ray_callbacks import Progress
    from sweep.ray_scheduler import ResumableASHA
    from sweep.ray_search import SweepStudy

    objects = {"sweep.ray_scheduler": ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=4,
                                                    grace_period=1, reduction_factor=2, experiment_dir=str(tmp_path)),
               "sweep.ray_search": SweepStudy(tmp_path / "optuna.db"), "sweep.ray_callbacks": Progress(4, 2)}
    for module, obj in objects.items():
        new = pickle.dumps(obj, protocol=0)  # protocol 0 names globals as text: "c<module>\n<name>\n"
        assert f"c{module}\n".encode() in new
        old = new.replace(f"c{module}\n".encode(), b"csweep.ray_parts\n")
        back = pickle.loads(old)
        assert type(back) is type(obj), module


def test_resume_refuses_a_moved_sweep_saved_with_its_study_by_absolute_url(tmp_path, capsys):
    # Sweeps saved before SweepStudy pickled optuna's RDBStorage by its URL: moved, one line, nothing opened.
    import optuna
    import pickle
    import shutil

    from sweep.ray_search import foreign_studies

    original = tmp_path / "original"
    original.mkdir()
    url = f"sqlite:///{(original / 'optuna.db').resolve()}"
    saved = pickle.dumps(_searcher(original, optuna.storages.RDBStorage(url)))
    assert foreign_studies(saved, original / "optuna.db") == []  # in place: its own study
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(original / "optuna.db", moved / "optuna.db")
    (moved / "tuner.pkl").write_bytes(saved)
    (moved / "config.yaml").write_text(yaml.safe_dump({"name": "moved", "data": {"download": False}}))
    assert foreign_studies(saved, moved / "optuna.db") == [url]
    assert main(["resume", str(moved)]) == 2
    line = _one_error_line(capsys)
    assert str(moved / "tuner.pkl") in line and str(original / "optuna.db") in line
    # The new format names no URL at all: a moved folder is re-pointed instead (test above).
    assert foreign_studies(pickle.dumps(_searcher(original)), moved / "optuna.db") == []


def test_a_sweeps_relative_paths_are_read_from_its_launch_directory(tmp_path, monkeypatch, nsmc_dir):
    import os

    from sweep.config import validate
    from sweep.runs import in_launch_dir, launch_dir, stamp
    from trainable.data import DataError, locate_files

    launch, elsewhere = tmp_path / "launch", tmp_path / "one" / "level" / "deeper"  # ../.. means elsewhere there
    launch.mkdir()
    elsewhere.mkdir(parents=True)
    cfg = validate({"name": "s", "data": {"dir": os.path.relpath(nsmc_dir, launch), "download": False}}, "t")
    monkeypatch.chdir(launch)
    folder = launch / "results" / "s"
    folder.mkdir(parents=True)
    stamp(folder, cfg)
    assert launch_dir(folder) == launch
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError):
        locate_files(cfg.data, print, download=False)  # ../shared/data/nsmc from elsewhere: not the corpus
    said = []
    with in_launch_dir(folder, said.append):
        assert Path.cwd() == launch
        train, _ = locate_files(cfg.data, print, download=False)
        assert train.resolve() == (nsmc_dir / "ratings_train.txt").resolve()
    assert Path.cwd() == elsewhere and said == []

    # Launched on another machine: said in one line, and the block runs where it is.
    (folder / "command.txt").write_text("sweep run x.yaml\n# cwd: /nonexistent/launch\n")
    with in_launch_dir(folder, said.append):
        assert Path.cwd() == elsewhere
    assert len(said) == 1 and "/nonexistent/launch" in said[0]


def test_report_names_the_trial_folders_it_leaves_out(tmp_path):
    from sweep.config import validate
    from sweep.report import collect_trials

    folder = tmp_path / "s"
    for tid in ("aaa", "bbb"):
        (folder / f"trial_{tid}").mkdir(parents=True)
        (folder / f"trial_{tid}" / "params.json").write_text("{}")
        (folder / f"trial_{tid}" / "result.json").write_text(
            json.dumps({"trial_id": tid, "epoch": 1, "val_acc": 0.5}) + "\n")
    state = {"trial_data": [[json.dumps({"trial_id": "aaa", "status": "TERMINATED"}), "{}"]]}
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    said = []
    rows = collect_trials(folder, validate({"name": "s"}, "t"), said.append)
    assert [r["trial_id"] for r in rows] == ["aaa"]
    assert len(said) == 1 and "trial_bbb" in said[0] and "trial_aaa" not in said[0]


def _asked(db: Path) -> bool:
    import sqlite3

    try:
        return db.is_file() and bool(_states(db))
    except sqlite3.OperationalError:  # no table yet, or locked by the sweep's write
        return False


def test_an_interrupted_sweep_copied_and_moved_resumes_from_another_directory(nsmc_dir, tmp_path):
    """The user's story: a sweep with relative paths (data, cache, results) is interrupted, its folder copied and
    the original moved away; the copy is resumed from another working directory. It finishes from its own study,
    and the moved original's study is not touched."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_cli

    launch = tmp_path / "launch"
    launch.mkdir()
    cfg = {"name": "q", "data": {"dir": os.path.relpath(nsmc_dir, launch), "download": False, "train_rows": 1000,
                                 "test_rows": 200},
           "tokenizer": {"vocab_size": 500, "max_length": 32}, "student": {"embedding_dim": 16, "hidden_dim": 16},
           "train": {"epochs": 4, "batch_size": 64, "threads": 1, "alpha": 1.0}, "cache_dir": "cache",
           "results_dir": "results",
           "sweep": {"space": {"parameters": {"train.lr": {"type": "float", "low": 1e-3, "high": 3e-3}}},
                     "num_samples": 2, "max_concurrent": 1, "scheduler": {"kind": "none"}, "twins": 0,
                     "resources": {"cpu": 1}}}
    (launch / "q.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", "q.yaml"], cwd=launch, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    original = launch / "results" / "q"
    deadline = time.time() + 300
    while not _asked(original / "optuna.db"):  # Optuna asked for the first trial: interrupt the sweep (Ctrl-C)
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() else ""
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    studied_before = _states(original / "optuna.db")
    assert "COMPLETE" not in studied_before or len(studied_before) < 2

    copy = tmp_path / "elsewhere" / "copy_of_q"
    shutil.copytree(original, copy)
    moved = tmp_path / "moved_q"
    original.rename(moved)
    entries_before = sorted(p.name for p in moved.iterdir())
    other_cwd = tmp_path / "a" / "working" / "directory"  # the relative data.dir means nothing from here
    other_cwd.mkdir(parents=True)
    r = run_cli("resume", str(copy), cwd=other_cwd, env={"PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert _states(copy / "optuna.db") == ["COMPLETE", "COMPLETE"]
    assert _states(moved / "optuna.db") == studied_before  # the original's study was not written
    assert sorted(p.name for p in moved.iterdir()) == entries_before  # nor its folder
    assert not original.exists()  # and no trial was written where the folder used to be
    import pyarrow.parquet as pq

    rows = pq.read_table(copy / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(row["status"] == "finished" for row in rows)
