"""The search benchmark's two halves: the table (`bench/search_table.py`: forked runs equal straight ones, a
stopped table resumes without repeating a run) and the replay (`bench/search_replay.py`: its ASHA decides what our
scheduler, Ray's ASHAScheduler, decides; a repetition is deterministic for its seed)."""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


replay_mod = _bench("search_replay")


# ----------------------------------------------------------------------------- ASHA: the replay's rule is Ray's


def _run(decide, rng_seed: int, n_trials: int, max_t: int, workers: int, grace: int, rf: float, tmp_path=None):
    """Drive one scheduler through a simulated sweep: trials take turns at random; values come from a coarse set
    (ties happen, as with accuracies on a fixed validation split). Returns the (trial, epoch, value, stop) log."""
    rng = random.Random(rng_seed)
    curves = {t: [round(rng.uniform(0.5, 0.9) * 500) / 500 for _ in range(max_t)] for t in range(n_trials)}
    if decide == "ray":
        from ray.tune.experiment import Trial
        from ray.tune.schedulers import TrialScheduler

        from sweep.ray_scheduler import ResumableASHA

        sched = ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=max_t, grace_period=grace,
                              reduction_factor=rf, experiment_dir=str(tmp_path))
        trials = {}

        def step(tid, epoch, value):
            if tid not in trials:
                trials[tid] = Trial("__fake", config={}, trial_id=f"t{tid}", stub=True)
                sched.on_trial_add(None, trials[tid])
            result = {"epoch": epoch, "val_acc": value}
            stop = sched.on_trial_result(None, trials[tid], result) == TrialScheduler.STOP
            if stop:  # Ray's controller then completes the trial with its last result (TuneController.stop_trial)
                sched.on_trial_complete(None, trials[tid], result)
            return stop
    else:
        asha = replay_mod.Asha(max_t, grace, rf)

        def step(tid, epoch, value):
            stop = asha.on_result(tid, epoch, value)
            if stop:
                asha.on_complete(tid, epoch, value)
            return stop

    waiting, running, log = list(range(n_trials)), {}, []
    while waiting or running:
        while waiting and len(running) < workers:
            running[waiting.pop(0)] = 0
        tid = rng.choice(sorted(running))
        running[tid] += 1
        epoch = running[tid]
        stop = step(tid, epoch, curves[tid][epoch - 1])
        log.append((tid, epoch, curves[tid][epoch - 1], stop))
        if stop:
            del running[tid]
    return log


@pytest.mark.parametrize("grace,rf,max_t", [(1, 2, 8), (2, 2, 8), (3, 2, 8), (1, 3, 8), (1, 2, 9), (2, 4, 10)])
def test_replay_asha_decides_what_rays_asha_decides(tmp_path, grace, rf, max_t):
    """The same interleaved results (trials start as workers free up, take turns at random, values with ties) to
    our ResumableASHA (Ray's ASHAScheduler) and to the replay's Asha: every stop/continue decision is the same. The
    streams depend on the decisions (a stopped trial frees its worker), so equal logs mean equal decisions all
    along."""
    stops = 0
    for seed in range(12):
        ray_log = _run("ray", seed, 40, max_t, 3, grace, rf, tmp_path)
        replay_log = _run("replay", seed, 40, max_t, 3, grace, rf)
        assert replay_log == ray_log, f"seed {seed}: first difference at " + str(
            next(i for i, (a, b) in enumerate(zip(ray_log, replay_log)) if a != b))
        stops += sum(1 for _, epoch, _, stop in ray_log if stop and epoch < max_t)
    assert stops > 0, "no trial was stopped early: the comparison would not test the rungs"


# ----------------------------------------------------------------------------- the replay


def _table():
    for name in ("search_table.parquet", "search_table.jsonl"):
        path = ROOT / "results" / name
        if path.is_file():
            return replay_mod.Table.load(path, min_seeds=1)
    pytest.fail("results/search_table.parquet (the committed table) is missing")


