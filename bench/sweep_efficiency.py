"""Sweep efficiency, in one run on the same machine:

  (a) ASHA + TPE against the seed_grid-style grid (hidden/embedding pairs x loss rate x temperature), the same
      per-trial epochs: best validation accuracy of each and the trial-epochs each spent;
  (b) the same 4 students run 2 at a time (1 core each) against 1 at a time: wall-time speed-up;
  (c) Ray's per-trial overhead in the sequential run: (wall time - time inside the trainable) / trials.

    python bench/sweep_efficiency.py [--rows 8000] [--epochs 3] [--out /tmp/kd-bench]

step_size is left out of the grid: with 3 epochs, StepLR steps of 5 and 10 never fire, so both values train the
same student (the seed grid's 200 students become 100 distinct ones).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GRID = {
    "dims": {"type": "categorical", "choices": {
        "h256_e128": {"student.hidden_dim": 256, "student.embedding_dim": 128},
        "h128_e64": {"student.hidden_dim": 128, "student.embedding_dim": 64},
        "h64_e32": {"student.hidden_dim": 64, "student.embedding_dim": 32},
        "h16_e16": {"student.hidden_dim": 16, "student.embedding_dim": 16},
        "h26_e8": {"student.hidden_dim": 26, "student.embedding_dim": 8}}},
    "train.alpha": {"type": "categorical", "choices": [0.0, 0.1, 0.5, 0.9]},
    "train.temperature": {"type": "categorical", "choices": [1.0, 2.0, 3.0, 4.0, 10.0]},
}
TPE_SPACE = {
    "student.hidden_dim": {"type": "int", "low": 16, "high": 256, "log": True},
    "student.embedding_dim": {"type": "int", "low": 8, "high": 128, "log": True},
    "train.alpha": {"type": "float", "low": 0.0, "high": 0.9},
    "train.temperature": {"type": "float", "low": 1.0, "high": 10.0, "log": True},
}


def base(out: Path, rows: int, epochs: int) -> dict:
    return {
        "data": {"mirrors": [str((ROOT.parent / "shared" / "data" / "nsmc").resolve())], "dir": "data/nsmc",
                 "train_rows": rows, "test_rows": 2000},
        "tokenizer": {"vocab_size": 3000, "max_length": 128},
        "teacher": {"preset": "tiny", "epochs": 2, "max_length": 128, "vocab_size": 4000},
        "train": {"epochs": epochs, "batch_size": 64, "threads": 1, "step_size": 5},
        "cache_dir": str(ROOT / ".cache" / "kd"), "results_dir": str(out),
    }


def run(out: Path, name: str, cfg: dict) -> tuple[float, list[dict]]:
    from sweep.tuner import run_sweep

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name}))
    msgs: list[str] = []
    rc = run_sweep(str(path), [], force=True, log=msgs.append)
    assert rc == 0, f"sweep {name} failed"
    # Wall time of Tuner.fit alone (no Ray start, no preparation, no report).
    wall = float(next(m for m in msgs if m.startswith("sweep finished in")).split()[3])
    return wall, pq.read_table(out / name / "trials.parquet").to_pylist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tpe-trials", type=int, default=40)
    ap.add_argument("--out", default="/tmp/kd-bench")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    b = base(out, args.rows, args.epochs)

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    prepare(ExperimentConfig.model_validate(b), log=lambda m: None)  # teacher + logits outside every timing

    # (b) + (c): four fixed students, sequential then two at a time, no early stopping.
    fixed = {"parameters": {"dims": GRID["dims"] | {"choices": {k: v for k, v in list(GRID["dims"]["choices"].items())[1:3]}},
                            "train.alpha": {"type": "categorical", "choices": [0.1, 0.5]}}}
    par = {**b, "sweep": {"space": fixed, "searcher": "grid", "scheduler": {"kind": "none"}, "max_concurrent": 1}}
    wall_seq, rows_seq = run(out, "sequential", par)
    wall_par, _ = run(out, "parallel", {**par, "sweep": {**par["sweep"], "max_concurrent": 2}})
    inside = sum(r["wall_time_s"] for r in rows_seq)
    overhead = (wall_seq - inside) / len(rows_seq)

    # (a) the grid against ASHA + TPE.
    wall_grid, grid = run(out, "grid", {**b, "sweep": {"space": {"parameters": GRID}, "searcher": "grid",
                                                       "scheduler": {"kind": "none"}, "max_concurrent": 2}})
    wall_tpe, tpe = run(out, "asha_tpe", {**b, "sweep": {
        "space": {"parameters": TPE_SPACE}, "searcher": "tpe", "seed": 0, "num_samples": args.tpe_trials,
        "max_concurrent": 2, "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3}}})
    g_best, t_best = max(r["best_val_acc"] for r in grid), max(r["best_val_acc"] for r in tpe)
    g_ep, t_ep = sum(r["epochs"] for r in grid), sum(r["epochs"] for r in tpe)

    print(f"data: {args.rows} reviews (90% train), {args.epochs} epochs per trial, 2 CPU cores")
    print(f"(a) grid:      {len(grid):3d} trials, {g_ep:4d} trial-epochs, best val_acc {g_best:.4f}, {wall_grid:.0f} s")
    print(f"(a) ASHA+TPE:  {len(tpe):3d} trials, {t_ep:4d} trial-epochs, best val_acc {t_best:.4f}, {wall_tpe:.0f} s")
    print(f"(a) ASHA+TPE - grid: {100 * (t_best - g_best):+.2f} pt with {100 * t_ep / g_ep:.0f}% of the trial-epochs")
    print(f"(b) 4 students: sequential {wall_seq:.1f} s, 2 at a time {wall_par:.1f} s, speed-up {wall_seq / wall_par:.2f}x")
    print(f"(c) Ray overhead per trial (sequential run): {overhead:.2f} s")


if __name__ == "__main__":
    main()
