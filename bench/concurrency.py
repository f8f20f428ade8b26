"""Two trials at a time: where the speed-up short of 2x goes (issue 19, item 6). In one run, on the same machine:

  (1) without Ray: the same 4 fixed students trained by the real loop (`trainable.loop.train_student`) in plain
      processes, 1 at a time and 2 at a time (one torch thread each), timed inside the processes: the speed-up the
      machine itself allows for two 1-thread trainings (memory bandwidth, caches, what the host gives two vCPUs);
  (2) through the sweep: `sweep_efficiency.py`'s (b) (the same 4 students, `run_sweep`, max_concurrent 1 and 2,
      no ASHA, no twins), each trial's training span read from its TensorBoard events (first record: `fit` opened
      its writer; last: the last epoch's scalars), and the parallel sweep's wall time split into: before the first
      trial trains and after the last one ends (Ray start of the trials, the driver's last checkpoint and
      teardown), time with 2 trials training, with 1 (a trial waiting to start, or the tail), with 0 (gaps).

    python bench/concurrency.py [--rows 8000] [--epochs 3] [--repeats 2] [--out /tmp/kd-concurrency]

Each setting `--repeats` times, the order alternating. Prints one block of figures; results/benchmarks.md records it.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sweep_efficiency import GRID, base  # noqa: E402

DIMS = list(GRID["dims"]["choices"].items())[1:3]  # h128_e64, h64_e32: sweep_efficiency's (b)
STUDENTS = [{**dims, "train.alpha": a} for _, dims in DIMS for a in (0.1, 0.5)]

_PREP = None


def _init(base_cfg: dict) -> None:
    global _PREP
    import torch

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    torch.set_num_threads(1)
    _PREP = (base_cfg, prepare(ExperimentConfig.model_validate(base_cfg), log=lambda m: None))  # cached: a read


def _train(trial: dict) -> tuple[float, float, float]:
    """(start, end, samples/s) of one student trained by the real loop in this process."""
    from trainable.loop import train_student
    from trainable.prepare import student_inputs
    from trainable.tasks import config_from_trial

    base_cfg, prep = _PREP
    cfg = config_from_trial(base_cfg, trial)
    data, logits = student_inputs(prep.encoded, prep.logits, cfg)
    t0 = time.time()
    r = train_student(cfg.student, cfg.train, data, logits, log=lambda m: None)
    return t0, time.time(), r.samples_per_s


def plain(base_cfg: dict, workers: int) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init, initargs=(base_cfg,)) as pool:
        pool.map(_noop, range(workers))  # both workers up and prepared before the clock starts
        spans = pool.map(_train, STUDENTS, chunksize=1)
    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    return {"wall": wall, "per_student": statistics.mean(e - s for s, e, _ in spans),
            "samples_per_s": statistics.mean(x for _, _, x in spans)}


def _noop(_):
    return None


def run(out: Path, name: str, cfg: dict) -> tuple[float, float]:
    """`run_sweep` of `cfg`: (Tuner.fit's wall time, the moment it ended), from the sweep's own log line."""
    import yaml

    from sweep.tuner import run_sweep

    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**cfg, "name": name, "sweep": {"twins": 0, **cfg["sweep"]}}))
    said: list[tuple[float, str]] = []
    assert run_sweep(str(path), [], force=True, log=lambda m: said.append((time.time(), m))) == 0, name
    when, line = next((t, m) for t, m in said if m.startswith("sweep finished in"))
    return float(line.split()[3]), when


def timeline(trials: list[dict]) -> dict:
    """Within [first training start, last training end]: seconds with 2, 1 and 0 trials training."""
    iv = sorted((t["start"], t["end"]) for t in trials if t["start"] and t["end"])
    points = sorted({p for ab in iv for p in ab})
    at = {0: 0.0, 1: 0.0, 2: 0.0}
    for a, b in zip(points, points[1:]):
        n = sum(1 for s, e in iv if s <= a and e >= b)
        at[min(n, 2)] += b - a
    return {"first": iv[0][0], "last": max(e for _, e in iv), **{f"t{k}": v for k, v in at.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="/tmp/kd-concurrency")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    b = base(out, args.rows, args.epochs)
    _init(b)  # teacher and logits made (or read) once, outside every timing

    from gpu_check import read_trials

    fixed = {"parameters": {"dims": {"type": "categorical", "choices": dict(DIMS)},
                            "train.alpha": {"type": "categorical", "choices": [0.1, 0.5]}}}
    par = {**b, "sweep": {"space": fixed, "searcher": "grid", "scheduler": {"kind": "none"}}}
    res: dict[str, list[dict]] = {k: [] for k in ("plain1", "plain2", "ray1", "ray2")}
    for i in range(args.repeats):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        for k in order:
            p = plain(b, k)
            res[f"plain{k}"].append(p)
            print(f"plain, {k} at a time, repeat {i + 1}: {p['wall']:.1f} s, {p['per_student']:.1f} s per student, "
                  f"{p['samples_per_s']:.0f} samples/s each", flush=True)
        for k in order:
            wall, ended = run(out, f"ray{k}_{i}", {**par, "sweep": {**par["sweep"], "max_concurrent": k}})
            trials = read_trials(out / f"ray{k}_{i}")
            tl = timeline(trials)
            tl["before"], tl["after"] = tl["first"] - (ended - wall), ended - tl["last"]
            spans = [t["span_s"] for t in trials if t["span_s"]]
            inside = [t["ray_time_s"] - t["span_s"] for t in trials if t["span_s"] and t["ray_time_s"]]
            r = {"wall": wall, "span_mean": statistics.mean(spans), "span_sum": sum(spans),
                 "inside_not_training": statistics.mean(inside) if inside else None,
                 **tl}
            res[f"ray{k}"].append(r)
            print(f"ray, {k} at a time, repeat {i + 1}: fit {wall:.1f} s; training spans {r['span_mean']:.1f} s "
                  f"each (sum {r['span_sum']:.1f}); before the first training {r['before']:.1f} s, after the last "
                  f"{r['after']:.1f} s; "
                  f"2 training {r['t2']:.1f} s, 1 {r['t1']:.1f} s, 0 {r['t0']:.1f} s", flush=True)

    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0] if v[0][m] is not None} for k, v in res.items()}
    p1, p2, r1, r2 = med["plain1"], med["plain2"], med["ray1"], med["ray2"]
    print(f"\n{args.repeats} repeats each, medians; 4 students (E64/H128 and E32/H64, alpha 0.1 and 0.5), "
          f"{args.rows} rows, {args.epochs} epochs")
    print(f"(1) plain processes: 1 at a time {p1['wall']:.1f} s, 2 at a time {p2['wall']:.1f} s: "
          f"**{p1['wall'] / p2['wall']:.2f}x**; one student's training {p1['per_student']:.1f} s alone, "
          f"{p2['per_student']:.1f} s beside another ({p2['per_student'] / p1['per_student']:.2f}x slower)")
    print(f"(2) sweep: 1 at a time {r1['wall']:.1f} s, 2 at a time {r2['wall']:.1f} s: **{r1['wall'] / r2['wall']:.2f}x**")
    print(f"    a trial's training span: {r1['span_mean']:.1f} s alone, {r2['span_mean']:.1f} s two at a time "
          f"({r2['span_mean'] / r1['span_mean']:.2f}x slower)")
    print(f"    2 at a time, of {r2['wall']:.1f} s: {r2['before']:.1f} s before the first trial trains, "
          f"{r2['after']:.1f} s after the last ends, {r2['t2']:.1f} s two training, {r2['t1']:.1f} s one, "
          f"{r2['t0']:.1f} s none (1 at a time: {r1['before']:.1f} s before, {r1['after']:.1f} s after, "
          f"{r1['t0']:.1f} s between trials)")
    if "inside_not_training" in r2:
        print(f"    per trial, Ray's time_total_s minus the training span (start in the actor, last report): "
              f"{r1.get('inside_not_training', float('nan')):.2f} s alone, {r2['inside_not_training']:.2f} s two at a time")
    ideal = r1["wall"] / 2
    print(f"    the 2x ideal would be {ideal:.1f} s; the parallel sweep took {r2['wall'] - ideal:+.1f} s more: "
          f"contention (spans x{r2['span_mean'] / r1['span_mean']:.2f}: "
          f"{(r2['span_mean'] - r1['span_mean']) * len(STUDENTS) / 2:+.1f} s), "
          f"the rest fixed costs that do not halve and one trial alone ({r2['t1']:.1f} s)")


if __name__ == "__main__":
    main()
