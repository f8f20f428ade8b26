"""The search table: every distinct configuration of a grid space trained to the full budget with several seeds,
one learning curve per run, so search methods can be replayed on it without training anything
(`bench/search_replay.py`).

    python bench/search_table.py                      # the committed table: results/search_table.jsonl -> .parquet
    python bench/search_table.py --to-parquet         # (re)write the Parquet from the lines appended so far

It appends two lines per finished job (a job is one configuration without its step_size, one seed: see "forks")
to the JSONL file and flushes them, so a stopped table resumes where it stopped; the Parquet is written when every
job is done. Each run records per epoch: validation accuracy and loss, `test_acc` (the test accuracy of the
best-validation weights so far, exactly as a sweep's trials report it: the test split is scored whenever the
validation accuracy improves), training loss, learning rate, and the epoch's wall and CPU seconds (training,
evaluation and the checkpoint write, as in a sweep trial). CPU seconds are what the replay simulates with: each
run has one torch thread, so its CPU time is the time it takes on a core of its own, whatever else the machine
was doing while the table was made.

The recipe (RECIPE below), and why, following the issue's conditions for a question worth asking:
- labelled data: 9,000 NSMC training reviews (a seeded subset), split 4,000 for training and 5,000 for
  validation (one review is 0.02 pt: the searcher's choice is not decided by a handful of reviews), 10,000 test
  reviews. Few labelled rows is where a teacher matters, and where users distil.
- teacher: an ensemble of two n-gram models (characters + words, and Korean morphemes via kiwipiepy), fitted on
  the 4,000 labelled rows, weights chosen on validation: 81% test, against 71-74% for the grid's students
  without a teacher (the no-teacher rows of the table measure it): the 3-pt condition holds with room.
- transfer set: the first 4,000 reviews of `unlabeled.txt`, labelled by the teacher: 8,000 rows per epoch.
- 8 epochs, StepLR gamma 0.9: ASHA has rungs at 1, 2, 4 (rf 2) or 1, 3 (rf 3); step_size 5 decays the learning
  rate after epoch 5 and step_size 10 never does within 8 epochs, so the two differ.
- max length 64 tokens (the reviews' 95th percentile is 83 WordPiece tokens over the whole split; mean 22 here),
  vocab 3,000 as the grid fixes, batch 64, one thread per run, 2 runs at a time on a 2-core machine.
- the grid (`search_spaces/seed_grid.yaml`): 5 hidden/embedding pairs x loss rate {0, 0.1, 0.5, 0.9} x
  temperature {1, 2, 3, 4, 10} x step_size {5, 10} = 200 configurations, 3 seeds each; plus, outside the grid,
  each pair without a teacher (alpha 1: labelled rows only, both step sizes), the twins' reference.

Forks: two runs that differ only in step_size train identically until the smaller step size first decays the
learning rate (StepLR changes nothing before the end of epoch `step_size`), so a job trains the largest step size
with a checkpoint per epoch, and every smaller step size s continues from its checkpoint at epoch s with its own
schedule (`ForkJob`). Each run's record holds all its epochs, the shared ones with their measured seconds, so a
forked run reads exactly like one trained from scratch: `tests/test_search_replay.py` checks that a forked run's
curve equals a straight one's.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NSMC = ROOT.parent / "shared" / "data" / "nsmc"
RECIPE = {
    "name": "search_table",
    "data": {"mirrors": [str(NSMC)], "train_rows": 9000, "val_fraction": 5 / 9, "test_rows": 10000,
             "transfer_file": "unlabeled.txt", "transfer_rows": 4000, "seed": 0},
    "tokenizer": {"vocab_size": 3000, "max_length": 64},
    "teacher": {"source": ["ngram", {"source": "ngram", "ngram": {"analyzer": "morphemes"}}], "max_length": 64},
    "train": {"epochs": 8, "batch_size": 64, "threads": 1, "scheduler": "step", "gamma": 0.9, "device": "cpu"},
}
NO_TEACHER = {"train.alpha": 1.0, "train.temperature": 1.0}  # the twins' reference: labelled rows only
PER_EPOCH = ("val_acc", "val_loss", "test_acc", "test_scored", "train_loss", "lr", "wall_s", "cpu_s")


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def grid_runs(space_path: str | Path, seeds: int, no_teacher: bool = True) -> list[dict]:
    """Every run of the table: the space's grid (expanded to dotted config keys, its bundle label kept), plus one
    no-teacher run per bundle value and step size, each with seeds 0..seeds-1."""
    from search_spaces import load_space

    space = load_space(space_path)
    if not space.is_grid:
        raise SystemExit(f"{space_path}: a table needs a grid space (categorical parameters without 'when')")
    grid = space.grid()
    names = list(grid)
    combos = [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    runs = [{"role": "grid", **_labels(c), **space.expand(c)} for c in combos]
    if no_teacher:
        seen = set()
        for c in combos:
            ref = {**space.expand(c), **NO_TEACHER}
            key = json.dumps(ref, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                runs.append({"role": "no_teacher", **_labels(c, keep={n for n in names if "." not in n}), **ref})
    for r in runs:
        r.pop("data.mirrors", None)  # the recipe names the corpus by its absolute path
    return [{**r, "train.seed": s} for s in range(seeds) for r in runs]


def _labels(combo: dict, keep: set | None = None) -> dict:
    """Bundle labels (undotted parameter names, e.g. dims: h64_e32) as `label.NAME` columns."""
    return {f"label.{k}": v for k, v in combo.items() if "." not in k and (keep is None or k in keep)}


def jobs_of(runs: list[dict]) -> list[list[dict]]:
    """Runs grouped by everything but train.step_size: one job each, largest step size first."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        key = json.dumps({k: v for k, v in r.items() if k != "train.step_size"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(r)
    return [sorted(g, key=lambda r: -r.get("train.step_size", RECIPE["train"].get("step_size", 5)))
            for g in groups.values()]


