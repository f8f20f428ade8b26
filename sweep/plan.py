"""Plan a sweep before anything trains: how many trials and trial-epochs it costs and how long that takes here.

    sweep plan CONFIG [--set k=v ...]      (`sweep run` prints the same plan in two lines first)

- Trials: the search trials and the finalist trials (reruns and no-teacher twins), as the tuner counts them
  (`sweep/counts.py`).
- Trial-epochs: worst case (every trial every epoch), and expected under ASHA from its rungs (Ray's formula for
  grace period, reduction factor and max_t = train.epochs): at each rung 1/rf of the trials go on, plus the first
  one to arrive, which asynchronous ASHA always promotes. Finalist trials run every epoch.
- Rows: counted in the corpus files (nothing is prepared); the task says which of them a trial's epoch trains on
  and evaluates (`Task.epoch_rows`).
- Speed: one short timed run through the task's real training loop (`Task.probe_speed`) for the cheapest, a
  middle and the dearest trial the space draws, on random token ids whose lengths follow the corpus (a WordPiece
  trained on a sample of it); other trials are interpolated in log-log by the task's cost per row. Each timed run is
  brought to an idle core by the share of a core it had (its CPU time over its wall time) and cached in
  `cache_dir/calibration.json`.
- Wall time: the trials' work divided by the trials that run at once (min(max_concurrent, CPUs / resources.cpu)),
  plus each phase's tail (its last trial may run alone), plus start-up; on an idle machine and, when the machine is
  busy now (its 1-minute load average), with the share of the cores the trials would get beside that load.
  Preparation (teacher, tokenizer, logits) comes on top when its caches are cold.

torch and trainable.data/io (they load pyarrow) are imported inside the functions that use them, so `sweep plan` refuses
a bad config before loading them.
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import Config, ConfigError
from .counts import finalist_count, finalist_split, largest, num_samples, sample_trials, smallest

Log = Callable[[str], None]

CALIBRATION_FILE = "calibration.json"
SAMPLE_TEXTS = 5000  # corpus texts a length sample is drawn from (a WordPiece trained on them: ~0.3 s)
PROBE_S = 2.0  # seconds of timed training per probed trial (`sweep plan`)
RUN_PROBE_S = 0.7  # ... for `sweep run`'s two-line plan, when nothing is cached
# Measured on the 2-core machine (results/benchmarks.md): Ray's cost to start a trial in a reused actor, and what
# a local sweep spends outside its trials (importing, starting Ray, reading the caches, writing the report).
TRIAL_START_S = 0.3
STARTUP_S = 15.0


# ----------------------------------------------------------------------------- trial-epochs under ASHA


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The epochs at which ASHA decides (Ray's one-bracket rungs grace * rf^k below max_t; a decision falls on
    the first reported epoch at or past a rung)."""
    grace = min(grace_period, max_t)
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    epochs = {math.ceil(grace * reduction_factor ** k - 1e-9) for k in range(count)}
    return sorted(e for e in epochs if e < max_t)  # at max_t a trial ends anyway


def asha_trial_epochs(num_trials: int, epochs: int, grace_period: int, reduction_factor: float,
                      max_t: int) -> float:
    """Expected epochs trained by `num_trials` search trials of `epochs` epochs under ASHA: of the trials reaching a
    rung, the first goes on and 1/rf of the others do."""
    cap = min(epochs, max_t)
    alive, done, total = float(num_trials), 0, 0.0
    for rung in asha_rungs(grace_period, reduction_factor, max_t):
        if rung >= cap:
            break
        total += alive * (rung - done)
        done = rung
        alive = min(alive, 1 + (alive - 1) / reduction_factor) if alive >= 1 else alive
    return total + alive * (cap - done)


# ----------------------------------------------------------------------------- rows and lengths


@dataclass(frozen=True)
class Rows:
    labelled: int  # training rows after the validation split
    val: int
    test: int
    transfer_file: int  # rows in the transfer file (0: none)
    augmented: int  # augmented copies (data.augment.samples per labelled row)
    lengths: np.ndarray | None = field(default=None, repr=False)  # token lengths of a sample of the pool's rows
    note: str = ""


