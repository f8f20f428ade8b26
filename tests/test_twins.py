"""KD gain measured, never assumed: after the search, the best finished trials (finalists) are rerun with more
seeds and each gets a no-teacher twin (train.alpha 1, everything else the same), as trials of the same Ray
experiment. Unit tests of the selection, the searcher's saved state and the gain arithmetic (no Ray cluster), then a
real small sweep, and a driver SIGKILLed while finalist trials run, then resumed."""
from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, kill_driver, run_main, small_config
from trainable.tasks.classify import TASK as CLASSIFY

# ----------------------------------------------------------------------------- selection and gain, no Ray


def _done(epoch=2, acc=0.7, error=False):
    return {"error": error, "epoch": epoch, "best_val_acc": acc}


def test_finalists_are_the_best_finished_search_trials_with_reruns_and_twins():
    from sweep.ray_search import OF, ROLE, finalist_trials

    done = {"failed": _done(acc=0.99, error=True), "stopped": _done(epoch=1, acc=0.95), "nan": _done(acc=math.nan),
            "a": _done(acc=0.80), "b": _done(acc=0.85), "c": _done(acc=0.75), "notchr": _done(acc=0.82)}
    configs = {t: {"student.hidden_dim": 16, "train.alpha": 0.3} for t in done}
    configs["notchr"] = {"student.hidden_dim": 32, "train.alpha": 1.0}  # already no teacher: no twin
    configs["a"]["train.seed"] = 100  # a searched seed is the finalist's first seed
    extra = finalist_trials(done, configs, twins=3, seeds=2, twin=CLASSIFY.twin,
                            base={"train.alpha": 0.5}, base_seed=7, max_epochs=2)
    got = [(e[OF], e[ROLE], e["train.seed"], e["train.alpha"]) for e in extra]
    assert got == [("b", "rerun", 8, 0.3), ("b", "twin", 7, 1.0), ("b", "twin", 8, 1.0),
                   ("notchr", "rerun", 8, 1.0),
                   ("a", "rerun", 101, 0.3), ("a", "twin", 100, 1.0), ("a", "twin", 101, 1.0)]
    assert all(e["student.hidden_dim"] == configs[e[OF]]["student.hidden_dim"] for e in extra)
    # One seed: only the twins; no finalist at all when nothing finished.
    one = finalist_trials(done, configs, twins=1, seeds=1, twin=CLASSIFY.twin,
                          base={"train.alpha": 0.5}, base_seed=7, max_epochs=2)
    assert [(e[OF], e[ROLE], e["train.seed"]) for e in one] == [("b", "twin", 7)]
    assert finalist_trials({"x": _done(epoch=1)}, {"x": {}}, twins=3, seeds=2,
                           twin=CLASSIFY.twin, base={"train.alpha": 0.5}, base_seed=7,
                           max_epochs=2) == []


