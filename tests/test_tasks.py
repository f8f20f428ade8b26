"""The task seam. A toy task defined in this file alone (the `TASK` below) is swept by the real CLI: a new task
needs no change outside its own module. The lm task: a real sweep on unlabeled NSMC reviews with ASHA, a driver
SIGKILL and `sweep resume`, export, and `sweep predict` reading the export. Bad task configs: one line, exit 2.

Only torch, numpy and the package are imported at module level: the sweep's driver and Ray's workers load this
file as the toy task's module.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import Field, PositiveInt

from trainable.config import Section
from trainable.tasks import Task


# ----------------------------------------------------------------------------- a toy task, in this file alone


class ToyConfig(Section):
    width: PositiveInt = 4  # hidden units of a one-hidden-layer regressor
    noise: float = Field(0.1, ge=0.0)
    rows: PositiveInt = 512


class ToyJob:
    """y = sin(3x) + noise, fitted by an MLP: the part of training `trainable.loop.fit` asks a task for."""

    tb_metrics = ("val/mse",)
    extra: dict = {}

    def __init__(self, cfg, data):
        self.cfg, self.data = cfg, data
        self.model = torch.nn.Sequential(torch.nn.Linear(1, cfg.toy.width), torch.nn.Tanh(),
                                         torch.nn.Linear(cfg.toy.width, 1))
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)

    def train_epoch(self, epoch, gen):
        x, y = self.data["train"]
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(self.cfg.train.batch_size):
            loss = torch.nn.functional.mse_loss(self.model(x[idx]), y[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        return {"loss": total / len(x), "lr": self.cfg.train.lr, "samples": len(x)}

    @torch.no_grad()
    def evaluate(self, split):
        x, y = self.data[split]
        return {"mse": torch.nn.functional.mse_loss(self.model(x), y).item()}

    def state_dict(self):
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["optimizer"])


class Toy(Task):
    name = "toy"
    section = ToyConfig
    metrics = {"val_mse": "min"}
    test_key = "test_mse"
    description = "regress sin(3x)"
    columns = {"width": "hp:toy.width", "lr": "hp:train.lr"}

    def prepare(self, cfg, log, space=None):
        rng = np.random.default_rng(cfg.data.seed)
        out = {}
        for split, n in (("train", cfg.toy.rows), ("val", 256), ("test", 256)):
            x = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
            y = (np.sin(3 * x) + cfg.toy.noise * rng.standard_normal((n, 1))).astype(np.float32)
            out[split] = (torch.from_numpy(x), torch.from_numpy(y))
        log(f"toy: {cfg.toy.rows} training rows")
        return out

    def trial_inputs(self, prepared):
        return {"data": prepared}

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log, metric=None,
              mode=None):
        from trainable.loop import fit

        torch.manual_seed(cfg.train.seed)
        job = ToyJob(cfg, inputs["data"])
        params = sum(p.numel() for p in job.model.parameters())
        metric, mode = self.objective(metric, mode)  # the sweep's metric (here the task's only one)
        return fit(job, epochs=cfg.train.epochs, metric=metric, mode=mode, params=params, size_kb=params * 4 / 1024,
                   run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                   keep_checkpoints=keep_checkpoints, log=log, seed=cfg.train.seed)


TASK = Toy()


# ----------------------------------------------------------------------------- tests


def _sweep_config(tmp_path, task: str, name: str, space: dict, metric: str | None = None, **sections):
    import yaml

    cfg = {"task": task, "name": name, "cache_dir": str(tmp_path / "cache"), "results_dir": str(tmp_path / "results"),
           "train": {"epochs": 3, "batch_size": 64, "threads": 1, "lr": 0.01},
           "sweep": {"space": space, "searcher": "grid", "seed": 0, "max_concurrent": 1,
                     "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}, "resources": {"cpu": 1}},
           **sections}
    if metric is not None:
        cfg["sweep"]["metric"] = metric
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(folder):
    import pyarrow.parquet as pq

    return pq.read_table(folder / "trials.parquet").to_pylist()


def test_a_task_defined_in_a_test_file_alone_is_swept_by_the_cli(tmp_path):
    from conftest import run_cli

    space = {"parameters": {"toy.width": {"type": "categorical", "choices": [1, 2, 16, 32]}}}
    cfg = _sweep_config(tmp_path, __file__, "toy", space, toy={"rows": 512})
    r = run_cli("run", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "results" / "toy"
    rows = _rows(folder)
    assert len(rows) == 4
    assert {"best_val_mse", "final_val_mse", "test_mse", "val_mse_curve", "hp.toy.width"} <= set(rows[0])
    assert all(len(r["val_mse_curve"]) == r["epochs"] for r in rows)
    assert sum(r["stopped_early"] for r in rows) >= 1, [(r["hp.toy.width"], r["val_mse_curve"]) for r in rows]
    # mode min: the best trial is the one with the lowest validation MSE, and the report ranks it first.
    best = min(rows, key=lambda r: r["best_val_mse"])
    report = (folder / "report.md").read_text()
    assert "metric val_mse (min)" in report and "| Rank | Model | width | lr |" in report
    assert f"- best: trial {best['trial_id']}, val_mse" in report
    assert "| 1 | toy " + best["trial_id"] in report


def _killed_and_resumed(cfg, folder, monkeypatch):
    """Run the sweep, SIGKILL its driver (and Ray's workers) once two trials have a result row, `sweep resume` it (in
    this process: needs the `local_ray` fixture), and return trials.parquet's rows."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT, kill_driver, run_main

    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(cfg)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and sum(f.stat().st_size > 0 for f in folder.glob("trial_*/result.json")) < 2:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    kill_driver(proc)  # once two trials have a result row in storage: an event, not a sleep
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    r = run_main("resume", str(folder))  # in this process, on its local Ray: the killed driver left nothing here
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(folder)
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped_early") for r in rows)
    assert sum(r["stopped_early"] for r in rows) >= 1
    for row in rows:  # no epoch lost or trained twice across the kill
        assert len(row[[k for k in row if k.endswith("_curve")][0]]) == row["epochs"], row
    return rows


