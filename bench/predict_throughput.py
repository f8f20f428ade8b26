"""CPU predict throughput of an exported student, fp32 against int8, and what int8 costs in accuracy.

    python bench/predict_throughput.py MODEL_DIR [--rows 20000] [--threads N] [--repeats 3]
    python bench/predict_throughput.py --make WORK_DIR [--rows 20000]   # a 1-trial sweep + `sweep export --int8` first

MODEL_DIR is a folder from `sweep export --int8` (student.pt, student.ts, student.int8.ts, and student.onnx when onnx
was installed). `--make` builds one the way a user would: `sweep run` on a one-trial sweep (the default student,
embedding 64 / hidden 128, 10K training reviews, no teacher) and `sweep export --int8`, under WORK_DIR.

The reviews are the first --rows rows of NSMC's test file. Each runtime labels them as `sweep predict --file` does
(tokenize, sort by length, batches of 512): "end to end" includes tokenizing, "forward" times the model alone on the
same pre-built batches. Best of --repeats after a warm-up. Ratios are against fp32 eager, measured in the same run;
accuracy change is against fp32 eager on the same rows. Measure on an idle machine: with other processes on the
cores, timings with more than one thread swing several-fold (OpenMP threads wait on each other), so the load
average is printed with the table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainable.config import DataConfig  # noqa: E402
from trainable.data import EncodedSplit, encode_texts, read_table  # noqa: E402
from trainable.tasks.classify import RUNTIME_FILES, label_texts, load_runtime  # noqa: E402

NSMC_DIRS = [ROOT.parent / "shared" / "data" / "nsmc", ROOT / "data" / "nsmc"]


def make_model(work: Path, train_rows: int) -> Path:
    """A one-trial sweep without a teacher, exported with --int8, through the CLI."""
    cfg = {
        "name": "predict_bench",
        "data": {"dir": str(ROOT / "data" / "nsmc"), "mirrors": [str(NSMC_DIRS[0])], "train_rows": train_rows,
                 "test_rows": 1000},
        "tokenizer": {"vocab_size": 3000, "max_length": 64},
        "train": {"epochs": 2, "alpha": 1.0, "threads": 2},
        "sweep": {"num_samples": 1, "max_concurrent": 1, "scheduler": {"kind": "none"}, "resources": {"cpu": 2},
                  "space": {"parameters": {"train.lr": {"type": "categorical", "choices": [0.002]}}}},
        "cache_dir": str(work / "cache"), "results_dir": str(work / "results"),
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    model = work / "best"
    for args in (["run", str(work / "sweep.yaml")],
                 ["export", str(work / "results" / "predict_bench"), "--out", str(model), "--int8", "--force"]):
        subprocess.run([sys.executable, "-m", "sweep.cli", *args], cwd=ROOT, check=True)
    return model


def batches(tok, texts: list[str], max_length: int, batch_size: int) -> tuple[list, np.ndarray]:
    """The batches `label_texts` builds: [(tokens (B, T) int64, lengths (B,) int64)] and the row order."""
    tokens, offsets = encode_texts(tok, texts, max_length)
    enc = EncodedSplit(np.arange(len(texts)), np.zeros(len(texts), dtype=np.int64), tokens, offsets)
    order = np.argsort(enc.lengths, kind="stable")
    out = []
    for start in range(0, len(texts), batch_size):
        part = enc.take(order[start:start + batch_size])
        out.append((torch.from_numpy(part.padded()), torch.from_numpy(part.lengths)))
    return out, order


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: lazy init, TorchScript profiling runs
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", help="a folder from `sweep export --int8`")
    p.add_argument("--make", metavar="WORK_DIR", help="build the model folder first (a one-trial sweep)")
    p.add_argument("--train-rows", type=int, default=10000, help="training reviews for --make (10000)")
    p.add_argument("--rows", type=int, default=20000, help="NSMC test reviews to label (20000)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=None,
                   help="torch and ONNX Runtime threads (default: torch's, what `sweep predict` uses)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if (args.model_dir is None) == (args.make is None):
        p.error("give MODEL_DIR or --make WORK_DIR")
    model_dir = make_model(Path(args.make), args.train_rows) if args.make else Path(args.model_dir)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]  # other work on the cores makes multi-thread timings swing several-fold
    test_file = next((d / "ratings_test.txt" for d in NSMC_DIRS if (d / "ratings_test.txt").is_file()), None)
    if test_file is None:
        sys.exit(f"error: no NSMC ratings_test.txt in {[str(d) for d in NSMC_DIRS]}")
    table = read_table(test_file, DataConfig())
    rows = min(args.rows, len(table))
    texts, labels = table.texts[:rows], table.labels[:rows]

    runtimes = ["eager", "torchscript", "int8", "onnx"]
    missing = [r for r in runtimes[1:] if not (model_dir / RUNTIME_FILES[r]).is_file()]
    runtimes = [r for r in runtimes if r not in missing]
    results = {}
    for runtime in runtimes:
        forward, tok, meta = load_runtime(model_dir, runtime, threads=threads)
        probs = {}

        def end_to_end():
            probs["p"] = label_texts(forward, tok, texts, meta["max_length"], args.batch_size)

        e2e = best_time(end_to_end, args.repeats)
        prebuilt, _ = batches(tok, texts, meta["max_length"], args.batch_size)

        def forward_only():
            with torch.no_grad():
                for tokens, lengths in prebuilt:
                    forward(tokens, lengths)

        fwd = best_time(forward_only, args.repeats)
        results[runtime] = {"e2e": rows / e2e, "fwd": rows / fwd, "acc": float((probs["p"].argmax(1) == labels).mean()),
                            "size_kb": (model_dir / RUNTIME_FILES.get(runtime, "student.pt")).stat().st_size / 1024}

    base = results["eager"]
    print(f"predict throughput: {rows} NSMC test reviews ({test_file}), batches of {args.batch_size} sorted by length, "
          f"{threads} threads, torch {torch.__version__}, best of {args.repeats}; load average {load:.1f} on "
          f"{os.cpu_count()} cores before the run")
    print(f"model: {model_dir} (embedding {meta['embedding_dim']}, hidden {meta['hidden_dim']}, "
          f"vocab {meta['vocab_size']}, max length {meta['max_length']})")
    print(f"{'runtime':<18}{'file KiB':>9}{'end to end/s':>14}{'x eager':>9}{'forward/s':>11}{'x eager':>9}"
          f"{'accuracy':>10}{'change':>9}")
    names = {"eager": "fp32 eager", "torchscript": "fp32 TorchScript", "int8": "int8 TorchScript",
             "onnx": "fp32 ONNX RT"}
    for runtime, r in results.items():
        print(f"{names[runtime]:<18}{r['size_kb']:>9.0f}{r['e2e']:>14.0f}{r['e2e'] / base['e2e']:>9.2f}"
              f"{r['fwd']:>11.0f}{r['fwd'] / base['fwd']:>9.2f}{r['acc']:>10.4f}{r['acc'] - base['acc']:>+9.4f}")
    if missing:
        print(f"not measured (no file): {', '.join(RUNTIME_FILES[m] for m in missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