def _counting_searcher():
    """A stand-in for the Optuna searcher: numbered configs; records which trials it is told about."""
    from ray.tune.search import Searcher

    class Counting(Searcher):
        def __init__(self):
            super().__init__(metric="val_acc", mode="max")
            self.n, self.told = 0, []

        def suggest(self, trial_id):
            self.n += 1
            return {"student.hidden_dim": 8 * self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            self.told.append(trial_id)

        def save(self, path):
            Path(path).write_bytes(pickle.dumps((self.n, self.told)))

        def restore(self, path):
            self.n, self.told = pickle.loads(Path(path).read_bytes())

    return Counting()


def _generator(max_concurrent=2):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.search_generator import SearchGenerator

    from sweep.ray_search import FinalistSearch

    inner = ConcurrencyLimiter(_counting_searcher(), max_concurrent=max_concurrent)
    return SearchGenerator(FinalistSearch(inner, num_search=3, twins=2, seeds=2, twin=CLASSIFY.twin,
                                          base={"train.alpha": 0.5}, base_seed=0,
                                          max_epochs=2, max_concurrent=max_concurrent))


def test_finalist_search_waits_for_the_search_then_issues_each_extra_trial_once_across_a_restore(tmp_path):
    from ray.tune.search import Searcher

    from sweep.ray_search import ROLE

    gen = _generator()
    fs = gen.searcher
    issued = {}

    def suggest(g, tid):
        cfg = g.searcher.suggest(tid)
        if isinstance(cfg, dict):
            issued[tid] = cfg
        return cfg

    assert suggest(gen, "s1") and suggest(gen, "s2") and suggest(gen, "s3") is None  # 2 at a time
    fs.on_trial_complete("s1", {"epoch": 2, "best_val_acc": 0.8})
    assert suggest(gen, "s3")
    assert suggest(gen, "w1") is None  # the search is not over: wait, do not finish
    fs.on_trial_complete("s2", {"epoch": 2, "best_val_acc": 0.9})
    fs.on_trial_complete("s3", {"epoch": 1, "best_val_acc": 0.95})  # stopped early: not a finalist
    assert fs.searcher.searcher.told == ["s1", "s2", "s3"]
    e1, e2 = suggest(gen, "e1"), suggest(gen, "e2")
    assert suggest(gen, "e3") is None  # max_concurrent extra trials at a time
    fs.on_trial_result("e1", {"val_acc": 0.5})
    fs.on_trial_complete("e1", {"epoch": 2, "best_val_acc": 0.5})
    assert fs.searcher.searcher.told == ["s1", "s2", "s3"]  # the searcher never hears of the extra trials

    # Ray saves the searcher with its experiment state; a resumed sweep restores it into a fresh one.
    gen.save_to_dir(str(tmp_path), session_str="x")
    resumed = _generator()
    resumed.restore_from_dir(str(tmp_path))
    rest = [suggest(resumed, "r1")]
    resumed.searcher.on_trial_complete("e2", {"epoch": 2})
    resumed.searcher.on_trial_complete("r1", {"epoch": 2})
    while True:
        cfg = suggest(resumed, f"r{len(rest) + 1}")
        if cfg == Searcher.FINISHED:
            break
        assert cfg is not None
        rest.append(cfg)
        resumed.searcher.on_trial_complete(f"r{len(rest)}", {"epoch": 2})
    extras = [e1, e2, *rest]
    keys = sorted((c["kd_of"], c[ROLE], c["train.seed"]) for c in extras)
    assert keys == [("s1", "rerun", 1), ("s1", "twin", 0), ("s1", "twin", 1),
                    ("s2", "rerun", 1), ("s2", "twin", 0), ("s2", "twin", 1)]  # none lost, none twice
    assert all(c["train.alpha"] == 1.0 for c in extras if c[ROLE] == "twin")
    assert all("train.alpha" not in c for c in extras if c[ROLE] == "rerun")


def test_asha_never_stops_a_rerun_or_twin_and_keeps_them_out_of_its_rungs(tmp_path):
    from types import SimpleNamespace

    from sweep.ray_scheduler import ResumableASHA

    def trial(tid, **config):
        return SimpleNamespace(trial_id=tid, config=config)

    # A twin recorded by an earlier driver: the replay after a restart must not put it in the rungs either.
    (tmp_path / "trial_t0").mkdir()
    (tmp_path / "trial_t0" / "params.json").write_text(json.dumps({"kd_role": "twin", "kd_of": "s1"}))
    (tmp_path / "trial_t0" / "result.json").write_text(json.dumps({"trial_id": "t0", "epoch": 1, "val_acc": 0.9}))
    asha = ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=4, grace_period=1,
                         reduction_factor=2, experiment_dir=str(tmp_path))
    for t in (trial("s1"), trial("s2"), trial("tw", kd_role="twin", kd_of="s1")):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, trial("s1"), {"epoch": 1, "val_acc": 0.8}) == "CONTINUE"
    assert asha.on_trial_result(None, trial("s2"), {"epoch": 1, "val_acc": 0.7}) == "STOP"
    assert asha.on_trial_result(None, trial("tw", kd_role="twin"), {"epoch": 1, "val_acc": 0.1}) == "CONTINUE"
    asha.on_trial_complete(None, trial("tw", kd_role="twin"), {"epoch": 4, "val_acc": 0.1})
    rung1 = dict(asha._brackets[0]._rungs[-1][1])
    assert rung1 == {"s1": 0.8, "s2": 0.7}  # neither the live twin nor the replayed one


