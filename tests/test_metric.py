"""One metric, end to end: the sweep's `sweep.metric` and its mode reach the training loop, so the weights a trial
keeps as "best", the finalists, the report's best trial and `sweep export` all follow it, not val_acc.

Unit tests of fit's best-epoch choice (a scripted job, then `train_student` on synthetic rows), of the finalist
search's choice and the decisions file it writes, of the report reading that file; then a small real sweep with
`sweep.metric: val_loss` whose export is checked against the trials' own per-epoch val_loss."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import run_main, small_config
from trainable.tasks.classify import TASK as CLASSIFY

# ----------------------------------------------------------------------------- fit: the best epoch of its metric

# (val_acc, val_loss) per epoch: accuracy peaks at epoch 2, loss is lowest at epoch 3.
SCRIPT = [(0.60, 0.50), (0.70, 0.60), (0.65, 0.40)]


class Scripted:
    """A job whose epoch e sets its one weight to e and whose validation scores follow `script`."""

    def __init__(self, script=SCRIPT):
        from trainable.loop import Job

        class _Job(Job):
            tb_metrics = ()

            def __init__(self):
                self.model = torch.nn.Linear(1, 1, bias=False)
                self.epoch = 0

            def train_epoch(self, epoch, gen):
                with torch.no_grad():
                    self.model.weight.fill_(float(epoch))
                self.epoch = epoch
                return {"loss": 1.0 / epoch, "samples": 10}

            def evaluate(self, split):
                acc, loss = script[self.epoch - 1]
                return {"acc": acc, "loss": loss} if split == "val" else {"acc": self.epoch / 10, "loss": 0.0}

        self.job = _Job()


@pytest.mark.parametrize("metric, mode, epoch", [("val_acc", "max", 2), ("val_loss", "min", 3)])
def test_fit_keeps_the_best_epoch_of_the_metric_it_is_told(tmp_path, metric, mode, epoch):
    from trainable.loop import fit, load_checkpoint

    r = fit(Scripted().job, epochs=3, metric=metric, mode=mode, params=1, size_kb=0.0, run_dir=tmp_path,
            tb_dir=None, log=lambda m: None)
    assert r.best_epoch == epoch and r.best == SCRIPT[epoch - 1][0 if metric == "val_acc" else 1]
    assert r.test == {"acc": epoch / 10, "loss": 0.0}  # the held-out score of those weights, not the last ones
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == epoch
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch_0003")
    assert state["metric"] == metric and state["best_epoch"] == epoch
    assert state["best_model"]["weight"].item() == epoch
    assert r.history[-1][f"best_{metric}"] == r.best


def test_a_run_resumed_with_another_metric_compares_like_with_like(tmp_path):
    """A checkpoint whose best weights were kept by val_loss, resumed with val_acc (e.g. a sweep started before its
    metric reached the loop): the kept epoch's val_acc is the value to beat, not its val_loss."""
    from trainable.loop import fit

    script = [(0.90, 0.50), (0.60, 0.70), (0.70, 0.80)]
    fit(Scripted(script).job, epochs=2, metric="val_loss", mode="min", params=1, size_kb=0.0, run_dir=tmp_path,
        tb_dir=None, log=lambda m: None)
    said = []
    r = fit(Scripted(script).job, epochs=3, metric="val_acc", mode="max", params=1, size_kb=0.0, run_dir=tmp_path,
            tb_dir=None, resume_from=tmp_path / "checkpoints" / "epoch_0002", log=said.append)
    # Epoch 3's val_acc 0.70 would beat epoch 1's val_loss 0.50; it does not beat epoch 1's val_acc 0.90.
    assert (r.best_epoch, r.best) == (1, 0.90)
    assert any(m.startswith("warning:") and "kept its best weights by val_loss" in m for m in said), said


