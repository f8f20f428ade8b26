"""Plan a sweep before anything trains: how many trials and trial-epochs it costs, how long that takes here, and,
for `sweep.resources.gpu: auto`, how many trials share one GPU.

    sweep plan CONFIG [--set k=v ...]      (`sweep run` prints the same plan in two lines first)

- Trials: the search trials (`num_samples`) and the finalist trials (reruns and no-teacher twins), as the tuner
  counts them.
- Trial-epochs: worst case (every trial every epoch), and expected under ASHA from its rungs (Ray's formula for
  grace period, reduction factor and max_t = train.epochs): at each rung 1/rf of the trials go on, plus the first
  one to arrive, which asynchronous ASHA always promotes (it has nothing to compare it with). Finalist trials run
  every epoch.
- Rows: counted in the corpus files (nothing is prepared): labelled rows after the validation split, plus the
  transfer rows each trial takes (none for a trial with alpha 1, such as a twin).
- Speed: measured. The smallest, a middle and the largest student the space can draw (at its smallest and largest
  batch) train for a few seconds each on random token ids whose lengths follow the corpus (a WordPiece trained on a
  sample of it), through the loop's own batching, loss and optimizer, then evaluate and checkpoint once. Cached in
  `cache_dir/calibration.json` per (shape, batch size, length, threads, device, torch version), brought to an idle
  core by the share of a core the calibration got (its CPU time over its wall time). Other students are
  interpolated in log-log between them by their LSTM multiply-adds per token.
- Wall time: the trials' work divided by the trials that run at once (min(max_concurrent, CPUs / resources.cpu)),
  plus the tail of each phase (its last trial may run alone: up to (1 - 1/c) of a full trial), plus start-up; on an
  idle machine, and, when other work runs now, with the share of the cores the trials would get beside it (the
  kernel's fair sharing between sessions, or between threads by nice value). Preparation (teacher, tokenizer,
  logits) comes on top when its caches are cold.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trainable.memory import MemoryEstimate, estimate_trial_memory, fmt_bytes, trials_per_gpu

from .config import Config, ConfigError

Log = Callable[[str], None]

CALIBRATION_FILE = "calibration.json"
GPU_SIZING_FILE = "gpu_sizing.json"
SAMPLE_TEXTS = 5000  # corpus texts a length sample is drawn from (a WordPiece trained on them: ~0.3 s)
SAMPLED_TRIALS = 200  # trial configs drawn from the space to average speeds and rows over
TRAIN_BUDGET_S = 3.0  # seconds of timed training per calibrated shape (at most MAX_BATCHES batches)
CALIBRATION_BUDGET_S = 12.0  # ... and in all (with evaluation and start-up: under ~20 s)
RUN_CALIBRATION_BUDGET_S = 3.0  # `sweep run`'s two-line plan, when nothing is cached: a rougher measurement
MAX_BATCHES = 300
WARMUP_BATCHES = 3  # untimed: the allocator, the kernels' first calls, Adam's state
# Measured on the 2-core machine (results/benchmarks.md): Ray's cost to start a trial in a reused actor
# ("Ray overhead with actor reuse"), and what a local sweep spends outside its trials (importing, starting local
# Ray, reading the prepared caches, writing the report and its plots; "Budget planner").
TRIAL_START_S = 0.3
STARTUP_S = 15.0


# ----------------------------------------------------------------------------- what the space can draw


def _dump_get(raw: dict, key: str) -> Any:
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def trial_values(cfg: Config, space, key: str) -> list:
    """Every value `key` can take in a trial: the space's values (a numeric parameter's bounds), and the config's
    own value when some trial may leave the key alone (no fixed value, no unconditional parameter or bundle)."""
    base = _dump_get(cfg.model_dump(), key)
    if space is None:
        return [base]
    values = space.values_of(key, numeric_ok=True)
    always = key in space.fixed or any(
        p.when is None and (name == key or (isinstance(p.choices, dict) and all(key in c for c in p.choices.values())))
        for name, p in space.params.items())
    return values if always and values else values + [base]


def _largest(cfg: Config, space, key: str):
    values = [v for v in trial_values(cfg, space, key) if v is not None]
    return max(values) if values else None


def _smallest(cfg: Config, space, key: str):
    values = [v for v in trial_values(cfg, space, key) if v is not None]
    return min(values) if values else None


SHAPE_KEYS = {"vocab_size": "tokenizer.vocab_size", "embedding_dim": "student.embedding_dim",
              "hidden_dim": "student.hidden_dim", "num_layers": "student.num_layers",
              "batch_size": "train.batch_size"}


@dataclass(frozen=True)
class Shape:
    """A student's shape and training batch: what its speed and memory depend on."""

    vocab_size: int
    embedding_dim: int
    hidden_dim: int
    num_layers: int
    batch_size: int

    @property
    def label(self) -> str:
        layers = f"x{self.num_layers}" if self.num_layers > 1 else ""
        return f"E{self.embedding_dim}/H{self.hidden_dim}{layers} vocab {self.vocab_size} batch {self.batch_size}"

    @property
    def lstm_macs(self) -> int:
        """Multiply-adds per token of the forward pass, both directions, all layers."""
        h, macs = self.hidden_dim, 0
        for layer in range(self.num_layers):
            inp = self.embedding_dim if layer == 0 else 2 * h
            macs += 2 * 4 * h * (inp + h)
        return macs


