"""The task seam changed nothing for the classify task: the same student trained by the code before the seam and by
the code after it, alternately, in fresh processes, same data, seed and teacher logits.

    git worktree add /tmp/before <commit before the seam>
    python bench/task_seam.py --before /tmp/before [--rows 20000] [--epochs 2] [--repeats 3]

Prints, per tree, the training samples/s of each run (median and min) and the validation accuracy per epoch; then
the after/before throughput ratio and whether the accuracies are identical (they must be: same computation).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from trainable.config import ExperimentConfig
from trainable.loop import train_student
from trainable.prepare import prepare
cfg = ExperimentConfig.model_validate(json.loads(sys.argv[2]))
prep = prepare(cfg, log=lambda m: None)
r = train_student(cfg.student, cfg.train, prep.encoded[cfg.tokenizer.vocab_size], prep.logits["train"],
                  log=lambda m: None)
print(json.dumps({"samples_per_s": r.samples_per_s, "val_acc": [h["val_acc"] for h in r.history],
                  "test_acc": r.test_acc}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="a checkout of the commit before the task seam")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "nsmc"))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "bench-task-seam"))
    args = ap.parse_args()
    cfg = {"data": {"dir": args.data_dir, "download": False, "train_rows": args.rows, "test_rows": 5000},
           "tokenizer": {"vocab_size": 3000, "max_length": 128},
           "teacher": {"preset": "tiny", "epochs": 1, "max_length": 64, "vocab_size": 3000, "lr": 5e-4},
           "student": {"embedding_dim": 64, "hidden_dim": 128},
           "train": {"epochs": args.epochs, "batch_size": 64, "threads": args.threads, "alpha": 0.5},
           "cache_dir": args.cache_dir}
    trees = {"before": str(Path(args.before).resolve()), "after": str(ROOT)}
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    order = ["before", "after"]
    for i in range(args.repeats):
        for name in (order if i % 2 == 0 else order[::-1]):  # alternate, so drift hits both alike
            out = subprocess.run([sys.executable, "-c", CHILD, trees[name], json.dumps(cfg)], capture_output=True,
                                 text=True, check=True, cwd=trees[name]).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name:6s} run {i + 1}: {runs[name][-1]['samples_per_s']:.0f} samples/s, val_acc "
                  f"{runs[name][-1]['val_acc']}", flush=True)
    med = {k: statistics.median(r["samples_per_s"] for r in v) for k, v in runs.items()}
    for k, v in runs.items():
        print(f"{k:6s}: median {med[k]:.0f} samples/s, min {min(r['samples_per_s'] for r in v):.0f}, "
              f"test_acc {v[0]['test_acc']:.4f}")
    same = all(r["val_acc"] == runs["before"][0]["val_acc"] for v in runs.values() for r in v)
    print(f"after / before throughput (medians): {med['after'] / med['before']:.3f}x")
    print(f"validation accuracies identical across trees and runs: {same}")


if __name__ == "__main__":
    main()