def test_report_finalists_and_kd_gain_arithmetic():
    from sweep.config import validate
    from sweep.report import finalists, kd_gain, mean_std

    m, s = mean_std([0.80, 0.84])
    assert m == pytest.approx(0.82) and s == pytest.approx(math.sqrt(0.0008))
    gain, se = kd_gain([0.80, 0.84], [0.78, 0.78])
    assert gain == pytest.approx(0.04) and se == pytest.approx(math.sqrt(0.0008 / 2))
    assert kd_gain([0.8], [0.7]) == (pytest.approx(0.1), 0.0)

    cfg = validate({"train": {"epochs": 2, "alpha": 0.5}, "sweep": {"twins": 2, "finalist_seeds": 2}}, "t")

    def row(tid, acc, test, role="search", of=None, status="finished", **hp):
        return {"trial_id": tid, "best_val_acc": acc, "test_acc": test, "kd_role": role, "kd_of": of,
                "status": status, **{f"hp.{k}": v for k, v in hp.items()}}

    rows = [row("a", 0.90, 0.80), row("a2", None, 0.84, "rerun", "a"), row("at1", None, 0.78, "twin", "a"),
            row("at2", None, 0.78, "twin", "a"),
            row("b", 0.95, 0.85, **{"train.alpha": 1.0}), row("b2", None, 0.83, "rerun", "b", **{"train.alpha": 1.0}),
            row("c", 0.99, 0.9, status="stopped_early"), row("d", 0.7, 0.7)]
    fin = finalists(rows, cfg)
    assert [e["trial_id"] for e in fin] == ["b", "a"]
    b, a = fin
    assert b["no_teacher"] and b["gain"] is None and not b["pending"] and b["acc"] == [0.85, 0.83]
    assert a["acc"] == [0.80, 0.84] and a["twin_acc"] == [0.78, 0.78] and not a["pending"]
    assert a["gain"][0] == pytest.approx(0.04) and a["gain"][1] == pytest.approx(math.sqrt(0.0004))
    rows[3]["status"] = "failed"  # a twin that failed counts as missing, not as a zero
    a = finalists(rows, cfg)[1]
    assert a["twin_acc"] == [0.78] and a["pending"]
    assert finalists([r for r in rows if r["kd_role"] == "search"], cfg) == []  # a sweep from before twins


# ----------------------------------------------------------------------------- real sweeps

SPACE = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [16, 24]},
                        "train.alpha": {"type": "categorical", "choices": [0.2, 0.5]}}}  # a grid: 4 distinct trials


def _config(tmp: Path, nsmc_dir, cache_dir, name: str, epochs: int = 2, **sweep) -> Path:
    cfg = small_config(nsmc_dir, cache_dir, tmp / "results", train={"epochs": epochs, "threads": 1},
                       student={"embedding_dim": 16, "hidden_dim": 16})
    cfg["name"] = name
    cfg["sweep"] = {"space": SPACE, "searcher": "grid", "seed": 0, "max_concurrent": 2,
                    "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
                    "resources": {"cpu": 1}, "twins": 2, "finalist_seeds": 2, **sweep}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _epochs(folder: Path, trial_id: str) -> list[int]:
    rfile = folder / f"trial_{trial_id}" / "result.json"
    return [json.loads(ln)["epoch"] for ln in rfile.read_text().splitlines() if ln.strip()]