def _shape_of(values: dict) -> Shape:
    return Shape(**{name: int(values[key]) for name, key in SHAPE_KEYS.items()})


def space_extremes(cfg: Config, space) -> tuple[Shape, Shape]:
    """The smallest and the largest student (and batch) the space can draw."""
    small = {key: _smallest(cfg, space, key) for key in SHAPE_KEYS.values()}
    large = {key: _largest(cfg, space, key) for key in SHAPE_KEYS.values()}
    return _shape_of(small), _shape_of(large)


def sample_trials(cfg: Config, space, n: int = SAMPLED_TRIALS, seed: int = 0) -> list[dict]:
    """`n` trial configs drawn at random from the space (Optuna's random sampler over the space's own
    define-by-run, so conditions and log scales hold), as {dotted key: value} over the config's values."""
    base = cfg.model_dump()
    keys = [*SHAPE_KEYS.values(), "train.epochs", "train.alpha", "data.transfer_rows", "tokenizer.max_length",
            "train.eval_batch_size"]
    if space is None:
        return [{k: _dump_get(base, k) for k in keys}]
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        fn = space.define_by_run()
        out = []
        for _ in range(n):
            trial = study.ask()
            overrides = fn(trial)
            study.tell(trial, 0.0)
            out.append({k: overrides.get(k, _dump_get(base, k)) for k in keys})
    finally:
        optuna.logging.set_verbosity(verbosity)
    return out


