"""Replace only what can be replaced: `--force` sets the old sweep or run aside until the new one has started,
folders and files are swapped in whole (never a moment with neither), a partial file never gets its final name,
a killed writer's temporary is cleaned up by the next write, and `--out`/`--resume` refuse folders that are not
theirs to replace."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_main, small_config

from sweep.cli import main
from trainable import io as tio


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _child(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


# ----------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_never_leaves_a_moment_without_the_folder(tmp_path):
    """A reader in another process stats the folder in a tight loop while it is replaced 300 times: it never finds
    it missing (deleting the old folder, then renaming the new one in, leaves a gap the reader sees)."""
    target = tmp_path / "export"
    with tio.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("0")
    reader = _child("""
        import os, sys, time
        path, stop = sys.argv[1], sys.argv[2]
        misses = looks = 0
        print("ready", flush=True)
        while not os.path.exists(stop):
            looks += 1
            if not os.path.exists(path):
                misses += 1
        print(misses, looks, flush=True)
    """, str(target), str(tmp_path / "stop"))
    assert reader.stdout.readline().strip() == "ready"
    for i in range(300):
        with tio.atomic_dir(target) as tmp:
            for j in range(20):  # a folder of a few files, so deleting the old one takes a moment
                (tmp / f"f{j}.txt").write_text(str(i))
    (tmp_path / "stop").touch()
    misses, looks = map(int, reader.communicate(timeout=60)[0].split())
    assert looks > 1000 and misses == 0, (misses, looks)
    assert (target / "f0.txt").read_text() == "299"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "stop"]  # no temporary or old copy left


def test_atomic_dir_without_renameat2_puts_back_what_a_killed_call_set_aside(tmp_path, monkeypatch):
    """Without renameat2 the old folder is set aside, then the new one renamed in. A process SIGKILLed between the
    two leaves the old folder under its set-aside name only: the next atomic_dir call puts it back before anything
    else, and a failed write then leaves it as it was."""
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.pt").write_text("old")
    child = _child("""
        import os, signal, sys
        from trainable import io
        io._RENAMEAT2 = None  # a C library without renameat2
        real_rename = os.rename
        def rename(src, dst):
            if str(src).endswith(".tmp"):  # the second rename: the new folder going in
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(src, dst)
        os.rename = rename
        with io.atomic_dir(sys.argv[1]) as tmp:
            (tmp / "model.pt").write_text("new")
    """, str(target))
    child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # What the kill left: the old folder set aside, the new one under its temporary name, nothing at `target`.
    assert not target.exists() and sorted(p.suffix for p in tmp_path.iterdir()) == [".old", ".tmp"]

    monkeypatch.setattr(tio, "_RENAMEAT2", None)
    with pytest.raises(RuntimeError):
        with tio.atomic_dir(target) as tmp:
            (tmp / "model.pt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert _tree(target) == {"model.pt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with tio.atomic_dir(target) as tmp:  # and the fallback replaces it when all goes well
        (tmp / "model.pt").write_text("new")
    assert _tree(target) == {"model.pt": b"new"} and [p.name for p in tmp_path.iterdir()] == ["export"]


# ----------------------------------------------------------------------------- Ray's storage writes


def _atomic_fs():
    return tio.atomic_local_filesystem()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _raise_inside_with(fs, target):
    with pytest.raises(RuntimeError):  # the caller raises inside its `with` block
        with fs.open_output_stream(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("serialising the rest failed")


def _drop_unclosed(fs, target):
    f = fs.open_output_stream(str(target))  # dropped without close(), as pyarrow's C++ copy does on a read error
    f.write(b"half")
    del f


def _copy_with_a_read_error(fs, target):
    with pytest.raises(OSError):  # /proc/self/mem opens, and reading its offset 0 fails (EIO)
        fs.copy_file("/proc/self/mem", str(target))


@pytest.mark.parametrize("how", [_raise_inside_with, _drop_unclosed, _copy_with_a_read_error],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_partial_file_never_gets_its_name(tmp_path, how):
    target = tmp_path / "experiment_state.json"
    target.write_text("old")
    how(_atomic_fs(), target)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_a_write_that_completes_while_another_exception_is_handled_lands(tmp_path):
    """Positive control for the rule above: only an exception raised since the file was opened discards it."""
    target = tmp_path / "experiment_state.json"
    target.write_text("old")
    try:
        raise KeyError("handled elsewhere")
    except KeyError:
        with _atomic_fs().open_output_stream(str(target)) as f:
            f.write(b"new")
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", ["ray storage stream", "atomic_path"])
def test_a_sigkilled_writer_leaves_no_file_and_the_next_write_removes_its_temporary(tmp_path, writer):
    folder = tmp_path / "trial"
    folder.mkdir()
    (folder / "result.json").write_text("old")
    child = _child("""
        import sys, time
        from trainable import io
        kind, path = sys.argv[1], sys.argv[2]
        if kind == "atomic_path":
            with io.atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    f.write(b"half")
                    f.flush()
                    print("written", flush=True)
                    time.sleep(600)
        else:
            f = io.atomic_local_filesystem().open_output_stream(path)
            f.write(b"half")
            f.flush()
            print("written", flush=True)
            time.sleep(600)
    """, writer, str(folder / "result.json"))
    assert child.stdout.readline().strip() == "written", child.stderr.read()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert (folder / "result.json").read_text() == "old"
    (temp,) = _leftovers(folder)
    assert temp.startswith(f".result.json.{child.pid}-") and temp.endswith(".tmp")

    tio.write_json(folder / "params.json", {"x": 1})  # the next write into that folder, of another file
    assert _leftovers(folder) == []
    assert (folder / "result.json").read_text() == "old"


def test_a_resume_removes_dead_temporaries_in_folders_never_written_again(tmp_path):
    """A checkpoint folder whose temporary could not be removed (its storage turned read-only under the write) is
    never written again: `remove_dead_temps_below`, which `sweep resume` runs over the sweep folder, removes it and
    leaves a live writer's alone."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(child.stdout)
    deep = tmp_path / "trial_x" / "checkpoint_000000"
    deep.mkdir(parents=True)
    live = tio.owned_sibling(deep / "state.pt", "tmp")
    dead = deep / live.name.replace(f".{os.getpid()}-", f".{dead_pid}-")
    dead_dir = tmp_path / dead.name.replace("state.pt", "trial_y")
    for p in (live, dead):
        p.write_bytes(b"half")
    dead_dir.mkdir()
    (dead_dir / "inner").write_text("x")
    tio.remove_dead_temps_below(tmp_path)
    assert sorted(p.name for p in deep.iterdir()) == [live.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial_x"]


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    """The clean-up removes only the temporaries of processes that have exited."""
    fs = _atomic_fs()
    f = fs.open_output_stream(str(tmp_path / "a.json"))
    f.write(b"{}")
    tio.write_json(tmp_path / "b.json", {})
    f.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


# ----------------------------------------------------------------------------- sweep run --force


def _sweep_config(tmp_path: Path, nsmc_dir, cache_dir, **sweep) -> Path:
    cfg = small_config(nsmc_dir, cache_dir, tmp_path / "results", train={"epochs": 1, "threads": 1, "alpha": 1.0},
                       student={"embedding_dim": 8, "hidden_dim": 8},
                       data={"train_rows": 600, "test_rows": 200})
    cfg["name"] = "s"
    cfg["sweep"] = {"space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8]}}},
                    "searcher": "grid", "max_concurrent": 1, "scheduler": {"kind": "none"}, "twins": 0, **sweep}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _old_sweep(tmp_path: Path) -> Path:
    old = tmp_path / "results" / "s"
    (old / "trial_old").mkdir(parents=True)
    (old / "config.yaml").write_text("name: s\n")
    (old / "trial_old" / "marker.txt").write_text("the old sweep's trial")
    return old


def test_run_force_interrupted_before_it_starts_puts_the_old_sweep_back(tmp_path, nsmc_dir, cache_dir):
    """Ctrl-C during the preparation (here: at the first line the sweep logs) puts the old sweep back whole."""
    from sweep.tuner import run_sweep

    cfg = _sweep_config(tmp_path, nsmc_dir, cache_dir)
    old = _old_sweep(tmp_path)
    before = _tree(old)

    def log(msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(str(cfg), [], force=True, log=log)
    assert _tree(old) == before
    assert [p.name for p in old.parent.iterdir()] == ["s"]  # no set-aside copy, no partial new one


def test_run_force_that_fails_a_later_check_puts_the_old_sweep_back(tmp_path, nsmc_dir, cache_dir, local_ray):
    """`sweep run --force` asking for more CPUs than the node has: refused after Ray started (exit 2); the old sweep
    is back with its files, and nothing of the new one remains."""
    cfg = _sweep_config(tmp_path, nsmc_dir, cache_dir, resources={"cpu": 10000})
    old = _old_sweep(tmp_path)
    before = _tree(old)
    r = run_main("run", str(cfg), "--force")
    assert r.returncode == 2 and "10000 CPUs per trial asked" in r.stderr, r.stderr[-2000:]
    assert _tree(old) == before
    assert [p.name for p in old.parent.iterdir()] == ["s"]


@pytest.mark.slow
def test_run_force_that_starts_replaces_the_old_sweep(tmp_path, nsmc_dir, cache_dir, local_ray):
    cfg = _sweep_config(tmp_path, nsmc_dir, cache_dir)
    old = _old_sweep(tmp_path)
    r = run_main("run", str(cfg), "--force")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (old / "trial_old").exists() and (old / "optuna.db").is_file() and (old / "report.md").is_file()
    assert [p.name for p in old.parent.iterdir()] == ["s"]  # the old copy deleted, not left aside

    # `export --out` over that real sweep, whose best trial it could export: never into the sweep, the results
    # folder or a folder above them, even with --force; a new folder is fine.
    (tmp_path / "file.bin").write_text("a file")
    before = _tree(tmp_path)
    for out in (old.parent, old, tmp_path, tmp_path / "file.bin"):
        assert main(["export", str(old), "--out", str(out), "--force"]) == 2, out
        assert _tree(tmp_path) == before
    assert main(["export", str(old), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "student.pt").is_file()


def test_a_set_aside_sweep_left_by_a_killed_run_is_named_not_lost(tmp_path):
    """A `--force` run SIGKILLed before it started leaves the old sweep under its set-aside name: the next claim of
    that name refuses in one line naming it, instead of replacing anything."""
    from sweep.config import ConfigError
    from sweep.runs import Claim

    old = _old_sweep(tmp_path)
    child = _child("""
        import os, signal, sys
        from sweep.runs import Claim
        Claim(__import__("pathlib").Path(sys.argv[1]), force=True, what="sweep")
        os.kill(os.getpid(), signal.SIGKILL)
    """, str(old))
    child.communicate(timeout=60)
    (aside,) = [p for p in old.parent.iterdir() if p.name != "s"]
    assert (aside / "trial_old" / "marker.txt").is_file() and list(old.iterdir()) == []
    with pytest.raises(ConfigError, match=r"set aside by a --force run that was killed"):
        Claim(old, force=True, what="sweep")
    assert (aside / "trial_old" / "marker.txt").is_file()


# ----------------------------------------------------------------------------- sweep train --out --force/--resume


def _train_config(tmp_path, nsmc_dir, cache_dir, **train) -> Path:
    cfg = small_config(nsmc_dir, cache_dir, tmp_path / "results", train={"epochs": 2, "threads": 1, "alpha": 1.0,
                                                                         **train},
                       student={"embedding_dim": 8, "hidden_dim": 8}, data={"train_rows": 600, "test_rows": 200})
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _one_error_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    return lines[0]


def test_train_force_that_fails_puts_the_old_run_back(tmp_path, nsmc_dir, cache_dir, capsys):
    cfg = _train_config(tmp_path, nsmc_dir, cache_dir)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["train", str(cfg), "--out", str(out), "--force", "--set", "data.train_file=missing.txt"])
    assert _tree(out) == {"notes.txt": b"mine"} and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert rc == 2
    _one_error_line(capsys, "missing.txt: file not found")


@pytest.mark.parametrize("files", [{"data.csv": b"a,b\n"},
                                   {"config.yaml": b"name: mine\n", "data.csv": b"a,b\n"}])  # config.yaml alone: no run
def test_train_resume_into_a_folder_that_is_not_a_run_is_refused(tmp_path, nsmc_dir, cache_dir, capsys, files):
    """Refused before anything runs, even when the run would then have failed (and so cleaned up after itself)."""
    cfg = _train_config(tmp_path, nsmc_dir, cache_dir)
    out = tmp_path / "mine"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    rc = main(["train", str(cfg), "--out", str(out), "--resume", "--set", "data.train_file=missing.txt"])
    assert _tree(out) == files
    assert rc == 2
    _one_error_line(capsys, "not a run folder of `sweep train`")


def test_train_into_an_empty_folder_it_did_not_make_keeps_it_on_error(tmp_path, nsmc_dir, cache_dir, capsys):
    cfg = _train_config(tmp_path, nsmc_dir, cache_dir)
    out = tmp_path / "mount"
    out.mkdir()
    for flags in ([], ["--resume"]):
        rc = main(["train", str(cfg), "--out", str(out), *flags, "--set", "data.train_file=missing.txt"])
        assert rc == 2
        _one_error_line(capsys, "missing.txt: file not found")
        assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.slow
def test_train_resume_skips_a_corrupt_newest_checkpoint(tmp_path, nsmc_dir, cache_dir, capsys):
    cfg = _train_config(tmp_path, nsmc_dir, cache_dir)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    state = out / "checkpoints" / "epoch_0002" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--set", "train.epochs=3"]) == 0
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "epoch_0002" in err, err
    assert "resumed from" in err and "epoch_0001 (epoch 1 done)" in err, err
    assert "epoch 2/3" in err and "epoch 3/3" in err

    for ckpt in (out / "checkpoints").iterdir():  # every checkpoint corrupt: refused, nothing changed
        (ckpt / "state.pt").write_bytes(b"x")
    before = _tree(out)
    assert main(["train", str(cfg), "--out", str(out), "--resume", "--set", "train.epochs=4"]) == 2
    _one_error_line(capsys, "checkpoints is readable; pass --force")
    assert _tree(out) == before


# ----------------------------------------------------------------------------- sweep export --out


@pytest.fixture
def sweep_folder(tmp_path, nsmc_dir, cache_dir) -> Path:
    """A sweep folder as `sweep run` leaves it, as far as `export` reads before refusing an --out."""
    results = tmp_path / "work" / "results"
    folder = results / "s"
    folder.mkdir(parents=True)
    cfg = small_config(nsmc_dir, cache_dir, results)
    cfg["name"] = "s"
    cfg["sweep"] = {"space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8]}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "optuna.db").write_bytes(b"")
    (folder / "trial_a").mkdir()
    (folder / "trial_a" / "params.json").write_text("{}")
    other = results / "other"
    other.mkdir()
    (other / "config.yaml").write_text("name: other\n")
    (other / "optuna.db").write_bytes(b"")
    (tmp_path / "elsewhere" / "results").mkdir(parents=True)
    (tmp_path / "elsewhere" / "results" / "x").mkdir()
    (tmp_path / "elsewhere" / "results" / "x" / "tuner.pkl").write_bytes(b"")
    (tmp_path / "file.bin").write_text("a file")
    return folder


@pytest.mark.parametrize("out,expected", [
    ("file.bin", "is a file, not a folder"),
    ("work/results/s", "is the sweep folder"),
    ("work/results/s/trial_a", "is a part of the sweep folder"),
    ("work/results/other", "is a sweep folder"),
    ("work/results", "is the results folder"),
    ("work", "holds the sweep folder"),
    (".", "holds the sweep folder"),
    ("elsewhere/results", "holds sweeps"),
])
def test_export_refuses_an_out_it_must_not_replace(sweep_folder, tmp_path, capsys, out, expected):
    target = tmp_path / out
    before = _tree(tmp_path)
    rc = main(["export", str(sweep_folder), "--out", str(target), "--force"])
    assert rc == 2
    _one_error_line(capsys, expected)
    assert _tree(tmp_path) == before
