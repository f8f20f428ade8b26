"""Does distillation pay? The headline table: the strongest teacher this machine builds in its time budget, then the
seed study's five student sizes trained three ways on the whole NSMC training split, with several seeds:

    none      no teacher (loss rate 1): the student's no-teacher twin
    kd        distilled on the labelled rows only
    kd+T      distilled on the labelled rows plus a transfer set of unlabeled reviews labelled by the teacher

    python bench/kd_headline.py                       # full size: about 1.5 hours on 2 CPU cores
    python bench/kd_headline.py --train-rows 10000 --transfer-rows 20000 --sizes E8/H16 --seeds 1   # a quick look

Every run appends one JSON line to OUT/runs.jsonl (so an interrupted bench keeps what it measured and, run again,
skips what is done), and the table is printed at the end (and with --table-only). Students run two at a time, one
thread each; the teacher is built first, with both threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {"E64/H128": (64, 128), "E32/H64": (32, 64), "E16/H16": (16, 16), "E8/H16": (8, 16), "E8/H32": (8, 32)}
VARIANTS = ("none", "kd", "kd+T")
from bench.teacher import RECIPE as TEACHER  # noqa: E402  the teacher of bench/teacher.py


def base_config(args) -> dict:
    return {
        "name": "kd-headline",
        "data": {"dir": str(args.data_dir), "download": False, "train_rows": args.train_rows,
                 "transfer_file": "unlabeled.txt", "transfer_rows": args.transfer_rows},
        "tokenizer": {"vocab_size": 3000, "max_length": 128},
        "teacher": {"source": TEACHER, "max_length": 128, "threads": 2},
        "train": {"epochs": args.epochs, "batch_size": 64, "lr": 1e-3, "scheduler": "step", "step_size": 1,
                  "gamma": 0.9, "alpha": args.alpha, "temperature": args.temperature, "threads": 1},
        "cache_dir": str(args.cache_dir),
    }


def _prepare(raw: dict, log=None):
    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    cfg = ExperimentConfig.model_validate(raw)
    return cfg, prepare(cfg, log or (lambda m: None))


_PREP = None


def run_one(raw: dict, size: str, variant: str, seed: int) -> dict:
    global _PREP
    import torch

    from trainable.config import ExperimentConfig
    from trainable.loop import train_student
    from trainable.prepare import student_inputs

    torch.set_num_threads(1)
    if _PREP is None:
        _PREP = _prepare(raw)[1]  # cache hits only: the parent prepared everything
    e, h = SIZES[size]
    run = json.loads(json.dumps(raw))
    run["student"] = {"embedding_dim": e, "hidden_dim": h}
    run["train"]["seed"] = seed
    if variant == "none":
        run["train"]["alpha"] = 1.0
    elif variant == "kd":
        run["data"]["transfer_rows"] = 0
    cfg = ExperimentConfig.model_validate(run)
    data, logits = student_inputs(_PREP.encoded, _PREP.logits, cfg)
    t0 = time.perf_counter()
    r = train_student(cfg.student, cfg.train, data, logits, log=lambda m: None)
    return {"size": size, "variant": variant, "seed": seed, "test_acc": r.test_acc, "val_acc": r.val_acc,
            "best_epoch": r.best_epoch, "params": r.params, "rows_per_epoch": len(data.train) + (
                len(data.transfer) if data.transfer is not None else 0),
            "wall_s": time.perf_counter() - t0, "samples_per_s": r.samples_per_s}


def table(out: Path, teacher: dict | None) -> str:
    rows = [json.loads(ln) for ln in (out / "runs.jsonl").read_text().splitlines()] if (out / "runs.jsonl").is_file() else []
    lines = []
    if teacher:
        lines.append(f"teacher: test {100 * teacher['test_acc']:.2f}%, val {100 * teacher['val_acc']:.2f}%, "
                     f"built in {teacher['build_s']:.0f} s; weights {teacher['weights']}; members: " + "; ".join(
                         f"{m['source']} test {100 * m['test_acc']:.2f}%" for m in teacher.get("members", [])))
    lines += ["", "| student | params | no teacher | KD, labelled rows | KD + transfer set | gain (kd+T - none) |",
              "|---|---:|---:|---:|---:|---:|"]

    def cell(vals):
        if not vals:
            return "-", None
        m = 100 * float(np.mean(vals))
        if len(vals) == 1:
            return f"{m:.2f}", m
        return f"{m:.2f} ± {100 * float(np.std(vals, ddof=1)):.2f} (n={len(vals)})", m

    for size in SIZES:
        got = {v: [r["test_acc"] for r in rows if r["size"] == size and r["variant"] == v] for v in VARIANTS}
        if not any(got.values()):
            continue
        params = next(r["params"] for r in rows if r["size"] == size)
        cells = [cell(got[v]) for v in VARIANTS]
        gain = f"{cells[2][1] - cells[0][1]:+.2f} pt" if cells[0][1] is not None and cells[2][1] is not None else "-"
        lines.append(f"| {size} | {params:,} | " + " | ".join(c[0] for c in cells) + f" | {gain} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "nsmc")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "kd")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "kd-headline")
    ap.add_argument("--train-rows", type=int, default=None)
    ap.add_argument("--transfer-rows", type=int, default=200_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for E8/H16 and E64/H128 (one for the others)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = base_config(args)
    tfile = args.out / "teacher.json"
    if args.table_only:
        print(table(args.out, json.loads(tfile.read_text()) if tfile.is_file() else None))
        return 0

    t0 = time.perf_counter()
    _, prep = _prepare(raw, log=lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", flush=True))
    build_s = time.perf_counter() - t0
    teacher = {**prep.teacher.metrics, "build_s": build_s if not tfile.is_file() else
               json.loads(tfile.read_text())["build_s"]}
    tfile.write_text(json.dumps(teacher, indent=2))
    print(f"teacher ready in {build_s:.0f} s: test {teacher['test_acc']:.4f}", flush=True)

    done = set()
    if (args.out / "runs.jsonl").is_file():
        done = {(r["size"], r["variant"], r["seed"]) for r in map(json.loads, (args.out / "runs.jsonl").read_text().splitlines())}
    sizes = [s for s in args.sizes.split(",") if s]
    jobs = [(s, v, 0) for s in sizes for v in VARIANTS]  # one full table first, then the extra seeds
    jobs += [(s, v, seed) for seed in range(1, args.seeds) for s in sizes if s in ("E8/H16", "E64/H128") for v in VARIANTS]
    jobs = [j for j in jobs if j not in done]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(run_one, raw, *j): j for j in jobs}
        for fut in as_completed(futures):
            r = fut.result()
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[{time.perf_counter() - t0:6.0f}s] {r['size']} {r['variant']} seed {r['seed']}: test "
                  f"{r['test_acc']:.4f} (best epoch {r['best_epoch']}, {r['rows_per_epoch']} rows/epoch, "
                  f"{r['wall_s']:.0f} s)", flush=True)
    print(table(args.out, teacher))
    return 0


if __name__ == "__main__":
    sys.exit(main())
