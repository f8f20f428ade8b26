"""The daily tools on one real tiny sweep (2 trials, no teacher) and its export: `sweep predict --file`/stdin,
`sweep evaluate`, ONNX and int8 copies, and the two servers (`sweep dashboard`, `sweep tensorboard`) answering
over HTTP on 127.0.0.1. Reviews are real NSMC test rows."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT, run_cli, run_main, small_config

SPACE = {"parameters": {"student.hidden_dim": {"type": "int", "low": 16, "high": 32},
                        "train.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}}}


@pytest.fixture(scope="module")
def tools_sweep(nsmc_dir, cache_dir, tmp_path_factory, local_ray):
    """A 2-trial sweep without a teacher (alpha 1), exported with --int8."""
    tmp = tmp_path_factory.mktemp("tools")
    cfg = small_config(nsmc_dir, cache_dir, tmp / "results", train={"epochs": 2, "threads": 1, "alpha": 1.0})
    cfg["name"] = "tools"
    cfg["sweep"] = {"space": SPACE, "seed": 0, "num_samples": 2, "max_concurrent": 2, "scheduler": {"kind": "none"},
                    "resources": {"cpu": 1}}
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    r = run_main("run", str(tmp / "sweep.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    folder, model = tmp / "results" / "tools", tmp / "best"
    r = run_main("export", str(folder), "--out", str(model), "--int8")
    assert r.returncode == 0, r.stderr[-3000:]
    return {"folder": folder, "model": model, "tmp": tmp, "export_stderr": r.stderr}


@pytest.fixture(scope="module")
def reviews(nsmc_dir):
    """300 real test reviews with their labels (lengths from one character to the 48-token cap)."""
    from trainable.config import DataConfig
    from trainable.data import read_table

    table = read_table(nsmc_dir / "ratings_test.txt", DataConfig())
    return table.take(np.arange(300))


def _write_tsv(path: Path, texts, labels) -> Path:
    path.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t{t}\t{y}\n" for i, (t, y) in
                                                       enumerate(zip(texts, labels))), encoding="utf-8")
    return path


def _labels(stdout: str) -> list[int]:
    return [json.loads(ln)["label"] for ln in stdout.splitlines()]


def test_predict_into_a_pipe_whose_reader_leaves_stops_without_a_traceback(tools_sweep, reviews, tmp_path):
    """`sweep predict MODEL --file F | head -1`: the reader leaves after the first line; predict stops with exit 1
    and no traceback (a BrokenPipeError's, before), whatever output it had left."""
    texts = [t for t in reviews.texts if t.strip()]
    lines = tmp_path / "many.txt"
    lines.write_text("\n".join(texts * 20) + "\n", encoding="utf-8")  # ~6000 lines: more than a pipe buffers
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", "predict", str(tools_sweep["model"]), "--file",
                             str(lines)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["text"] == texts[0]
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 1, err[-3000:]
    finally:
        proc.kill()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err[-3000:]


def test_predict_file_and_stdin_give_the_labels_of_text_arguments(tools_sweep, reviews, tmp_path, monkeypatch):
    texts = [t for t in reviews.texts[:40] if t.strip() and not t.startswith("-")]
    model = str(tools_sweep["model"])
    by_args = run_main("predict", model, *texts)
    assert by_args.returncode == 0, by_args.stderr
    expected = _labels(by_args.stdout)
    assert [json.loads(ln)["text"] for ln in by_args.stdout.splitlines()] == texts  # input order, not length order

    lines = tmp_path / "reviews.txt"
    lines.write_text("\n".join(texts) + "\n", encoding="utf-8")
    by_file = run_main("predict", model, "--file", str(lines), "--batch-size", "7")  # several sorted batches
    assert by_file.returncode == 0, by_file.stderr
    assert _labels(by_file.stdout) == expected
    assert "samples/s" in by_file.stderr.strip().splitlines()[-1]

    by_stdin = subprocess.run([sys.executable, "-m", "sweep.cli", "predict", model, "--file", "-"], cwd=ROOT,
                              input=lines.read_text(encoding="utf-8"), capture_output=True, text=True, timeout=300)
    assert by_stdin.returncode == 0, by_stdin.stderr
    assert _labels(by_stdin.stdout) == expected

    # In-process: the library's predict, and the same texts read from a TSV (file and stdin) and a Parquet file.
    from trainable.tasks.classify import predict
    from sweep.tools import read_input_texts

    assert [lab for _, lab, _ in predict(tools_sweep["model"], texts, batch_size=5)] == expected
    tsv = _write_tsv(tmp_path / "reviews.tsv", texts, [0] * len(texts))
    parquet = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"review": texts}), parquet)
    assert read_input_texts(str(tsv)) == texts and read_input_texts(str(parquet), "review") == texts
    monkeypatch.setattr(sys, "stdin", io.StringIO(tsv.read_text(encoding="utf-8")))
    assert read_input_texts("-") == texts