def run_key(run: dict) -> str:
    """A run's identity: its dotted config keys (a record's results and labels are not part of it)."""
    return json.dumps({k: v for k, v in run.items() if "." in k and not k.startswith("label.")}, sort_keys=True,
                      default=str)


# ----------------------------------------------------------------------------- one job, in a worker process

_PREP = None
_BASE: dict = {}


def _init(base: dict, prep=None) -> None:
    global _PREP, _BASE
    import torch

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    torch.set_num_threads(1)
    _BASE = base
    _PREP = prep or prepare(ExperimentConfig.model_validate(base), log=lambda m: None)  # cached: reads files


def _train(cfg, run_dir: Path, resume_from: Path | None, on_epoch):
    """`train_student`'s set-up with `ForkJob`, whose resume replays its own learning-rate schedule."""
    import torch

    from trainable.loop import StudentJob, fit
    from trainable.prepare import student_inputs
    from trainable.student import BiLSTMClassifier, count_params, state_dict_kb

    class ForkJob(StudentJob):
        def load_state_dict(self, state: dict) -> None:
            self.opt.load_state_dict(state["optimizer"])
            # The checkpoint's scheduler is the parent's (another step_size): step this run's own StepLR through
            # the epochs already done instead, from the learning rate they started with.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(state["epoch"]):
                    self.sched.step()

    data, logits = student_inputs(_PREP.encoded, _PREP.logits, cfg)
    torch.manual_seed(cfg.train.seed)
    model = BiLSTMClassifier(data.vocab_size, cfg.student.embedding_dim, cfg.student.hidden_dim,
                             cfg.data.num_classes, cfg.student.num_layers, cfg.student.dropout)
    job = ForkJob(model, cfg.train, data, logits, cfg.data.num_classes, torch.device("cpu"))
    return fit(job, epochs=cfg.train.epochs, metric="val_acc", mode="max", params=count_params(model),
               size_kb=state_dict_kb(model), run_dir=run_dir, resume_from=resume_from, on_epoch=on_epoch,
               keep_checkpoints=cfg.train.epochs, log=lambda m: None, seed=cfg.train.seed, tb_dir=None)


