"""Constraints and the latency objective on one real tiny sweep (4 students, no teacher, a grid): with
`sweep.constraints` the best, the ranking, `sweep export` and the front name feasible trials only, even where an
infeasible one is more accurate; Optuna's study holds each trial's constraint values (what its samplers learn the
feasible region from) and, with `objectives: accuracy_and_latency`, the measured latency as the second objective.
Bad constraints are one line, exit 2, nothing created."""
from __future__ import annotations

import json
import math
import re
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_main, small_config

# The limit splits the grid by embedding size, whatever the tokenizer's real vocabulary V (300 <= V <= 2000):
# embedding 8 is under 18k parameters (70 KiB; V is at most the configured 2000), embedding 64 at least 64 V (75 KiB
# at V = 300).
SIZE_KB = 72.0
LATENCY_MS = 1000.0  # met by every student: its constraint values are stored all the same
GRID = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [4, 8]},
                       "student.embedding_dim": {"type": "categorical", "choices": [8, 64]}}}


@pytest.fixture(scope="module")
def constrained(nsmc_dir, cache_dir, tmp_path_factory, local_ray):
    tmp = tmp_path_factory.mktemp("constrained")
    cfg = small_config(nsmc_dir, cache_dir, tmp / "results", train={"epochs": 2, "threads": 1, "alpha": 1.0, "lr": 0.01},
                       data={"train_rows": 1500, "test_rows": 500})
    cfg["name"] = "constrained"
    cfg["sweep"] = {"space": GRID, "searcher": "grid", "objectives": "accuracy_and_latency", "max_concurrent": 2,
                    "scheduler": {"kind": "none"}, "twins": 0, "resources": {"cpu": 1},
                    "constraints": {"size_kb": SIZE_KB, "latency_ms": LATENCY_MS}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    r = run_main("run", str(tmp / "sweep.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp / "results" / "constrained"
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["finished"] * 4, rows
    return {"folder": folder, "tmp": tmp, "rows": rows, "log": r.stdout + r.stderr}


def _feasible(rows):
    return [r for r in rows if r["size_kb"] <= SIZE_KB and r["latency_ms"] <= LATENCY_MS]


def test_the_best_is_the_best_feasible_trial_even_beside_a_more_accurate_infeasible_one(constrained, tmp_path):
    from sweep.cli import main

    rows = constrained["rows"]
    feasible = _feasible(rows)
    assert {r["hp.student.embedding_dim"] for r in feasible} == {8}, rows  # the limit splits the grid as planned
    assert {r["trial_id"] for r in rows if r["feasible"]} == {r["trial_id"] for r in feasible}
    best = max(feasible, key=lambda r: r["best_val_acc"])
    top = max(rows, key=lambda r: r["best_val_acc"])
    assert top not in feasible, "no infeasible trial beat the feasible ones: the test would show nothing"
    # trials.parquet's ranking: the feasible trials, best first; an infeasible one has no rank.
    assert sorted((r["rank"], r["trial_id"]) for r in feasible) == [
        (i, r["trial_id"]) for i, r in enumerate(sorted(feasible, key=lambda r: -r["best_val_acc"]), 1)]
    assert all(r["rank"] is None for r in rows if r not in feasible)
    report = (constrained["folder"] / "report.md").read_text()
    assert f"- best: trial {best['trial_id']}," in report
    out = tmp_path / "best"
    assert main(["export", str(constrained["folder"]), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["trial_id"] == best["trial_id"]
    assert "best feasible val_acc" in constrained["log"]  # the progress line's best is a feasible one too


def test_optuna_study_holds_every_trials_constraint_values_and_latency_as_its_second_objective(constrained):
    import optuna

    by_id = {r["trial_id"]: r for r in constrained["rows"]}
    study = optuna.load_study(study_name="constrained",
                              storage=f"sqlite:///{constrained['folder'] / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 4
    assert study.metric_names == ["val_acc", "latency_ms"]  # what optuna-dashboard names the objectives
    for t in trials:
        row = by_id[t.user_attrs["ray_trial_id"]]
        assert t.state == optuna.trial.TrialState.COMPLETE
        # how far over each limit, relative to it (<= 0: met), from the trial's own measures
        assert t.constraints.keys() == {"size_kb", "latency_ms"}
        assert math.isclose(t.constraints["size_kb"], row["size_kb"] / SIZE_KB - 1, rel_tol=1e-6)
        assert math.isclose(t.constraints["latency_ms"], row["latency_ms"] / LATENCY_MS - 1, rel_tol=1e-6)
        assert (t.constraints["size_kb"] <= 0) == row["feasible"]
        assert t.values[0] == pytest.approx(row["final_val_acc"]) and t.values[1] == pytest.approx(row["latency_ms"])
    # Optuna's own idea of the front skips the infeasible trials, as the report's does.
    assert {t.user_attrs["ray_trial_id"] for t in study.best_trials} <= {r["trial_id"] for r in _feasible(by_id.values())}


def test_report_counts_the_feasible_trials_names_the_best_infeasible_and_fronts_latency(constrained, tmp_path):
    from sweep.cli import main

    rows = constrained["rows"]
    feasible = _feasible(rows)
    report = (constrained["folder"] / "report.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("- constraints:"))
    top = max((r for r in rows if r not in feasible), key=lambda r: r["best_val_acc"])
    assert line.startswith(f"- constraints: latency_ms <= 1000, size_kb <= 72: {len(feasible)} of 4 search trials "
                           f"feasible; the best infeasible: trial {top['trial_id']}, val_acc "), line
    assert re.search(r"val_acc ([0-9.]+), test_acc [0-9.]+ \(size_kb [0-9.]+ > 72\), ([0-9.]+) val_acc beyond", line)
    assert float(re.search(r"val_acc ([0-9.]+),", line).group(1)) == pytest.approx(top["best_val_acc"], abs=1e-4)
    # The front is (val_acc up, latency_ms down) over the feasible trials; --pareto exports the same members.
    dominated = lambda a, b: (b["best_val_acc"] >= a["best_val_acc"] and b["latency_ms"] <= a["latency_ms"]  # noqa: E731
                              and (b["best_val_acc"], b["latency_ms"]) != (a["best_val_acc"], a["latency_ms"]))
    expected = {a["trial_id"] for a in feasible if not any(dominated(a, b) for b in feasible)}
    front_line = next(ln for ln in report.splitlines() if ln.startswith("- Pareto front"))
    assert "latency_ms down, feasible trials" in front_line, front_line
    assert set(re.findall(r"(\w+) \([0-9.]+, [0-9.e-]+ ms/review\)", front_line)) == expected, front_line
    out = tmp_path / "front"
    assert main(["export", str(constrained["folder"]), "--pareto", str(out)]) == 0
    members = json.loads((out / "index.json").read_text())["members"]
    assert {m["trial"] for m in members} == expected
    assert all(set(m["values"]) == {"best_val_acc", "latency_ms"} for m in members)
    table = [ln for ln in report.splitlines() if ln.startswith("| - |")]
    assert len(table) == 4 - len(feasible) and all("(infeasible: size_kb" in ln for ln in table), table


def test_with_no_feasible_trial_the_report_says_so_and_export_refuses_in_one_line(constrained, tmp_path, capsys):
    from sweep.cli import main

    copy = tmp_path / "results" / "constrained"
    shutil.copytree(constrained["folder"], copy, symlinks=True)
    stamped = yaml.safe_load((copy / "config.yaml").read_text())
    stamped["sweep"]["constraints"] = {"size_kb": 1.0}  # below every student
    stamped["results_dir"] = str(tmp_path / "results")
    (copy / "config.yaml").write_text(yaml.safe_dump(stamped))
    assert main(["report", str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert "- constraints: size_kb <= 1: 0 of 4 search trials feasible; the best infeasible: trial " in report
    assert "- best: none, no search trial meets the constraints" in report and "- best: trial" not in report
    capsys.readouterr()
    for how, expected in ((["--out"], "sweep.constraints: no trial of"), (["--pareto"], "meets sweep.constraints")):
        assert main(["export", str(copy), *how, str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not (tmp_path / "out").exists()
    # Asked for by name, an infeasible trial is exported, with a warning.
    some = constrained["rows"][0]["trial_id"]
    assert main(["export", str(copy), "--trial", some, "--out", str(tmp_path / "named")]) == 0
    assert "warning: trial " + some + " does not meet sweep.constraints (size_kb" in capsys.readouterr().err


def test_finalists_are_the_best_feasible_trials():
    from sweep.counts import is_feasible
    from sweep.ray_search import pick_finalists

    limits = {"latency_ms": 1.0, "export_kb": 200.0}
    results = {"fast": {"latency_ms": 0.5, "export_kb": 150.0, "best_val_acc": 0.80},
               "slow": {"latency_ms": 1.5, "export_kb": 150.0, "best_val_acc": 0.90},
               "big": {"latency_ms": 0.5, "export_kb": 250.0, "best_val_acc": 0.85},
               "unmeasured": {"best_val_acc": 0.95},
               "edge": {"latency_ms": 1.0, "export_kb": 200.0, "best_val_acc": 0.70}}
    done = {tid: {"error": False, "epoch": 2, "best": r["best_val_acc"], "feasible": is_feasible(limits, r)}
            for tid, r in results.items()}
    assert pick_finalists(done, twins=3, max_epochs=2) == ["fast", "edge"]
    assert pick_finalists({t: d for t, d in done.items() if not d["feasible"]}, twins=3, max_epochs=2) == []


@pytest.mark.parametrize("constraints,expected", [
    ({"latency": 1.0}, "sweep.constraints.latency: unknown measure; task classify measures: params, size_kb, "
                       "latency_ms"),
    ({"latency_ms": -1.0}, "sweep.constraints.latency_ms: Input should be greater than 0"),
    ({"size_kb": 0}, "sweep.constraints.size_kb: Input should be greater than 0"),
    ({"latency_ms": "fast"}, "sweep.constraints.latency_ms: Input should be a valid number"),
    ({"latency_ms": True}, "sweep.constraints.latency_ms: Input should be a valid number"),
    ({"latency_ms": float("inf")}, "sweep.constraints.latency_ms: Input should be a finite number"),
    ({"val_acc": 0.9}, "sweep.constraints.val_acc: val_acc is a metric (what the sweep optimizes), not a cost"),
    ([1.0], "sweep.constraints: Input should be a valid dictionary"),
])
def test_bad_constraints_are_one_line_exit_2_and_create_nothing(constraints, expected, make_config, tmp_path, capsys):
    from sweep.cli import main

    path = make_config(sweep={"space": GRID, "constraints": constraints})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith(f"error: {path}: "), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_a_latency_objective_on_a_task_that_measures_no_latency_is_one_line(tmp_path, capsys):
    from sweep.cli import main

    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump({"task": "lm", "sweep": {"objectives": "accuracy_and_latency"}}))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: sweep.objectives: accuracy_and_latency needs latency_ms, which task lm does not measure "
                   f"(it measures: params, size_kb)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.yaml"]


def test_asha_stops_a_trial_that_misses_a_constraint_at_its_first_result(tmp_path):
    """A trial's cost is measured at its first epoch and never changes: under `sweep.constraints`, ASHA stops an
    infeasible search trial there (its epochs go to trials that can be the best) and keeps it out of its rungs, so
    a feasible trial is not stopped for being below a student that could never be shipped; after a restart the
    replay of the folder leaves it out too."""
    import json
    from types import SimpleNamespace

    from sweep.config import validate
    from sweep.tuner import make_scheduler

    cfg = validate({"train": {"epochs": 4}, "sweep": {"scheduler": {"kind": "asha", "grace_period": 1},
                                                      "constraints": {"size_kb": 100.0}}}, "t")
    asha = make_scheduler(cfg, tmp_path)
    small, big = SimpleNamespace(trial_id="small", config={}), SimpleNamespace(trial_id="big", config={})
    for t in (small, big):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, big, {"epoch": 1, "val_acc": 0.9, "size_kb": 140.0}) == "STOP"
    asha.on_trial_complete(None, big, {"epoch": 1, "val_acc": 0.9, "size_kb": 140.0})  # what Ray calls on a stop
    assert asha.on_trial_result(None, small, {"epoch": 1, "val_acc": 0.7, "size_kb": 60.0}) == "CONTINUE"
    assert dict(asha._brackets[0]._rungs[-1][1]) == {"small": 0.7}  # the first rung: the feasible trial alone
    for tid, acc, kb in (("big", 0.9, 140.0), ("small", 0.7, 60.0)):  # the same results, on disk, after a restart
        (tmp_path / f"trial_{tid}").mkdir()
        (tmp_path / f"trial_{tid}" / "params.json").write_text("{}")  # Ray writes it as the trial starts
        (tmp_path / f"trial_{tid}" / "result.json").write_text(
            json.dumps({"trial_id": tid, "epoch": 1, "val_acc": acc, "size_kb": kb}) + "\n")
    resumed = make_scheduler(cfg, tmp_path)
    resumed.on_trial_add(None, SimpleNamespace(trial_id="next", config={}))
    assert dict(resumed._brackets[0]._rungs[-1][1]) == {"small": 0.7}
    unconstrained = make_scheduler(validate({"train": {"epochs": 4}, "sweep": {"scheduler": {"kind": "asha"}}}, "t"),
                                   tmp_path)
    unconstrained.on_trial_add(None, big)
    assert unconstrained.on_trial_result(None, big, {"epoch": 1, "val_acc": 0.7, "size_kb": 140.0}) == "CONTINUE"
