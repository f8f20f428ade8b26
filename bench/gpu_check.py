"""GPU check (issue 21): the GPU path through Ray, in one prepared call. Run it through `bench/gpu_check.sh`, which
puts Ray and Optuna on PYTHONPATH from the carry folder (`bench/gpu_carry.sh`) on a bare GPU machine.

    bash bench/gpu_check.sh [--out DIR] [--data NSMC_DIR] [--budget-s 450]   # a GPU machine, about 7-8 minutes
    bash bench/gpu_check.sh --dry-run --out DIR                               # a CPU, a logical GPU, ~1-3 min

What it does, each sweep a real `sweep run` (the CLI's own entry point, `sweep.cli.main`, called in this one driver
process, so Ray starts once and imports are paid once), local Ray on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0):
1. `sweep prepare` of the whole NSMC training split (135K training, 15K validation, 50K test reviews), WordPiece
   3,000, max length 128, the n-gram teacher (`teacher.source: ngram`) and its logits.
2. `sweep.resources.gpu` at 1, 0.5, 0.25 and 0.125, one sweep each: 1/gpu trials (one wave: on the GPU the check
   measures throughput, and a second wave would run partly alone) of one fixed student, E64/H128 (the seed study's
   base, and the student of the earlier 4-per-H100 plain-process figure), 2 epochs, batch 64, one CPU per trial,
   seeds 0..n-1 through the grid searcher, no ASHA, no twins. Per setting: trials at once as Ray accounted them
   (CPUs in use / CPUs per trial, sampled every 0.25 s from `ray.available_resources()`), the trials whose training
   overlapped (their TensorBoard event times), aggregate training samples/s (every trial's samples over the span
   from the first trial's first step to the last trial's last evaluation), the speed-up over gpu 1, each trial's
   peak GPU memory (`gpu_mem_peak_mb`, `torch.cuda.max_memory_allocated`, which the loop reports on CUDA) against
   `trainable/memory.py`'s estimate for that trial (without the CUDA context, which the peak does not count; with
   it, against the trial process's memory in `nvidia-smi`), and GPU utilisation (`nvidia-smi` every 0.5 s).
3. The seed study's grid (`search_spaces/seed_grid.yaml`, grid searcher, 200 students) with `gpu: auto`, so one
   sweep answers both questions: the fraction auto chose (`results/NAME/gpu_sizing.json`), whether any trial ran out
   of memory, each student size's peak against its estimate, and the study's cost. It runs 1 epoch on a subset of the
   split sized to the time left (about a tenth of it on an H100/H200: see `grid_rows`), and extrapolates to the
   study's real budget, the one `sweep run search_spaces/seed_grid.yaml --set sweep.searcher=grid` trains: the
   whole split, `train.epochs` (5 by default) for every trial (worst case; under the default ASHA, the expected
   trial-epochs from `sweep.plan.asha_trial_epochs`), plus the 3 twins. How: per trial, its Ray time splits into
   set-up (Ray's time_total_s minus its training span) and training span; the span is scaled by (real epochs x
   real rows per epoch) / (measured), set-up is not; per student size, the mean over its trials; GPU-hours charged
   = fraction x the sum over the study's trials; on one GPU = the same work / the trials at once measured. It
   assumes the speed per epoch and the packing stay as measured (no epoch is slower than another; the test split,
   scored whenever validation improves, is counted every epoch: an upper bound).

Sizing for at most 8 minutes on one H100/H200 with 16 CPU cores (the previous H100 run: one E64/H128 student at
~8,600 samples/s, i.e. ~16 s per epoch of 135K reviews; four at once 26,800): carry unpacking and imports ~15 s;
preparation ~60 s (the n-gram teacher on the whole split); the four fraction sweeps ~4 x 20 s of driver work plus
2 epochs each (~35 s alone, ~55 s for eight at once if packing gives 5x), ~260 s; the grid gets what is left of
`--budget-s` (450 s) minus 30 s for the report, and its rows are chosen so that 200 trials fit at the aggregate
speed measured at 0.125 (a stop at the budget interrupts it cleanly, and the extrapolation uses the trials done).
Every step writes the JSON and the markdown again, so a run cut short still returns what it measured.

The dry run (`--dry-run`) takes the same steps on a CPU: a logical GPU declared to Ray (RAY_OVERRIDE_RESOURCES, which
Ray reads for the local node: {"GPU": 1, "CPU": 16}), 600 training reviews, max length 32, an E8/H8 student, 1
epoch, 3 grid trials, `gpu_fallback: true`, the fractions 1 and 0.25 only (`DRY_FRACTIONS`); each fraction gets one trial more than fits at once, so a fraction Ray
ignored would show as one trial too many at once. It checks the scheduling, the output and, with `--carry` and
`--bare-image`, that the carry brings everything the GPU image lacks.

Output (`--out`, default $OUT, else results/gpu_check): gpu_check.json, gpu_check.md (also printed), gpu_check.log,
nvidia_smi.csv (when there is an nvidia-smi).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FRACTIONS = (1.0, 0.5, 0.25, 0.125)
DRY_FRACTIONS = (1.0, 0.25)  # the dry run checks that a fraction reaches Ray: two of them do (7 trials, not 19)
GRID_SPACE = ROOT / "search_spaces" / "seed_grid.yaml"
SEED_REFERENCE = "the seed study: ~40 GPU-hours for ~35 hand runs"
MiB = 1 << 20

GPU = {"train_rows": None, "test_rows": None, "vocab_size": 3000, "max_length": 128, "student": (64, 128),
       "batch_size": 64, "epochs": 2, "grid_epochs": 1, "grid_samples": None, "extra_trials": 0,
       "cpus": None, "max_concurrent": 16}
DRY = {"train_rows": 600, "test_rows": 200, "vocab_size": 3000, "max_length": 32, "student": (8, 8),
       "batch_size": 64, "epochs": 1, "grid_epochs": 1, "grid_samples": 3, "extra_trials": 1,
       "cpus": 16, "max_concurrent": 16}
FULL_TRAIN, FULL_TEST = 150_000, 50_000  # NSMC's split sizes (the grid's subset is a fraction of both)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- samplers


class RaySampler(threading.Thread):
    """Ray's own accounting of what runs: (time, CPUs in use, GPUs in use) every `every_s`, from this driver."""

    def __init__(self, every_s: float = 0.25):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.stop = every_s, [], threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.is_set():
            try:
                if ray.is_initialized():
                    total, free = ray.cluster_resources(), ray.available_resources()
                    self.samples.append((time.time(), total.get("CPU", 0) - free.get("CPU", 0),
                                         total.get("GPU", 0) - free.get("GPU", 0)))
            except Exception:  # Ray starting or stopping between two sweeps
                pass
            self.stop.wait(self.every_s)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, float]]:
        return [s for s in self.samples if t0 <= s[0] <= t1]


