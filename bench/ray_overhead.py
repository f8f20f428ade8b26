"""Ray's per-trial overhead, with and without actor reuse, in one run on the same machine.

    python bench/ray_overhead.py [--trials 12] [--rows 2000] [--repeats 3]

The same N tiny students (1 epoch each, one at a time, no early stopping) run through `sweep run`'s code with
`sweep.reuse_actors: false` (a fresh Ray actor process per trial) and `true` (the next trial runs in the finished
trial's process), `--repeats` times each, the order alternating (false first, then true first, ...) so that a cold
start or drift does not always land on the same setting. Overhead per trial = (Tuner.fit wall time - time inside
the trainable) / N; min and median over the repeats.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sweep_efficiency import base, run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="/tmp/kd-bench-overhead")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    b = base(out, args.rows, 1)
    b["train"]["alpha"] = 1.0  # no teacher needed: this measures Ray, not distillation

    space = {"parameters": {"student.hidden_dim": {"type": "categorical",
                                                   "choices": list(range(8, 8 + 2 * args.trials, 2))}}}
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for i in range(args.repeats):
        for reuse in ((False, True) if i % 2 == 0 else (True, False)):
            cfg = {**b, "sweep": {"space": space, "searcher": "grid", "scheduler": {"kind": "none"},
                                  "max_concurrent": 1, "reuse_actors": reuse}}
            wall, rows = run(out, f"reuse_{str(reuse).lower()}_{i}", cfg)
            assert len(rows) == args.trials and all(r["status"] == "finished" for r in rows)
            inside = sum(r["wall_time_s"] for r in rows)
            results[reuse].append((wall, (wall - inside) / len(rows)))
            print(f"repeat {i + 1} reuse_actors={str(reuse).lower():5s}: {args.trials} trials in {wall:.1f} s, "
                  f"overhead {results[reuse][-1][1]:.2f} s/trial", flush=True)

    def summary(reuse: bool) -> tuple[float, float, float, float]:
        walls, over = [w for w, _ in results[reuse]], [o for _, o in results[reuse]]
        return min(walls), statistics.median(walls), min(over), statistics.median(over)

    for reuse in (False, True):
        wmin, wmed, omin, omed = summary(reuse)
        print(f"reuse_actors={str(reuse).lower():5s}: wall min {wmin:.1f} s, median {wmed:.1f} s; "
              f"overhead min {omin:.2f}, median {omed:.2f} s/trial ({args.repeats} repeats)")
    (_, w0, _, o0), (_, w1, _, o1) = summary(False), summary(True)
    print(f"actor reuse (medians): overhead {o0:.2f} -> {o1:.2f} s/trial ({o0 / o1:.2f}x less), "
          f"sweep wall {w0 / w1:.2f}x faster")

if __name__ == "__main__":
    main()