def test_evaluate_accuracy_equals_the_one_recomputed_from_predict(tools_sweep, reviews, tmp_path, capsys):
    tsv = _write_tsv(tmp_path / "test.tsv", reviews.texts, reviews.labels)
    r = run_main("evaluate", str(tools_sweep["model"]), str(tsv), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    from sweep.cli import main

    assert main(["predict", str(tools_sweep["model"]), "--file", str(tsv)]) == 0
    preds = np.asarray(_labels(capsys.readouterr().out))
    assert len(preds) == len(reviews) == result["rows"]
    assert result["accuracy"] == pytest.approx(float((preds == reviews.labels).mean()), abs=1e-12)
    confusion = np.asarray(result["confusion"])
    assert confusion.sum() == len(reviews) and np.trace(confusion) == int((preds == reviews.labels).sum())
    assert [c["support"] for c in result["classes"]] == np.bincount(reviews.labels, minlength=2).tolist()

    parquet = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": reviews.texts, "y": reviews.labels}), parquet)
    from sweep.tools import evaluate, format_evaluation
    again = evaluate(tools_sweep["model"], parquet, "text", "y")
    assert again["accuracy"] == result["accuracy"] and again["confusion"] == result["confusion"]
    table = format_evaluation(again)
    assert "precision" in table and "confusion" in table and f"{result['accuracy']:.4f}" in table
    assert main(["evaluate", str(tools_sweep["model"]), str(parquet), "--column-text", "text",
                 "--column-label", "y"]) == 0


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "nolabel.tsv").write_text("id\tdocument\n1\t좋다\n", encoding="utf-8")
    (tmp / "badlabel.tsv").write_text("id\tdocument\tlabel\n1\t좋다\t1\n2\t별로\tx\n", encoding="utf-8")
    (tmp / "latin1.txt").write_bytes("좋다\n".encode() + b"caf\xe9\n")
    (tmp / "other.tsv").write_text("id\treview\n1\t좋다\n", encoding="utf-8")
    pq.write_table(pa.table({"review": ["좋다"]}), tmp / "other.parquet")
    (tmp / "empty.txt").write_text("", encoding="utf-8")
    return {
        "predict: not found": (["predict", "MODEL", "--file", str(tmp / "missing.txt")], "missing.txt: file not found"),
        "predict: not UTF-8": (["predict", "MODEL", "--file", str(tmp / "latin1.txt")], "latin1.txt:2: expected UTF-8"),
        "predict: TSV without the column": (["predict", "MODEL", "--file", str(tmp / "other.tsv")],
                                            "other.tsv:1: missing column 'document'"),
        "predict: Parquet without the column": (["predict", "MODEL", "--file", str(tmp / "other.parquet")],
                                                "other.parquet: expected a Parquet file with a 'document' column"),
        "predict: empty file": (["predict", "MODEL", "--file", str(tmp / "empty.txt")], "empty.txt: no text rows"),
        "predict: nothing to label": (["predict", "MODEL"], "give TEXT arguments or --file"),
        "evaluate: not found": (["evaluate", "MODEL", str(tmp / "missing.tsv")], "missing.tsv: file not found"),
        "evaluate: missing label column": (["evaluate", "MODEL", str(tmp / "nolabel.tsv")],
                                           "nolabel.tsv:1: missing column 'label'"),
        "evaluate: bad label": (["evaluate", "MODEL", str(tmp / "badlabel.tsv")],
                                "badlabel.tsv:3: expected a label in [0, 1], got 'x'"),
        "evaluate: unknown runtime": (["evaluate", "MODEL", str(tmp / "badlabel.tsv"), "--runtime", "fp16"],
                                      "--runtime fp16: expected one of"),
    }