class GpuMonitor:
    """`nvidia-smi` in the background: the GPU's utilisation and memory every 0.5 s, and each process's memory
    every second, stamped with the time each line arrived. Absent (no nvidia-smi): everything is None."""

    def __init__(self, csv_path: Path):
        self.gpu: list[tuple[float, float, float]] = []  # (t, utilisation %, memory used MiB)
        self.apps: list[tuple[float, int, float]] = []  # (t, pid, used MiB)
        self.procs: list[subprocess.Popen] = []
        self.csv = open(csv_path, "w") if shutil.which("nvidia-smi") else None
        if self.csv is None:
            return
        self.csv.write("time,kind,a,b,c\n")
        self._start(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,memory.total",
                     "--format=csv,noheader,nounits", "-lms", "500"], self._gpu_line)
        self._start(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                     "-lms", "1000"], self._app_line)

    def _start(self, cmd: list[str], handle) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)

        def read() -> None:
            for line in proc.stdout:
                parts = [p.strip() for p in line.split(",")]
                try:
                    handle(time.time(), parts)
                except (ValueError, IndexError):
                    continue  # "[N/A]" or a header
        threading.Thread(target=read, daemon=True).start()

    def _gpu_line(self, t: float, parts: list[str]) -> None:
        self.gpu.append((t, float(parts[0]), float(parts[1])))
        self.csv.write(f"{t:.2f},gpu,{parts[0]},{parts[1]},{parts[2]}\n")

    def _app_line(self, t: float, parts: list[str]) -> None:
        self.apps.append((t, int(parts[0]), float(parts[1])))
        self.csv.write(f"{t:.2f},app,{parts[0]},{parts[1]},\n")

    def summary(self, t0: float, t1: float, pids: set[int]) -> dict:
        gpu = [g for g in self.gpu if t0 <= g[0] <= t1]
        apps = [a for a in self.apps if t0 - 1 <= a[0] <= t1 + 1 and a[1] in pids]
        if self.csv is None:
            return dict.fromkeys(("gpu_util_mean", "gpu_util_max", "gpu_mem_used_max_mb", "process_mem_max_mb"))
        return {"gpu_util_mean": _mean([g[1] for g in gpu]), "gpu_util_max": max((g[1] for g in gpu), default=None),
                "gpu_mem_used_max_mb": max((g[2] for g in gpu), default=None),
                "process_mem_max_mb": max((a[2] for a in apps), default=None)}

    def close(self) -> None:
        for proc in self.procs:  # only the processes this monitor started
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.csv is not None:
            self.csv.close()


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------- one sweep through the CLI


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def run_cli(argv: list[str], log_file, limit_s: float | None) -> tuple[int, float]:
    """`sweep ARGV` in this process (its logs to stderr and the log file); past `limit_s` it gets a Ctrl-C, which a
    sweep answers by stopping its trials and saving its state. Returns (exit status, wall seconds)."""
    from sweep.cli import main

    log_file.write(f"\n$ sweep {' '.join(argv)}\n")
    timer = None
    if limit_s is not None:
        timer = threading.Timer(max(1.0, limit_s), lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()
    t0 = time.time()
    try:
        with contextlib.redirect_stderr(Tee(sys.stderr, log_file)), \
                contextlib.redirect_stdout(Tee(sys.stdout, log_file)):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except KeyboardInterrupt:
                rc = 130
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        if timer is not None:
            timer.cancel()
    return rc, time.time() - t0


# ----------------------------------------------------------------------------- reading a sweep's trials


def _tb_times(tb_dir: Path | None) -> tuple[float | None, float | None]:
    """(start, end) of a trial's training: the event file's first record (written when `fit` opens its writer)
    and its last scalar (the last epoch's validation); not the KD gain the report adds to a finalist's run."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from sweep.tb import KD_GAIN_FILE

    files = sorted(f for f in tb_dir.glob("events.*") if not f.name.endswith(KD_GAIN_FILE)) if tb_dir else []
    times = [e.wall_time for f in files for e in EventFileLoader(str(f)).Load()]
    return (min(times), max(times)) if times else (None, None)


def read_trials(folder: Path) -> list[dict]:
    """Every trial of a sweep folder: the report's row (trials.parquet), Ray's result rows and the training span."""
    import pyarrow.parquet as pq

    from sweep.tb import find_run

    table = folder / "trials.parquet"
    rows = pq.read_table(table).to_pylist() if table.is_file() else []
    out = []
    for row in rows:
        tdir = folder / row["trial_dir"]
        results = []
        if (tdir / "result.json").is_file():
            for line in (tdir / "result.json").read_text().splitlines():
                with contextlib.suppress(ValueError):
                    results.append(json.loads(line))
        start, end = _tb_times(find_run(folder, row["trial_id"]))
        samples, prev = 0.0, 0.0
        for r in results:  # samples/s x the epoch's training seconds = the epoch's rows
            samples += r.get("samples_per_s", 0.0) * (r.get("train_time_s", prev) - prev)
            prev = r.get("train_time_s", prev)
        epochs = max((r.get("epoch", 0) for r in results), default=0)
        error = row.get("error") or ""
        out.append({
            "trial_id": row["trial_id"], "status": row["status"], "error": error or None,
            "oom": "out of memory" in error.lower() or "outofmemory" in error.lower(),
            "hp": {k[3:]: v for k, v in row.items() if k.startswith("hp.")},
            "epochs": epochs, "samples": round(samples), "rows_per_epoch": round(samples / epochs) if epochs else 0,
            "samples_per_s": _mean([r.get("samples_per_s") for r in results]),
            "start": start, "end": end, "span_s": (end - start) if start and end else None,
            "ray_time_s": row.get("wall_time_s"), "pid": results[-1].get("pid") if results else None,
            "gpu_mem_peak_mb": max((r["gpu_mem_peak_mb"] for r in results if "gpu_mem_peak_mb" in r), default=None),
            "gpu_mem_reserved_mb": max((r["gpu_mem_reserved_mb"] for r in results if "gpu_mem_reserved_mb" in r),
                                       default=None),
            "val_acc": row.get("best_val_acc"),
        })
    return out


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, e in intervals] + [(e, -1) for s, e in intervals], key=lambda x: (x[0], x[1]))
    now = best = 0
    for _, d in events:
        now += d
        best = max(best, now)
    return best


def estimate_mb(trial: dict, sizes: dict, dims: dict | None = None) -> tuple[float, float]:
    """trainable/memory.py's estimate for one trial, in MiB: (without the CUDA context, with it)."""
    from trainable.memory import CUDA_CONTEXT_BYTES, estimate_trial_memory

    hp = dims or {}
    e, h = sizes["student"]
    est = estimate_trial_memory(vocab_size=sizes["vocab_size"], embedding_dim=hp.get("student.embedding_dim", e),
                                hidden_dim=hp.get("student.hidden_dim", h), batch_size=sizes["batch_size"],
                                max_length=sizes["max_length"], pool_rows=trial["rows_per_epoch"])
    return (est.total - CUDA_CONTEXT_BYTES) / MiB, est.total / MiB


# ----------------------------------------------------------------------------- the check


class Check:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.sizes = dict(DRY if self.dry else GPU)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="kd-gpu-check-"))
        self.t_start = time.time()
        self.deadline = None if (self.dry or args.budget_s is None) else self.t_start + args.budget_s
        self.log_file = open(self.out / "gpu_check.log", "w", buffering=1)
        self.report: dict = {
            "check": "gpu_check (issue 21)", "dry_run": self.dry, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv), "sizes": {**self.sizes, "student": "E%d/H%d" % self.sizes["student"]},
            "fractions": [], "grid": None, "goals": {}, "notes": []}

    # --- configs

    def config(self, name: str, **over) -> Path:
        s = self.sizes
        cfg = {
            "name": name,
            "data": {"dir": str(Path(self.args.data).resolve()), "download": False, "train_rows": s["train_rows"],
                     "test_rows": s["test_rows"]},
            "tokenizer": {"vocab_size": s["vocab_size"], "max_length": s["max_length"]},
            "teacher": {"source": "ngram", "max_length": s["max_length"]},
            "student": {"embedding_dim": s["student"][0], "hidden_dim": s["student"][1]},
            "train": {"epochs": s["epochs"], "batch_size": s["batch_size"], "threads": 1, "device": "auto"},
            "cache_dir": str(self.work / "cache"), "results_dir": str(self.work / "results"),
            "sweep": {"searcher": "grid", "scheduler": {"kind": "none"}, "twins": 0,
                      "max_concurrent": s["max_concurrent"], "resources": {"cpu": 1, "gpu": 1.0, "gpu_fallback": True}},
        }
        for key, value in over.items():
            node = cfg
            *path, last = key.split(".")
            for p in path:
                node = node.setdefault(p, {})
            node[last] = value
        import yaml

        path = self.work / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.time()

    # --- steps

    def environment(self) -> None:
        import torch

        env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "cpus": os.cpu_count()}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=p.name, gpu_memory_mb=round(p.total_memory / MiB))
        for mod in ("ray", "optuna", "pydantic"):
            m = __import__(mod)
            env[mod] = f"{m.__version__} ({Path(m.__file__).parent.parent})"
        self.report["environment"] = env
        log("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
        if not self.dry and not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA GPU visible to torch (use --dry-run on a CPU)")

    def prepare(self, cfg: Path, what: str) -> float:
        rc, wall = run_cli(["prepare", str(cfg)], self.log_file, self.time_left())
        if rc != 0:
            raise SystemExit(f"gpu_check: sweep prepare ({what}) exited {rc}; see {self.out / 'gpu_check.log'}")
        return wall

    def fraction(self, f: float) -> dict:
        n = int(round(1 / f))
        trials = n + self.sizes["extra_trials"]
        name = f"gpu_{str(f).replace('.', '_')}"
        cfg = self.config(name, **{"sweep.num_samples": trials, "sweep.resources.gpu": f,
                                   "sweep.space": {"parameters": {"train.seed": {"type": "categorical",
                                                                                 "choices": list(range(trials))}}}})
        limit = self.time_left()
        t0 = time.time()
        rc, wall = run_cli(["run", str(cfg)], self.log_file, limit)
        t1 = time.time()
        rows = read_trials(self.work / "results" / name)
        cpus = self.sizes["cpus"] or os.cpu_count()
        expected = min(n, int(cpus), self.sizes["max_concurrent"], trials)
        return {"gpu": f, "exit": rc, "wall_s": round(wall, 1), "expected_at_once": expected,
                **self.measure(rows, t0, t1), "trials_detail": rows}

    def measure(self, rows: list[dict], t0: float, t1: float, cpu_per_trial: float = 1.0) -> dict:
        done = [r for r in rows if r["status"] == "finished"]
        spans = [(r["start"], r["end"]) for r in rows if r["start"] and r["end"]]
        ray_at_once = max((round(c / cpu_per_trial) for _, c, _ in self.ray.window(t0, t1)), default=None)
        first, last = (min(s for s, _ in spans), max(e for _, e in spans)) if spans else (None, None)
        samples = sum(r["samples"] for r in rows if r["start"])
        peaks = [r["gpu_mem_peak_mb"] for r in rows if r["gpu_mem_peak_mb"] is not None]
        pids = {r["pid"] for r in rows if r["pid"]}
        m = {"trials": len(rows), "finished": len(done), "failed": sum(r["status"] == "failed" for r in rows),
             "oom": sum(r["oom"] for r in rows), "trials_at_once": ray_at_once, "training_at_once": most_at_once(spans),
             "actors": len(pids), "samples": samples, "span_s": round(last - first, 2) if spans else None,
             "aggregate_samples_per_s": round(samples / (last - first)) if spans and last > first else None,
             "sum_of_trial_samples_per_s": round(sum(r["samples_per_s"] or 0 for r in rows)),
             "gpu_mem_peak_mb_max": max(peaks, default=None),
             "gpu_mem_reserved_mb_max": max((r["gpu_mem_reserved_mb"] for r in rows
                                             if r["gpu_mem_reserved_mb"] is not None), default=None),
             "val_acc_mean": _mean([r["val_acc"] for r in done])}
        m.update(self.gpu.summary(first or t0, last or t1, pids))
        trained = [r for r in rows if r["rows_per_epoch"]]
        if trained:  # every trial of a fraction sweep is the same student on the same rows
            est, est_ctx = estimate_mb(trained[0], self.sizes)
            m.update(estimate_mb=round(est, 1), estimate_with_context_mb=round(est_ctx, 1))
            if peaks:
                m["estimate_over_peak"] = round(est / max(peaks), 3)  # the largest peak: the least margin
        return m

    def grid_rows(self, at_0125: dict | None) -> tuple[int | None, int | None, str]:
        """The grid's rows: all in the dry run's tiny data; on a GPU, what lets 200 one-epoch trials fit in the
        time left at the aggregate speed measured at 0.125 (with 30% to spare), at least 3,000 and at most all."""
        s = self.sizes
        if self.dry:
            return s["train_rows"], s["test_rows"], "the dry run's rows"
        left = self.time_left()
        speed = (at_0125 or {}).get("aggregate_samples_per_s")
        if left is None or not speed:
            return 15_000, 5_000, "a tenth of the split (no time budget or no speed measured at 0.125)"
        from search_spaces import load_space

        grid = load_space(str(GRID_SPACE)).grid_size()
        fixed_s = 60 + 1.5 * grid / 16  # the sweep's driver work and teacher, and each trial's set-up, 16 at once
        usable = left - 30 - fixed_s
        rows = int(usable * speed / (grid * s["grid_epochs"] * 0.9 * 1.3))  # 0.9: the validation split
        train = max(3_000, min(FULL_TRAIN, rows))
        return train, max(1_000, train // 3), (f"{train:,} of {FULL_TRAIN:,} reviews: {grid} trials x "
                                               f"{s['grid_epochs']} epoch at {speed:,} samples/s (measured at 0.125) "
                                               f"in the {left:.0f} s left, 30% to spare")

    def grid(self, at_0125: dict | None) -> dict:
        from search_spaces import load_space

        train_rows, test_rows, why = self.grid_rows(at_0125)
        name = "seed_grid_auto"
        over = {"sweep.space": str(GRID_SPACE), "sweep.resources.gpu": "auto",
                "train.epochs": self.sizes["grid_epochs"], "data.train_rows": train_rows, "data.test_rows": test_rows}
        if self.sizes["grid_samples"]:
            over["sweep.num_samples"] = self.sizes["grid_samples"]
        cfg = self.config(name, **over)
        prep_s = self.prepare(cfg, "grid")
        left = self.time_left()
        t0 = time.time()
        rc, wall = run_cli(["run", str(cfg)], self.log_file, None if left is None else left - 30)
        t1 = time.time()
        folder = self.work / "results" / name
        rows = read_trials(folder)
        sizing_file = folder / "gpu_sizing.json"
        sizing = json.loads(sizing_file.read_text()) if sizing_file.is_file() else None
        space = load_space(str(GRID_SPACE))
        for r in rows:
            r["dims"] = r["hp"].get("dims")
            dims = space.expand({"dims": r["dims"]})
            r["estimate_mb"], r["estimate_with_context_mb"] = estimate_mb(r, self.sizes, dims)
        m = self.measure(rows, t0, t1)
        for key in ("estimate_mb", "estimate_with_context_mb", "estimate_over_peak"):  # per student size, below
            m.pop(key, None)
        fraction = sizing["gpu_per_trial"] if sizing else None
        per_gpu = (sizing or {}).get("trials_per_gpu") or self.sizes["max_concurrent"]  # 0: on the CPU
        m["expected_at_once"] = min(per_gpu, int(self.sizes["cpus"] or os.cpu_count()), self.sizes["max_concurrent"],
                                    len(rows))
        by_dims = {}
        for label in space.params["dims"].choices:
            mine = [r for r in rows if r["dims"] == label and r["status"] == "finished"]
            if not mine:
                continue
            peaks = [r["gpu_mem_peak_mb"] for r in mine if r["gpu_mem_peak_mb"] is not None]
            by_dims[label] = {
                "trials": len(mine), "estimate_mb": round(mine[0]["estimate_mb"], 1),
                "estimate_with_context_mb": round(mine[0]["estimate_with_context_mb"], 1),
                "gpu_mem_peak_mb_max": max(peaks, default=None),
                "estimate_over_peak": round(mine[0]["estimate_mb"] / max(peaks), 3) if peaks else None,
                "span_s_mean": _mean([r["span_s"] for r in mine]),
                "setup_s_mean": _mean([max(0.0, r["ray_time_s"] - r["span_s"]) for r in mine
                                       if r["ray_time_s"] is not None and r["span_s"] is not None]),
                "samples_per_s_mean": _mean([r["samples_per_s"] for r in mine])}
        return {"exit": rc, "wall_s": round(wall, 1), "prepare_s": round(prep_s, 1), "rows_chosen": why,
                "train_rows": train_rows, "test_rows": test_rows, "epochs": self.sizes["grid_epochs"],
                "grid_size": space.grid_size(), "gpu_sizing": sizing, "auto_fraction": fraction,
                "auto_trials_per_gpu": sizing.get("trials_per_gpu") if sizing else None, **m, "by_dims": by_dims,
                "extrapolation": self.extrapolate(by_dims, fraction, m, space.grid_size(), cfg),
                "trials_detail": rows}

    def extrapolate(self, by_dims: dict, fraction: float | None, m: dict, grid_size: int, cfg: Path) -> dict | None:
        """The whole study at its real budget from the trials measured here (the module docstring says how)."""
        from sweep.config import load_config
        from sweep.plan import asha_trial_epochs, count_rows

        if not by_dims:
            return None
        real, _ = load_config(GRID_SPACE, ["sweep.searcher=grid", f"data.dir={Path(self.args.data).resolve()}"])
        measured, _ = load_config(cfg)
        rr, mr = count_rows(real, None, with_lengths=False), count_rows(measured, None, with_lengths=False)
        k_rows = (rr.labelled + rr.val + rr.test) / (mr.labelled + mr.val + mr.test)
        e_real, e_meas = real.train.epochs, measured.train.epochs
        s = real.sweep.scheduler
        twins = real.sweep.twins
        worst = grid_size * e_real + twins * e_real
        asha = asha_trial_epochs(grid_size, e_real, s.grace_period, s.reduction_factor, e_real) + twins * e_real
        # Each student size is 1/len(choices) of the grid: the mean over the sizes measured stands for the study.
        epoch_s = _mean([d["span_s_mean"] / e_meas * k_rows for d in by_dims.values() if d["span_s_mean"]])
        setup_s = _mean([d["setup_s_mean"] for d in by_dims.values()]) or 0.0
        trials_real = grid_size + twins
        at_once = m.get("trials_at_once") or 1
        f = fraction if fraction else 1.0 / at_once  # on a CPU (no GPU: fraction 0), as if each had its share

        def hours(trial_epochs: float) -> dict:
            work = trials_real * setup_s + trial_epochs * epoch_s  # trial-seconds at the packing measured
            return {"trial_epochs": round(trial_epochs, 1), "gpu_hours_charged": round(f * work / 3600, 3),
                    "one_gpu_wall_hours": round(work / at_once / 3600, 3)}

        return {"real_budget": f"the whole split ({rr.labelled:,} training, {rr.val:,} validation, {rr.test:,} test "
                               f"reviews), {e_real} epochs, {grid_size} grid trials + {twins} twins "
                               f"(sweep run {GRID_SPACE.relative_to(ROOT)} --set sweep.searcher=grid)",
                "measured": f"{measured.train.epochs} epoch(s) on {mr.labelled:,} training, {mr.val:,} validation, "
                            f"{mr.test:,} test reviews; rows x{k_rows:.2f}",
                "epoch_s_real_per_trial": round(epoch_s, 2), "setup_s_per_trial": round(setup_s, 2),
                "fraction": f, "at_once": at_once, "worst_case": hours(worst), "asha_expected": hours(asha),
                "reference": SEED_REFERENCE}

    # --- output

    def goals(self) -> None:
        fr = {r["gpu"]: r for r in self.report["fractions"]}
        g = {}
        one, eight = (fr.get(f, {}).get("aggregate_samples_per_s") for f in (1.0, 0.125))
        if one and eight:
            x = eight / one
            g["packing"] = {"goal": "8 trials at 0.125 give >= 5x the aggregate samples/s of 1 at gpu 1",
                            "value": round(x, 2), "met": x >= 5}
        ratios = [r.get("estimate_over_peak") for r in fr.values()]
        grid = self.report.get("grid") or {}
        ratios += [d.get("estimate_over_peak") for d in grid.get("by_dims", {}).values()]
        ratios = [x for x in ratios if x is not None]
        if ratios:
            g["memory"] = {"goal": "the estimate within 30% of every measured peak and never below it "
                                   "(estimate without the CUDA context / torch.cuda.max_memory_allocated)",
                           "min": min(ratios), "max": max(ratios), "met": 1.0 <= min(ratios) and max(ratios) <= 1.3}
        ex = grid.get("extrapolation")
        if ex:
            h = ex["worst_case"]["gpu_hours_charged"]
            g["seed_study"] = {"goal": "the whole seed study under 1 GPU-hour (worst case: every trial every epoch)",
                               "value": h, "met": h < 1.0}
        self.report["goals"] = g

    def write(self) -> str:
        self.report["wall_s"] = round(time.time() - self.t_start, 1)
        self.goals()
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1, default=str))
        md = markdown(self.report)
        (self.out / "gpu_check.md").write_text(md)
        return md

    def run(self) -> int:
        import ray  # noqa: F401  (after the environment is set: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER)

        self.ray = RaySampler()
        self.gpu = GpuMonitor(self.out / "nvidia_smi.csv")
        self.ray.start()
        try:
            self.environment()
            self.report["prepare_s"] = round(self.prepare(self.config("prepare"), "whole split"), 1)
            log(f"prepared in {self.report['prepare_s']} s")
            self.write()
            for f in DRY_FRACTIONS if self.dry else FRACTIONS:
                left = self.time_left()
                if left is not None and left < 60:
                    self.report["notes"].append(f"gpu {f}: skipped, {left:.0f} s of the budget left")
                    continue
                row = self.fraction(f)
                base = self.report["fractions"][0] if self.report["fractions"] else row
                if base["gpu"] == 1.0 and base.get("aggregate_samples_per_s") and row.get("aggregate_samples_per_s"):
                    row["speedup"] = round(row["aggregate_samples_per_s"] / base["aggregate_samples_per_s"], 2)
                self.report["fractions"].append(row)
                log(f"gpu {f}: {row['trials_at_once']} at once (expected {row['expected_at_once']}), "
                    f"{row['aggregate_samples_per_s']} samples/s aggregate, exit {row['exit']}")
                self.write()
            left = self.time_left()
            if left is not None and left < 90:
                self.report["notes"].append(f"seed grid with gpu auto: skipped, {left:.0f} s of the budget left")
            else:
                at_0125 = next((r for r in self.report["fractions"] if r["gpu"] == 0.125), None)
                self.report["grid"] = self.grid(at_0125)
            if not self.dry:
                missing = [r["gpu"] for r in self.report["fractions"]
                           if r.get("finished") and r.get("gpu_mem_peak_mb_max") is None]
                if missing:
                    self.report["notes"].append(f"no gpu_mem_peak_mb in the trials' results at gpu {missing}: did "
                                                f"the trials run on the GPU?")
        finally:
            self.ray.stop.set()
            self.gpu.close()
            md = self.write()
            import ray

            if ray.is_initialized():
                ray.shutdown()
        print(md, flush=True)
        return 0


