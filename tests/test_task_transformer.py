"""The transformer task (trainable/tasks/transformer.py) on small real NSMC subsets: a sweep through the CLI with
ASHA, a driver SIGKILL and `sweep resume`, the report, and an export that a classify run takes as its teacher and
the task's predict labels text with and `sweep evaluate` scores; a resumed trial does not pre-train again and
ends exactly where an uninterrupted one does; bad transformer configs are refused naming the key.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT, kill_driver, run_main

# A 1-layer BERT of 2 heads x 16 dims on 1,350 training reviews of at most 32 tokens: about a second an epoch.
SMALL = {"n_layer": 1, "n_head": 2, "d_head": 16, "vocab_size": 1000, "max_length": 32, "pretrain_steps": 20,
         "pretrain_rows": 2000, "pretrain_batch_size": 32}


def _config(nsmc_dir, tmp_path, **sections) -> dict:
    cfg = {"task": "transformer", "name": "tf", "cache_dir": str(tmp_path / "cache"),
           "results_dir": str(tmp_path / "results"),
           "data": {"dir": str(nsmc_dir), "download": False, "train_rows": 1500, "test_rows": 300,
                    "transfer_file": "unlabeled.txt"},
           "transformer": dict(SMALL), "train": {"epochs": 3, "batch_size": 16, "threads": 1}}
    cfg.update(sections)
    return cfg


def test_transformer_sweep_survives_a_sigkill_and_exports_a_teacher_that_a_classify_run_loads(nsmc_dir, tmp_path,
                                                                                                capsys, local_ray,
                                                                                                monkeypatch):
    # lr 1e-5 learns nothing in 3 epochs, 3e-3 reaches ~0.7 by epoch 1. The grid's order is fixed by sweep.seed
    # (seed 0: both lr 3e-3 trials first), so an lr 1e-5 trial meets a better result at epoch 1 and ASHA stops it.
    space = {"parameters": {"train.lr": {"type": "categorical", "choices": [0.00001, 0.003]},
                            "transformer.pretrain_steps": {"type": "categorical", "choices": [0, 20]}}}
    cfg = _config(nsmc_dir, tmp_path, sweep={
        "space": space, "searcher": "grid", "seed": 0, "max_concurrent": 1, "resources": {"cpu": 1},
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2}})
    path = tmp_path / "tf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    folder = tmp_path / "results" / "tf"

    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "run", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and sum(f.stat().st_size > 0 for f in folder.glob("trial_*/result.json")) < 2:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.2)
    kill_driver(proc)  # once two trials have a result row in storage: an event, not a sleep
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
    r = run_main("resume", str(folder))  # in this process, on its local Ray: the killed driver left nothing here
    assert r.returncode == 0, r.stderr[-3000:]

    rows = pq.read_table(folder / "trials.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped_early") for r in rows), rows
    assert sum(r["stopped_early"] for r in rows) >= 1, [(r["hp.train.lr"], r["val_acc_curve"]) for r in rows]
    assert {"best_val_acc", "test_acc", "val_acc_curve", "hp.train.lr", "hp.transformer.pretrain_steps"} <= set(rows[0])
    for row in rows:
        assert len(row["val_acc_curve"]) == row["epochs"], row  # no epoch lost or trained twice across the kill
        assert row["best_val_acc"] == max(row["val_acc_curve"]) and 0.0 < row["test_acc"] <= 1.0
        # A pre-training trial reports its MLM loss with every epoch; a trial without pre-training never does.
        reports = [json.loads(ln) for ln in (folder / row["trial_dir"] / "result.json").read_text().splitlines()]
        pretrained = row["hp.transformer.pretrain_steps"] > 0
        assert all(("pretrain_loss" in m) == pretrained for m in reports), row["trial_dir"]
    best = max(rows, key=lambda r: r["best_val_acc"])
    assert best["hp.train.lr"] == 0.003 and best["best_val_acc"] > 0.6  # chance is ~0.5
    # The two pre-training trials differ only in fine-tuning: they share one cached encoder.
    assert len(list((tmp_path / "cache" / "pretrained").glob("*/pretrain.json"))) == 1
    report = (folder / "report.md").read_text()
    assert "metric val_acc (max)" in report
    assert ("| Rank | Model | arch | layers | heads | head dim | vocab size | pretrain steps | dropout | lr | Acc | "
            "Val Acc | Step |") in report
    assert f"| 1 | Transformer {best['trial_id']} | bert | 1 | 2 | 16 | 1000 |" in report

    out = tmp_path / "teacher"
    r = run_main("export", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "export.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "export.json").read_text())["trial_id"] == best["trial_id"]

    # A classify run with the export as its teacher, used as it is: the teacher's accuracy, measured by the
    # teacher's own loading, tokenizing and batching on the same validation and test rows, is the trial's.
    classify = _config(nsmc_dir, tmp_path, name="kd", task="classify",
                       teacher={"source": str(out), "epochs": 0, "max_length": 32},
                       tokenizer={"vocab_size": 1000, "max_length": 32},
                       student={"embedding_dim": 16, "hidden_dim": 16}, train={"epochs": 1, "threads": 1})
    del classify["transformer"], classify["data"]["transfer_file"]  # no transfer set: the labelled rows only
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(classify))
    r = run_main("train", str(tmp_path / "kd.yaml"), "--out", str(tmp_path / "kd"))
    assert r.returncode == 0, r.stderr[-3000:]
    teacher = json.loads((tmp_path / "kd" / "result.json").read_text())["teacher"]
    assert teacher["paths"] and math.isclose(teacher["val_acc"], best["best_val_acc"], abs_tol=1e-6)
    assert math.isclose(teacher["test_acc"], best["test_acc"], abs_tol=1e-6)

    # `sweep predict` picks the task's predict by config.json's task (called here in-process: a CLI call costs ~10 s).
    from trainable.tasks.transformer import TASK

    assert json.loads((out / "config.json").read_text())["task"] == "transformer"
    labelled = TASK.predict(out, ["정말 재밌는 영화", "최악의 영화"])
    assert [x["text"] for x in labelled] == ["정말 재밌는 영화", "최악의 영화"]
    assert all(x["label"] in (0, 1) and math.isclose(sum(x["probs"]), 1.0, abs_tol=1e-3) for x in labelled)

    # `sweep evaluate` scores the teacher folder on a labelled file: the trial's own test rows, written as an NSMC
    # TSV, give the trial's test accuracy.
    from sweep.cli import main
    from trainable.config import DataConfig
    from trainable.data import load_corpus

    test = load_corpus(DataConfig.model_validate(cfg["data"]), log=lambda m: None, download=False).test
    tsv = tmp_path / "test.tsv"
    tsv.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{t}\t{y}\n" for i, (t, y) in
                                                     enumerate(zip(test.texts, test.labels))), encoding="utf-8")
    assert main(["evaluate", str(out), str(tsv), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == len(test) == 300 and sum(map(sum, result["confusion"])) == 300
    assert math.isclose(result["accuracy"], best["test_acc"], abs_tol=1e-6), (result["accuracy"], best["test_acc"])
    assert main(["evaluate", str(out), str(tsv), "--runtime", "onnx"]) == 2
    assert "a transformer export runs in eager PyTorch only" in capsys.readouterr().err


def test_a_resumed_trial_does_not_pretrain_again_and_ends_where_an_uninterrupted_one_does(nsmc_dir, tmp_path):
    from sweep.config import validate
    from trainable.tasks.transformer import TASK

    before = torch.get_num_threads()
    try:
        cfg = validate(_config(nsmc_dir, tmp_path, train={"epochs": 3, "batch_size": 16, "threads": 1, "lr": 0.003}),
                       "test")
        inputs = TASK.trial_inputs(TASK.prepare(cfg, lambda m: None))

        def run(run_dir, epochs, resume_from=None):
            logs = []
            c = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})
            result = TASK.train(c, inputs, run_dir=run_dir, tb_dir=None, resume_from=resume_from, on_epoch=None,
                                keep_checkpoints=3, log=logs.append)
            return result, logs

        full, full_logs = run(tmp_path / "full", 3)
        assert any(m.startswith("pretrain: masked-LM") for m in full_logs)  # the first trial pre-trains
        _, logs = run(tmp_path / "cut", 1)
        assert any(m.startswith("pretrain: cache hit") for m in logs)  # the same shape and texts: its encoder
        resumed, logs = run(tmp_path / "cut", 3, resume_from=tmp_path / "cut" / "checkpoints" / "epoch_0001")
        assert not any(m.startswith("pretrain") for m in logs), logs  # the checkpoint holds fine-tuned weights
        assert [h["val_acc"] for h in resumed.history] == [h["val_acc"] for h in full.history]
        assert resumed.test == full.test and resumed.history[-1]["pretrain_loss"] == full.history[-1]["pretrain_loss"]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("change, expected", [
    ({"data": {"transfer_file": None}}, "data.transfer_file: transformer.pretrain_steps > 0 pre-trains"),
    ({"transformer": {"n_layers": 2}}, "transformer.n_layers: unknown key"),
    ({"transformer": {"arch": "gpt2"}}, "transformer.arch: Input should be 'bert' or 'electra'"),
    ({"transformer": {"max_length": 2}}, "transformer.max_length: Input should be greater than or equal to 4"),
    ({"data": {"transfer_file": None}, "transformer": {"pretrain_steps": 0},
      "sweep": {"space": {"parameters": {"transformer.pretrain_steps": {"type": "categorical", "choices": [0, 20]}}}}},
     "parameter transformer.pretrain_steps: data.transfer_file: transformer.pretrain_steps > 0 pre-trains"),
    ({"sweep": {"space": {"parameters": {"transformer.d_head": {"type": "categorical", "choices": [8, 0]}}}}},
     "parameter transformer.d_head: transformer.d_head: Input should be greater than 0"),
])
def test_bad_transformer_configs_are_refused_naming_the_key(nsmc_dir, tmp_path, change, expected):
    from sweep.config import ConfigError, load_space_for, validate

    raw = _config(nsmc_dir, tmp_path)
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises((ConfigError, ValueError)) as e:
        load_space_for(validate(raw, "t.yaml"))
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