def count_rows(cfg: Config, space=None, with_lengths: bool = True, log: Log = lambda m: None) -> Rows:
    """Row counts from the corpus files as `load_corpus` would split them (nothing is prepared or cached), and the
    token lengths of a sample: a WordPiece of the space's smallest vocab (the longest sequences) trained on
    `SAMPLE_TEXTS` training reviews, applied to as many training and transfer reviews."""
    from trainable.data import (NSMC_ROWS, DataError, locate_files, locate_transfer, read_table, read_texts,
                                train_wordpiece)

    d = cfg.data
    try:
        train_path, test_path = locate_files(d, log, download=False)
    except DataError:
        if not (d.download and d.train_file in NSMC_ROWS and d.test_file in NSMC_ROWS):
            raise
        n_train, n_test = NSMC_ROWS[d.train_file], NSMC_ROWS[d.test_file]
        n_train, n_test = min(n_train, d.train_rows or n_train), min(n_test, d.test_rows or n_test)
        n_val = max(1, int(round(n_train * d.val_fraction)))
        return Rows(n_train - n_val, n_val, n_test, 0, d.augment.samples * (n_train - n_val), None,
                    "corpus not downloaded yet: NSMC's published row counts, no transfer set, no speed estimate "
                    "(run `sweep prepare` first)")
    train = read_table(train_path, d)
    n_test = len(read_table(test_path, d))
    n_train = min(len(train), d.train_rows or len(train))
    n_test = min(n_test, d.test_rows or n_test)
    n_val = max(1, int(round(n_train * d.val_fraction)))
    labelled = n_train - n_val
    transfer_texts: list[str] = read_texts(locate_transfer(d), d.text_column) if d.transfer_file else []
    lengths = None
    if with_lengths:
        rng = np.random.default_rng(d.seed)
        texts = [train.texts[i] for i in rng.choice(len(train), min(SAMPLE_TEXTS, len(train)), replace=False)]
        extra = ([transfer_texts[i] for i in rng.choice(len(transfer_texts), min(SAMPLE_TEXTS, len(transfer_texts)),
                                                        replace=False)] if transfer_texts else [])
        tok = train_wordpiece(texts + extra if cfg.tokenizer.train_on_transfer else texts,
                              smallest(cfg, space, "tokenizer.vocab_size"), cfg.tokenizer.min_frequency,
                              cfg.tokenizer.limit_alphabet)
        max_length = largest(cfg, space, "tokenizer.max_length")
        encs = tok.encode_batch(texts + extra, add_special_tokens=False)
        lengths = np.array([max(1, min(len(e.ids), max_length)) for e in encs], dtype=np.int64)
    return Rows(labelled, n_val, n_test, len(transfer_texts), d.augment.samples * labelled, lengths)


# ----------------------------------------------------------------------------- speed


def trial_threads(cfg: Config) -> int:
    """Torch threads of one trial: train.threads, else what Ray gives a trial's process (its CPUs)."""
    return cfg.train.threads or max(1, int(cfg.sweep.resources.cpu))


