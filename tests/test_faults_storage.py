"""Storage faults: the results folder fills up or turns read-only under a running sweep (a tmpfs and a read-only
bind mount: root only). Split from test_faults.py so that the two slowest fault files run on different workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, run_main, small_config
from test_faults import SMALL, _wait_for
from test_sweep import _epochs_by_trial


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@pytest.mark.needs(None if os.geteuid() == 0 else "a full disk or read-only mount is simulated with mount(8): needs root")
def test_storage_probe_names_a_full_or_read_only_results_folder(tmp_path):
    """When a sweep fails with an error whose text names no storage failure (SQLite under a results folder turned
    read-only can say "disk I/O error"), the driver probes the folder: full and read-only are named, a healthy one
    is not."""
    from sweep.tuner import _probe_storage

    assert _probe_storage(tmp_path) is None
    store = tmp_path / "store"
    store.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "kd-probe", str(store))
    try:
        assert _probe_storage(store) is None
        with open(store / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        assert _probe_storage(store) == "no space left on device"
        (store / "filler").unlink()
        _mount("-o", "remount,ro", str(store))
        assert _probe_storage(store) == "read-only file system"
    finally:
        subprocess.run(["umount", str(store)], check=False)


@pytest.mark.needs(None if os.geteuid() == 0 else "a full disk or read-only mount is simulated with mount(8): needs root")
@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_storage_that_fails_mid_sweep_stops_it_loudly_and_resume_finishes_it(nsmc_dir, cache_dir, tmp_path, fault,
                                                                            local_ray):
    """The results folder fills up (a 64 MB tmpfs, filled to the last byte) or turns read-only (a read-only bind
    mount over it) while trials run: the sweep stops with one line and exit 1, Ray's saved state and the
    checkpoints stay readable, and once the storage is fixed `sweep resume` finishes every trial."""
    from trainable.io import dead_siblings
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
        cfg["sweep"] = {"space": SMALL, "searcher": "grid", "max_concurrent": 2, "scheduler": {"kind": "none"},
                        "twins": 0}
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

        # Ray's experiment state exists and is whole, no file is half-written; every checkpoint folder either
        # loads or is refused (hash check, or a file missing), never loaded half-way; at least one loads.
        states = list(folder.glob("experiment_state-*.json"))
        assert states, "Ray's experiment state is missing"
        for state in states:
            json.loads(state.read_text())
        # A temporary file is never left under a final name. On a full disk each is removed at once; on storage
        # that turned read-only under a write it cannot be: it is then a dead writer's, removed by the resume.
        temps = list(folder.rglob(".*.tmp"))
        if fault == "disk full":
            assert not temps, temps
        else:
            assert all(t in dead_siblings(t.parent, "tmp") for t in temps), temps
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
        r = run_main("resume", str(folder))  # in this process, on its local Ray
        assert r.returncode == 0, r.stderr[-3000:]
        rows = pq.read_table(folder / "trials.parquet").to_pylist()
        assert len(rows) == 4 and {row["status"] for row in rows} == {"finished"}, rows
        for trial, epochs in _epochs_by_trial(folder).items():
            # Continued, nothing trained twice. (Ray's copy of result.json may miss a row or two written just
            # before the failure: the report fills those from the checkpoint's own history.)
            assert epochs == sorted(set(epochs)) and epochs[-1] == 6, (trial, epochs)
        for row in rows:
            assert len(row["val_acc_curve"]) == 6, row
        assert not list(folder.rglob(".*.tmp"))
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