# ----------------------------------------------------------------------------- trials and trial-epochs


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
    rung, the first goes on and 1/rf of the others do (each is compared with the median, for rf 2, of those
    before it)."""
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

    def transfer_for(self, trial: dict) -> int:
        """Transfer rows one trial trains on: none without a teacher (alpha 1), else its share of the file plus
        every augmented copy."""
        if trial["train.alpha"] >= 1.0:
            return 0
        take = trial["data.transfer_rows"]
        return (self.transfer_file if take is None else min(take, self.transfer_file)) + self.augmented


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
    transfer_texts: list[str] = []
    if d.transfer_file is not None:
        transfer_texts = read_texts(locate_transfer(d), d.text_column)
    lengths = None
    if with_lengths:
        rng = np.random.default_rng(d.seed)
        texts = [train.texts[i] for i in rng.choice(len(train), min(SAMPLE_TEXTS, len(train)), replace=False)]
        extra = ([transfer_texts[i] for i in rng.choice(len(transfer_texts), min(SAMPLE_TEXTS, len(transfer_texts)),
                                                        replace=False)] if transfer_texts else [])
        vocab = _smallest(cfg, space, "tokenizer.vocab_size")
        tok_texts = texts + extra if cfg.tokenizer.train_on_transfer else texts
        tok = train_wordpiece(tok_texts, vocab, cfg.tokenizer.min_frequency, cfg.tokenizer.limit_alphabet)
        max_length = _largest(cfg, space, "tokenizer.max_length")
        encs = tok.encode_batch(texts + extra, add_special_tokens=False)
        lengths = np.array([max(1, min(len(e.ids), max_length)) for e in encs], dtype=np.int64)
    return Rows(labelled, n_val, n_test, len(transfer_texts), d.augment.samples * labelled, lengths)


# ----------------------------------------------------------------------------- calibration


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return "cuda:" + torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}"


def calibration_key(shape: Shape, max_length: int, mean_length: float, threads: int, device: str) -> str:
    import torch

    return (f"{shape.label} | max length {max_length}, mean {mean_length:.1f} | {threads} thread(s) | "
            f"{_device_name(device)} | torch {torch.__version__}")


def measure_speed(shape: Shape, lengths: np.ndarray, *, num_classes: int, threads: int, device: str,
                  max_length: int, eval_batch_size: int, budget_s: float = TRAIN_BUDGET_S,
                  max_batches: int = MAX_BATCHES) -> dict:
    """Train one student of `shape` on random token ids of the given lengths with the loop's own batching
    (length-bucketed), distillation loss and optimizer for `budget_s` seconds (at most `max_batches` batches, after
    up to `WARMUP_BATCHES`), then evaluate it and write one checkpoint. {train_samples_per_s, eval_samples_per_s,
    checkpoint_s, batches, load}: samples/s of rows drawn from `lengths`."""
    import tempfile

    import torch

    from trainable.config import TrainConfig
    from trainable.data import NO_LABEL, EncodedSplit
    from trainable.loop import bucketed_batches, evaluate, make_optimizer, save_checkpoint
    from trainable.losses import distillation_loss
    from trainable.student import BiLSTMClassifier

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        B, C = shape.batch_size, num_classes
        n = B * (max_batches + WARMUP_BATCHES)
        pool_lengths = rng.choice(lengths, n)
        padded = rng.integers(5, shape.vocab_size, (n, int(pool_lengths.max())), dtype=np.int32)
        labels = torch.from_numpy(np.where(rng.random(n) < 0.5, rng.integers(0, C, n), NO_LABEL)).to(dev)
        t_logits = torch.randn(n, C).to(dev)
        model = BiLSTMClassifier(shape.vocab_size, shape.embedding_dim, shape.hidden_dim, C, shape.num_layers).to(dev)
        opt = make_optimizer(model, TrainConfig())
        model.train()

        def step(idx: np.ndarray) -> None:  # as StudentJob.train_epoch does per batch
            lens = pool_lengths[idx]
            tokens = torch.from_numpy(padded[idx, : int(lens.max())]).long().to(dev)
            idx_t = torch.from_numpy(idx).to(dev)
            logits = model(tokens, torch.from_numpy(lens).to(dev))
            loss, parts = distillation_loss(logits, t_logits[idx_t], labels[idx_t], 0.5, 2.0, "kl")
            if not torch.isfinite(loss):
                raise FloatingPointError("calibration loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.tensor([loss.item(), parts["ce"].item(), parts["kd"].item()], dtype=torch.float64)

        batches = bucketed_batches(pool_lengths, B, torch.Generator().manual_seed(0))
        # A batch costs about its padded tokens (rows x its longest row), so the timed batches' speed is brought
        # to the whole pool's mix of lengths: a few timed batches of a large student need not be typical ones.
        padded_per_row = sum(len(i) * int(pool_lengths[i].max()) for i in batches) / n
        t0 = time.perf_counter()
        warm = 0
        while warm < min(WARMUP_BATCHES, len(batches) - 1):
            step(batches[warm])
            warm += 1
            if time.perf_counter() - t0 >= budget_s / 4:
                break
        sync()
        rows = tokens = 0
        t0, cpu0 = time.perf_counter(), time.process_time()
        for idx in batches[warm:]:
            step(idx)
            rows, tokens = rows + len(idx), tokens + len(idx) * int(pool_lengths[idx].max())
            if time.perf_counter() - t0 >= budget_s:
                break
        sync()
        wall = time.perf_counter() - t0
        # The share of a core our thread had: the CPU time the process got over the wall time (with other work on
        # the machine, below 1; the speeds are brought to an idle core with it). Several threads are not all busy
        # all the time even on an idle machine, so for them the caller estimates the share instead (None).
        cpu_share = (min(1.0, (time.process_time() - cpu0) / wall) if dev.type == "cpu" and threads == 1
                     else 1.0 if dev.type != "cpu" else None)
        train_sps = rows / wall * (tokens / rows) / padded_per_row

        # Evaluation: forward only, batches sorted by length, about a quarter of the budget's worth of rows.
        n_eval = int(min(8192, max(64, 3 * train_sps * budget_s / 4)))
        eval_lengths = rng.choice(lengths, n_eval)
        offsets = np.zeros(n_eval + 1, dtype=np.int64)
        np.cumsum(eval_lengths, out=offsets[1:])
        split = EncodedSplit(np.arange(n_eval), rng.integers(0, C, n_eval),
                             rng.integers(5, shape.vocab_size, int(offsets[-1]), dtype=np.int32), offsets)
        evaluate(model, split.take(np.arange(min(n_eval, 16))), eval_batch_size)  # warm-up
        sync()
        t0 = time.perf_counter()
        evaluate(model, split, eval_batch_size)
        sync()
        eval_sps = n_eval / (time.perf_counter() - t0) * eval_lengths.mean() / lengths.mean()

        # One epoch's checkpoint, as the loop writes it (model, optimizer, best weights, history).
        best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        with tempfile.TemporaryDirectory(prefix="kd-calibrate-") as tmp:
            t0 = time.perf_counter()
            save_checkpoint(Path(tmp) / "epoch_0001", {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": {},
                "rng": torch.get_rng_state(), "epoch": 1, "metric": "val_acc", "best": 0.0, "best_val_acc": 0.0,
                "best_epoch": 1, "test_acc": 0.0, "best_model": best, "train_time_s": 0.0, "history": []})
            checkpoint_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"train_samples_per_s": train_sps, "eval_samples_per_s": eval_sps, "checkpoint_s": checkpoint_s,
            "cpu_share": None if cpu_share is None else round(cpu_share, 3),
            "batches": rows // B, "load": round(load, 2), "cpus": os.cpu_count(), "device": _device_name(device),
            "measured": time.strftime("%Y-%m-%d %H:%M:%S")}


class Calibration:
    """Measured speeds by calibration key, kept in `cache_dir/calibration.json`."""

    def __init__(self, cache_dir: str | Path):
        self.path = Path(cache_dir) / CALIBRATION_FILE
        try:
            self.entries = json.loads(self.path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def get(self, key: str, measure: Callable[[], dict], budget_s: float = 0.0) -> tuple[dict, bool]:
        """(entry, cached); an entry measured with less than `budget_s` of training is measured again."""
        if key in self.entries and self.entries[key].get("budget_s", 0.0) >= 0.99 * budget_s:
            return self.entries[key], True
        entry = measure()
        self.entries[key] = entry
        from trainable.io import write_json

        try:
            write_json(self.path, {"entries": self.entries})
        except OSError:
            pass  # a read-only cache only costs a new measurement next time
        return entry, False


@dataclass(frozen=True)
class Background:
    """What else wants the CPUs, as the kernel shares them: with autogroups (Linux's default for desktops and
    most servers: one scheduling group per session), each busy session gets an equal share whatever its thread
    count or nice value; without them, every runnable thread does, weighted by its nice value (1.25x per step).
    `others`: (weight, demand in threads) of the other scheduling entities; `own`: other runnable threads in
    this process's own group (a sweep started from the same shell shares its group)."""

    others: tuple[tuple[float, float], ...] = ()
    own: float = 0.0
    grouped: bool = True

    def share(self, cpus: int, threads: int) -> float:
        """The share of a core each of our `threads` runnable threads gets."""
        if self.grouped:
            ours = threads + self.own
            return min(1.0, _water_fill(cpus, [(1.0, ours), *self.others])[0] / ours)
        alloc = _water_fill(cpus, [(1.0, 1.0)] * threads + list(self.others))
        return min(1.0, sum(alloc[:threads]) / threads)

    def to_json(self) -> dict:
        return {"others": [list(o) for o in self.others], "own": self.own, "grouped": self.grouped}


