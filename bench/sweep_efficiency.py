"""Sweep efficiency, in one run on the same machine:

  (a) ASHA + TPE against the seed_grid-style grid (hidden/embedding pairs x loss rate x temperature), the same
      per-trial epochs: best validation accuracy of each and the trial-epochs each spent. A few hundred validation
      reviews make one sweep's best a noisy figure, so each side's best configuration is then retrained with
      `--seeds` new seeds (no Ray) and scored on the test split too: mean +- std per side, and the difference of the
      means with its standard error;
  (b) the same 4 students run 2 at a time (1 core each) against 1 at a time: wall-time speed-up, `--repeats` times
      each with the order alternating (sequential first, then parallel first, ...), min and median;
  (c) Ray's per-trial overhead in the sequential runs: (wall time - time inside the trainable) / trials, min and
      median.

    python bench/sweep_efficiency.py [--rows 8000] [--epochs 3] [--seeds 3] [--repeats 3] [--out /tmp/kd-bench]

step_size is left out of the grid: with 3 epochs, StepLR steps of 5 and 10 never fire, so both values train the
same student (the seed grid's 200 students become 100 distinct ones).
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
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
    # Twins off: the finalists' no-teacher reruns would add trials and epochs to what is compared here.
    cfg = {**cfg, "sweep": {"twins": 0, **cfg["sweep"]}}
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
    ap.add_argument("--seeds", type=int, default=3, help="reruns of each side's best configuration")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each of (b)'s two settings")
    ap.add_argument("--out", default="/tmp/kd-bench")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    b = base(out, args.rows, args.epochs)

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    prep = prepare(ExperimentConfig.model_validate(b), log=lambda m: None)  # teacher + logits outside every timing

    # (b) + (c): four fixed students, sequential and two at a time, no early stopping, alternating.
    fixed = {"parameters": {"dims": GRID["dims"] | {"choices": {k: v for k, v in list(GRID["dims"]["choices"].items())[1:3]}},
                            "train.alpha": {"type": "categorical", "choices": [0.1, 0.5]}}}
    par = {**b, "sweep": {"space": fixed, "searcher": "grid", "scheduler": {"kind": "none"}, "max_concurrent": 1}}
    walls: dict[str, list[float]] = {"sequential": [], "parallel": []}
    overheads: list[float] = []
    for i in range(args.repeats):
        for kind in (("sequential", "parallel") if i % 2 == 0 else ("parallel", "sequential")):
            conc = 1 if kind == "sequential" else 2
            wall, rows = run(out, f"{kind}_{i}", {**par, "sweep": {**par["sweep"], "max_concurrent": conc}})
            walls[kind].append(wall)
            if kind == "sequential":
                overheads.append((wall - sum(r["wall_time_s"] for r in rows)) / len(rows))
            print(f"(b) repeat {i + 1} {kind}: {wall:.1f} s", flush=True)

    # (a) the grid against ASHA + TPE.
    wall_grid, grid = run(out, "grid", {**b, "sweep": {"space": {"parameters": GRID}, "searcher": "grid",
                                                       "scheduler": {"kind": "none"}, "max_concurrent": 2}})
    wall_tpe, tpe = run(out, "asha_tpe", {**b, "sweep": {
        "space": {"parameters": TPE_SPACE}, "searcher": "tpe", "seed": 0, "num_samples": args.tpe_trials,
        "max_concurrent": 2, "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3}}})
    g_row, t_row = max(grid, key=lambda r: r["best_val_acc"]), max(tpe, key=lambda r: r["best_val_acc"])
    g_best, t_best = g_row["best_val_acc"], t_row["best_val_acc"]
    g_ep, t_ep = sum(r["epochs"] for r in grid), sum(r["epochs"] for r in tpe)
    reruns = {side: rerun(b, row, prep, args.seeds) for side, row in (("grid", g_row), ("asha_tpe", t_row))}

    n_val = round(args.rows * 0.1)
    print(f"data: {args.rows} reviews ({args.rows - n_val} train, {n_val} validation), 2000 test, "
          f"{args.epochs} epochs per trial, 2 CPU cores")
    print(f"(a) grid:      {len(grid):3d} trials, {g_ep:4d} trial-epochs, best val_acc {g_best:.4f}, {wall_grid:.0f} s")
    print(f"(a) ASHA+TPE:  {len(tpe):3d} trials, {t_ep:4d} trial-epochs, best val_acc {t_best:.4f}, {wall_tpe:.0f} s")
    print(f"(a) ASHA+TPE - grid (one sweep each): {100 * (t_best - g_best):+.2f} pt "
          f"({round(abs(t_best - g_best) * n_val)} validation reviews) with {100 * t_ep / g_ep:.0f}% of the trial-epochs")
    for key in ("val_acc", "test_acc"):
        for side in ("grid", "asha_tpe"):
            v = reruns[side][key]
            print(f"(a) {side:8s} best config, {args.seeds} new seeds: {key} {100 * statistics.mean(v):.2f} "
                  f"+- {100 * _std(v):.2f} ({', '.join(f'{100 * x:.2f}' for x in v)})")
        a, g = reruns["asha_tpe"][key], reruns["grid"][key]
        se = math.sqrt(_std(a) ** 2 / len(a) + _std(g) ** 2 / len(g))
        print(f"(a) ASHA+TPE - grid, {key} over seeds: {100 * (statistics.mean(a) - statistics.mean(g)):+.2f} "
              f"+- {100 * se:.2f} pt (standard error)")
    s_min, s_med = min(walls["sequential"]), statistics.median(walls["sequential"])
    p_min, p_med = min(walls["parallel"]), statistics.median(walls["parallel"])
    print(f"(b) 4 students, {args.repeats} repeats: sequential min {s_min:.1f} / median {s_med:.1f} s, 2 at a time "
          f"min {p_min:.1f} / median {p_med:.1f} s; speed-up {s_min / p_min:.2f}x (mins), {s_med / p_med:.2f}x (medians)")
    print(f"(c) Ray overhead per trial (sequential runs): min {min(overheads):.2f}, "
          f"median {statistics.median(overheads):.2f} s")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def rerun(base_cfg: dict, row: dict, prep, seeds: int) -> dict[str, list[float]]:
    """The row's configuration retrained with seeds 1..seeds, no Ray: best val_acc and its test_acc per seed."""
    from trainable.tasks import config_from_trial
    from trainable.loop import train_student
    from trainable.prepare import student_inputs

    hp = {k[len("hp."):]: v for k, v in row.items() if k.startswith("hp.") and v is not None}
    out: dict[str, list[float]] = {"val_acc": [], "test_acc": []}
    for seed in range(1, seeds + 1):
        cfg = config_from_trial(base_cfg, {**hp, "train.seed": seed})
        data, logits = student_inputs(prep.encoded, prep.logits, cfg)
        r = train_student(cfg.student, cfg.train, data, logits, log=lambda m: None)
        out["val_acc"].append(r.val_acc)
        out["test_acc"].append(r.test_acc)
    return out

if __name__ == "__main__":
    main()
