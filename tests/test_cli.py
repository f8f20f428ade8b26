"""The CLI as a user runs it: `sweep prepare`, `sweep train`, and refusals of bad input (exit 2, one line,
nothing created or overwritten)."""
import json

import pytest
import yaml

from conftest import run_cli


def test_prepare_is_idempotent(make_config):
    cfg = make_config()
    first = run_cli("prepare", str(cfg))
    assert first.returncode == 0, first.stderr
    second = run_cli("prepare", str(cfg))
    assert second.returncode == 0, second.stderr
    assert "teacher: cache hit" in second.stderr and "teacher logits: cache hit" in second.stderr
    assert "encoded data: cache hit" in second.stderr
    # The task's word on what it prepared (Task.prepared_lines): classify names its teacher and its scores.
    import re

    assert re.search(r"^teacher: /\S+ \(val 0\.\d{4}, test 0\.\d{4}\)$", second.stderr, re.M), second.stderr


def test_train_writes_a_complete_run_folder_and_refuses_to_overwrite(make_config, tmp_path):
    cfg = make_config(train={"epochs": 2, "alpha": 0.5, "threads": 1})
    out = tmp_path / "run"
    r = run_cli("train", str(cfg), "--set", "student.hidden_dim=48", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "result.json").read_text())
    for key in ("val_acc", "test_acc", "params", "size_kb", "epochs", "train_time_s", "samples_per_s"):
        assert key in result
    assert result["epochs"] == 2 and result["val_acc"] > 0.55
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["student"]["hidden_dim"] == 48  # the --set reached the loop
    assert "student.hidden_dim=48" in (out / "command.txt").read_text()
    assert "package" in json.loads((out / "version.json").read_text())
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]

    before = (out / "result.json").read_bytes()
    again = run_cli("train", str(cfg), "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr and "--force" in again.stderr
    assert (out / "result.json").read_bytes() == before

    more = run_cli("train", str(cfg), "--out", str(out), "--resume", "--set", "train.epochs=3")
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stderr and json.loads((out / "result.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("args,expected", [
    (["--set", "train.epochs=0"], "train.epochs: Input should be greater than 0"),
    (["--set", "train.unknown=1"], "train.unknown: unknown key"),
    (["--set", "data.train_file=missing.txt"], "missing.txt: file not found"),
    (["--set", "teacher.source=/nonexistent/teacher"], "is not a model folder"),
    (["--set", "data.num_classes=3", "--set", "data.label_column=id"], "expected a label in [0, 1, 2]"),
])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(make_config, tmp_path, args, expected):
    cfg = make_config()
    out = tmp_path / "run"
    r = run_cli("train", str(cfg), "--out", str(out), *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not out.exists()


def test_unreadable_config_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    r = run_cli("train", str(bad))
    assert r.returncode == 2 and "malformed YAML" in r.stderr


def test_the_command_leaves_after_the_exit_handlers_and_waits_for_a_working_thread(tmp_path):
    """`sweep` leaves without the interpreter's teardown (sweep.cli.entry), but only once its output is out and the
    exit handlers have run (Ray's shutdown is one); a thread that is no daemon and still works is waited for, as
    Python always does. Both with the exit status of the command (a refusal here: 2)."""
    import subprocess
    import sys

    from conftest import ROOT

    marker = tmp_path / "thread-done"
    code = f"""
import atexit, sys, threading, time
from pathlib import Path
from sweep.cli import entry
atexit.register(lambda: print("exit handler ran", flush=True))
if sys.argv[1] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), Path({str(marker)!r}).write_text("done"))).start()
sys.argv = ["sweep", "plan", {str(tmp_path / "missing.yaml")!r}]
entry()
"""
    for case in ("plain", "thread"):
        r = subprocess.run([sys.executable, "-c", code, case], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (case, r.stderr[-2000:])
        assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "missing.yaml" in r.stderr, r.stderr
        assert r.stdout == "exit handler ran\n", (case, r.stdout)
    assert marker.read_text() == "done"