def _check_finalist_trials(folder: Path, epochs: int, twins: int) -> list[dict]:
    """The `twins` best finished search trials are the finalists; each has its rerun (seed 1) and two twins (seeds
    0 and 1) with the right configs, each run to the end exactly once."""
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    search = [r for r in rows if r["kd_role"] == "search"]
    extra = [r for r in rows if r["kd_role"] != "search"]
    assert len(search) == 4
    finished = sorted((r for r in search if r["status"] == "finished"), key=lambda r: (-r["best_val_acc"], r["trial_id"]))
    finalists = [r["trial_id"] for r in finished[:twins]]
    by_id = {r["trial_id"]: r for r in search}
    assert sorted({r["kd_of"] for r in extra}) == sorted(finalists)
    keys = sorted((r["kd_of"], r["kd_role"], r["hp.train.seed"]) for r in extra)
    assert keys == sorted((f, role, seed) for f in finalists
                          for role, seed in (("rerun", 1), ("twin", 0), ("twin", 1))), keys  # none twice
    for r in extra:
        f = by_id[r["kd_of"]]
        assert r["status"] == "finished" and not r["stopped_early"] and r["epochs"] == epochs, r
        # No epoch trained twice. After a driver crash result.json can lack rows (the trial went on, or the driver
        # died before writing them; the resumed trial starts after its newest checkpoint); the report takes those
        # from the checkpoint's history.
        recorded = _epochs(folder, r["trial_id"])
        assert recorded == sorted(set(recorded)) and len(r["val_acc_curve"]) == epochs, r
        assert r["hp.train.alpha"] == (1.0 if r["kd_role"] == "twin" else f["hp.train.alpha"])
        assert r["hp.student.hidden_dim"] == f["hp.student.hidden_dim"]
    # The searcher's decisions file says the same, also after a driver crash and a resume (Ray copies the folder's
    # JSON files down and back up: a file written beside them lost the trials issued after the resume).
    decisions = json.loads((folder / "finalists.json").read_text())
    assert decisions["finalists"] == finalists
    assert decisions["trials"] == {r["trial_id"]: {"role": r["kd_role"], "of": r["kd_of"]} for r in extra}
    return rows


