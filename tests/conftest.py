"""Shared fixtures: real NSMC subsets from ../shared/data/nsmc, a tiny scratch teacher trained once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
NSMC = (ROOT.parent / "shared" / "data" / "nsmc").resolve()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(why_not): the test needs root, a tool or a package; `why_not` is None "
                            "when it can run, else the reason it cannot. Skipped on a developer's machine; a failure "
                            "under CI=true, where everything it needs is installed (.ci/run), so it cannot quietly "
                            "drop out of the run")


# The files with the slowest tests, slowest first (by `--durations` of CI runs): they run first, so that no worker is
# left with one of them at the end while the other has nothing to do. pytest-xdist hands whole files to its workers
# in collection order (`--no-loadscope-reorder` in pyproject.toml; its default puts the files with the most tests
# first, which put these last). A file not named here keeps its place after them.
SLOW_FILES_FIRST = ("test_faults.py", "test_tasks.py", "test_faults_storage.py", "test_sweep.py", "test_twins.py",
                    "test_inert.py", "test_multinode.py", "test_task_transformer.py", "test_ray_up.py",
                    "test_gpu_check.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (a stable sort: within a file, as written)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        why_not = mark.args[0] if mark.args else None
        if why_not is not None:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"CI must run this test but cannot: {why_not}", pytrace=False)
            pytest.skip(str(why_not))


@pytest.fixture(scope="session")
def nsmc_dir() -> Path:
    if not (NSMC / "ratings_train.txt").is_file():
        pytest.fail(f"the NSMC corpus is expected at {NSMC} (../shared/data/nsmc beside the checkout)")
    return NSMC


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole run, shared by pytest-xdist's workers (their base folders are siblings), so the
    tiny teacher, its logits and the planner's timings are made once, not once per worker. The cache is
    content-addressed and every file in it is written under a temporary name and renamed: two workers making the
    same entry at once both write it whole, and the last rename wins."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "kd-cache"
    path.mkdir(exist_ok=True)
    return path


def small_config(nsmc_dir: Path, cache_dir: Path, results_dir: Path, **sections) -> dict:
    cfg = {
        "name": "t",
        "data": {"dir": str(nsmc_dir), "download": False, "train_rows": 4000, "test_rows": 1000},
        "tokenizer": {"vocab_size": 2000, "max_length": 48},
        "teacher": {"preset": "tiny", "epochs": 2, "max_length": 48, "vocab_size": 3000, "lr": 5e-4},
        "student": {"embedding_dim": 32, "hidden_dim": 64},
        "train": {"epochs": 2, "batch_size": 64, "threads": 1},
        "cache_dir": str(cache_dir),
        "results_dir": str(results_dir),
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            cfg[section] = {**cfg[section], **values}
        else:
            cfg[section] = values
    return cfg


@pytest.fixture
def make_config(nsmc_dir, cache_dir, tmp_path):
    """Write a small config YAML into tmp_path and return its path."""
    def make(name: str = "config.yaml", **sections) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(small_config(nsmc_dir, cache_dir, tmp_path / "results", **sections)))
        return path
    return make


# A Ray driver that cannot connect (nothing answers, or a token the cluster refuses) retries: about 85 s here with
# Ray's defaults (20 tries and their timeouts), about 4 s with these. Ray reads them when first imported, so they
# go in the environment of a process of its own. Tests of a refusal use them; the refusal itself is the same.
RAY_GIVES_UP_FAST = {"RAY_NUM_REDIS_GET_RETRIES": "1", "RAY_py_gcs_connect_timeout_s": "1",
                     "RAY_gcs_server_request_timeout_seconds": "1", "RAY_gcs_rpc_server_connect_timeout_s": "1"}


def kill_driver(proc) -> None:
    """SIGKILL a sweep driver started with start_new_session=True and every process of its session: what a crash
    of the driver's machine would take down with it. Not only its process group: Ray's raylet starts each worker
    in a process group of its own (same session), and a worker that outlived the driver went on writing its
    checkpoints into the sweep folder while the test read it (CI saw a resumed ASHA's rungs hold an epoch-1 result
    the test's earlier read had not)."""
    import signal
    import time

    deadline = time.time() + 30
    while True:
        members = _live_in_session(proc.pid)
        if not members or time.time() > deadline:
            break
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    proc.wait()
    assert not _live_in_session(proc.pid), f"processes of the killed sweep still run: {_live_in_session(proc.pid)}"


def _live_in_session(sid: int) -> list[int]:
    """The processes of session `sid` that still run (a zombie waiting for its reaper does not)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600):
    """Run the `sweep` CLI as a user would (a fresh process)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(*args: str) -> subprocess.CompletedProcess:
    """The `sweep` CLI's `main` in this process, its output captured: what `run_cli` returns, without a fresh
    interpreter's start-up and Ray's or torch's imports (seconds a call). For commands whose separate process is not
    what the test checks; `run_cli` where it is. A `sweep run` or `resume` here needs the `local_ray` fixture."""
    import contextlib
    import io

    from sweep.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's refusals
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["sweep", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def prepared(nsmc_dir, cache_dir, tmp_path_factory):
    """(config, Prepared) for the small config: corpus, encodings, tiny teacher and its logits, made once."""
    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    cfg = ExperimentConfig.model_validate(small_config(nsmc_dir, cache_dir, tmp_path_factory.mktemp("r")))
    return cfg, prepare(cfg, lambda msg: None)


@pytest.fixture(scope="session")
def local_ray():
    """The local Ray node that `sweep run` starts (sweep.tuner.init_ray: 127.0.0.1 only), started once in this test
    process and shared by the sweeps that run in it (`run_main`): `sweep run` finds Ray started and uses it, as the
    GPU check's driver does for its sweeps (bench/gpu_check.py). Each sweep would otherwise start and stop a Ray of
    its own, about 5 s and 3 CPU-seconds. Its CPUs and GPUs as Ray counts them. The sweeps whose test is about the
    process (the sockets its Ray opens, a SIGKILL, Ctrl-C, a full disk, a move) run the CLI in a process of their
    own (`run_cli`, Popen), with a Ray of their own."""
    import ray

    from sweep.tuner import init_ray

    assert not ray.is_initialized()
    init_ray(None, False, lambda msg: None)
    try:
        res = ray.cluster_resources()
        yield {"CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)}
    finally:
        ray.shutdown()
