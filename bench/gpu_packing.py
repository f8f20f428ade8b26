"""Fractional-GPU packing: N students trained at once on one GPU (what `sweep.resources.gpu: 1/N` asks Ray to do:
N worker processes sharing the device) against one student alone on it. Same student, same data, one run.

    python bench/gpu_packing.py [--data-dir ../shared/data/nsmc] [--students 4] [--epochs 2]

Prints each configuration's aggregate training samples/s (all students' samples over the wall time of the slowest)
and the ratio last. Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _student(args: tuple) -> tuple[float, float, float, float]:
    """Train one student in its own process; (start, end, samples, val_acc)."""
    cfg_dict, seed, cache_dir = args
    import torch

    from trainable.config import ExperimentConfig
    from trainable.loop import train_student
    from trainable.prepare import prepare

    cfg = ExperimentConfig.model_validate(cfg_dict)
    prep = prepare(cfg, log=lambda m: None)  # cache hits: prepared once by the parent
    data = prep.encoded[cfg.tokenizer.vocab_size]
    torch.cuda.init()
    tcfg = cfg.train.model_copy(update={"seed": seed})
    start = time.perf_counter()
    r = train_student(cfg.student, tcfg, data, prep.logits["train"], log=lambda m: None)
    end = time.perf_counter()
    return start, end, len(data.train) * r.epochs, r.val_acc


def run(n: int, cfg: dict, cache_dir: str) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    with ctx.Pool(n) as pool:
        out = pool.map(_student, [(cfg, seed, cache_dir) for seed in range(n)])
    wall = max(o[1] for o in out) - min(o[0] for o in out)
    return sum(o[2] for o in out) / wall, [o[3] for o in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/nsmc")
    ap.add_argument("--students", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--cache-dir", default=".cache/kd")
    args = ap.parse_args()
    import torch

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    cfg = {
        "data": {"dir": args.data_dir, "download": False, "train_rows": args.rows},
        "tokenizer": {"vocab_size": 3000, "max_length": 128},
        "teacher": {"preset": "small", "epochs": 1, "max_length": 128, "batch_size": 64},
        "student": {"embedding_dim": 64, "hidden_dim": 128},
        "train": {"epochs": args.epochs, "batch_size": 64, "threads": 2, "device": "cuda"},
        "cache_dir": args.cache_dir,
    }
    t0 = time.perf_counter()
    prep = prepare(ExperimentConfig.model_validate(cfg), log=lambda m: print(m, flush=True))
    print(f"prepared in {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name()}; teacher val "
          f"{prep.teacher.metrics['val_acc']:.4f}, test {prep.teacher.metrics['test_acc']:.4f}", flush=True)
    one, acc1 = run(1, cfg, args.cache_dir)
    print(f"1 student on the GPU:  {one:9.0f} samples/s  val_acc {acc1[0]:.4f}", flush=True)
    many, accn = run(args.students, cfg, args.cache_dir)
    print(f"{args.students} students on the GPU: {many:9.0f} samples/s aggregate  val_acc "
          f"{min(accn):.4f}-{max(accn):.4f}", flush=True)
    print(f"packing gain ({args.students} per GPU / 1 per GPU): {many / one:.2f}x")


if __name__ == "__main__":
    main()
