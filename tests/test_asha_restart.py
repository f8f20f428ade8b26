"""ASHA after a driver restart decides what an uninterrupted ASHA decides.

Ray keeps no scheduler state across a restart; `ResumableASHA` rebuilds its rungs from the result rows in the
experiment folder. The check here is on decisions, not on the rebuilt rungs: one simulated sweep is run twice on the
same results, once straight through and once cut at an event (the first scheduler's results are what Ray would have
written to each trial's `result.json`, then a new scheduler starts from that folder, the unfinished trials are added
again as a restored Tuner adds them, and the rest of the results arrive). Every stop/continue after the cut must be
the uninterrupted run's."""
from __future__ import annotations

import json
import random

import pytest


def _events(seed: int, n_trials: int, max_t: int, grace: int, rf: float, tmp_path):
    """The uninterrupted run: trials start in order, two at a time take turns at random, values from a coarse set
    (ties happen). Returns [(trial, epoch, value, decision)] in arrival order."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from sweep.ray_scheduler import ResumableASHA

    rng = random.Random(seed)
    sched = ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=max_t, grace_period=grace,
                          reduction_factor=rf, experiment_dir=str(tmp_path / "empty"))
    waiting, running, log, trials = list(range(n_trials)), {}, [], {}
    while waiting or running:
        while waiting and len(running) < 2:
            tid = waiting.pop(0)
            trials[tid] = Trial("__fake", config={}, trial_id=f"t{tid}", stub=True)
            sched.on_trial_add(None, trials[tid])
            running[tid] = 0
        tid = rng.choice(sorted(running))
        running[tid] += 1
        value = round(rng.uniform(0.5, 0.9) * 100) / 100
        result = {"epoch": running[tid], "val_acc": value, "trial_id": f"t{tid}"}
        decision = sched.on_trial_result(None, trials[tid], result)
        log.append((tid, running[tid], value, decision))
        if decision == TrialScheduler.STOP or running[tid] >= max_t:
            sched.on_trial_complete(None, trials[tid], result)
            del running[tid]
    return log


def _resumed(log, cut: int, max_t: int, grace: int, rf: float, folder, replay: bool = True,
             lost_rows: bool = False):
    """The same results with the driver killed before event `cut`: rows before it are on disk, a new scheduler
    takes the rest. Returns the decisions it makes after the cut. `lost_rows`: each trial's last row before the
    cut never reached its result.json (Ray copies it in the background), but its checkpoint's history has it."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from sweep.ray_scheduler import ResumableASHA
    from trainable.loop import save_checkpoint

    folder.mkdir()
    rows: dict[int, list[dict]] = {}
    for tid, epoch, value, _ in log[:cut]:
        rows.setdefault(tid, []).append({"trial_id": f"t{tid}", "epoch": epoch, "val_acc": value})
    for tid, trial_rows in rows.items():
        d = folder / f"trial_t{tid}"  # as the sweep names trial folders: trial_<Ray's trial id>
        d.mkdir()
        (d / "params.json").write_text("{}")
        kept = trial_rows[:-1] if lost_rows else trial_rows
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in kept))
        if lost_rows:
            save_checkpoint(d / "checkpoint_000000", {"epoch": trial_rows[-1]["epoch"], "history": trial_rows})
    sched = ResumableASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=max_t, grace_period=grace,
                          reduction_factor=rf, experiment_dir=str(folder))
    if not replay:
        sched._replayed = True  # what a scheduler that forgets the rungs (Ray's own after a restart) would do
    trials, out, stopped = {}, [], set()
    for tid, epoch, value, _ in log[cut:]:
        if tid in stopped:  # stopped here but not in the uninterrupted run: its later results never come
            out.append("NEVER RUN")
            continue
        if tid not in trials:  # restored unfinished trials and new ones are added as they come back
            trials[tid] = Trial("__fake", config={}, trial_id=f"t{tid}", stub=True)
            sched.on_trial_add(None, trials[tid])
        result = {"epoch": epoch, "val_acc": value, "trial_id": f"t{tid}"}
        decision = sched.on_trial_result(None, trials[tid], result)
        out.append(decision)
        if decision == TrialScheduler.STOP or epoch >= max_t:
            sched.on_trial_complete(None, trials[tid], result)
            stopped.add(tid)
    return out


@pytest.mark.parametrize("lost_rows", [False, True], ids=["rows", "rows-lost-checkpoint-kept"])
@pytest.mark.parametrize("seed,grace,rf,max_t", [(0, 1, 2, 4), (1, 1, 3, 6), (2, 2, 2, 8)])
def test_resumed_asha_decides_what_an_uninterrupted_one_decides(tmp_path, seed, grace, rf, max_t, lost_rows):
    log = _events(seed, 24, max_t, grace, rf, tmp_path)
    stops = sum(d == "STOP" for *_, d in log)
    assert stops > 5  # the simulated sweep exercises stopping
    for i, cut in enumerate(range(3, len(log) - 1, max(1, len(log) // 7))):
        got = _resumed(log, cut, max_t, grace, rf, tmp_path / f"cut{i}", lost_rows=lost_rows)
        assert got == [d for *_, d in log[cut:]], f"cut at event {cut}"


def test_a_scheduler_that_forgets_its_rungs_decides_otherwise(tmp_path):
    """The check above can fail: without the replay, a restarted ASHA lets trials on that the uninterrupted run
    stopped (Ray's own ASHAScheduler after a restart)."""
    log = _events(0, 24, 4, 1, 2, tmp_path)
    differ = 0
    for i, cut in enumerate(range(3, len(log) - 1, max(1, len(log) // 7))):
        got = _resumed(log, cut, 4, 1, 2, tmp_path / f"cut{i}", replay=False)
        differ += got != [d for *_, d in log[cut:]]
    assert differ > 0
