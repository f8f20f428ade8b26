"""The strongest teacher this 2-core CPU builds within a time budget, without a model hub, and its test accuracy.

    python bench/teacher.py                     # whole NSMC training split, cold cache: about 15 minutes
    python bench/teacher.py --train-rows 10000  # a quick look

The recipe (measured in ../shared/PERF_NOTES.md and results/benchmarks.md): members that see the text differently
add up. Two n-gram models (characters + words; Korean morphemes with their POS tags) cost a minute or two each and
are the strongest single members; a wide BiLSTM adds a recurrent view. Their log-probabilities are averaged with
weights chosen on the validation split. The same config goes into a sweep as `teacher.source: [...]` (see RECIPE).
Members are cached: run it twice and the second run only reads files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = [
    {"source": "ngram", "ngram": {"analyzer": "chars_words"}},
    {"source": "ngram", "ngram": {"analyzer": "morphemes", "max_features": 600000}},
    {"source": "bilstm", "epochs": 3, "vocab_size": 3000, "batch_size": 64,
     "bilstm": {"embedding_dim": 128, "hidden_dim": 256}},
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "nsmc")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "kd")
    ap.add_argument("--train-rows", type=int, default=None)
    ap.add_argument("--transfer-rows", type=int, default=0, help="also label this many unlabeled reviews")
    ap.add_argument("--budget-min", type=float, default=60.0)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    data = {"dir": str(args.data_dir), "download": False, "train_rows": args.train_rows}
    if args.transfer_rows:
        data.update(transfer_file="unlabeled.txt", transfer_rows=args.transfer_rows)
    cfg = ExperimentConfig.model_validate({"data": data, "teacher": {"source": RECIPE, "max_length": 128, "threads": 2},
                                           "cache_dir": str(args.cache_dir)})
    t0 = time.perf_counter()
    prep = prepare(cfg, lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", flush=True))
    wall = time.perf_counter() - t0
    m = prep.teacher.metrics
    for member in m.get("members", []):
        print(f"member {member['source']}: val {member['val_acc']:.4f}, test {member['test_acc']:.4f}")
    print(f"teacher: test {m['test_acc']:.4f}, val {m['val_acc']:.4f}, weights {m['weights']}, {wall:.0f} s "
          f"({'within' if wall <= 60 * args.budget_min else 'OVER'} the {args.budget_min:g}-minute budget"
          f"{'; cache hits, not a build time' if wall < 60 and not args.train_rows else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