def _water_fill(total: float, entities: list[tuple[float, float]]) -> list[float]:
    """CPU time per entity (weight, demand): shares in proportion to weight, none above its demand, what one
    cannot use going to the others."""
    alloc = [0.0] * len(entities)
    active = {i for i, (_, d) in enumerate(entities) if d > 0}
    left = float(total)
    while active and left > 1e-9:
        wsum = sum(entities[i][0] for i in active)
        give = {i: left * entities[i][0] / wsum for i in active}
        full = {i for i in active if alloc[i] + give[i] >= entities[i][1]}
        if not full:
            for i in active:
                alloc[i] += give[i]
            break
        for i in full:
            left -= entities[i][1] - alloc[i]
            alloc[i] = entities[i][1]
        active -= full
    return alloc


def sample_background(samples: int = 10, interval_s: float = 0.05) -> Background:
    """Other runnable threads, by scheduling group, averaged over half a second (Linux: /proc; elsewhere the
    1-minute load average, which lags and counts this process's own recent work)."""
    me = os.getpid()

    def group_of(pid: str) -> str | None:
        try:
            return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
        except (OSError, IndexError):
            return None

    try:
        grouped = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        own_group, nice0 = group_of(str(me)) if grouped else None, os.nice(0)
        demand: dict = {}  # group (or thread) -> summed runnable count over the samples
        weight: dict = {}
        for _ in range(samples):
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit() or int(proc.name) == me:
                    continue
                try:
                    for task in (proc / "task").iterdir():
                        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                        if fields[0] != "R":
                            continue
                        if grouped:
                            key = group_of(proc.name)
                            text = Path(f"/proc/{proc.name}/autogroup").read_text().split()
                            weight[key] = 1.25 ** -int(text[-1]) if text[-2] == "nice" else 1.0
                            demand[key] = demand.get(key, 0.0) + (1.0 if key != own_group else
                                                                  1.25 ** (nice0 - int(fields[16])))
                        else:
                            key = f"{proc.name}/{task.name}"
                            weight[key] = 1.25 ** (nice0 - int(fields[16]))
                            demand[key] = demand.get(key, 0.0) + 1.0
                except (OSError, IndexError, ValueError):
                    continue  # the process ended while we looked
            time.sleep(interval_s)
        own = demand.pop(own_group, 0.0) / samples if grouped else 0.0
        others = tuple((weight[k], d / samples) for k, d in demand.items())
        return Background(others, own, grouped)
    except OSError:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        return Background(((1.0, load),), 0.0, False)


@dataclass(frozen=True)
class SpeedPoint:
    shape: Shape
    entry: dict  # measure_speed's result
    cached: bool

    @property
    def train_s(self) -> float:  # seconds per training sample, in the conditions it was measured under
        return 1.0 / self.entry["train_samples_per_s"]

    @property
    def eval_s(self) -> float:
        return 1.0 / self.entry["eval_samples_per_s"]

    @property
    def share(self) -> float:
        """The share of a core each calibration thread had (its CPU time over the wall time, measured)."""
        return self.entry.get("cpu_share", 1.0)


class SpeedModel:
    """Seconds per training and per evaluated sample of any shape: piecewise linear in log(time) over log(LSTM
    multiply-adds per token) between the calibrated shapes (smallest, middle, largest), then linear in log(batch
    size) between the smallest and the largest batch. On this machine's quickstart students, this was within 13%
    of direct measurements, where a straight line in the work between the two ends was up to 25% off (the time
    per multiply-add falls as the matrices grow)."""

    def __init__(self, points: list[SpeedPoint], cpus: int):
        self.points, self.cpus = points, cpus
        self.batches = sorted({p.shape.batch_size for p in points})
        self.checkpoint_s = max(p.entry["checkpoint_s"] for p in points)

    def _at(self, shape: Shape, attr: str) -> float:
        logs = []
        for b in self.batches:
            pts = sorted((p for p in self.points if p.shape.batch_size == b), key=lambda p: p.shape.lstm_macs)
            x = [math.log(p.shape.lstm_macs) for p in pts]
            # Each point is brought to an idle machine's speed: times the share of a core it had when measured.
            y = [math.log(getattr(p, attr) * p.share) for p in pts]
            logs.append(float(np.interp(math.log(shape.lstm_macs), x, y)))
        if len(logs) == 1:
            return math.exp(logs[0])
        return math.exp(float(np.interp(math.log(shape.batch_size), [math.log(b) for b in self.batches], logs)))

    def train_s(self, shape: Shape) -> float:
        """Seconds per training sample on an idle machine."""
        return self._at(shape, "train_s")

    def eval_s(self, shape: Shape) -> float:
        return self._at(shape, "eval_s")