def trial_device(cfg: Config) -> str:
    import torch

    gpu = cfg.sweep.resources.gpu
    wants_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and (gpu == "auto" or gpu > 0))
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def concurrency(cfg: Config) -> tuple[int, str]:
    """Trials at once, and why: min(max_concurrent, CPUs / resources.cpu[, GPUs / resources.gpu])."""
    s = cfg.sweep
    if s.address or os.environ.get("RAY_ADDRESS"):
        return s.max_concurrent, f"max_concurrent {s.max_concurrent}; on a cluster, if it has room for them"
    cpus = os.cpu_count() or 1
    n = min(s.max_concurrent, max(1, int(cpus // s.resources.cpu)))
    why = f"max_concurrent {s.max_concurrent}, {cpus} CPUs / {s.resources.cpu:g} per trial"
    gpu = s.resources.gpu
    if isinstance(gpu, (int, float)) and gpu > 0:
        import torch

        if torch.cuda.device_count():
            n = min(n, max(1, int(torch.cuda.device_count() // gpu)))
            why += f", {torch.cuda.device_count()} GPU(s) / {gpu:g} per trial"
    return n, why


@dataclass
class Speed:
    """Seconds per training and per evaluated row on an idle core, from the probed trials (work per row, entry),
    interpolated in log-log between them."""

    points: list[tuple[float, dict]]
    cached: bool

    def _at(self, work: float, key: str) -> float:
        pts = sorted(self.points, key=lambda p: p[0])
        x = [math.log(w) for w, _ in pts]
        y = [math.log(e[key] * (e.get("cpu_share") or 1.0)) for _, e in pts]  # brought to an idle core
        return math.exp(float(np.interp(math.log(work), x, y)))

    def train_s(self, work: float) -> float:
        return self._at(work, "train_s")

    def eval_s(self, work: float) -> float:
        return self._at(work, "eval_s")


def probe(cfg: Config, trials: list[dict], rows: Rows, budget_s: float, log: Log) -> Speed:
    """Time the cheapest, a middle and the dearest of the sampled trials once each (cached per trial, length
    sample, threads, device and torch version)."""
    import torch

    from trainable.io import sha256_json, write_json

    task = cfg.task_def
    ranked = sorted(trials, key=task.work_per_row)
    picks = list({json.dumps(t, sort_keys=True): t for t in (ranked[0], ranked[len(ranked) // 2], ranked[-1])}.values())
    path = Path(cfg.cache_dir) / CALIBRATION_FILE
    try:
        cache = json.loads(path.read_text()).get("entries", {})
    except (OSError, ValueError, AttributeError):
        cache = {}
    threads, device = trial_threads(cfg), trial_device(cfg)
    points, cached = [], True
    for trial in picks:
        key = sha256_json({"task": task.name, "trial": trial, "lengths": round(float(rows.lengths.mean()), 1),
                           "threads": threads, "device": device, "cpu": _cpu_model(), "torch": torch.__version__})
        entry = cache.get(key)
        if entry is None or entry.get("budget_s", 0.0) < 0.99 * budget_s:
            log(f"plan: timing {_label(trial)} ({threads} thread(s), {device}, ~{budget_s:.0f} s)")
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                entry = {**task.probe_speed(cfg, {**trial, "train.threads": threads, "train.device": device},
                                            rows.lengths, budget_s), "budget_s": budget_s, "label": _label(trial)}
            finally:
                torch.set_num_threads(old)
            if entry.get("cpu_share") is None:  # several threads: their share is not measurable this way
                entry["cpu_share"] = load_share(threads)
            cache[key], cached = entry, False
        points.append((task.work_per_row(trial), {**entry, "label": _label(trial)}))
    if not cached:
        try:
            write_json(path, {"entries": cache})
        except OSError:
            pass  # a read-only cache only costs a new measurement next time
    return Speed(points, cached)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass

    return platform.processor() or platform.machine()


def _label(trial: dict) -> str:
    names = {"student.embedding_dim": "E", "student.hidden_dim": "H", "train.batch_size": "batch "}
    return "/".join(f"{short}{trial[k]}" for k, short in names.items() if k in trial) or "trial"


def load_share(threads: int, load: float | None = None) -> float:
    """The share of a core each of `threads` runnable threads gets beside the machine's load now (the 1-minute
    load average: runnable threads of every other process, as the kernel counts them)."""
    cpus = os.cpu_count() or 1
    load = (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0) if load is None else load
    return min(1.0, cpus / max(load + threads, 1e-9))


# ----------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    name: str
    search: int
    finalists: int
    reruns: int
    twins: int
    epochs: int  # per trial (ASHA's max_t)
    rungs: list[int]
    worst_trial_epochs: int
    asha_trial_epochs: float
    concurrency: int
    concurrency_why: str
    asha: bool = True
    rows: Rows | None = None
    rows_line: str = ""
    speed: Speed | None = None
    search_s: float | None = None
    finalists_s: float = 0.0
    worst_s: float | None = None
    load: float = 0.0  # the 1-minute load average when planned
    idle: float = 1.0  # of a core per trial thread on an idle machine (the trials share the cores)
    share: float = 1.0  # ... beside the load now
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float | None:
        return None if self.search_s is None else self.search_s + self.finalists_s + STARTUP_S

    @property
    def loaded(self) -> bool:
        return self.search_s is not None and self.share < 0.95 * self.idle

    def lines(self) -> list[str]:
        out = [f"plan for sweep {self.name}, before anything trains:"]
        fin = (f" + up to {self.finalists} finalist trials ({self.reruns} reruns, {self.twins} no-teacher twins)"
               if self.finalists else " (no finalist trials)")
        out.append(f"  trials: {self.search} search{fin}")
        asha = (f"ASHA decides at epoch(s) {', '.join(map(str, self.rungs))}" if self.rungs
                else "ASHA stops no trial (no rung before the last epoch)" if self.asha else "no early stopping")
        out.append(f"  epochs: {self.epochs} per trial; {asha}")
        out.append(f"  trial-epochs: {self.worst_trial_epochs} worst case (all trials all epochs), "
                   f"{self.asha_trial_epochs:.0f} expected with ASHA")
        if self.rows_line:
            out.append(f"  rows per epoch: {self.rows_line}")
        if self.speed is not None:
            pts = ", ".join(f"{e['label']} {1 / e['train_s']:,.0f}" for _, e in self.speed.points)
            out.append(f"  speed: training rows/s of one trial ({'cached' if self.speed.cached else 'timed now'}, "
                       f"through the real training loop): {pts}")
        out.append(f"  concurrency: {self.concurrency} trial(s) at a time ({self.concurrency_why})")
        if self.total_s is not None:
            out.append(f"  load now: {self.load:.1f} on {os.cpu_count()} CPUs: each trial thread would get "
                       f"{self.share:.2f} of a core (idle: {self.idle:.2f})")
            out.append(f"  wall time: ~{_fmt_s(self.total_s)} expected with ASHA on an idle machine (search "
                       f"{_fmt_s(self.search_s)}, finalists {_fmt_s(self.finalists_s)}, start-up and report "
                       f"{_fmt_s(STARTUP_S)}), worst case ~{_fmt_s(self.worst_s + STARTUP_S)}"
                       + (f"; ~{_fmt_s(self.loaded_total_s)} if the load now goes on" if self.loaded else "")
                       + "; plus preparation (teacher, tokenizer, logits) when not cached")
        out += [f"  note: {n}" for n in self.notes]
        return out

    @property
    def loaded_total_s(self) -> float:
        return (self.search_s + self.finalists_s) * self.idle / self.share + STARTUP_S

    def summary(self) -> list[str]:
        """The plan in two lines, for `sweep run`."""
        first = (f"plan: {self.search} search + {self.finalists} finalist trials, {self.asha_trial_epochs:.0f} "
                 f"trial-epochs expected with ASHA ({self.worst_trial_epochs} at most), {self.concurrency} at a time")
        if self.total_s is None:
            return [first + "; no time estimate" + (f" ({self.notes[0]})" if self.notes else "")]
        return [first, f"plan: ~{_fmt_s(self.total_s)} expected on an idle machine (worst case "
                       f"~{_fmt_s(self.worst_s + STARTUP_S)})"
                       + (f", ~{_fmt_s(self.loaded_total_s)} if the load now goes on" if self.loaded else "")
                       + f", from a {'cached' if self.speed.cached else 'new'} timing; plus preparation when not "
                         f"cached (`sweep plan` for the details)"]


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def make_plan(cfg: Config, space, log: Log = lambda m: None, time_it: bool = True,
              probe_s: float = PROBE_S) -> Plan:
    """The plan of a sweep; `time_it` False: counts only (no corpus lengths, no timed runs)."""
    task = cfg.task_def
    n_search, n_final = num_samples(cfg, space), finalist_count(cfg)
    reruns, twins = finalist_split(cfg)
    max_t, sched = cfg.train.epochs, cfg.sweep.scheduler
    asha = sched.kind == "asha"
    rungs = asha_rungs(sched.grace_period, sched.reduction_factor, max_t) if asha else []
    trials = sample_trials(cfg, space, ["train.epochs", *task.plan_keys], seed=cfg.sweep.seed)
    notes = []
    longer = sorted({t["train.epochs"] for t in trials if t["train.epochs"] > max_t})
    if asha and longer:
        notes.append(f"the space sets train.epochs to {', '.join(map(str, longer))}, but ASHA's max_t is the "
                     f"config's train.epochs ({max_t}): ASHA stops every search trial at epoch {max_t}")
    epochs = [min(t["train.epochs"], max_t) if asha else t["train.epochs"] for t in trials]
    full = float(np.mean([t["train.epochs"] for t in trials]))
    per_search = (float(np.mean([asha_trial_epochs(n_search, e, sched.grace_period, sched.reduction_factor, max_t)
                                 for e in epochs])) if asha else n_search * float(np.mean(epochs)))
    plan = Plan(cfg.name, n_search, n_final, reruns, twins, max_t, rungs,
                worst_trial_epochs=round(n_search * float(np.mean(epochs)) + n_final * full),
                asha_trial_epochs=per_search + n_final * full, concurrency=0, concurrency_why="", asha=asha,
                notes=notes)
    plan.concurrency, plan.concurrency_why = concurrency(cfg)
    if not task.plan_keys:
        notes.append(f"task {task.name}: trial counts only (the task gives no row counts or speed probe)")
        return plan
    rows = plan.rows = count_rows(cfg, space, with_lengths=time_it, log=log)
    if rows.note:
        notes.append(rows.note)
    sizes = [task.epoch_rows(t, rows) for t in trials]
    big = max(range(len(trials)), key=lambda i: sizes[i][0])
    plan.rows_line = (f"{sizes[big][0]:,} trained on (the largest trial; {rows.labelled:,} labelled"
                      + (f" + {sizes[big][0] - rows.labelled:,} transfer" if sizes[big][0] > rows.labelled else "")
                      + f"), {sizes[big][1]:,} evaluated (validation {rows.val:,}, test {rows.test:,})")
    if not time_it or rows.lengths is None:
        return plan
    if trial_device(cfg) == "cpu" and (cfg.train.device == "cuda" or (
            cfg.train.device == "auto" and cfg.sweep.resources.gpu != "auto" and cfg.sweep.resources.gpu > 0)):
        notes.append("trials ask for a GPU and this machine has none: no time estimate (plan where they run)")
        return plan
    plan.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before our own timed runs add to it
    speed = plan.speed = probe(cfg, trials, rows, probe_s, log)
    c = max(1, min(plan.concurrency, n_search))
    plan.share = load_share(c * trial_threads(cfg), plan.load)
    idle = plan.idle = load_share(c * trial_threads(cfg), 0.0)  # the trials share the cores with each other

    def epoch_s(trial: dict, teacher: bool = True) -> float:
        train, evaluated = task.epoch_rows(trial if teacher else {**trial, **task.twin}, rows)
        w = task.work_per_row(trial)
        return (train * speed.train_s(w) + evaluated * speed.eval_s(w)) / idle

    search_epoch = [epoch_s(t) for t in trials]
    one = float(np.mean([e * s for e, s in zip(epochs, search_epoch)]))  # one trial, every epoch
    mean_epochs = per_search / n_search if n_search else 0.0
    # A phase takes its work spread over c trials at a time, plus its tail: the last trial may run alone, for up
    # to (1 - 1/c) of a trial trained to the end (under ASHA, the last ones are the survivors).
    plan.search_s = n_search * (mean_epochs * float(np.mean(search_epoch)) + TRIAL_START_S) / c + (1 - 1 / c) * one
    worst = n_search * (one + TRIAL_START_S) / c + (1 - 1 / c) * one
    if n_final:
        twin = float(np.mean([t["train.epochs"] * epoch_s(t, teacher=False) for t in trials]))
        rerun = float(np.mean([t["train.epochs"] * s for t, s in zip(trials, search_epoch)]))
        cf = max(1, min(plan.concurrency, n_final))
        plan.finalists_s = ((twins * twin + reruns * rerun + n_final * TRIAL_START_S) / cf
                            + (1 - 1 / cf) * max(twin, rerun if reruns else 0.0))
    plan.worst_s = worst + plan.finalists_s
    return plan


def log_plan_summary(cfg: Config, space, log: Log) -> None:
    """`sweep run`'s two plan lines; a plan that cannot be made never stops the sweep."""
    from trainable.data import DataError

    try:
        plan = make_plan(cfg, space, log, probe_s=RUN_PROBE_S)
    except (ConfigError, DataError):
        return  # bad input: the sweep's own checks report it, in one line, next
    except Exception as e:  # noqa: BLE001 - the plan is advice
        log(f"plan: not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    for line in plan.summary():
        log(line)