def run_job(job: list[dict], fork: bool = True) -> list[dict]:
    """Train a job's runs (largest step size first; with `fork`, the others continue from its checkpoints)."""
    from trainable.tasks import config_from_trial

    records = []
    with tempfile.TemporaryDirectory(prefix="kd-table-") as tmp:
        parent_dir, parent_rows = None, None
        for i, run in enumerate(job):
            cfg = config_from_trial(_BASE, {k: v for k, v in run.items() if "." in k and not k.startswith("label.")})
            step = cfg.train.step_size
            resume, prefix = None, []
            if fork and parent_dir is not None and step < cfg.train.epochs:
                resume = parent_dir / "checkpoints" / f"epoch_{step:04d}"
                prefix = parent_rows[:step]
            elif fork and parent_dir is not None:  # no decay within the budget: the same run as the parent's
                prefix = parent_rows
            rows = list(prefix)
            clock = [time.perf_counter(), time.process_time()]

            def on_epoch(m: dict, ckpt) -> None:
                now = [time.perf_counter(), time.process_time()]
                rows.append({"val_acc": m["val_acc"], "val_loss": m["val_loss"], "test_acc": m["test_acc"],
                             "test_scored": m["best_epoch"] == m["epoch"], "train_loss": m["train_loss"],
                             "lr": m["lr"], "wall_s": now[0] - clock[0], "cpu_s": now[1] - clock[1]})
                clock[:] = now

            run_dir = Path(tmp) / f"run{i}"
            if len(rows) < cfg.train.epochs:
                r = _train(cfg, run_dir, resume, on_epoch)
                params, size_kb = r.params, r.size_kb
            else:
                params, size_kb = records[0]["params"], records[0]["size_kb"]
            if i == 0:
                parent_dir, parent_rows = run_dir, rows
            best = max(range(len(rows)), key=lambda e: (rows[e]["val_acc"], -e))
            records.append({**run, "params": params, "size_kb": size_kb, "epochs": len(rows),
                            "best_val_acc": rows[best]["val_acc"], "best_epoch": best + 1,
                            "test_acc": rows[-1]["test_acc"], "forked_at": len(prefix),
                            "wall_s": sum(r["wall_s"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows),
                            "load1": os.getloadavg()[0], "curve": rows})
    return records


# ----------------------------------------------------------------------------- the driver


def read_lines(path: Path) -> list[dict]:
    """The records appended so far (a torn last line, from a kill mid-write, is ignored and rewritten later)."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def to_parquet(lines: list[dict], path: Path) -> None:
    """One row per run: its config and summary columns, and the per-epoch curves as list columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for rec in lines:
        flat = {k: v for k, v in rec.items() if k not in ("curve", "meta")}
        for key in PER_EPOCH:
            flat[f"curve.{key}"] = [e[key] for e in rec["curve"]]
        rows.append(flat)
    table = pa.Table.from_pylist(rows)
    meta = next((rec["meta"] for rec in lines if "meta" in rec), {})
    table = table.replace_schema_metadata({"kd_table": json.dumps(meta)})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainable", "bench"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "seed_grid.yaml"))
    ap.add_argument("--out", default=str(ROOT / "results" / "search_table.jsonl"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="worker processes; 0: in this process")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "kd"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change the recipe (dotted key, YAML value), e.g. for a small test table")
    ap.add_argument("--no-fork", action="store_true", help="train every run from scratch (to check the forks)")
    ap.add_argument("--no-teacher-runs", action="store_true", help="leave out the alpha-1 reference runs")
    ap.add_argument("--limit", type=int, default=None, help="stop after this many jobs (tests)")
    ap.add_argument("--to-parquet", action="store_true", help="only write the Parquet from the lines so far")
    args = ap.parse_args(argv)

    import yaml

    from trainable.config import set_dotted

    out = Path(args.out)
    parquet = out.with_suffix(".parquet")
    if args.to_parquet:
        lines = read_lines(out)
        to_parquet(lines, parquet)
        print(f"{len(lines)} runs -> {parquet}")
        return 0

    recipe = json.loads(json.dumps(RECIPE))
    for item in args.set:
        key, _, value = item.partition("=")
        set_dotted(recipe, key, yaml.safe_load(value))
    base = {**recipe, "cache_dir": args.cache_dir}
    meta = {"recipe": recipe, "recipe_hash": recipe_hash(recipe), "space": Path(args.space).name,
            "seeds": args.seeds, "fork": not args.no_fork, "code": code_version(), "workers": args.workers}

    done_lines = read_lines(out)
    hashes = {rec.get("meta", {}).get("recipe_hash") for rec in done_lines if "meta" in rec}
    if hashes - {meta["recipe_hash"]}:
        print(f"{out}: made with another recipe ({', '.join(sorted(h for h in hashes if h))}); "
              f"use another --out", file=sys.stderr)
        return 2
    done = {run_key(rec) for rec in done_lines}
    runs = grid_runs(args.space, args.seeds, no_teacher=not args.no_teacher_runs)
    jobs = [j for j in jobs_of(runs) if not all(run_key(r) in done for r in j)]
    # Seed by seed (a complete one-seed table comes first), largest students first within a seed (short tail).
    jobs.sort(key=lambda j: (j[0]["train.seed"], -_cost(j[0])))
    if args.limit is not None:
        jobs = jobs[:args.limit]
    total = len(jobs_of(runs))
    print(f"table: {len(runs)} runs in {total} jobs, {total - len(jobs)} done before; {len(jobs)} to go on "
          f"{args.workers} worker(s); appending to {out}", flush=True)

    from trainable.config import ExperimentConfig
    from trainable.prepare import prepare

    t0 = time.time()
    prep = prepare(ExperimentConfig.model_validate(base), log=lambda m: print(f"  {m}", flush=True))
    if prep.teacher is not None:
        enc = prep.encoded[recipe["tokenizer"]["vocab_size"]]
        acc = {s: float((prep.logits[s].argmax(1) == getattr(enc, s).labels).mean()) for s in ("val", "test")}
        meta["teacher"] = acc
        print(f"teacher: val {acc['val']:.4f}, test {acc['test']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    first = not done_lines
    t0 = time.time()
    with out.open("a") as f:
        for n, records in enumerate(_results(jobs, base, args.workers, not args.no_fork, prep), 1):
            for rec in records:
                if first:
                    rec = {**rec, "meta": meta}
                    first = False
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
            elapsed = time.time() - t0
            left = elapsed / n * (len(jobs) - n)
            r0 = records[0]
            print(f"[{elapsed:6.0f}s] job {n}/{len(jobs)}: {r0.get('label.dims', '')} alpha "
                  f"{r0['train.alpha']} T {r0['train.temperature']} seed {r0['train.seed']}: "
                  + ", ".join(f"step {r['train.step_size']} val {r['best_val_acc']:.4f} test {r['test_acc']:.4f}"
                              for r in records)
                  + f"; ~{left / 60:.0f} min left, load {os.getloadavg()[0]:.1f}", flush=True)
    lines = read_lines(out)
    if len({run_key(r) for r in lines}) >= len(runs):
        to_parquet(lines, parquet)
        print(f"table complete: {len(lines)} runs -> {parquet}")
    return 0


def _results(jobs: list[list[dict]], base: dict, workers: int, fork: bool, prep=None):
    """Each job's records as it finishes: in worker processes (one torch thread each), or here with 0 workers."""
    if workers == 0:
        _init(base, prep)
        for job in jobs:
            yield run_job(job, fork)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init, initargs=(base,)) as pool:
        for fut in as_completed([pool.submit(run_job, j, fork) for j in jobs]):
            yield fut.result()


def _cost(run: dict) -> float:
    h, e = run.get("student.hidden_dim", 128), run.get("student.embedding_dim", 64)
    return h * (h + e) * (1.0 if run.get("train.alpha", 0.5) < 1.0 else 0.5)


if __name__ == "__main__":
    sys.exit(main())
