"""A sweep on a real two-node Ray cluster (each node a host in a network namespace of its own, see netns_cluster.py),
driven by `sweep run --address` from the head's host. Trials run on both nodes; then the worker host dies while a
trial runs there, and the sweep still completes: every trial accounted for, the interrupted trial continued from
its checkpoint on the surviving node rather than started over."""
from __future__ import annotations

import glob
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import RAY_GIVES_UP_FAST, ROOT, small_config
from netns_cluster import NetnsCluster, can_make_namespaces, killpg

_why_not = can_make_namespaces()
pytestmark = pytest.mark.needs(_why_not)

EPOCHS = 5
SPACE = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [64, 80, 96, 112]}}}


def _results(pattern: str) -> dict[str, list[dict]]:
    out = {}
    for f in glob.glob(pattern):
        rows = []
        for ln in Path(f).read_text().splitlines():
            try:
                rows.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
        out[Path(f).parent.name] = rows
    return out


@pytest.fixture(scope="module")
def cluster(nsmc_dir, cache_dir, tmp_path_factory):
    """The worker host sees neither the data, nor the driver's caches, nor the driver's Ray temp dir, nor the
    driver's private folder; it shares only `shared/` with the head."""
    base = tmp_path_factory.mktemp("cluster")
    (base / "private").mkdir()
    with NetnsCluster(base, hidden_from_worker=[nsmc_dir, cache_dir, base / "private"]) as c:
        yield c


def _config(nsmc_dir, cache_dir, results: Path) -> Path:
    cfg = small_config(nsmc_dir, cache_dir, results, train={"epochs": EPOCHS, "threads": 1, "alpha": 0.5},
                       student={"embedding_dim": 32})
    cfg["name"] = "cluster"
    cfg["sweep"] = {"space": SPACE, "searcher": "grid", "max_concurrent": 2, "scheduler": {"kind": "none"}, "twins": 0,
                    "max_failures": 2, "resources": {"cpu": 1}}
    path = results.parent / "cluster.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _connect(cluster, env: dict) -> subprocess.CompletedProcess:
    """A driver on the head's host joining the cluster with `env`; prints CONNECTED and the node count if let in."""
    code = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
            "print('CONNECTED', len([n for n in ray.nodes() if n['Alive']]))" % cluster.address)
    try:
        return subprocess.run(["ip", "netns", "exec", cluster.head_ns, sys.executable, "-c", code], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:  # refused by retrying until it gave up: still not let in
        return subprocess.CompletedProcess(e.cmd, -1, e.stdout or "", e.stderr or "")


def test_the_cluster_refuses_a_driver_with_a_wrong_or_no_token(cluster, tmp_path, nsmc_dir, cache_dir):
    """Token authentication is on for the test cluster, not only configured: a driver with the cluster's token
    joins, one with another token or with none is refused; `sweep run --address` with another token says so in one
    line, exit 2, and makes no sweep folder."""
    ok = _connect(cluster, cluster.env)
    assert ok.returncode == 0 and "CONNECTED 2" in ok.stdout, ok.stderr[-2000:]
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    for env in ({**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}):
        r = _connect(cluster, {**env, **RAY_GIVES_UP_FAST})
        assert r.returncode > 0 and "CONNECTED" not in r.stdout, (r.returncode, r.stdout, r.stderr[-2000:])
        assert "token" in r.stderr.lower(), r.stderr[-2000:]

    cfg_path = _config(nsmc_dir, cache_dir, tmp_path / "results")
    r = subprocess.run(["ip", "netns", "exec", cluster.head_ns, sys.executable, "-m", "sweep.cli", "run",
                        str(cfg_path), "--address", cluster.address], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong), **RAY_GIVES_UP_FAST})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(f"error: sweep.address: cannot connect to the Ray cluster at "
                                                 f"{cluster.address}: ") and "InvalidAuthToken" in last, r.stderr[-2000:]
    assert not (tmp_path / "results" / "cluster").exists()