def _synthetic(seed: int = 1):
    """Random reviews with a weak signal (most positive rows start with token 4); seed 1 makes a run whose
    val_acc peaks at epoch 3 and whose val_loss is lowest at epoch 4."""
    from trainable.data import EncodedData, EncodedSplit

    rng = np.random.default_rng(seed)

    def split(n):
        lens = rng.integers(3, 12, n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        labels = rng.integers(0, 2, n)
        tokens = rng.integers(5, 60, int(offsets[-1]), dtype=np.int32)
        for i in range(n):
            if labels[i] and rng.random() < 0.6:
                tokens[offsets[i]] = 4
        return EncodedSplit(np.arange(n), labels, tokens, offsets)

    return EncodedData(split(256), split(64), split(64), 60, "", "synthetic")


def test_train_student_keeps_the_best_epoch_of_the_metric_it_is_told(tmp_path):
    from trainable.config import StudentConfig, TrainConfig
    from trainable.loop import load_checkpoint, train_student

    student, train = StudentConfig(embedding_dim=8, hidden_dim=8), TrainConfig(epochs=4, lr=0.03, alpha=1.0,
                                                                                threads=1, batch_size=32)
    by_acc = train_student(student, train, _synthetic(), None, log=lambda m: None)  # the default: val_acc, max
    accs, losses = [m["val_acc"] for m in by_acc.history], [m["val_loss"] for m in by_acc.history]
    assert int(np.argmax(accs)) != int(np.argmin(losses)), ("the data must tell the two metrics apart", accs, losses)
    assert by_acc.best_epoch == 1 + int(np.argmax(accs)) and by_acc.val_acc == max(accs)

    by_loss = train_student(student, train, _synthetic(), None, metric="val_loss", mode="min", run_dir=tmp_path,
                            log=lambda m: None)
    assert [m["val_loss"] for m in by_loss.history] == losses  # the same run; only the choice differs
    assert by_loss.best_epoch == 1 + int(np.argmin(losses))
    assert by_loss.metric == "val_loss" and by_loss.best == min(losses)
    assert by_loss.val_acc == accs[by_loss.best_epoch - 1]  # the kept weights' accuracy, not the best accuracy
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch_0004")
    assert state["metric"] == "val_loss" and state["best_epoch"] == by_loss.best_epoch


# ----------------------------------------------------------------------------- finalists: decided once, written


def test_finalist_search_ranks_by_the_sweep_metric_and_writes_its_decisions(tmp_path):
    """The decisions are written with each of Ray's snapshots of the search (into its staging folder, which Ray
    copies to the sweep folder), so the file always agrees with the state a resume restores."""
    from ray.tune.search import Searcher

    from sweep.ray_search import FINALISTS_FILE, FinalistSearch, FolderSearchGenerator

    class Numbered(Searcher):
        def __init__(self):
            super().__init__(metric="val_loss", mode="min")
            self.n = 0

        def suggest(self, trial_id):
            self.n += 1
            return {"student.hidden_dim": 8 * self.n}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

        def save(self, path):
            Path(path).write_text(str(self.n))

        def restore(self, path):
            self.n = int(Path(path).read_text())

    def generator():
        return FolderSearchGenerator(FinalistSearch(Numbered(), num_search=3, twins=1, seeds=2, twin=CLASSIFY.twin,
                                                    base={"train.alpha": 1.0}, base_seed=0, max_epochs=2, max_concurrent=2))

    gen, staged = generator(), tmp_path / "staging"
    staged.mkdir()
    fs = gen.searcher
    for tid in ("s1", "s2", "s3"):
        assert fs.suggest(tid)
    # s1 has the best accuracy, s2 the lowest loss; s3 stopped early (lower still) and is no candidate.
    fs.on_trial_complete("s1", {"epoch": 2, "best_val_loss": 0.50, "best_val_acc": 0.90})
    fs.on_trial_complete("s2", {"epoch": 2, "best_val_loss": 0.40, "best_val_acc": 0.80})
    fs.on_trial_complete("s3", {"epoch": 1, "best_val_loss": 0.30, "best_val_acc": 0.95})
    gen.save_to_dir(str(staged), session_str="x")
    assert not (staged / FINALISTS_FILE).exists()  # not decided before the search is over
    rerun = fs.suggest("e1")
    assert rerun["kd_of"] == "s2" and rerun["kd_role"] == "rerun"  # alpha 1: no twin, one rerun
    assert fs.suggest("e2") == Searcher.FINISHED
    gen.save_to_dir(str(staged), session_str="x")
    decisions = json.loads((staged / FINALISTS_FILE).read_text())
    assert decisions["metric"] == "val_loss" and decisions["mode"] == "min"
    assert decisions["finalists"] == ["s2"] and decisions["search_trials"] == 3
    assert decisions["trials"] == {"e1": {"role": "rerun", "of": "s2"}} and len(decisions["extra"]) == 1
    # A resume restores the state into a fresh searcher; its next snapshot rewrites the file Ray copied down.
    (staged / FINALISTS_FILE).write_text("{}")
    resumed = generator()
    resumed.restore_from_dir(str(staged))
    resumed.save_to_dir(str(staged), session_str="y")
    assert json.loads((staged / FINALISTS_FILE).read_text()) == decisions


def test_the_report_takes_the_finalists_from_the_decisions_file(tmp_path):
    from sweep.config import validate
    from sweep.report import finalists
    from sweep.ray_search import FINALISTS_FILE

    cfg = validate({"name": "x", "train": {"alpha": 1.0},
                    "sweep": {"metric": "val_loss", "twins": 1, "finalist_seeds": 2}}, "x.yaml")

    def row(tid, loss, role="search", of=None):
        return {"trial_id": tid, "status": "finished", "kd_role": role, "kd_of": of, "best_val_loss": loss,
                "test_acc": 0.7, "hp.train.alpha": 1.0}

    rows = [row("a", 0.40), row("b", 0.50), row("r", 0.45, "rerun", "b")]
    # Without the file (a sweep made before it), the finalists are derived: the rerun names b; b counts.
    assert [e["trial_id"] for e in finalists(rows, cfg, tmp_path)] == ["a", "b"]
    (tmp_path / FINALISTS_FILE).write_text(json.dumps({"metric": "val_loss", "mode": "min", "finalists": ["b"],
                                                       "search_trials": 2, "extra": [], "trials": {}}))
    assert [e["trial_id"] for e in finalists(rows, cfg, tmp_path)] == ["b"]


# ----------------------------------------------------------------------------- a real sweep ranked by val_loss

# Per exploration on this corpus subset: lr 0.01 has the best val_acc (epoch 3), lr 0.03 the lowest val_loss
# (epoch 1, while its val_acc peaks at epoch 2). The test checks that the data still tells them apart.
SPACE = {"parameters": {"train.lr": {"type": "categorical", "choices": [0.01, 0.03]}}}


def _epochs(trial_dir) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (trial_dir / "result.json").read_text().splitlines() if ln.strip()]
    return {int(r["epoch"]): r for r in rows if "epoch" in r}