def test_bad_files_exit_2_with_one_line(tools_sweep, tmp_path, capsys):
    from sweep.cli import main

    for case, (argv, message) in _bad_inputs(tmp_path).items():
        argv = [str(tools_sweep["model"]) if a == "MODEL" else a for a in argv]
        rc = main(argv)
        err = capsys.readouterr()
        lines = err.err.strip().splitlines()
        assert rc == 2, (case, err.err)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, lines)
        assert err.out == "", case
    # and once as a user would run it
    r = run_cli("predict", str(tools_sweep["model"]), "--file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: file not found"


def _encode(model_dir: Path, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Real reviews as a right-padded batch: tokens (B, T) int64, lengths (B,) int64."""
    from tokenizers import Tokenizer

    from trainable.data import EncodedSplit, encode_texts

    max_length = json.loads((model_dir / "config.json").read_text())["max_length"]
    tokens, offsets = encode_texts(Tokenizer.from_file(str(model_dir / "tokenizer.json")), texts, max_length)
    enc = EncodedSplit(np.arange(len(texts)), np.zeros(len(texts), dtype=np.int64), tokens, offsets)
    return torch.from_numpy(enc.padded()), torch.from_numpy(enc.lengths)


def test_onnx_logits_equal_the_eager_students(tools_sweep, reviews):
    import onnxruntime as ort

    from trainable.tasks.classify import load_exported

    model_dir = tools_sweep["model"]
    model, _, _ = load_exported(model_dir)
    session = ort.InferenceSession(str(model_dir / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [("tokens", "tensor(int64)"),
                                                                 ("lengths", "tensor(int64)")]
    for lo, hi in [(0, 1), (0, 37), (37, 300)]:  # batch sizes 1, 37, 263; lengths 1 .. the cap
        tokens, lengths = _encode(model_dir, reviews.texts[lo:hi])
        with torch.no_grad():
            expected = model(tokens, lengths).numpy()
        (got,) = session.run(["logits"], {"tokens": tokens.numpy(), "lengths": lengths.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert int(lengths.min()) == 1 and int(lengths.max()) == 48


def test_export_without_onnx_skips_the_file_with_a_warning(tools_sweep, tmp_path, monkeypatch):
    from sweep.export import export_best

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    said = []
    out = export_best(tools_sweep["folder"], tmp_path / "best", log=said.append)
    assert {p.name for p in out.iterdir()} == {"student.pt", "student.ts", "tokenizer.json", "config.json"}
    assert any(s.startswith("warning: onnx is not installed") for s in said)


def test_int8_copy_loads_and_predicts(tools_sweep, reviews, tmp_path, capsys):
    model_dir = tools_sweep["model"]
    meta = json.loads((model_dir / "config.json").read_text())
    change = meta["int8"]
    # Re-measured on the sweep's own validation split it is the trial's best val_acc (to a review or two whose
    # argmax float rounding may flip between the loop's batches and the sorted ones).
    assert change["val_acc_fp32"] == pytest.approx(meta["val_acc"], abs=2.5 / change["val_rows"])
    assert abs(change["val_acc_change"]) < 0.03 and change["val_rows"] == 400
    int8 = torch.jit.load(str(model_dir / "student.int8.ts"))
    tokens, lengths = _encode(model_dir, reviews.texts)
    from trainable.tasks.classify import load_exported
    model, _, _ = load_exported(model_dir)
    with torch.no_grad():
        agree = (int8(tokens, lengths).argmax(1) == model(tokens, lengths).argmax(1)).float().mean()
    assert agree >= 0.95
    lines = tmp_path / "reviews.txt"
    lines.write_text("\n".join(reviews.texts[:50]) + "\n", encoding="utf-8")
    from sweep.cli import main

    assert main(["predict", str(model_dir), "--file", str(lines), "--runtime", "int8"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 50 and "int8" in out.err.splitlines()[-1]


# ----------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serving(args: list[str]):
    """Start `sweep ARGS --port P` in its own process group and yield get(url_path, ready, timeout=60), which polls
    http://127.0.0.1:P/url_path until `ready(json)` holds and returns the JSON. The server and its children (the
    TensorBoard process) are always stopped."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sweep.cli", *args, "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def get(url_path: str, ready, timeout: float = 60.0):
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{url_path}", timeout=5) as resp:
                    last = json.loads(resp.read())
                if ready(last):
                    return last
            except OSError:
                pass
            time.sleep(0.5)
        pytest.fail(f"sweep {' '.join(args)}: {url_path} not ready in {timeout} s (last answer {last})")

    def listening() -> list[str]:
        """Local addresses listening on the server's port (from `ss`)."""
        out = subprocess.run(["ss", "-lntH"], capture_output=True, text=True).stdout
        return [ln.split()[3] for ln in out.splitlines() if ln.split()[3].endswith(f":{port}")]

    get.listening = listening
    try:
        yield get
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def test_dashboard_lists_the_sweeps_study_and_trials(tools_sweep):
    with _serving(["dashboard", str(tools_sweep["folder"])]) as get:
        studies = get("/api/studies", lambda js: bool(js["study_summaries"]))
        assert len(studies["study_summaries"]) == 1
        import optuna
        names = optuna.get_all_study_names(f"sqlite:///{tools_sweep['folder'] / 'optuna.db'}")
        assert [st["study_name"] for st in studies["study_summaries"]] == names
        detail = get(f"/api/studies/{studies['study_summaries'][0]['study_id']}", lambda js: "trials" in js)
        assert get.listening() == [f"127.0.0.1:{get.listening()[0].rsplit(':', 1)[1]}"]  # loopback only
    assert len(detail["trials"]) == 2
    assert {"student.hidden_dim", "train.lr"} <= {p["name"] for p in detail["trials"][0]["params"]}


def test_dashboard_refuses_a_sweep_without_a_study_or_the_package(tools_sweep, tmp_path, capsys, monkeypatch):
    from sweep.cli import main

    (tmp_path / "config.yaml").write_bytes((tools_sweep["folder"] / "config.yaml").read_bytes())
    assert main(["dashboard", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: no Optuna study (optuna.db is missing; a sweep "
                                               "writes it when it starts)")
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)
    assert main(["dashboard", str(tools_sweep["folder"])]) == 2
    assert "optuna-dashboard is not installed" in capsys.readouterr().err


def test_tensorboard_lists_the_trial_runs(tools_sweep):
    """`sweep tensorboard` serves the sweep's tb/: one run per trial, named by its number and its searched
    parameters, and the run of the HParams experiment."""
    rows = pq.read_table(tools_sweep["folder"] / "trials.parquet").to_pylist()
    names = {f"{int(r['trial_id'].rsplit('_', 1)[1]):03d} hidden_dim={r['hp.student.hidden_dim']} "
             f"lr={r['hp.train.lr']:.3g}" for r in rows}
    assert len(names) == 2
    with _serving(["tensorboard", str(tools_sweep["folder"])]) as get:
        runs = get("/data/runs", lambda js: set(js) >= names)
    assert set(runs) == names | {"hparams"}


def test_classification_metrics_by_hand():
    """Six reviews, four classes (class 3 never seen nor predicted): precision, recall, F1, support and the
    confusion matrix counted by hand."""
    from sweep.tools import classification_metrics

    m = classification_metrics(np.array([0, 1, 1, 2, 2, 2]), np.array([0, 1, 2, 2, 2, 0]), 4)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["rows"] == 6
    assert [(c["precision"], c["recall"], c["support"]) for c in m["classes"]] == pytest.approx(
        [(0.5, 1.0, 1), (1.0, 0.5, 2), (2 / 3, 2 / 3, 3), (0.0, 0.0, 0)])
    assert m["macro_f1"] == pytest.approx((2 / 3 * 3) / 4)
    assert m["confusion"] == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
