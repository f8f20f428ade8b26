"""Faults a sweep must survive and unsafe inputs it must refuse, on real Ray, real Optuna and NSMC subsets:
failing trials (NaN loss, out of memory), Ctrl-C and resume, a killed trial worker, a corrupt checkpoint,
resources no node has, pickles that would run code, servers bound to 127.0.0.1 only."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, run_cli, small_config
from test_sweep import _epochs_by_trial, _tree


def sweep_config(tmp: Path, nsmc_dir, cache_dir, name: str, space: dict, **sweep) -> Path:
    cfg = small_config(nsmc_dir, cache_dir, tmp / "results", train={"epochs": 2, "threads": 1},
                       student={"embedding_dim": 16, "hidden_dim": 16})
    cfg["name"] = name
    cfg["sweep"] = {"space": space, "searcher": "grid", "max_concurrent": 2, "scheduler": {"kind": "none"}, **sweep}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FAILING = {"parameters": {"case": {"type": "categorical", "choices": {
    "ok_a": {"student.hidden_dim": 16},
    "ok_b": {"student.hidden_dim": 24},
    # T = 1e-40 underflows to a float32 denormal: student / T overflows to inf and the KD loss becomes NaN.
    "nan_loss": {"train.temperature": 1.0e-40, "train.alpha": 0.5},
    # An LSTM of hidden size 400,000 needs terabytes: the allocation fails at once.
    "out_of_memory": {"student.hidden_dim": 400000},
}}}}


def test_failing_trials_are_recorded_and_the_sweep_completes(nsmc_dir, cache_dir, tmp_path):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "faulty", FAILING)
    r = run_cli("run", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "results" / "faulty"
    rows = {json.dumps(sorted((k, v) for k, v in row.items() if k == "hp.case")): row
            for row in pq.read_table(folder / "trials.parquet").to_pylist()}
    by_case = {json.loads(k)[0][1]: v for k, v in rows.items()}
    assert by_case["ok_a"]["status"] == by_case["ok_b"]["status"] == "finished"
    assert by_case["nan_loss"]["status"] == "failed" and "loss is nan" in by_case["nan_loss"]["error"]
    assert by_case["out_of_memory"]["status"] == "failed"
    assert "allocate" in by_case["out_of_memory"]["error"].lower()
    report = (folder / "report.md").read_text()
    assert "loss is nan" in report and "2 failed" in report
    best_line = next(ln for ln in report.splitlines() if ln.startswith("- best:"))
    assert by_case["ok_a"]["trial_id"] in best_line or by_case["ok_b"]["trial_id"] in best_line
    # The NaN trial's retry did no training: it failed at once with the same reason.
    nan_dir = folder / by_case["nan_loss"]["trial_dir"]
    assert (nan_dir / ".not_retryable").is_file()
    assert len([ln for ln in (nan_dir / "result.json").read_text().splitlines() if ln.strip()]) == 0
    with sqlite3.connect(folder / "optuna.db") as db:
        states = sorted(s for (s,) in db.execute("select state from trials"))
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]  # never a NaN value, never left RUNNING


SMALL = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8, 12, 16, 20]}}}


def _wait_for(pred, timeout=240, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep ended first (rc {proc.returncode})")
        time.sleep(0.3)
    raise AssertionError("timed out")


def _newest_checkpoint_epoch(trial_dir: Path) -> int:
    epochs = [json.loads(m.read_text())["epoch"] for m in trial_dir.glob("checkpoint_*/meta.json")]
    return max(epochs, default=0)


def test_ctrl_c_saves_state_and_resume_survives_a_corrupt_checkpoint(nsmc_dir, cache_dir, tmp_path):
    epochs = 6
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "interrupted", SMALL, max_concurrent=1)
    yaml_cfg = yaml.safe_load(cfg.read_text())
    yaml_cfg["train"]["epochs"] = epochs
    cfg.write_text(yaml.safe_dump(yaml_cfg))
    folder = tmp_path / "results" / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(cfg)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    # Checkpoints reach storage as the trial writes them (results only with Ray's next state copy): interrupt
    # while a trial is half-way.
    _wait_for(lambda: any(2 <= _newest_checkpoint_epoch(d) <= 3 for d in folder.glob("trial_*")), proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"sweep resume {folder}" in err
    before = _epochs_by_trial(folder)

    # Corrupt every checkpoint of an unfinished trial: resume must notice (never load garbage) and start the
    # trial again, with a warning.
    unfinished = next(d for d in folder.glob("trial_*") if 0 < _newest_checkpoint_epoch(d) < epochs)
    unfinished_id = unfinished.name.removeprefix("trial_")
    for ckpt in unfinished.glob("checkpoint_*"):
        state = ckpt / "state.pt"
        state.write_bytes(state.read_bytes()[:100])

    r = run_cli("resume", str(folder))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == 4 and all(row["status"] == "finished" for row in rows)
    warnings = (unfinished / "warnings.txt").read_text()
    assert "skipping a bad checkpoint" in warnings and "starts again from epoch 1" in warnings
    assert "skipping a bad checkpoint" in next(r["warnings"] for r in rows if r["trial_id"] == unfinished_id)
    after = _epochs_by_trial(folder)
    for t, done in before.items():
        assert after[t][: len(done)] == done and after[t][-1] == epochs
    recorded = before.get(unfinished_id, [])
    assert after[unfinished_id][len(recorded)] == 1  # restarted, not resumed from garbage


def test_killed_trial_worker_is_retried_from_its_checkpoint(nsmc_dir, cache_dir, tmp_path):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "worker", {"parameters": {
        "student.hidden_dim": {"type": "categorical", "choices": [8, 16, 24]}}})
    y = yaml.safe_load(cfg.read_text())
    y["train"]["epochs"] = 5
    cfg.write_text(yaml.safe_dump(y))
    folder = tmp_path / "results" / "worker"
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(1 <= e[-1] <= 3 for e in _epochs_by_trial(folder).values()), proc=proc)
    victims = [p for p in _tree(proc.pid) if "ImplicitFunc" in _cmdline(p)]
    assert victims, "no trial worker process found"
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == 3 and all(r["status"] == "finished" for r in rows)
    retried = [r for r in rows if (folder / r["trial_dir"] / "error.txt").is_file()]
    assert len(retried) == 1, "the killed trial should have one recorded failure"
    epochs = _epochs_by_trial(folder)[retried[0]["trial_id"]]
    assert epochs == [1, 2, 3, 4, 5], epochs  # continued from its checkpoint, no epoch trained twice


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("resources,expected", [
    ({"gpu": 0.25}, "the Ray cluster has no GPU"),
    ({"gpu": 2}, "the Ray cluster has no GPU"),
    ({"cpu": 64}, "64 CPUs per trial asked, but the largest node has"),
])
def test_resources_no_node_has_are_refused_before_launch(nsmc_dir, cache_dir, tmp_path, resources, expected):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "greedy", SMALL, resources=resources)
    r = run_cli("run", str(cfg))
    assert r.returncode == 2 and expected in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "results" / "greedy").exists()


def test_gpu_fallback_runs_on_cpu_when_asked(nsmc_dir, cache_dir, tmp_path):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "fallback",
                       {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8]}}},
                       resources={"gpu": 0.5, "gpu_fallback": True})
    r = run_cli("run", str(cfg))
    assert r.returncode == 0 and "running on CPU (gpu_fallback)" in r.stderr, r.stderr[-2000:]


def test_multi_objective_sweep_records_both_objectives_and_the_pareto_front(nsmc_dir, cache_dir, tmp_path):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "pareto", SMALL, objectives="accuracy_and_size")
    r = run_cli("run", str(cfg))
    assert r.returncode == 0, r.stderr[-2000:]
    folder = tmp_path / "results" / "pareto"
    with sqlite3.connect(folder / "optuna.db") as db:
        assert db.execute("select count(distinct objective), count(*) from trial_values").fetchone() == (2, 8)
    front_line = next(ln for ln in (folder / "report.md").read_text().splitlines() if ln.startswith("- Pareto front"))
    smallest = min(pq.read_table(folder / "trials.parquet").to_pylist(), key=lambda row: row["params"])
    assert smallest["trial_id"] in front_line  # the smallest student is always on the front


def test_grid_with_a_continuous_space_is_refused_by_the_cli(nsmc_dir, cache_dir, tmp_path):
    cfg = sweep_config(tmp_path, nsmc_dir, cache_dir, "badgrid",
                       {"parameters": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}})
    r = run_cli("run", str(cfg))
    assert r.returncode == 2 and "grid search needs" in r.stderr
    assert not (tmp_path / "results" / "badgrid").exists()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kd-pwned",))


def test_pickles_that_run_code_are_refused(tmp_path):
    from trainable.io import sha256_file, write_json
    from trainable.loop import load_checkpoint

    Path("/tmp/kd-pwned").unlink(missing_ok=True)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"model": _RunsCode()}, f)
    write_json(ckpt / "meta.json", {"epoch": 1, "sha256": sha256_file(ckpt / "state.pt")})
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ckpt)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"vocab_size": 10, "embedding_dim": 4, "hidden_dim": 4,
                                                     "num_classes": 2, "num_layers": 1, "dropout": 0.0,
                                                     "max_length": 8}))
    (export / "tokenizer.json").write_text("{}")
    with open(export / "student.pt", "wb") as f:
        pickle.dump(_RunsCode(), f)
    r = run_cli("predict", str(export), "text")
    assert r.returncode == 2 and "not a plain state dict" in r.stderr
    assert not Path("/tmp/kd-pwned").exists()


def test_atomic_writes_leave_the_old_file_or_nothing(tmp_path):
    from trainable.io import atomic_path

    target = tmp_path / "trials.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_tensorboard_binds_to_loopback(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: s\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "tensorboard", str(folder), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, seen = time.time() + 60, []
        while time.time() < deadline and not seen:
            out = subprocess.run(["ss", "-lntpH"], capture_output=True, text=True).stdout
            seen = [ln.split()[3] for ln in out.splitlines() if f":{port} " in ln + " "]
            time.sleep(0.5)
        assert seen and all(a.startswith("127.0.0.1:") for a in seen), seen
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="a full disk or read-only mount is simulated with mount(8): needs root")
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_storage_that_fails_mid_sweep_stops_it_loudly_and_resume_finishes_it(nsmc_dir, cache_dir, tmp_path, fault):
    """The results folder fills up (a 64 MB tmpfs, filled to the last byte) or turns read-only (a read-only bind
    mount over it) while trials run: the sweep stops with one line and exit 1, Ray's saved state and the
    checkpoints stay readable, and once the storage is fixed `sweep resume` finishes every trial."""
    from trainable.loop import CheckpointError, load_checkpoint

    store = tmp_path / "store"
    store.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64m", "kd-test", str(store))
    mounts = [store]
    _mount("--make-private", str(store))  # so a mount can be moved within it
    try:
        cfg = small_config(nsmc_dir, cache_dir, store / "results", train={"epochs": 6, "threads": 1},
                           student={"embedding_dim": 16, "hidden_dim": 16})
        cfg["name"] = "storage"
        cfg["sweep"] = {"space": SMALL, "searcher": "grid", "max_concurrent": 2, "scheduler": {"kind": "none"}}
        cfg_path = tmp_path / "storage.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        folder = store / "results" / "storage"
        proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(cfg_path)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: len(list(folder.glob("trial_*/checkpoint_*"))) >= 2, proc=proc)
        if fault == "disk full":
            with open(store / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
        else:
            # Made read-only aside (a remount in place fails while the sweep has files open for writing), then
            # moved over the results folder in one step.
            stage = store / "ro-stage"
            stage.mkdir()
            _mount("--bind", str(store / "results"), str(stage))
            mounts.append(stage)
            _mount("-o", "remount,bind,ro", str(stage))
            _mount("--move", str(stage), str(store / "results"))
            mounts[-1] = store / "results"
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        expected = "no space left on device" if fault == "disk full" else "read-only file system"
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: results_dir: {expected} while writing {folder}"), last
        assert last.endswith(f"sweep resume {folder}"), last

        # Ray's experiment state is whole, no file is half-written; a checkpoint folder whose copy was cut short
        # is refused by its hash check, never loaded; the older ones load.
        for state in folder.glob("experiment_state-*.json"):
            json.loads(state.read_text())
        assert not [p for p in folder.rglob(".*.tmp")]
        loaded = 0
        for ckpt in folder.glob("trial_*/checkpoint_*"):
            try:
                load_checkpoint(ckpt)
                loaded += 1
            except CheckpointError:
                pass
        assert loaded >= 1

        if fault == "disk full":
            (store / "filler").unlink()
        else:
            subprocess.run(["umount", str(mounts.pop())], check=True)
        r = run_cli("resume", str(folder))
        assert r.returncode == 0, r.stderr[-3000:]
        rows = pq.read_table(folder / "trials.parquet").to_pylist()
        assert len(rows) == 4 and {row["status"] for row in rows} == {"finished"}, rows
        for trial, epochs in _epochs_by_trial(folder).items():
            # Continued, nothing trained twice. (Ray's copy of result.json may miss a row or two written just
            # before the failure: the report fills those from the checkpoint's own history.)
            assert epochs == sorted(set(epochs)) and epochs[-1] == 6, (trial, epochs)
        for row in rows:
            assert len(row["val_acc_curve"]) == 6, row
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