def test_results_dir_that_a_node_cannot_see_is_refused(cluster, nsmc_dir, cache_dir):
    cfg_path = _config(nsmc_dir, cache_dir, cluster.workdir / "private" / "results")
    driver = cluster.run_in_head([sys.executable, "-m", "sweep.cli", "run", str(cfg_path), "--address",
                                  cluster.address], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"error: results_dir: {cluster.workdir / 'private' / 'results'} cannot be seen from node(s) "
        f"{cluster.worker_ip}; on a cluster it must be a shared filesystem every node mounts (cluster/README.md)")
    assert not (cluster.workdir / "private" / "results" / "cluster").exists()  # nothing left behind


def test_sweep_on_two_nodes_survives_losing_the_worker(cluster, nsmc_dir, cache_dir):
    tmp_path = cluster.workdir
    shared = tmp_path / "shared"  # the cluster's shared filesystem (NFS on a real one)
    cfg_path = _config(nsmc_dir, cache_dir, shared / "results")
    folder = shared / "results" / "cluster"
    assert cluster.alive_nodes() == [cluster.head_ip, cluster.worker_ip]
    with open(tmp_path / "driver.log", "w") as log:
        driver = cluster.run_in_head([sys.executable, "-m", "sweep.cli", "run", str(cfg_path),
                                      "--address", cluster.address], cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT)
        try:
            # Results as the driver receives them (Ray copies them to the shared folder only now and then).
            staged = str(cluster.head_tmp / "session_*" / "artifacts" / "*" / "cluster" / "driver_artifacts"
                         / "*" / "result.json")
            deadline = time.time() + 300
            victim = None
            while victim is None:
                assert time.time() < deadline, "no trial reported from the worker node in time"
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                for trial, rows in _results(staged).items():
                    on_worker = [r for r in rows if r.get("node_ip") == cluster.worker_ip]
                    if on_worker and max(r["epoch"] for r in rows) <= EPOCHS - 3:  # well before its end
                        victim = trial
                        break
                time.sleep(0.1)
            cluster.kill_worker()
            rc = driver.wait(timeout=420)
        finally:
            if driver.poll() is None:
                killpg(driver)
    driver_log = (tmp_path / "driver.log").read_text()
    assert cluster.alive_nodes() == [cluster.head_ip]

    assert rc == 0, driver_log[-4000:]
    rows = {r["trial_dir"]: r for r in pq.read_table(folder / "trials.parquet").to_pylist()}
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"finished"}, rows

    # Trials ran on both nodes.
    nodes = {ip for r in rows.values() for ip in r["nodes"].split(",")}
    assert nodes == {cluster.head_ip, cluster.worker_ip}

    # The interrupted trial: its first epochs on the worker, the rest on the head, no epoch trained twice, as the
    # trial recorded it in shared storage epoch by epoch (Ray's result.json rows from the worker may never have
    # reached storage: the report then fills those epochs from the checkpoint, and their nodes from this record).
    trial = victim
    history = [json.loads(ln) for ln in (folder / trial / "where.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in history]
    assert epochs == list(range(1, EPOCHS + 1)), epochs
    where = [r["node_ip"] for r in history]
    assert where[0] == cluster.worker_ip and where[-1] == cluster.head_ip, where
    assert rows[trial]["epochs"] == EPOCHS
    assert rows[trial]["nodes"] == f"{cluster.worker_ip},{cluster.head_ip}"
    assert "recovered after" in (rows[trial]["warnings"] or ""), rows[trial]
    report = (folder / "report.md").read_text()
    assert f"- nodes: {cluster.head_ip} (" in report and f"{cluster.worker_ip} (" in report

    # What trials wrote from the worker reached the shared folder: TensorBoard events from both hosts, in the one
    # run of the trial (tb/<number> hidden_dim=..., beside Ray's trial folders in the shared sweep folder).
    from sweep.tb import find_run

    assert len(list(find_run(folder, trial.removeprefix("trial_")).glob("events.out.tfevents.*"))) == 2
    for r in rows.values():
        run = find_run(folder, r["trial_id"])
        assert run.parent == folder / "tb" and run.name.endswith(f" hidden_dim={r['hp.student.hidden_dim']}"), run
        assert list(run.glob("events.out.tfevents.*")), r["trial_dir"]

    with sqlite3.connect(folder / "optuna.db") as db:
        states = [s for (s,) in db.execute("select state from trials")]
    assert states == ["COMPLETE"] * 4