def calibration_shapes(cfg: Config, space) -> list[Shape]:
    """The smallest, the middle (geometric means) and the largest student the space can draw, at the smallest
    and at the largest batch size."""
    small, large = space_extremes(cfg, space)
    mid = Shape(*(round(math.sqrt(a * b)) for a, b in zip(astuple(small), astuple(large))))
    shapes = []
    for batch in sorted({small.batch_size, large.batch_size}):
        for s in (small, mid, large):
            s = replace(s, batch_size=batch)
            if s not in shapes and all(t.lstm_macs != s.lstm_macs or t.batch_size != batch for t in shapes):
                shapes.append(s)
    return shapes


def calibrate(cfg: Config, space, rows: Rows, log: Log = lambda m: None, background: Background = Background(),
              budget_s: float = CALIBRATION_BUDGET_S) -> SpeedModel:
    """Speeds of `calibration_shapes`, measured once each (`budget_s` of training in all) and cached with the
    `background` they were measured beside."""
    shapes = calibration_shapes(cfg, space)
    threads, device = trial_threads(cfg), trial_device(cfg)
    max_length = _largest(cfg, space, "tokenizer.max_length")
    eval_batch = _largest(cfg, space, "train.eval_batch_size")
    mean_length = float(rows.lengths.mean())
    cache = Calibration(cfg.cache_dir)
    budget = min(TRAIN_BUDGET_S, budget_s / len(shapes))
    points = []
    for shape in shapes:
        key = calibration_key(shape, max_length, mean_length, threads, device)
        if cache.entries.get(key, {}).get("budget_s", 0.0) < 0.99 * budget:
            log(f"plan: calibrating {shape.label} ({threads} thread(s), {device}, ~{budget:.0f} s)")

        def measure() -> dict:
            entry = measure_speed(shape, rows.lengths, num_classes=cfg.data.num_classes, threads=threads,
                                  device=device, max_length=max_length, eval_batch_size=eval_batch, budget_s=budget)
            if entry["cpu_share"] is None:
                entry["cpu_share"] = round(background.share(os.cpu_count() or 1, threads), 3)
            return {**entry, "background": background.to_json(), "threads": threads, "budget_s": budget}

        entry, cached = cache.get(key, measure, budget)
        points.append(SpeedPoint(shape, entry, cached))
    return SpeedModel(points, os.cpu_count() or 1)


