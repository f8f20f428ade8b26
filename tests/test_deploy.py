"""Deployment on one real tiny multi-objective sweep (4 students, no teacher): `sweep export --trial` (by Ray trial
id and by Optuna trial number) and `--pareto` export what they say, checked by `sweep evaluate` of the exported
folders on the sweep's own test rows against each trial's recorded test accuracy."""
from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import run_main, small_config

# Four students of different sizes, so the front (accuracy up, parameters down) has a choice to make.
GRID = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8, 32]},
                       "student.embedding_dim": {"type": "categorical", "choices": [8, 32]}}}


@pytest.fixture(scope="module")
def deploy_sweep(nsmc_dir, cache_dir, tmp_path_factory, local_ray):
    tmp = tmp_path_factory.mktemp("deploy")
    cfg = small_config(nsmc_dir, cache_dir, tmp / "results", train={"epochs": 2, "threads": 1, "alpha": 1.0, "lr": 0.01},
                       data={"train_rows": 1500, "test_rows": 500})
    cfg["name"] = "deploy"
    cfg["sweep"] = {"space": GRID, "searcher": "grid", "objectives": "accuracy_and_size", "max_concurrent": 2,
                    "scheduler": {"kind": "none"}, "twins": 0, "resources": {"cpu": 1}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    r = run_main("run", str(tmp / "sweep.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp / "results" / "deploy"
    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["finished"] * 4, rows
    return {"folder": folder, "tmp": tmp, "rows": {row["trial_id"]: row for row in rows}, "cfg": cfg}


@pytest.fixture(scope="module")
def test_rows_tsv(deploy_sweep):
    """The sweep's own test rows (its data settings, re-read from the corpus), as a TSV for `sweep evaluate`."""
    from trainable.config import DataConfig
    from trainable.data import load_corpus

    test = load_corpus(DataConfig(**deploy_sweep["cfg"]["data"]), lambda msg: None, download=False,
                       transfer_rows=0).test
    path = deploy_sweep["tmp"] / "test_rows.tsv"
    path.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{t}\t{y}\n" for i, (t, y) in
                                                       enumerate(zip(test.texts, test.labels))), encoding="utf-8")
    return path, len(test)


def _right(model_dir: Path, tsv: tuple[Path, int]) -> int:
    """How many of the test rows the exported student labels right (`sweep evaluate`)."""
    from sweep.tools import evaluate

    result = evaluate(model_dir, tsv[0], "document", "label")
    assert result["rows"] == tsv[1]
    return round(result["accuracy"] * tsv[1])


def test_export_trial_by_ray_id_and_by_optuna_number(deploy_sweep, test_rows_tsv, tmp_path):
    from sweep.cli import main

    rows = deploy_sweep["rows"]
    best = max(rows.values(), key=lambda r: r["best_val_acc"])
    others = sorted((r for r in rows.values() if r["trial_id"] != best["trial_id"]), key=lambda r: r["params"])
    by_id, by_number = others[0], others[-1]  # two trials that are not the best, of different sizes
    assert by_number["optuna_number"] is not None
    for row, which in ((by_id, by_id["trial_id"]), (by_number, str(by_number["optuna_number"]))):
        out = tmp_path / f"t{which}"
        assert main(["export", str(deploy_sweep["folder"]), "--trial", which, "--out", str(out)]) == 0
        meta = json.loads((out / "config.json").read_text())
        assert (meta["trial_id"], meta["optuna_number"]) == (row["trial_id"], row["optuna_number"])
        assert (meta["hidden_dim"], meta["embedding_dim"]) == (row["hp.student.hidden_dim"],
                                                               row["hp.student.embedding_dim"])
        assert _right(out, test_rows_tsv) == round(row["test_acc"] * test_rows_tsv[1])  # (recorded as float32)


def test_unknown_trial_is_one_line_exit_2_and_creates_nothing(deploy_sweep, tmp_path, capsys):
    from sweep.cli import main

    for which in ("nosuchtrial", "999"):
        out = tmp_path / f"out_{which}"
        assert main(["export", str(deploy_sweep["folder"]), "--trial", which, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--trial {which}: no such trial" in err[0], err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pareto_export_holds_every_front_member_with_its_own_student(deploy_sweep, test_rows_tsv, tmp_path):
    from sweep.cli import main

    rows = list(deploy_sweep["rows"].values())
    # The front recomputed here: no other trial is as accurate and as small, and better on one of the two.
    dominated = lambda a, b: (b["best_val_acc"] >= a["best_val_acc"] and b["params"] <= a["params"]  # noqa: E731
                              and (b["best_val_acc"], b["params"]) != (a["best_val_acc"], a["params"]))
    expected = {a["trial_id"] for a in rows if not any(dominated(a, b) for b in rows)}
    out = tmp_path / "front"
    assert main(["export", str(deploy_sweep["folder"]), "--pareto", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    members = index["members"]
    assert len(expected) >= 2, rows  # a front of one would not show that every member is exported
    assert {m["trial"] for m in members} == expected
    assert sorted(p.name for p in out.iterdir()) == sorted([m["folder"] for m in members] + ["index.json"])
    for m in members:
        row = deploy_sweep["rows"][m["trial"]]
        assert m["values"] == {"best_val_acc": row["best_val_acc"], "params": row["params"]}
        assert json.loads((out / m["folder"] / "config.json").read_text())["trial_id"] == m["trial"]
        assert _right(out / m["folder"], test_rows_tsv) == round(row["test_acc"] * test_rows_tsv[1])
    report = (deploy_sweep["folder"] / "report.md").read_text()
    # The report's front line names the same front; Optuna's study holds both objectives for every trial; the
    # smallest student is always on the front (these checks had a sweep of their own in test_faults.py).
    front_line = next(ln for ln in report.splitlines() if ln.startswith("- Pareto front"))
    assert set(re.findall(r"(\w+) \([0-9.]+, \d+ params\)", front_line)) == expected, front_line
    assert min(rows, key=lambda row: row["params"])["trial_id"] in expected
    with sqlite3.connect(deploy_sweep["folder"] / "optuna.db") as db:
        assert db.execute("select count(distinct objective), count(*) from trial_values").fetchone() == (2, 2 * len(rows))
    assert f"sweep export {deploy_sweep['folder']} --pareto DIR" in report
    assert "--trial ID|NUMBER" in report


def test_every_finished_trial_records_its_serving_cost(deploy_sweep):
    """ms per review (batch 1) and per batch of 64, fp32 and int8, and the exported files' KiB, measured in the trial
    (trainable/cost.py), reach trials.parquet and the report's table."""
    from sweep.report import COST_KEYS

    for row in deploy_sweep["rows"].values():
        assert row["status"] == "finished"
        assert all(isinstance(row.get(k), float) and row[k] > 0 for k in COST_KEYS), row
        assert row["latency_b64_ms"] > row["latency_ms"]  # 64 reviews take longer than one
    small, big = (sorted(deploy_sweep["rows"].values(), key=lambda r: r["params"])[i] for i in (0, -1))
    assert big["export_kb"] > small["export_kb"]
    header = next(ln for ln in (deploy_sweep["folder"] / "report.md").read_text().splitlines()
                  if ln.startswith("| Rank"))
    assert "ms/review" in header and "Export KB" in header
