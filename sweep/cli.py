"""The `sweep` command line.

    sweep prepare CONFIG                 data, tokenizer, teacher, teacher logits (idempotent, cached)
    sweep train CONFIG [--set k=v ...]   one student, no Ray
    sweep run CONFIG [--set k=v ...]     a sweep with Ray Tune + Optuna + ASHA
    sweep resume NAME|PATH               continue an interrupted sweep
    sweep report NAME|PATH               trials.parquet, report.md and plots
    sweep export NAME|PATH --out DIR     the best student, ready for `sweep predict`
    sweep predict DIR TEXT...            labels for new text
    sweep tensorboard NAME|PATH          TensorBoard on 127.0.0.1

Bad input exits with status 2 and one line on stderr; nothing is created or overwritten.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

USAGE_ERROR = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args) -> int:
    from trainable.prepare import prepare

    from .config import load_config, student_transfer_rows, student_vocab_sizes

    cfg, _ = load_config(args.config, args.set)
    t0 = time.perf_counter()
    prep = prepare(cfg, log, vocab_sizes=student_vocab_sizes(cfg), transfer_rows=student_transfer_rows(cfg))
    if prep.teacher is not None:
        log(f"teacher: {', '.join(str(t.path) for t in prep.teacher.members)} (val "
            f"{prep.teacher.metrics.get('val_acc', float('nan')):.4f}, "
            f"test {prep.teacher.metrics.get('test_acc', float('nan')):.4f})")
    log(f"prepared in {time.perf_counter() - t0:.1f} s; cache: {cfg.cache_dir}")
    return 0


def cmd_train(args) -> int:
    from trainable.io import write_json
    from trainable.loop import train_student
    from trainable.prepare import prepare, student_inputs

    from .config import load_config
    from .runs import claim_dir, stamp

    cfg, _ = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else Path(cfg.results_dir) / "runs" / cfg.name
    resume_from = None
    if args.resume and (run_dir / "config.yaml").is_file():
        # A resumed run keeps its own resolved config; --set may still change e.g. train.epochs.
        cfg, _ = load_config(run_dir / "config.yaml", args.set)
        ckpts = sorted((run_dir / "checkpoints").glob("epoch_*"))
        resume_from = ckpts[-1] if ckpts else None
    claim_dir(run_dir, force=args.force, resume=args.resume)
    try:
        prep = prepare(cfg, log, need_teacher=cfg.train.alpha < 1.0)
        stamp(run_dir, cfg)
        data, logits = student_inputs(prep.encoded, prep.logits, cfg)
        if data.transfer is not None:
            log(f"student: {len(data.train)} labelled + {len(data.transfer)} transfer rows per epoch")
        result = train_student(cfg.student, cfg.train, data, logits, num_classes=cfg.data.num_classes,
                               run_dir=run_dir, resume_from=resume_from, log=log)
    except BaseException:
        if resume_from is None and not (run_dir / "checkpoints").exists():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no partial folder
        raise
    out = asdict(result)
    out.pop("history")
    if prep.teacher is not None:
        out["teacher"] = {"paths": [str(t.path) for t in prep.teacher.members], **prep.teacher.metrics}
    write_json(run_dir / "result.json", out)
    log(f"student: val_acc {result.val_acc:.4f} test_acc {result.test_acc:.4f} params {result.params} "
        f"size {result.size_kb:.1f} KiB, {result.samples_per_s:.0f} samples/s")
    log(f"run folder: {run_dir}")
    print(json.dumps(out))
    return 0


def cmd_run(args) -> int:
    from .tuner import run_sweep

    return run_sweep(args.config, args.set, force=args.force, resume=args.resume, address=args.address, log=log)


def cmd_resume(args) -> int:
    from .tuner import resume_sweep

    return resume_sweep(args.target, address=args.address, log=log)


def cmd_report(args) -> int:
    from .report import build_report, find_sweep

    folder = find_sweep(args.target)
    report = build_report(folder, log=log)
    print(report.read_text())
    return 0


def cmd_export(args) -> int:
    from .export import export_best
    from .report import find_sweep

    out = export_best(find_sweep(args.target), Path(args.out), force=args.force, log=log)
    log(f"exported the best student to {out}")
    return 0


def cmd_predict(args) -> int:
    from .export import predict

    for text, label, probs in predict(Path(args.model_dir), args.text):
        print(json.dumps({"text": text, "label": label, "probs": probs}, ensure_ascii=False))
    return 0


def cmd_tensorboard(args) -> int:
    import subprocess

    from .report import find_sweep

    folder = find_sweep(args.target)
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(folder), "--host", args.host,
           "--port", str(args.port)]
    log(f"TensorBoard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd)


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description="Hyperparameter sweeps for knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config (see search_spaces/quickstart.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=3 (repeatable)")

    sp = sub.add_parser("prepare", help="data, tokenizer, teacher and teacher logits (cached)")
    with_config(sp)
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("train", help="train one student without Ray")
    with_config(sp)
    sp.add_argument("--out", help="run folder (default: RESULTS_DIR/runs/NAME)")
    sp.add_argument("--force", action="store_true", help="replace an existing run folder")
    sp.add_argument("--resume", action="store_true", help="continue an existing run from its last checkpoint")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("run", help="run a sweep")
    with_config(sp)
    sp.add_argument("--address", help="an existing Ray cluster (default: $RAY_ADDRESS, else local Ray on 127.0.0.1)")
    sp.add_argument("--force", action="store_true", help="replace an existing sweep of the same name")
    sp.add_argument("--resume", action="store_true", help="continue an existing sweep of the same name")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("resume", help="continue an interrupted sweep")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--address", help="an existing Ray cluster")
    sp.set_defaults(func=cmd_resume)

    sp = sub.add_parser("report", help="write and print the sweep's report")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("export", help="export the best student")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--out", required=True, help="folder to write")
    sp.add_argument("--force", action="store_true", help="replace an existing folder")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("predict", help="label new text with an exported student")
    sp.add_argument("model_dir")
    sp.add_argument("text", nargs="+")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("tensorboard", help="serve the sweep's TensorBoard on 127.0.0.1")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=6006)
    sp.set_defaults(func=cmd_tensorboard)
    return p


def main(argv: list[str] | None = None) -> int:
    from search_spaces import SpaceError
    from trainable.data import DataError
    from trainable.teacher import TeacherError

    from .config import ConfigError
    from .runs import StorageError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except (ConfigError, SpaceError, DataError, TeacherError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