def trial_threads(cfg: Config) -> int:
    """Torch threads of one trial: train.threads, else what Ray gives a trial's process (OMP_NUM_THREADS =
    its CPUs)."""
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
    by_cpu = max(1, int(cpus // s.resources.cpu))
    n = min(s.max_concurrent, by_cpu)
    why = f"max_concurrent {s.max_concurrent}, {cpus} CPUs / {s.resources.cpu:g} per trial"
    gpu = s.resources.gpu
    if isinstance(gpu, (int, float)) and gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus:
            n = min(n, max(1, int(gpus // gpu)))
            why += f", {gpus} GPU(s) / {gpu:g} per trial"
    return n, why


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
    rows: Rows
    concurrency: int
    concurrency_why: str
    speed: SpeedModel | None = None
    search_s: float | None = None
    finalists_s: float | None = None
    worst_s: float | None = None
    max_transfer: int = 0  # transfer rows of the trial that takes the most
    asha: bool = True
    background: Background = Background()  # what else ran when planned
    idle_share: float = 1.0  # of a core, per trial thread, during the sweep on an idle machine
    core_share: float = 1.0  # ... and beside what runs now
    loaded_s: float | None = None  # total_s, if what runs now goes on running
    loaded_worst_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float | None:
        return None if self.search_s is None else self.search_s + self.finalists_s + STARTUP_S

    def lines(self) -> list[str]:
        r = self.rows
        out = [f"plan for sweep {self.name}, before anything trains:"]
        fin = (f" + up to {self.finalists} finalist trials ({self.reruns} reruns, {self.twins} no-teacher twins)"
               if self.finalists else " (no finalist trials)")
        out.append(f"  trials: {self.search} search{fin}")
        asha = (f"ASHA decides at epoch(s) {', '.join(map(str, self.rungs))}" if self.rungs
                else "ASHA stops no trial (no rung before the last epoch)" if self.asha else "no early stopping")
        out.append(f"  epochs: {self.epochs} per trial; {asha}")
        out.append(f"  trial-epochs: {self.worst_trial_epochs} worst case (all trials all epochs), "
                   f"{self.asha_trial_epochs:.0f} expected with ASHA")
        if self.max_transfer:
            twins = f"; a twin: {r.labelled:,}" if self.twins else ""
            rows = (f"{r.labelled:,} labelled + {self.max_transfer:,} transfer = "
                    f"{r.labelled + self.max_transfer:,} (the largest trial{twins})")
        else:
            rows = f"{r.labelled:,} labelled (no transfer rows)"
        if r.labelled:  # counted (the classify task)
            out.append(f"  rows per epoch: {rows}; evaluated: validation {r.val:,}, test {r.test:,}")
        if self.speed is not None:
            p0 = self.speed.points[0]
            pts = ", ".join(f"{p.shape.label} {p.entry['train_samples_per_s']:,.0f}" for p in self.speed.points)
            cached = all(p.cached for p in self.speed.points)
            out.append(f"  speed: training samples/s of one trial ({p0.entry['threads']} thread(s), "
                       f"{p0.entry.get('device', 'cpu')}; {'cached calibration' if cached else 'calibrated now'}, "
                       f"measured with {p0.share:.2f} of a core): {pts}")
        out.append(f"  concurrency: {self.concurrency} trial(s) at a time ({self.concurrency_why})")
        if self.speed is not None:
            bg = self.background
            others = (f"{len(bg.others)} other {'session' if bg.grouped else 'thread'}(s) wanting "
                      f"{sum(d for _, d in bg.others):.1f} cores" if bg.others else "nothing else running")
            out.append(f"  load now on {self.speed.cpus} CPUs: {others}: each trial thread would get "
                       f"{self.core_share:.2f} of a core (idle: {self.idle_share:.2f})")
        if self.total_s is not None:
            out.append(f"  wall time: ~{_fmt_s(self.total_s)} expected with ASHA on an idle machine (search "
                       f"{_fmt_s(self.search_s)}, finalists {_fmt_s(self.finalists_s)}, start-up and report "
                       f"{_fmt_s(STARTUP_S)}), worst case ~{_fmt_s(self.worst_s + STARTUP_S)}"
                       + (f"; up to ~{_fmt_s(self.loaded_s)} (worst case ~{_fmt_s(self.loaded_worst_s)}) if the "
                          f"load now goes on" if self.loaded else "")
                       + "; plus preparation (teacher, tokenizer, logits) when not cached")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def summary(self) -> list[str]:
        """The plan in two lines, for `sweep run`."""
        first = (f"plan: {self.search} search + {self.finalists} finalist trials, {self.asha_trial_epochs:.0f} "
                 f"trial-epochs expected with ASHA ({self.worst_trial_epochs} at most), {self.concurrency} at a time")
        if self.total_s is None:
            return [first + "; no time estimate" + (f" ({self.notes[0]})" if self.notes else "")]
        cached = all(p.cached for p in self.speed.points)
        return [first, f"plan: ~{_fmt_s(self.total_s)} expected on an idle machine (worst case "
                       f"~{_fmt_s(self.worst_s + STARTUP_S)})"
                       + (f", up to ~{_fmt_s(self.loaded_s)} if the load now goes on" if self.loaded else "")
                       + f", from a {'cached' if cached else 'new'} calibration; plus preparation when not cached "
                         f"(`sweep plan` for the details)"]

    @property
    def loaded(self) -> bool:
        """Whether what runs now slows the sweep noticeably."""
        return self.loaded_s is not None and self.loaded_s > 1.05 * self.total_s


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def make_plan(cfg: Config, space, log: Log = lambda m: None, calibrate_speed: bool = True,
              calibration_budget_s: float = CALIBRATION_BUDGET_S) -> Plan:
    """The plan of a sweep; `calibrate_speed` False: counts only (no corpus lengths, no calibration)."""
    from .tuner import finalist_count, num_samples

    task = getattr(cfg, "task", "classify")
    n_search = num_samples(cfg, space)
    n_final = finalist_count(cfg)
    seeds = cfg.sweep.finalist_seeds
    reruns = (n_final // (2 * seeds - 1)) * (seeds - 1) if n_final else 0
    twins = n_final - reruns
    max_t = cfg.train.epochs
    sched = cfg.sweep.scheduler
    asha = sched.kind == "asha"
    rungs = asha_rungs(sched.grace_period, sched.reduction_factor, max_t) if asha else []
    trials = sample_trials(cfg, space, seed=cfg.sweep.seed)
    notes = []
    longer = sorted({t["train.epochs"] for t in trials if t["train.epochs"] > max_t})
    if asha and longer:
        notes.append(f"the space sets train.epochs to {', '.join(map(str, longer))}, but ASHA's max_t is the "
                     f"config's train.epochs ({max_t}): ASHA stops every search trial at epoch {max_t}")
    search_epochs = [min(t["train.epochs"], max_t) if asha else t["train.epochs"] for t in trials]
    mean_epochs = float(np.mean(search_epochs))
    mean_full = float(np.mean([t["train.epochs"] for t in trials]))
    per_search = (float(np.mean([asha_trial_epochs(n_search, e, sched.grace_period, sched.reduction_factor, max_t)
                                 for e in search_epochs])) if asha else n_search * mean_epochs)
    plan = Plan(cfg.name, n_search, n_final, reruns, twins, max_t, rungs,
                worst_trial_epochs=round(n_search * mean_epochs + n_final * mean_full),
                asha_trial_epochs=per_search + n_final * mean_full,
                rows=Rows(0, 0, 0, 0, 0), concurrency=0, concurrency_why="", asha=asha, notes=notes)
    plan.concurrency, plan.concurrency_why = concurrency(cfg)
    if task != "classify":
        notes.append(f"rows and time are estimated for the classify task only (this config's task: {task})")
        return plan
    rows = count_rows(cfg, space, with_lengths=calibrate_speed, log=log)
    plan.rows = rows
    plan.max_transfer = max(rows.transfer_for(t) for t in trials)
    if rows.note:
        notes.append(rows.note)
    if not calibrate_speed or rows.lengths is None:
        return plan
    gpu = cfg.sweep.resources.gpu
    wants_gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and gpu != "auto" and gpu > 0)
    if wants_gpu and trial_device(cfg) == "cpu":
        notes.append("trials ask for a GPU and this machine has none: no time estimate (plan where they run)")
        return plan
    background = sample_background()
    speed = calibrate(cfg, space, rows, log, background, calibration_budget_s)
    plan.speed, plan.background = speed, background
    c = max(1, min(plan.concurrency, n_search))
    # Calibrated speeds are brought to one idle core each; during the sweep the trials share the cores with each
    # other and with whatever else runs (sampled now, before calibrating).
    threads = trial_threads(cfg)
    plan.idle_share = Background().share(speed.cpus, c * threads)
    plan.core_share = background.share(speed.cpus, c * threads)
    plan.search_s, plan.finalists_s, plan.worst_s = _phases(
        plan, trials, search_epochs, per_search, speed, rows, c, plan.idle_share)
    loaded = _phases(plan, trials, search_epochs, per_search, speed, rows, c, plan.core_share)
    startup = STARTUP_S / background.share(speed.cpus, 1)  # one busy process (the driver) beside the others
    plan.loaded_s, plan.loaded_worst_s = loaded[0] + loaded[1] + startup, loaded[2] + startup
    return plan


def _phases(plan: Plan, trials: list[dict], search_epochs: list[int], per_search: float, speed: SpeedModel,
            rows: Rows, c: int, share: float) -> tuple[float, float, float]:
    """(search, finalists, worst case) seconds with each trial thread getting `share` of a core."""

    def epoch_s(t: dict, rows_per_epoch: int) -> float:
        shape = _shape_of(t)
        busy = rows_per_epoch * speed.train_s(shape) + (rows.val + rows.test) * speed.eval_s(shape)
        return busy / share + speed.checkpoint_s

    search_epoch = [epoch_s(t, rows.labelled + rows.transfer_for(t)) for t in trials]
    twin_epoch = [epoch_s(t, rows.labelled) for t in trials]
    full = float(np.mean([e * s for e, s in zip(search_epochs, search_epoch)]))  # one trial, every epoch
    exp_epochs = per_search / plan.search if plan.search else 0.0
    # A phase takes its work spread over c trials at a time, plus its tail: the last trial may run alone, for up
    # to (1 - 1/c) of a trial trained to the end (under ASHA, the last ones are the survivors).
    work = plan.search * (exp_epochs * float(np.mean(search_epoch)) + TRIAL_START_S)
    search = work / c + (1 - 1 / c) * full
    worst = plan.search * (full + TRIAL_START_S) / c + (1 - 1 / c) * full
    finalists = 0.0
    if plan.finalists:
        twin_full = float(np.mean([t["train.epochs"] * s for t, s in zip(trials, twin_epoch)]))
        rerun_full = float(np.mean([t["train.epochs"] * s for t, s in zip(trials, search_epoch)]))
        fin_work = plan.twins * twin_full + plan.reruns * rerun_full + plan.finalists * TRIAL_START_S
        cf = max(1, min(plan.concurrency, plan.finalists))
        finalists = fin_work / cf + (1 - 1 / cf) * max(twin_full, rerun_full if plan.reruns else 0.0)
    return search, finalists, worst + finalists


def log_plan_summary(cfg: Config, space, log: Log) -> None:
    """`sweep run`'s two plan lines; a plan that cannot be made never stops the sweep."""
    from trainable.data import DataError

    try:
        plan = make_plan(cfg, space, log, calibration_budget_s=RUN_CALIBRATION_BUDGET_S)
    except (ConfigError, DataError):
        return  # bad input: the sweep's own checks report it, in one line, next
    except Exception as e:  # noqa: BLE001 - the plan is advice
        log(f"plan: not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    for line in plan.summary():
        log(line)


# ----------------------------------------------------------------------------- GPU sizing (resources.gpu: auto)


def largest_trial(cfg: Config, space) -> dict[str, int]:
    """The largest value of every size the space can draw (each on its own: an upper bound)."""
    keys = {**SHAPE_KEYS, "max_length": "tokenizer.max_length", "eval_batch_size": "train.eval_batch_size"}
    return {name: int(_largest(cfg, space, key)) for name, key in keys.items()}


@dataclass(frozen=True)
class GpuSizing:
    largest: dict[str, int]
    pool_rows: int
    estimate: MemoryEstimate
    gpu_bytes: int | None  # None: no GPU in the cluster
    per_gpu: int  # trials sharing one GPU (0: CPU)
    fraction: float  # GPU per trial asked of Ray (0: CPU)
    margin: float

    def line(self) -> str:
        s = self.largest
        trial = (f"E{s['embedding_dim']}/H{s['hidden_dim']}" + (f"x{s['num_layers']}" if s["num_layers"] > 1 else "")
                 + f", vocab {s['vocab_size']}, batch {s['batch_size']}, length {s['max_length']}, "
                 f"{self.pool_rows:,} pool rows")
        if self.gpu_bytes is None:
            return f"resources: gpu auto: no GPU in the cluster; running on CPU (largest trial {trial}: " \
                   f"~{fmt_bytes(self.estimate.total)} if it had one)"
        return (f"resources: gpu auto: largest trial ({trial}) needs ~{fmt_bytes(self.estimate.total)} "
                f"(estimate); {self.per_gpu} per {fmt_bytes(self.gpu_bytes)} GPU keeping {self.margin:.0%} free: "
                f"{self.fraction:g} GPU per trial")

    def to_json(self) -> dict:
        return {"largest_trial": self.largest, "pool_rows": self.pool_rows, "estimate_bytes": self.estimate.total,
                "breakdown_bytes": self.estimate.breakdown, "params": self.estimate.params,
                "gpu_bytes": self.gpu_bytes, "trials_per_gpu": self.per_gpu, "gpu_per_trial": self.fraction,
                "margin": self.margin,
                "note": "an estimate (trainable/memory.py); check it on a GPU with torch.cuda.max_memory_allocated "
                        "plus the CUDA context"}


def size_gpu(cfg: Config, space, gpu_bytes: int | None, pool_rows: int | None = None,
             margin: float = 0.2) -> GpuSizing:
    """The GPU fraction per trial for `sweep.resources.gpu: auto`: the largest trial's memory estimate packed into
    a GPU of `gpu_bytes` (None: no GPU, run on CPU). `pool_rows`: the most training rows a trial holds (None:
    counted from the corpus files). Raises ConfigError when one trial does not fit."""
    if pool_rows is None:
        pool_rows = largest_pool_rows(cfg, space)
    s = largest_trial(cfg, space)
    est = estimate_trial_memory(vocab_size=s["vocab_size"], embedding_dim=s["embedding_dim"],
                                hidden_dim=s["hidden_dim"], num_layers=s["num_layers"],
                                num_classes=cfg.data.num_classes, batch_size=s["batch_size"],
                                max_length=s["max_length"], eval_batch_size=s["eval_batch_size"], pool_rows=pool_rows)
    if gpu_bytes is None:
        return GpuSizing(s, pool_rows, est, None, 0, 0.0, margin)
    try:
        n, fraction = trials_per_gpu(est.total, gpu_bytes, margin)
    except ValueError as e:
        raise ConfigError(f"sweep.resources.gpu: auto: {e}") from None
    return GpuSizing(s, pool_rows, est, gpu_bytes, n, fraction, margin)


def largest_pool_rows(cfg: Config, space) -> int:
    """The most training rows (labelled + transfer) any trial holds on its device."""
    rows = count_rows(cfg, space, with_lengths=False)
    transfer = 0
    if any(a < 1.0 for a in trial_values(cfg, space, "train.alpha") if a is not None):
        takes = trial_values(cfg, space, "data.transfer_rows")
        take = None if any(t is None for t in takes) else max(takes)
        transfer = (rows.transfer_file if take is None else min(take, rows.transfer_file)) + rows.augmented
    return rows.labelled + transfer


def cluster_gpu_bytes() -> int | None:
    """The memory of the smallest GPU in the Ray cluster (a trial may land on any), asked of each GPU node by a
    one-GPU task; None when the cluster has no GPU. Ray reports GPU counts, not their memory."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    if not nodes:
        return None

    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def gpu_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0

    refs = [gpu_memory.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    try:
        sizes = [s for s in ray.get(refs, timeout=180) if s]
    except ray.exceptions.GetTimeoutError:
        raise ConfigError("sweep.resources.gpu: auto: no GPU answered within 180 s (all busy?); set "
                          "sweep.resources.gpu to a number") from None
    return min(sizes) if sizes else None


def auto_gpu(cfg: Config, space, log: Log, folder: Path | None = None, cluster_has_gpu: bool = True) -> float:
    """`sweep.resources.gpu: auto`: the fraction of a GPU per trial (0.0: the cluster has no GPU, run on CPU),
    logged in one line and written to `folder/gpu_sizing.json` for the report."""
    from trainable.io import write_json

    task = getattr(cfg, "task", "classify")
    if task != "classify":  # the estimate is the BiLSTM student's
        if cluster_has_gpu:
            raise ConfigError(f"sweep.resources.gpu: auto sizes the classify task's BiLSTM students; for task "
                              f"{task}, give the GPU fraction per trial as a number")
        log("resources: gpu auto: no GPU in the cluster; running on CPU")
        return 0.0
    sizing = size_gpu(cfg, space, cluster_gpu_bytes() if cluster_has_gpu else None)
    log(sizing.line())
    if folder is not None:
        write_json(Path(folder) / GPU_SIZING_FILE, sizing.to_json())
    return sizing.fraction