def test_lm_sweep_survives_a_driver_sigkill_and_exports_a_model_predict_reads(nsmc_dir, tmp_path, capsys, local_ray,
                                                                               monkeypatch):
    import json

    from conftest import run_main

    space = {"parameters": {"train.lr": {"type": "categorical", "choices": [0.0001, 0.003]},
                            "lm.hidden_dim": {"type": "categorical", "choices": [16, 48]}}}
    cfg = _sweep_config(tmp_path, "lm", "lm", space, metric="val_bpc",  # bits per character, not the default
                        data={"dir": str(nsmc_dir), "download": False, "transfer_file": "unlabeled.txt"},
                        lm={"vocab_size": 800, "rows": 1500, "val_rows": 300, "test_rows": 300, "embedding_dim": 16,
                            "max_length": 32})
    folder = tmp_path / "results" / "lm"
    rows = _killed_and_resumed(cfg, folder, monkeypatch)
    for row in rows:
        curve = row["val_bpc_curve"]
        assert all(math.isfinite(v) and 0 < v < 16 for v in curve)  # bits per character of Korean text
        assert row["best_val_bpc"] == min(curve) and row["test_ppl"] > 1.0
    report = (folder / "report.md").read_text()
    assert "metric val_bpc (min)" in report and "| Rank | Model | vocab size |" in report
    assert "| best val_bpc | Test PPL |" in report

    out = tmp_path / "lm_export"
    r = run_main("export", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"lm.pt", "tokenizer.json", "config.json"}
    r = run_main("predict", str(out), "정말 재밌는 영화", "ㅁㄴㅇㄹ 쀍쀍 ㅋ")
    assert r.returncode == 0, r.stderr[-3000:]
    scored = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(scored) == 2 and all(s["ppl"] > 1.0 for s in scored)
    assert scored[0]["ppl"] < scored[1]["ppl"]  # an ordinary review is likelier than noise
    from sweep.cli import main  # in-process: `sweep evaluate` refuses an export without classes, in one line

    assert main(["evaluate", str(out), str(nsmc_dir / "ratings_test.txt")]) == 2
    assert "this lm export does not label texts with classes" in capsys.readouterr().err

    # The next stage: the LM initialises a classify student's embedding and forward LSTM (same tokenizer).
    import torch
    import yaml

    from conftest import small_config
    from trainable.student import BiLSTMClassifier, init_from_lm

    lm = json.loads((out / "config.json").read_text())
    student = BiLSTMClassifier(lm["vocab_size"], lm["embedding_dim"], lm["hidden_dim"])
    line = init_from_lm(student, out, out / "tokenizer.json")
    weights = torch.load(out / "lm.pt", weights_only=True)
    assert "embedding and forward LSTM" in line
    assert torch.equal(student.embedding.weight, weights["embedding.weight"])
    assert torch.equal(student.lstm.weight_hh_l0, weights["lstm.weight_hh_l0"])
    cfg = small_config(nsmc_dir, tmp_path / "cache", tmp_path / "results",
                       tokenizer={"file": str(out / "tokenizer.json"), "max_length": 32},
                       student={"embedding_dim": lm["embedding_dim"], "hidden_dim": lm["hidden_dim"],
                                "init_from": str(out)},
                       train={"epochs": 1, "alpha": 1.0, "threads": 1})
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(cfg))
    r = run_main("train", str(tmp_path / "student.yaml"), "--out", str(tmp_path / "student"))
    assert r.returncode == 0 and "initialised embedding and forward LSTM" in r.stderr, r.stderr[-3000:]
    assert json.loads(r.stdout)["val_acc"] > 0.5