def test_a_repetition_is_deterministic_for_its_seed_and_differs_between_seeds():
    table = _table()
    method = replay_mod.Method("tpe/asha2")
    a = replay_mod.replay(table, method, 3, cap=0.15)
    b = replay_mod.replay(table, method, 3, cap=0.15)
    c = replay_mod.replay(table, method, 4, cap=0.15)
    assert a == b
    assert a["traj"] != c["traj"]
    assert a["spent"] >= 0.15 * table.grid_epochs
    # Every incumbent is a configuration of the table, and the incumbent only ever improves in validation.
    assert all(tuple(p[2]) in table.runs for p in a["traj"])


def test_grid_without_asha_spends_the_whole_grid_once(tmp_path):
    """The reference: the grid in random order, no stopping, runs every configuration for every epoch; its best is
    the configuration with the best validation accuracy among the seeds the repetition drew."""
    table = _table()
    r = replay_mod.replay(table, replay_mod.Method("grid/none"), 0)
    assert r["spent"] == table.grid_epochs and r["trials"] == len(table.runs)


# ----------------------------------------------------------------------------- the table


def _tiny_table(tmp_path: Path, out: str, *extra: str) -> list[dict]:
    space = tmp_path / "space.yaml"
    space.write_text(
        "parameters:\n"
        "  dims:\n    type: categorical\n    choices:\n"
        "      h16_e16: {student.hidden_dim: 16, student.embedding_dim: 16}\n"
        "  train.alpha: {type: categorical, choices: [0.0, 0.5]}\n"
        "  train.temperature: {type: categorical, choices: [2.0]}\n"
        "  train.step_size: {type: categorical, choices: [1, 5]}\n")
    table = _bench("search_table")
    rc = table.main(["--space", str(space), "--out", str(tmp_path / out), "--seeds", "1", "--workers", "0",
                     "--cache-dir", str(tmp_path / "cache"), "--set", "data.train_rows=700",
                     "--set", "data.test_rows=200", "--set", "data.transfer_rows=200",
                     "--set", "tokenizer.vocab_size=300", "--set", "teacher.source=ngram",
                     "--set", "train.epochs=3", *extra])
    assert rc == 0
    return table.read_lines(tmp_path / out)


def test_forked_runs_equal_runs_trained_from_scratch_and_a_stopped_table_resumes(tmp_path):
    """A run that differs from its job's parent only in step_size continues from the parent's checkpoint at epoch
    `step_size`: its curve must be the one it would have trained alone, epoch for epoch (val and test accuracy,
    loss and learning rate). And a table stopped after its first job resumes with the rest, repeating nothing."""
    first = _tiny_table(tmp_path, "fork.jsonl", "--limit", "1")
    assert len(first) == 2
    forked = _tiny_table(tmp_path, "fork.jsonl")
    straight = _tiny_table(tmp_path, "straight.jsonl", "--no-fork")
    table = _bench("search_table")
    assert len(forked) == len(straight) == 6  # 2 alphas x 2 steps + 2 no-teacher runs (1 seed)
    assert len({table.run_key(r) for r in forked}) == 6
    assert any(r["forked_at"] == 1 for r in forked)
    fields = ("val_acc", "val_loss", "test_acc", "lr", "train_loss")
    by_key = {table.run_key(r): r for r in straight}
    for r in forked:
        twin = by_key[table.run_key(r)]
        assert [[e[f] for f in fields] for e in r["curve"]] == [[e[f] for f in fields] for e in twin["curve"]], r
    assert (tmp_path / "fork.parquet").is_file()
    lr = {r["train.step_size"]: [e["lr"] for e in r["curve"]] for r in forked if r["train.alpha"] == 0.5}
    assert lr[1][1] < lr[1][0] and lr[5][1] == lr[5][0]  # the two step sizes really differ
    assert json.loads(json.dumps(forked[0]["meta"]))["recipe"]["train"]["epochs"] == 3
