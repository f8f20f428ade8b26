"""A resumed search after a driver crash, without a sweep: the searcher's state can be newer than Ray's trials
saved beside it. Ray's real search generator, ConcurrencyLimiter and save/restore, Optuna's grid on SQLite."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import small_config

GRID = {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8, 16]},
                       "train.lr": {"type": "categorical", "choices": [0.001, 0.003]}}}


def _generator(cfg, folder: Path):
    """The search `sweep run` makes (tuner.make_searcher), set up as Ray's Tuner sets it up."""
    from ray.tune.experiment import Experiment

    from sweep.config import load_space_for
    from sweep.tuner import make_searcher

    gen = make_searcher(cfg, load_space_for(cfg), folder / "optuna.db", cfg.train.epochs)
    gen.set_search_properties("val_acc", "max", {})
    gen.add_configurations([Experiment(folder.name, lambda config: None, num_samples=4,
                                       storage_path=str(folder.parent))])
    return gen


@pytest.mark.parametrize("twins", [0, 1], ids=["search", "search with finalists"])
def test_a_trial_suggested_after_rays_last_saved_trials_is_suggested_again_on_resume(nsmc_dir, cache_dir, tmp_path,
                                                                                     twins):
    """One trial at a time over a grid of 4. The driver made a second trial and saved the search's state, then died
    before Ray saved that trial: the resumed search offers its parameters (and its Optuna trial) to the next trial
    made, and the grid is covered once. Before, the restored ConcurrencyLimiter held the lost trial as live forever:
    the search suggested nothing and the resumed sweep waited with 0 trials running (CI: a tagger sweep)."""
    import sqlite3

    from sweep.config import load_config
    from sweep.ray_search import resuming

    raw = small_config(nsmc_dir, cache_dir, tmp_path / "results")
    raw["name"] = "g"
    raw["sweep"] = {"space": GRID, "searcher": "grid", "max_concurrent": 1, "scheduler": {"kind": "none"},
                    "twins": twins}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "g.yaml"))[0]
    folder = tmp_path / "results" / "g"
    folder.mkdir(parents=True)

    gen = _generator(cfg, folder)
    first = gen.next_trial()
    assert gen.next_trial() is None  # one at a time
    gen.on_trial_complete(first.trial_id, {"val_acc": 0.6, "best_val_acc": 0.6, "epoch": 2})
    lost = gen.next_trial()
    gen.save_to_dir(str(folder), session_str="2026-12-04_00-00-00")
    # Ray's trials saved at that moment: the first only (its experiment state's format, read by sweep.results).
    (folder / "experiment_state-2026-12-04_00-00-00.json").write_text(json.dumps(
        {"trial_data": [[json.dumps({"trial_id": first.trial_id, "status": "TERMINATED"})]]}))

    with resuming(folder):
        again = _generator(cfg, folder)
        again.restore_from_dir(str(folder))
    made = [again.next_trial()]
    assert made[0] is not None, "the resumed search suggests nothing: it waits for a trial Ray does not have"
    assert made[0].trial_id != lost.trial_id and made[0].evaluated_params == lost.evaluated_params
    for _ in range(2):
        again.on_trial_complete(made[-1].trial_id, {"val_acc": 0.7, "best_val_acc": 0.7, "epoch": 2})
        made.append(again.next_trial())
    grid = [first.evaluated_params] + [t.evaluated_params for t in made]
    assert sorted(json.dumps(p, sort_keys=True) for p in grid) == sorted(
        json.dumps({"student.hidden_dim": h, "train.lr": lr}, sort_keys=True) for h in (8, 16) for lr in (0.001, 0.003))
    again.on_trial_complete(made[-1].trial_id, {"val_acc": 0.7, "best_val_acc": 0.7, "epoch": 2})
    with sqlite3.connect(folder / "optuna.db") as db:
        assert sorted(s for (s,) in db.execute("select state from trials")) == ["COMPLETE"] * 4  # none RUNNING


def test_a_finalists_extra_trial_lost_with_the_driver_is_issued_again():
    """The same for a finalist's rerun or twin (FinalistSearch): the extra trial Ray does not restore goes back to
    the front of the queue, the next trial made is it (same role, finalist and seed), and none is issued twice."""
    from test_twins import _generator

    from sweep.ray_search import OF, ROLE, forget_unrestored

    gen = _generator(max_concurrent=2)
    fs = gen.searcher
    search = ["s1", "s2", "s3"]
    assert fs.suggest("s1") and fs.suggest("s2")
    for i, tid in enumerate(search):
        if tid == "s3":
            assert fs.suggest("s3")
        fs.on_trial_complete(tid, {"epoch": 2, "best_val_acc": 0.7 + i / 10})
    kept, lost = fs.suggest("e1"), fs.suggest("e2")
    assert fs.suggest("e3") is None  # 2 extra trials at a time
    assert forget_unrestored(fs, set(search) | {"e1"}) == 1
    again = fs.suggest("e4")
    assert again == lost and again != kept and (again[ROLE], again[OF]) == (lost[ROLE], lost[OF])
    assert fs.suggest("e5") is None  # e1 and e4 live: still 2 at a time
    issued = [fs.roles[t] for t in ("e1", "e4")] + [(q[ROLE], q[OF]) for q in fs.queue]
    assert "e2" not in fs.roles and len(issued) == len(fs.planned)