def _first_best(by_epoch: dict[int, dict], key: str, mode: str) -> int:
    pick = min if mode == "min" else max
    return pick(sorted(by_epoch), key=lambda e: by_epoch[e][key])  # ties: the first epoch, as fit keeps it


def test_a_val_loss_sweep_exports_the_best_val_loss_epoch_of_the_best_val_loss_trial(nsmc_dir, cache_dir,
                                                                                        tmp_path, local_ray):
    from sweep.export import export_best
    from trainable.tasks.classify import load_exported
    from sweep.ray_search import FINALISTS_FILE
    from trainable.config import ExperimentConfig
    from trainable.loop import evaluate, load_checkpoint, trial_checkpoints
    from trainable.prepare import prepare

    raw = small_config(nsmc_dir, cache_dir, tmp_path / "results", data={"train_rows": 1500, "test_rows": 300},
                       train={"epochs": 3, "alpha": 1.0, "threads": 1})
    raw["name"] = "m"
    raw["sweep"] = {"space": SPACE, "searcher": "grid", "metric": "val_loss", "seed": 0, "max_concurrent": 2,
                    "scheduler": {"kind": "none"}, "resources": {"cpu": 1}, "twins": 1, "finalist_seeds": 2}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    r = run_main("run", str(path))
    folder = tmp_path / "results" / "m"

    search, extra = {}, {}
    for params_file in sorted(folder.glob("trial_*/params.json")):
        params, by_epoch = json.loads(params_file.read_text()), _epochs(params_file.parent)
        tid = by_epoch[max(by_epoch)]["trial_id"]
        (extra if params.get("kd_role") else search)[tid] = (params_file.parent, params, by_epoch)
    assert len(search) == 2 and all(len(e) == 3 for _, _, e in search.values()), r.stderr[-3000:]
    best_loss = {t: min(m["val_loss"] for m in e.values()) for t, (_, _, e) in search.items()}
    best_acc = {t: max(m["val_acc"] for m in e.values()) for t, (_, _, e) in search.items()}
    winner = min(best_loss, key=best_loss.get)
    _, _, curve = search[winner]
    epoch = _first_best(curve, "val_loss", "min")
    # The data must tell the metrics apart, or this test could not see the bug.
    assert max(best_acc, key=best_acc.get) != winner, (best_loss, best_acc)
    assert _first_best(curve, "val_acc", "max") != epoch, curve

    # The loop kept, in every trial, the weights of its best val_loss epoch (the checkpoint export reads).
    for tid, (tdir, _, by_epoch) in {**search, **extra}.items():
        state = load_checkpoint(trial_checkpoints(tdir)[0])
        assert (state["metric"], state["best_epoch"]) == ("val_loss", _first_best(by_epoch, "val_loss", "min")), tid

    assert r.returncode == 0, r.stderr[-3000:]
    assert "best val_loss" in r.stderr  # the progress line
    # The finalist (the one rerun with another seed) is the best val_loss trial, as the searcher's file says.
    assert json.loads((folder / FINALISTS_FILE).read_text())["finalists"] == [winner]
    assert [p["kd_of"] for _, p, _ in extra.values()] == [winner]
    report = (folder / "report.md").read_text()
    assert re.search(rf"^- best: trial {winner}, val_loss ", report, re.M), report
    assert "metric val_loss (min)" in report and "| best val_loss |" in report

    out = export_best(folder, tmp_path / "best", log=lambda m: None)
    meta = json.loads((out / "config.json").read_text())
    assert (meta["trial_id"], meta["best_epoch"], meta["metric"]) == (winner, epoch, "val_loss")
    assert meta["best_val_loss"] == pytest.approx(curve[epoch]["val_loss"])
    assert meta["val_acc"] == pytest.approx(curve[epoch]["val_acc"])  # the exported weights' own accuracy
    # The exported weights, scored again on the sweep's validation split, are that epoch's.
    cfg = ExperimentConfig.model_validate({k: v for k, v in raw.items() if k != "sweep"})
    val = prepare(cfg, lambda m: None, need_teacher=False).encoded[cfg.tokenizer.vocab_size].val
    model, _, _ = load_exported(out)
    acc, loss = evaluate(model, val, cfg.train.eval_batch_size)
    assert loss == pytest.approx(curve[epoch]["val_loss"], abs=1e-4)
    assert acc == pytest.approx(curve[epoch]["val_acc"], abs=1e-6)


def test_a_task_whose_train_takes_no_metric_still_trains_and_says_so():
    """A task file written before `train` took the sweep's metric keeps working; the warning says whose choice the
    kept weights follow."""
    from trainable.tasks import Task, train_task

    class Old(Task):
        name, metrics = "old", {"val_mse": "min"}

        def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log):
            return "trained"

    class New(Old):
        def train(self, cfg, inputs, *, log, metric=None, mode=None, **kw):
            return (metric, mode)

    said = []
    kw = dict(run_dir=None, tb_dir=None, resume_from=None, on_epoch=None, keep_checkpoints=2, log=said.append)
    assert train_task(Old(), None, {}, metric="val_mse", mode="min", **kw) == "trained"
    assert said == ["warning: task old: train() takes no metric/mode, so its best weights follow its own choice, "
                    "not 'val_mse'"]
    assert train_task(New(), None, {}, metric="val_mse", mode="min", **kw) == ("val_mse", "min")