def _finalist_table(report: str) -> dict[str, dict[str, str]]:
    """The report's finalists table: finalist -> column title -> cell."""
    lines = report.split("## Finalists and their no-teacher twins")[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "KD gain" in header
    table = {}
    for ln in lines[2:]:
        if not ln.startswith("|"):
            break
        row = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        table[row["Finalist"]] = row
    return table


def _gain_cells(report: str) -> dict[str, str]:
    return {fid: row["KD gain"] for fid, row in _finalist_table(report).items()}


def _check_tensorboard(folder: Path, rows: list[dict]) -> None:
    """What `sweep tensorboard` shows of the finalists: every run named for what it is (number and searched
    parameters; a rerun or twin: of which finalist, which seed), each finalist's run holding its KD gain (a
    fraction of accuracy, once, at its last epoch) as TensorBoard reads it, no other run one, and the HParams
    table listing `kd/gain` among its metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    def number(trial_id: str) -> str:
        return f"{int(trial_id.rsplit('_', 1)[1]):03d}"

    names = {r["trial_id"]: (f"{number(r['trial_id'])} hidden_dim={r['hp.student.hidden_dim']} "
                             f"alpha={r['hp.train.alpha']:.3g}" if r["kd_role"] == "search" else
                             f"{number(r['trial_id'])} {r['kd_role']} of {number(r['kd_of'])} "
                             f"seed={r['hp.train.seed']}" + (" (no teacher)" if r["kd_role"] == "twin" else ""))
             for r in rows}
    assert {p.name for p in (folder / "tb").iterdir()} == set(names.values()) | {"hparams"}
    hp = EventAccumulator(str(folder / "tb" / "hparams"))
    hp.Reload()
    experiment = metadata.parse_experiment_plugin_data(hp.summary_metadata[metadata.EXPERIMENT_TAG].plugin_data.content)
    assert "kd/gain" in [m.name.tag for m in experiment.metric_infos]
    finalists = {r["kd_of"] for r in rows if r["kd_of"]}
    for r in rows:
        acc = EventAccumulator(str(folder / "tb" / names[r["trial_id"]]))
        acc.Reload()
        if r["trial_id"] not in finalists:
            assert "kd/gain" not in acc.Tags()["scalars"], names[r["trial_id"]]
            continue
        runs = [x["test_acc"] for x in rows if x["trial_id"] == r["trial_id"]
                or (x["kd_of"] == r["trial_id"] and x["kd_role"] == "rerun")]
        twins = [x["test_acc"] for x in rows if x["kd_of"] == r["trial_id"] and x["kd_role"] == "twin"]
        points = acc.Scalars("kd/gain")
        assert [p.step for p in points] == [r["epochs"]], points
        assert points[0].value == pytest.approx(sum(runs) / len(runs) - sum(twins) / len(twins), abs=1e-6)


@pytest.mark.slow
def test_sweep_trains_finalist_reruns_and_twins_and_reports_the_kd_gain(nsmc_dir, cache_dir, tmp_path, local_ray):
    cfg = _config(tmp_path, nsmc_dir, cache_dir, "twins")
    r = run_main("run", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 search trials" in r.stderr and "then up to 6 finalist trials" in r.stderr
    folder = tmp_path / "results" / "twins"
    rows = _check_finalist_trials(folder, epochs=2, twins=2)
    report = (folder / "report.md").read_text()
    cells = _gain_cells(report)
    # The table's parameter columns are the task's (Task.finalist_columns), each the finalist's own value.
    from sweep.config import load_config
    from sweep.report import _resolved, fmt_number

    stamped, by_id = load_config(folder / "config.yaml")[0], {r["trial_id"]: r for r in rows}
    for fid, row in _finalist_table(report).items():
        assert list(row)[1:1 + len(CLASSIFY.finalist_columns)] == list(CLASSIFY.finalist_columns)
        assert all(row[t] == fmt_number(_resolved(stamped, by_id[fid], k))
                   for t, k in CLASSIFY.finalist_columns.items()), row
    for fid in {r["kd_of"] for r in rows if r["kd_of"]}:
        runs = [r["test_acc"] for r in rows if r["trial_id"] == fid or (r["kd_of"] == fid and r["kd_role"] == "rerun")]
        twins = [r["test_acc"] for r in rows if r["kd_of"] == fid and r["kd_role"] == "twin"]
        assert len(runs) == len(twins) == 2
        gain = 100 * (sum(runs) / 2 - sum(twins) / 2)
        assert cells[fid].startswith(f"{gain:+.2f} pt ±"), (cells[fid], gain)
    _check_tensorboard(folder, rows)
    again = run_main("report", str(folder))  # builds the report again: the KD gain is not written twice
    assert again.returncode == 0, again.stderr[-3000:]
    _check_tensorboard(folder, rows)
    best = next(ln for ln in report.splitlines() if ln.startswith("- best:"))
    assert not any(r["trial_id"] in best for r in rows if r["kd_role"] != "search")  # a twin is never the best
    # The search trials alone went to Optuna.
    import sqlite3

    with sqlite3.connect(folder / "optuna.db") as db:
        assert db.execute("select count(*) from trials").fetchone() == (4,)


def _newest_epoch(folder: Path, trial_dir: Path) -> int:
    return max((json.loads(m.read_text())["epoch"] for m in trial_dir.glob("checkpoint_*/meta.json")), default=0)


def _roles(folder: Path) -> dict[Path, str]:
    out = {}
    for params in folder.glob("trial_*/params.json"):
        try:
            out[params.parent] = json.loads(params.read_text()).get("kd_role", "search")
        except (OSError, ValueError):
            pass
    return out


@pytest.mark.slow
def test_sigkilled_driver_during_finalist_trials_resumes_them_once(nsmc_dir, cache_dir, tmp_path, local_ray,
                                                                   monkeypatch):
    epochs = 3
    cfg = _config(tmp_path, nsmc_dir, cache_dir, "killed", epochs=epochs, twins=1)
    folder = tmp_path / "results" / "killed"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline:  # a finalist trial half-way: it has a checkpoint, and more epochs to go
        if any(role != "search" and 1 <= _newest_epoch(folder, d) < epochs for d, role in _roles(folder).items()):
            break
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.3)
    else:
        raise AssertionError("no finalist trial started")
    time.sleep(1.0)  # let Ray's state snapshot see the running finalist trials
    kill_driver(proc)
    search_before = {d.name: _epochs(folder, d.name.removeprefix("trial_"))
                     for d, role in _roles(folder).items() if role == "search"}
    for d in folder.glob("trial_*"):  # no checkpoint folder Ray made is gone, so none its saved state names is
        made = sorted(int(c.name.removeprefix("checkpoint_")) for c in d.glob("checkpoint_*"))
        assert made == list(range(len(made))), (d.name, made)

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    r = run_main("resume", str(folder))  # in this process, on its local Ray: the killed driver left nothing here
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _check_finalist_trials(folder, epochs=epochs, twins=1)  # one finalist: a rerun, two twins, none twice
    assert len(rows) == 7
    search = {r["trial_dir"] for r in rows if r["kd_role"] == "search"}
    assert search == set(search_before)
    for d, epochs_before in search_before.items():
        assert _epochs(folder, d.removeprefix("trial_")) == epochs_before  # kept, none trained again