def test_lm_bits_per_character_count_every_character_at_any_vocab_size(nsmc_dir):
    """val_bpc divides the summed loss by characters, not tokens, so vocabularies compare: the characters counted
    are those of the text (spaces aside), whatever the vocabulary size, and a truncated review counts only what
    its kept tokens cover."""
    import unicodedata

    from trainable.data import train_wordpiece
    from trainable.tasks.lm import covered_chars

    lines = (nsmc_dir / "ratings_train.txt").read_text(encoding="utf-8").splitlines()[1:1501]
    texts = [unicodedata.normalize("NFKC", ln.split("\t")[1]) for ln in lines]
    expected = np.array([len(t) - t.count(" ") for t in texts])
    counts = {}
    for vocab in (300, 3000):
        tok = train_wordpiece(texts, vocab, min_frequency=2, limit_alphabet=1500)
        counts[vocab] = covered_chars(tok, texts, max_length=1000)
        assert (counts[vocab] == expected).all()
        assert (covered_chars(tok, texts, max_length=3) <= expected).all()
    lengths = {v: sum(len(e.ids) for e in train_wordpiece(texts, v, 2, 1500).encode_batch(texts)) for v in (300, 3000)}
    assert lengths[300] > 1.2 * lengths[3000]  # the smaller vocabulary cuts the same text into more tokens


def test_tagger_sweep_survives_a_driver_sigkill_and_exports_a_tagger_predict_reads(nsmc_dir, tmp_path, local_ray,
                                                                                   monkeypatch):
    import json

    from conftest import run_main

    space = {"parameters": {"train.lr": {"type": "categorical", "choices": [0.0002, 0.005]},
                            "tagger.hidden_dim": {"type": "categorical", "choices": [16, 48]}}}
    cfg = _sweep_config(tmp_path, "tagger", "tag", space,
                        data={"dir": str(nsmc_dir), "download": False, "transfer_file": "unlabeled.txt"},
                        tagger={"vocab_size": 3000, "rows": 2000, "val_rows": 300, "test_rows": 300,
                                "embedding_dim": 32})
    folder = tmp_path / "results" / "tag"
    rows = _killed_and_resumed(cfg, folder, monkeypatch)
    assert {"best_val_acc", "test_acc", "val_acc_curve", "hp.tagger.hidden_dim"} <= set(rows[0])
    best = max(rows, key=lambda r: r["best_val_acc"])
    assert best["best_val_acc"] > 0.7  # token accuracy; predicting the most common tag gets about 0.2
    vocab = json.loads((folder / "tagger_vocab.json").read_text())
    assert 40 <= len(vocab["tags"]) <= 60 and {"NNG", "JKS", "EF", "VV"} <= set(vocab["tags"])  # Sejong-style tags
    report = (folder / "report.md").read_text()
    assert "metric val_acc (max)" in report and "| Rank | Model | vocab size | embedding dim | hidden dim |" in report

    out = tmp_path / "tag_export"
    r = run_main("export", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_main("predict", str(out), "영화가 정말 재밌다")
    assert r.returncode == 0, r.stderr[-3000:]
    tokens = json.loads(r.stdout)["tokens"]
    assert [f for f, _ in tokens][:2] == ["영화", "가"] and all(t in vocab["tags"] for _, t in tokens)


def test_the_tagger_without_kiwipiepy_is_refused_before_any_work(nsmc_dir, tmp_path):
    import subprocess
    import sys

    import yaml

    from conftest import ROOT

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"task": "tagger", "data": {"dir": str(nsmc_dir), "transfer_file": "unlabeled.txt"},
                                    "results_dir": str(tmp_path / "results")}))
    # sys.modules[name] = None makes `import kiwipiepy` fail, as on a machine without the package.
    code = ("import sys; sys.modules['kiwipiepy'] = None; from sweep.cli import main; "
            f"sys.exit(main(['run', {str(path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "needs the kiwipiepy package" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_bad_task_configs_get_one_line_and_exit_2(tmp_path):
    import yaml

    from conftest import run_cli

    cases = [({"task": "nope"}, "task: unknown task 'nope'"),
             ({"task": "lm", "data": {"transfer_file": "x.txt"}, "sweep": {"metric": "val_acc"}},
             "sweep.metric: task lm has no metric 'val_acc'"),
             ({"task": "lm"}, "data.transfer_file: the lm task learns from unlabeled text"),
             ({"task": "lm", "data": {"transfer_file": "x.txt"}, "lm": {"hidden": 3}}, "lm.hidden: unknown key"),
             ({"lm": {"hidden_dim": 8}}, "lm: unknown key (task classify has no section 'lm')"),
             ({"task": "missing_task.py"}, "missing_task.py: file not found")]
    for i, (raw, expected) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        r = run_cli("train", str(path), "--out", str(tmp_path / f"run{i}"))
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], (raw, r.stderr[-2000:])
        assert not (tmp_path / f"run{i}").exists()
