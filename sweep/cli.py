"""The `sweep` command line.

    sweep prepare CONFIG                 data, tokenizer, teacher, teacher logits (idempotent, cached)
    sweep train CONFIG [--set k=v ...]   one student, no Ray
    sweep plan CONFIG [--set k=v ...]    trials, trial-epochs and wall time of a sweep, before anything trains
    sweep run CONFIG [--set k=v ...]     a sweep with Ray Tune + Optuna + ASHA
    sweep resume NAME|PATH               continue an interrupted sweep
    sweep report NAME|PATH               trials.parquet, report.md and plots
    sweep export NAME|PATH --out DIR     the best student, ready for `sweep predict` (--int8: a quantised copy too)
                 [--trial ID|NUMBER]     that trial's student instead (Ray trial id or Optuna trial number)
    sweep export NAME|PATH --pareto DIR  every student on the Pareto front, a sub-folder each, with index.json
    sweep predict DIR TEXT... | --file F labels for new text (a file, or - for stdin), one JSON line each
    sweep evaluate DIR FILE              accuracy, per-class precision/recall/F1, confusion matrix
    sweep tensorboard NAME|PATH          TensorBoard on 127.0.0.1
    sweep dashboard NAME|PATH            optuna-dashboard over the sweep's study, on 127.0.0.1
    sweep k8s CONFIG [--results pvc:C]   a KubeRay RayJob manifest that runs the sweep on Kubernetes

Bad input exits with status 2 and one line on stderr; nothing is created or overwritten.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from trainable.errors import DataError, TeacherError

USAGE_ERROR = 2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Hugging Face's progress bars and warnings off, by the variables transformers reads when first imported (and
    # that Ray's workers inherit); importing it here to say so cost 1.5 s before every command, refusals included.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args) -> int:
    from .config import load_config, load_space_for

    cfg, _ = load_config(args.config, args.set)
    t0 = time.perf_counter()
    prep = cfg.task_def.prepare(cfg, log, load_space_for(cfg))  # what a sweep of this config prepares
    for line in cfg.task_def.prepared_lines(prep):
        log(line)
    log(f"prepared in {time.perf_counter() - t0:.1f} s; cache: {cfg.cache_dir}")
    return 0


def cmd_train(args) -> int:
    from trainable.io import write_json
    from trainable.tasks import train_task

    from .config import ConfigError, check_writable, load_config, metric_of
    from .runs import Claim, stamp

    cfg, _ = load_config(args.config, args.set)
    check_writable(cfg)
    run_dir = Path(args.out) if args.out else Path(cfg.results_dir) / "runs" / cfg.name
    resume_from = None
    if args.resume and run_dir.is_dir() and any(run_dir.iterdir()):
        from trainable.loop import newest_valid_checkpoint

        ckpts = sorted(c for c in (run_dir / "checkpoints").glob("epoch_*") if (c / "meta.json").is_file())
        if not ckpts or not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a run folder of `sweep train` (expected config.yaml and "
                              f"checkpoints/epoch_*/meta.json); refusing to resume into it")
        resume_from = newest_valid_checkpoint(ckpts[::-1], log)
        if resume_from is None:
            raise ConfigError(f"{run_dir}: none of its {len(ckpts)} checkpoints is readable; pass --force to "
                              f"start the run over")
        # A resumed run keeps its own resolved config; --set may still change e.g. train.epochs.
        cfg, _ = load_config(run_dir / "config.yaml", args.set)
    # --force sets the old folder aside until this run's first checkpoint exists; a failure before that puts it back.
    claim = Claim(run_dir, force=args.force, resume=resume_from is not None, log=log)
    task = cfg.task_def
    with claim:
        prepared = task.prepare(cfg, log)  # this one run's inputs (a sweep's prepare covers its whole space)
        inputs = task.trial_inputs(prepared)
        stamp(run_dir, cfg)
        metric, mode = metric_of(cfg)  # `sweep.metric` picks the kept weights here too
        result = train_task(task, cfg, inputs, metric=metric, mode=mode, run_dir=run_dir, tb_dir=None,
                            resume_from=resume_from, on_epoch=lambda m, ckpt: claim.commit(), keep_checkpoints=2,
                            log=log)
        claim.commit()
    out, line = task.run_result(result, prepared)
    write_json(run_dir / "result.json", out)
    log(line)
    log(f"run folder: {run_dir}")
    print(json.dumps(out))
    return 0


def cmd_run(args) -> int:
    from .tuner import run_sweep

    return run_sweep(args.config, args.set, force=args.force, resume=args.resume, address=args.address, log=log)


def cmd_plan(args) -> int:
    from .config import ConfigError, load_config, load_space_for
    from .plan import make_plan

    cfg, _ = load_config(args.config, args.set)
    space = load_space_for(cfg)
    if space is None:
        raise ConfigError(f"{args.config}: sweep.space: required key is missing (a search-space file or mapping)")
    t0 = time.perf_counter()
    plan = make_plan(cfg, space, log)
    print("\n".join(plan.lines()))
    log(f"planned in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_resume(args) -> int:
    from .tuner import resume_sweep

    return resume_sweep(args.target, address=args.address, log=log, allow_task_code=args.allow_task_code)


def cmd_report(args) -> int:
    from .report import build_report, find_sweep
    from .runs import in_launch_dir

    folder = find_sweep(args.target)
    with in_launch_dir(folder, log):  # the stamped config's relative paths mean what they meant at launch
        report = build_report(folder, log=log, allow_task_code=args.allow_task_code)
    print(report.read_text())
    return 0


def cmd_export(args) -> int:
    from .config import ConfigError
    from .export import export_best, export_pareto
    from .report import find_sweep
    from .runs import in_launch_dir

    if args.pareto is not None and args.trial is not None:
        raise ConfigError("sweep export: --trial names one trial (with --out), --pareto exports the front; give one")
    folder = find_sweep(args.target)
    out = Path(args.pareto if args.pareto is not None else args.out).absolute()
    with in_launch_dir(folder, log):  # the stamped config's relative paths (e.g. the corpus) mean what they meant
        if args.pareto is not None:
            out, index = export_pareto(folder, out, force=args.force, log=log, int8=args.int8,
                                       allow_task_code=args.allow_task_code)
            log(f"exported the {len(index)} trials of the Pareto front to {out} (index.json lists them)")
            return 0
        out = export_best(folder, out, force=args.force, log=log, int8=args.int8,
                          allow_task_code=args.allow_task_code, trial=args.trial)
    log(f"exported {'the best trial' if args.trial is None else 'trial ' + args.trial} to {out}")
    return 0


def cmd_predict(args) -> int:
    from .config import ConfigError
    from .tools import open_predictor, read_input_texts

    if not args.text and args.file is None:
        raise ConfigError("sweep predict: give TEXT arguments or --file PATH (- for stdin)")
    texts = list(args.text) + (read_input_texts(args.file, args.column) if args.file is not None else [])
    task, predict = open_predictor(Path(args.model_dir), args.task, args.runtime, args.batch_size)
    t0 = time.perf_counter()
    rows = predict(texts)
    seconds = time.perf_counter() - t0
    for row in rows:
        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    how = f", {args.runtime}, batch {args.batch_size}" if len(task.runtimes) > 1 else ""  # which runtime ran
    log(f"{task.name}: {len(texts)} texts in {seconds:.2f} s ({len(texts) / max(seconds, 1e-9):.0f} samples/s{how})")
    return 0


def cmd_evaluate(args) -> int:
    from .tools import evaluate, format_evaluation

    result = evaluate(Path(args.model_dir), Path(args.file), args.column_text, args.column_label,
                      runtime=args.runtime, batch_size=args.batch_size, task_file=args.task)
    print(json.dumps(result) if args.json else format_evaluation(result))
    return 0


def cmd_dashboard(args) -> int:
    from .report import find_sweep
    from .tools import serve_dashboard

    serve_dashboard(find_sweep(args.target), args.host, args.port, log)
    return 0


def cmd_tensorboard(args) -> int:
    from .report import find_sweep
    from .tb import logdir

    folder = find_sweep(args.target)
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir(folder)), "--host", args.host,
           "--port", str(args.port)]
    log(f"TensorBoard on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd)


def cmd_k8s(args) -> int:
    from .k8s import main as write_k8s

    return write_k8s(args, log)


# ----------------------------------------------------------------------------- entry point


def _check_batch_size(args) -> None:
    from .config import ConfigError

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number of reviews per batch, got {args.batch_size}")


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

    sp = sub.add_parser("plan", help="what a sweep will cost (trials, trial-epochs, wall time), before it runs")
    with_config(sp)
    sp.set_defaults(func=cmd_plan)

    def with_task_code(sp):
        sp.add_argument("--allow-task-code", action="store_true",
                        help="run the task module (.py file) that the sweep's config.yaml names: it is code")

    sp = sub.add_parser("resume", help="continue an interrupted sweep")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--address", help="an existing Ray cluster")
    with_task_code(sp)
    sp.set_defaults(func=cmd_resume)

    sp = sub.add_parser("report", help="write and print the sweep's report")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    with_task_code(sp)
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("export", help="export the best student, one trial's, or the Pareto front's")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    where = sp.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="folder to write")
    where.add_argument("--pareto", metavar="DIR", help="export every trial on the Pareto front, one sub-folder "
                       "each, with index.json (trial, folder, objective values)")
    sp.add_argument("--trial", metavar="ID|NUMBER", help="export this trial (Ray trial id, or Optuna trial "
                    "number) instead of the best")
    sp.add_argument("--force", action="store_true", help="replace an existing folder")
    sp.add_argument("--int8", action="store_true",
                    help="also write student.int8.ts (LSTM and Linear weights dynamically quantised to int8)")
    with_task_code(sp)
    sp.set_defaults(func=cmd_export)

    def with_runtime(sp):
        # Checked against the export's task's runtimes (sweep.tools.open_predictor) once the export is known.
        sp.add_argument("--runtime", default="eager",
                        help="eager (student.pt), torchscript (student.ts), int8 (student.int8.ts), "
                        "onnx (student.onnx)")
        sp.add_argument("--batch-size", type=int, default=512, help="reviews per batch, sorted by length (512)")
        sp.set_defaults(check=_check_batch_size)
        sp.add_argument("--task", metavar="FILE", help="the task module (.py) of a custom task's export: an "
                        "exported folder names only built-in tasks itself, since a task module is code")

    sp = sub.add_parser("predict", help="label new text with an exported student")
    sp.add_argument("model_dir")
    sp.add_argument("text", nargs="*")
    sp.add_argument("--file", metavar="PATH", help="texts to label: one per line, or a TSV/CSV/Parquet with --column; "
                    "- reads stdin")
    sp.add_argument("--column", default="document", help="the text column of a TSV/CSV/Parquet file (document)")
    with_runtime(sp)
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser("evaluate", help="an exported student's (or transformer teacher's) accuracy, per-class "
                                        "metrics and confusion matrix")
    sp.add_argument("model_dir")
    sp.add_argument("file", help="labelled reviews: NSMC TSV, or CSV/TSV/Parquet with the named columns")
    sp.add_argument("--column-text", default="document")
    sp.add_argument("--column-label", default="label")
    sp.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    with_runtime(sp)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("tensorboard", help="serve the sweep's TensorBoard on 127.0.0.1")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=6006)
    sp.set_defaults(func=cmd_tensorboard)

    sp = sub.add_parser("dashboard", help="serve optuna-dashboard over the sweep's study on 127.0.0.1")
    sp.add_argument("target", help="sweep name (under results/) or folder")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8080)
    sp.set_defaults(func=cmd_dashboard)

    from .k8s import add_arguments as k8s_arguments  # the options live with the command (sweep/k8s.py)

    sp = sub.add_parser("k8s", help="write a KubeRay RayJob manifest that runs the sweep on Kubernetes")
    with_config(sp)
    k8s_arguments(sp)
    sp.set_defaults(func=cmd_k8s)
    return p


def main(argv: list[str] | None = None) -> int:
    from search_spaces import SpaceError

    from .config import ConfigError
    from .runs import StorageError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if getattr(args, "check", None) is not None:
            args.check(args)
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
    except BrokenPipeError:
        # The reader of the output left (`sweep predict ... | head`): stop without a traceback, as Python's docs
        # advise for EPIPE; what is left to write goes to /dev/null, so the flush on the way out cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def entry() -> None:
    """The `sweep` command (and `python -m sweep.cli`): `main`, then out with its status. Once the output is
    flushed and the exit handlers have run (Ray's shutdown, logging's flush, weakref finalizers, temporary folders),
    the process leaves without the interpreter's teardown, which clears the module graph torch, Ray and the rest
    loaded: about 1 s after every command here, a refusal's as much as a sweep's. When a thread that is no daemon
    still runs, Python's own exit waits for it as always. An exception that escapes `main` ends as it always has."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001  (what the interpreter runs first when it exits)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