# ----------------------------------------------------------------------------- markdown


def _f(x, fmt="{:,.0f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def markdown(rep: dict) -> str:
    env = rep.get("environment", {})
    where = (f"{env.get('gpu', 'no GPU')}" + (f" ({env['gpu_memory_mb']:,} MiB)" if env.get("gpu_memory_mb") else "")
             + f", {env.get('cpus')} CPUs, torch {env.get('torch')}, Python {env.get('python')}")
    s = rep["sizes"]
    rows = "the whole NSMC training split" if s["train_rows"] is None else f"{s['train_rows']:,} training reviews"
    lines = [f"## GPU check{' (dry run: CPU, a logical GPU)' if rep['dry_run'] else ''}: {where}", "",
             f"`{rep['command']}`, {rep.get('wall_s', 0):.0f} s wall. Each fraction: {s['student']} students, "
             f"{s['epochs']} epoch(s), batch {s['batch_size']}, max length {s['max_length']}, vocab {s['vocab_size']}, "
             f"{rows}, "
             f"n-gram teacher; preparation {_f(rep.get('prepare_s'), '{:.0f}')} s.", "",
             "| GPU per trial | trials | at once (Ray) | expected | training at once | aggregate samples/s | speed-up "
             "| peak MiB per trial | estimate MiB | estimate / peak | process MiB (nvidia-smi) "
             "| estimate + context MiB | GPU util mean / max % | failed (OOM) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rep["fractions"]:
        lines.append(
            f"| {r['gpu']:g} | {r['trials']} | {_f(r['trials_at_once'])} | {r['expected_at_once']} | "
            f"{r['training_at_once']} | {_f(r['aggregate_samples_per_s'])} | {_f(r.get('speedup'), '{:.2f}x')} | "
            f"{_f(r['gpu_mem_peak_mb_max'], '{:,.1f}')} | {_f(r.get('estimate_mb'), '{:,.1f}')} | "
            f"{_f(r.get('estimate_over_peak'), '{:.2f}')} | {_f(r['process_mem_max_mb'])} | "
            f"{_f(r.get('estimate_with_context_mb'), '{:,.1f}')} | "
            f"{_f(r['gpu_util_mean'])} / {_f(r['gpu_util_max'])} | "
            f"{r['failed']} ({r['oom']}) |")
    g = rep.get("grid")
    if g:
        sz = g.get("gpu_sizing") or {}
        lines += ["", f"**`gpu: auto` on the seed grid** ({g['trials']} of {g['grid_size']} trials run, {g['epochs']} "
                  f"epoch, {g['train_rows']:,} training reviews: {g['rows_chosen']}): auto chose "
                  f"{_f(g['auto_fraction'], '{:g}')} GPU per trial ({_f(g['auto_trials_per_gpu'])} per GPU; largest "
                  f"trial's estimate {_f((sz.get('estimate_bytes') or 0) / MiB if sz else None, '{:,.0f}')} MiB"
                  f"{', no GPU: CPU' if sz and sz.get('gpu_bytes') is None else ''}); {_f(g['trials_at_once'])} at "
                  f"once (Ray; expected {g['expected_at_once']}), {g['finished']} finished, {g['failed']} failed, "
                  f"{g['oom']} out of memory; "
                  f"{_f(g['aggregate_samples_per_s'])} samples/s aggregate; GPU util mean {_f(g['gpu_util_mean'])} %.",
                  "", "| student | trials | peak MiB | estimate MiB | estimate / peak | s per trial (training) "
                  "| set-up s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, d in g["by_dims"].items():
            lines.append(f"| {label} | {d['trials']} | {_f(d['gpu_mem_peak_mb_max'], '{:,.1f}')} | "
                         f"{_f(d['estimate_mb'], '{:,.1f}')} | {_f(d['estimate_over_peak'], '{:.2f}')} | "
                         f"{_f(d['span_s_mean'], '{:.2f}')} | {_f(d['setup_s_mean'], '{:.2f}')} |")
        ex = g.get("extrapolation")
        if ex:
            w, a = ex["worst_case"], ex["asha_expected"]
            lines += ["", f"**The seed study at its real budget** ({ex['real_budget']}), from {ex['measured']}: "
                      f"{ex['epoch_s_real_per_trial']:.1f} s per trial-epoch and {ex['setup_s_per_trial']:.1f} s "
                      f"set-up per trial at {ex['at_once']} at once, {ex['fraction']:.3g} GPU each: "
                      f"**{w['gpu_hours_charged']:.2f} GPU-hours** charged for {w['trial_epochs']:,.0f} trial-epochs "
                      f"({w['one_gpu_wall_hours']:.2f} h on one GPU); under the default ASHA "
                      f"{a['gpu_hours_charged']:.2f} GPU-hours ({a['trial_epochs']:,.0f} trial-epochs); "
                      f"{ex['reference']}."]
    if rep["goals"]:
        lines += ["", ("Goals (a dry run on a CPU: these numbers say nothing about a GPU): " if rep["dry_run"]
                       else "Goals: ") + "; ".join(
            f"{v['goal']}: {v['value'] if 'value' in v else str(v['min']) + '-' + str(v['max'])} "
            f"({'met' if v['met'] else 'NOT met'})"
            for v in rep["goals"].values())]
    for note in rep["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


IMPORTS = ("ray", "ray.tune", "ray.tune.search.optuna", "ray.tune.schedulers", "optuna", "sqlalchemy", "pydantic",
           "tensorboardX", "yaml", "pyarrow.parquet", "tensorboard", "sklearn.linear_model", "tokenizers",
           "matplotlib", "sweep.cli", "sweep.tuner", "sweep.ray_search", "sweep.ray_scheduler", "sweep.ray_callbacks",
           "sweep.plan", "sweep.report",
           "trainable.adapter", "trainable.loop", "trainable.teacher", "trainable.tasks.classify")


def check_imports() -> int:
    """Everything a sweep imports, and where from: with `gpu_check.sh --carry DIR --bare-image` on a CPU, a module the
    carry should bring and does not fails here, not on the GPU machine."""
    import importlib

    failed = 0
    for name in IMPORTS:
        try:
            mod = importlib.import_module(name)
            print(f"{name}: {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}".replace("  ", " "))
        except Exception as e:
            failed += 1
            print(f"{name}: FAILED: {type(e).__name__}: {e}")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "results" / "gpu_check"))
    ap.add_argument("--data", default=None, help="the NSMC folder (ratings_train.txt, ratings_test.txt)")
    ap.add_argument("--dry-run", action="store_true", help="a CPU with a logical GPU, tiny data")
    ap.add_argument("--budget-s", type=float, default=450.0, help="the GPU run's time budget (not in a dry run)")
    ap.add_argument("--work", default=None, help="caches and sweep folders (default: a new temporary folder)")
    ap.add_argument("--check-imports", action="store_true",
                    help="import what a sweep imports (Ray Tune, Optuna, the CLI, the trainable) and stop")
    ap.add_argument("--carry", default=None, help=argparse.SUPPRESS)  # handled by gpu_check.sh
    ap.add_argument("--bare-image", action="store_true", help=argparse.SUPPRESS)  # handled by gpu_check.sh
    args = ap.parse_args()
    if args.check_imports:
        return check_imports()
    if args.data is None:
        args.data = str(ROOT.parent / "shared" / "data" / "nsmc")
    data = Path(args.data)
    if not (data / "ratings_train.txt").is_file() or not (data / "ratings_test.txt").is_file():
        print(f"gpu_check: --data: {data} has no ratings_train.txt and ratings_test.txt", file=sys.stderr)
        return 2
    # Local Ray on loopback only (../shared/RAY_NOTES.md), never someone else's cluster.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    if args.dry_run:
        os.environ["RAY_OVERRIDE_RESOURCES"] = json.dumps({"GPU": 1, "CPU": DRY["cpus"]})
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())
