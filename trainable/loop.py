"""The training loop: plain PyTorch, no Ray. Runs and is tested on a laptop; the Ray trainable
(`trainable/adapter.py`) is a thin adapter over a task's `train`, which for every built-in task ends in `fit`.

`fit(job, ...)` is the one loop: epochs, the best-validation weights and their test score, TensorBoard scalars,
a checkpoint folder per epoch and an exact resume. A task's `Job` holds the part that differs (model, batches,
loss, evaluation). The classify task's job, `StudentJob` (run by `train_student`), per epoch: length-bucketed batches (reviews of almost equal length, so little time goes to padding) over the
labelled training rows plus the transfer rows (unlabeled; the teacher's soft labels are their only target), the
distillation loss against cached teacher logits, Adam, StepLR or CyclicLR, evaluation on validation, TensorBoard
scalars, and a checkpoint folder (model, optimizer, scheduler, epoch, RNG state) from which a run continues exactly
where it stopped. Test accuracy is measured on the best-validation weights.

TensorBoard (torch.utils.tensorboard) is imported inside the two functions that open an event writer, so importing the
loop (every task's trainer does) does not load it.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import StudentConfig, TrainConfig
from .cost import measure_cost
from .data import EncodedData, EncodedSplit
from .io import atomic_path, sha256_file, write_json
from .losses import distillation_loss
from .student import BiLSTMClassifier, count_params, init_from_lm, state_dict_kb

METRIC, MODE = "val_acc", "max"  # the classify task's default metric (a sweep's `sweep.metric` replaces it)
BUCKET_BATCHES = 50  # batches per sorted chunk: enough to find equal lengths, small enough to stay random


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run (or trial) is failed, never silently continued."""


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or does not match its recorded hash."""


@dataclass
class RunResult:
    val_acc: float  # validation accuracy of the kept weights (the best epoch of `metric`; with val_acc, the best)
    final_val_acc: float
    test_acc: float  # of the kept (best-validation) weights
    best_epoch: int
    epochs: int
    params: int
    size_kb: float
    train_time_s: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)
    metric: str = METRIC  # what picked the kept weights
    best: float = float("nan")  # its best value


# ----------------------------------------------------------------------------- batching


def bucketed_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator) -> list[np.ndarray]:
    """Shuffled batches whose members have almost equal lengths: shuffle, sort chunks of 50 batches by length,
    cut, shuffle the batch order."""
    perm = torch.randperm(len(lengths), generator=generator).numpy()
    chunk = batch_size * BUCKET_BATCHES
    batches = []
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=generator).numpy()
    return [batches[i] for i in order]


def _batch(padded: np.ndarray, lengths: np.ndarray, idx: np.ndarray,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lens = lengths[idx]
    tokens = torch.from_numpy(padded[idx, : int(lens.max())]).long()
    return tokens.to(device, non_blocking=True), torch.from_numpy(lens).to(device, non_blocking=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no GPU is visible to this process")
    return torch.device(name)


def evaluate(model: torch.nn.Module, split: EncodedSplit, batch_size: int = 512,
             padded: np.ndarray | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on a split."""
    logits = torch.from_numpy(predict_split(model, split, batch_size, padded))
    labels = torch.from_numpy(split.labels)
    return (logits.argmax(1) == labels).float().mean().item(), F.cross_entropy(logits, labels).item()


@torch.no_grad()
def predict_split(model: torch.nn.Module, split: EncodedSplit, batch_size: int = 512,
                  padded: np.ndarray | None = None) -> np.ndarray:
    """(N, C) float32 logits in the split's row order; batches sorted by length, so little time goes to padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    padded = split.padded(dtype=np.int32) if padded is None else padded
    lengths = split.lengths
    order = np.argsort(lengths, kind="stable")
    out = None
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        logits = model(*_batch(padded, lengths, idx, device)).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(split), logits.shape[1]), dtype=np.float32)
        out[idx] = logits
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- optimisation


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, batches_per_epoch: int):
    """StepLR steps once per epoch; CyclicLR once per batch with a half-epoch ramp up."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    return torch.optim.lr_scheduler.CyclicLR(
        opt, base_lr=cfg.base_lr, max_lr=cfg.lr, step_size_up=max(1, batches_per_epoch // 2), cycle_momentum=False,
    )


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, state: dict) -> Path:
    """Write `state.pt` and `meta.json` (with the file's hash) into `folder`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "state.pt") as tmp:
        torch.save(state, tmp)
    write_json(folder / "meta.json", {"epoch": state["epoch"], "sha256": sha256_file(folder / "state.pt"),
                                      "metric": state.get("metric"), "best": state.get("best")})
    return folder


def check_checkpoint(folder: str | Path) -> Path:
    """The checkpoint's state file, if its meta.json parses and the file matches the hash recorded there; else
    CheckpointError (missing, truncated or altered)."""
    folder = Path(folder)
    meta_path, state_path = folder / "meta.json", folder / "state.pt"
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (expected meta.json and state.pt)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or sha256_file(state_path) != meta.get("sha256"):
        raise CheckpointError(f"{state_path}: content does not match the hash in meta.json (truncated or corrupt)")
    return state_path


def load_checkpoint(folder: str | Path) -> dict:
    """Load a checkpoint folder, refusing one whose state file is missing, truncated or altered."""
    state_path = check_checkpoint(folder)
    # weights_only: a checkpoint is data, never code.
    return torch.load(state_path, map_location="cpu", weights_only=True)


def newest_valid_checkpoint(folders: list[Path], log: Callable[[str], None]) -> Path | None:
    """The first of `folders` (give them newest first) that passes `check_checkpoint`, with a warning line for
    each one skipped; None when none does."""
    for folder in folders:
        try:
            check_checkpoint(folder)
            return folder
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None


def kept_epoch(state: dict) -> dict:
    """A checkpoint's metrics at the epoch whose weights it keeps as best (`best_model`); {} if not in its history."""
    return next((m for m in state.get("history", []) if m.get("epoch") == state.get("best_epoch")), {})


def trial_checkpoints(trial_dir: str | Path) -> list[Path]:
    """A Ray trial folder's checkpoint folders, newest epoch first (by meta.json). Not by name: Ray numbers a
    restored trial's checkpoints from 000000 again, so after a resume `checkpoint_000000` can be the newest. A
    folder without meta.json is a pruned stub (`trainable.adapter`), not a checkpoint; one whose meta.json does not
    parse comes last (and fails `load_checkpoint`)."""
    def epoch(ckpt: Path) -> int:
        try:
            return int(json.loads((ckpt / "meta.json").read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    found = [c for c in Path(trial_dir).glob("checkpoint_*") if (c / "meta.json").exists()]
    return sorted(found, key=epoch, reverse=True)


# ----------------------------------------------------------------------------- TensorBoard


def _hparams(*sections, **extra) -> dict:
    hp = {**extra}
    for section in sections:
        hp.update(section.model_dump())
    return {k: (str(v) if isinstance(v, (tuple, list)) else v) for k, v in hp.items()
            if v is not None and not isinstance(v, dict)}


def _open_writer(tb_dir: Path, hparams: dict, metric_tags: tuple[str, ...]):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    writer = SummaryWriter(str(tb_dir))
    # Written at the start (not at the end, as add_hparams does in a sub-folder) so the HParams view shows the
    # run while it trains and links it to the validation curves in the same folder. The run's session only, not an
    # experiment: TensorBoard takes the first experiment it finds as the whole table's columns, so a sweep writes
    # one for all its trials (`write_experiment`: the searched parameters); without one, TensorBoard builds the
    # table from the sessions, the parameters that differ between runs first.
    _exp, ssi, sei = hparams_summary(hparams, {tag: 0.0 for tag in metric_tags})
    for s in (ssi, sei):
        writer.file_writer.add_summary(s)
    return writer


def write_experiment(tb_dir: Path, hparams: dict, metric_tags: list[str], text: str | None = None) -> None:
    """A TensorBoard HParams experiment for a folder of runs (a sweep's trials): the columns of its HParams table,
    in this order (`hparams`: name -> an example value, for its type; `metric_tags`: scalar tags), and, as a text
    summary, what the runs share (`text`: e.g. the config's constants)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    exp, _ssi, _sei = hparams_summary(hparams, {tag: 0.0 for tag in metric_tags})
    writer = SummaryWriter(str(tb_dir))
    try:
        writer.file_writer.add_summary(exp)
        if text:
            writer.add_text("config", text)
    finally:
        writer.close()


def write_scalars_file(run_dir: Path, suffix: str, scalars: dict[str, float], step: int) -> Path:
    """Scalars added to a run after its training (a finalist's KD gain), in one events file of the run folder
    named `events.out.tfevents.<suffix>` and replaced whole each time: writing it again adds no second point.
    (TensorBoard reads every events file of a run folder, by name: a suffix that starts with a letter sorts after
    the writers' timestamped files.)"""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    from torch.utils.tensorboard.summary import scalar

    path = Path(run_dir) / f"events.out.tfevents.{suffix}"
    now = time.time()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            records = RecordWriter(f)
            records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
            for tag, value in scalars.items():
                records.write(Event(wall_time=now, step=step, summary=scalar(tag, value)).SerializeToString())
    return path


# ----------------------------------------------------------------------------- the loop, for every task


class Job:
    """One trial's model and optimisation, as a task builds it for `fit`: the part of training that differs
    between tasks. `fit` owns the rest (epochs, best weights, test score, checkpoints, TensorBoard, resume)."""

    model: torch.nn.Module
    extra: dict = {}  # constant values added to every epoch's metrics (e.g. transfer_rows)

    def train_epoch(self, epoch: int, gen: torch.Generator) -> dict[str, float]:
        """One epoch. Returns the mean training scalars ("loss" first, then its parts), "lr" (the learning rate the
        epoch used) and "samples" (rows seen). Raise NonFiniteLossError on a NaN/inf loss."""
        raise NotImplementedError

    def evaluate(self, split: str) -> dict[str, float]:
        """{"acc": ..., "loss": ...}-style scores on "val" or "test" (reported as val_acc, test_acc, ...)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Optimizer and scheduler state, stored in the checkpoint beside the model."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class FitResult:
    metric: str
    best: float  # best validation value of `metric`
    final: float  # its value after the last epoch
    test: dict  # the best-validation weights' held-out scores, e.g. {"acc": ...}
    best_epoch: int
    epochs: int
    params: int
    size_kb: float
    train_time_s: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)


def fit(job: Job, *, epochs: int, metric: str, mode: str, params: int, size_kb: float,
        run_dir: str | Path | None = None, tb_dir: str | Path | None = None, resume_from: str | Path | None = None,
        on_epoch: Callable[[dict, Optional[Path]], None] | None = None, keep_checkpoints: int = 2,
        log: Callable[[str], None] = print, hparams: dict | None = None, seed: int = 0,
        weights_name: str = "model.pt", test: bool = True) -> FitResult:
    """Train `job` for `epochs` epochs. `metric` (a key of the epoch's metrics, e.g. "val_acc") and `mode`
    ("max"/"min") pick the best weights; with `test`, the held-out split is scored whenever they improve.

    With `run_dir`, a checkpoint folder `run_dir/checkpoints/epoch_NNNN` (model, the job's state, RNG, epoch, best
    weights, history) is written after every epoch (the last `keep_checkpoints` kept), handed to `on_epoch` with the
    epoch's metrics, and the best weights end as `run_dir/weights_name`. `resume_from` is such a folder: the run
    continues with the next epoch, exactly where it stopped. Epoch e shuffles with a generator seeded by (seed, e),
    so the order survives a resume."""
    model = job.model
    device = next(model.parameters()).device
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    start_epoch, best, best_epoch, test_scores, train_time, samples = 1, None, 0, {}, 0.0, 0
    best_state, history, cost = None, [], None
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        job.load_state_dict(state)
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch = state["epoch"] + 1
        best, test_scores = state["best"], state["test"]
        best_epoch, best_state = state["best_epoch"], state["best_model"]
        train_time, history = state["train_time_s"], state["history"]
        kept_by = state["metric"]
        if kept_by != metric:  # e.g. a sweep started before its metric reached the loop: that one decides from here
            best = next((m.get(metric) for m in history if m["epoch"] == best_epoch), None)
            log(f"warning: {resume_from} kept its best weights by {kept_by}; from epoch {start_epoch} on, {metric} "
                f"({mode}) decides")
        log(f"resumed from {resume_from} (epoch {state['epoch']} done)")

    run_dir = Path(run_dir) if run_dir is not None else None
    tb_dir = Path(tb_dir) if tb_dir is not None else (run_dir / "tb" if run_dir is not None else None)
    writer = None
    if tb_dir is not None:
        tags = tuple(dict.fromkeys([metric.replace("_", "/", 1), *getattr(job, "tb_metrics", ())]))
        writer = _open_writer(tb_dir, hparams or {}, tags)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # a reused Ray actor's previous trial is not this one's peak
    try:
        for epoch in range(start_epoch, epochs + 1):
            gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # epoch order survives a resume
            t0 = time.perf_counter()
            scalars = job.train_epoch(epoch, gen)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            samples, lr = scalars.pop("samples"), scalars.pop("lr", None)
            val = job.evaluate("val")
            m = {"epoch": epoch, **{f"train_{k}": v for k, v in scalars.items()},
                 **{f"val_{k}": v for k, v in val.items()}}
            if metric not in m:
                raise KeyError(f"metric {metric!r} is not among the epoch's metrics {sorted(m)}")
            value = m[metric]
            if best is None or (math.isfinite(value) and better(value, best)) or not math.isfinite(best):
                best, best_epoch = value, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                if test:
                    test_scores = job.evaluate("test")
            if lr is not None:
                m["lr"] = lr
            if cost is None and best_state is not None and hasattr(job, "cost"):
                # Once per run, on the best weights so far: a trial stopped early has it too (see trainable/cost.py)
                t_cost = time.perf_counter()
                cost = job.cost(best_state)
                cost["cost_time_s"] = time.perf_counter() - t_cost
            m.update(cost or {})
            m.update({f"best_{metric}": best, "best_epoch": best_epoch,
                      **{f"test_{k}": v for k, v in test_scores.items()},
                      "samples_per_s": samples / epoch_time, "train_time_s": train_time, "params": params,
                      "size_kb": size_kb, **job.extra})
            if device.type == "cuda":  # the peak that trainable/memory.py estimates (the CUDA context comes on top)
                m["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                m["gpu_mem_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
            history.append(m)
            log(f"epoch {epoch}/{epochs}: loss {m['train_loss']:.4f} "
                + " ".join(f"val_{k} {v:.4f}" for k, v in val.items())
                + (f" lr {lr:.2e}" if lr is not None else "") + f" {m['samples_per_s']:.0f} samples/s")
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(f"train/{k}", v, epoch)
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, epoch)
                for k, v in test_scores.items():  # the held-out score of the best weights so far
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"test/{k}", v, epoch)
                if epoch == start_epoch:  # what the run costs, for the HParams table: once
                    writer.add_scalar("model/params", params, epoch)
                    writer.add_scalar("model/size_kb", size_kb, epoch)
                    for k, v in (cost or {}).items():
                        if k != "cost_time_s" and isinstance(v, (int, float)):
                            writer.add_scalar(f"cost/{k}", v, epoch)
                if lr is not None:
                    writer.add_scalar("lr", lr, epoch)
                writer.flush()
            ckpt = None
            if run_dir is not None:
                ckpt = save_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch:04d}", {
                    "model": model.state_dict(), **job.state_dict(), "rng": torch.get_rng_state(), "epoch": epoch,
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "metric": metric, "best": best, "best_epoch": best_epoch, "test": test_scores,
                    "best_model": best_state, "train_time_s": train_time, "history": history,
                })
                for old in sorted((run_dir / "checkpoints").glob("epoch_*"))[:-keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            if on_epoch is not None:
                on_epoch(m, ckpt)
    finally:
        if writer is not None:
            writer.close()

    if best_state is not None and run_dir is not None:
        with atomic_path(run_dir / weights_name) as tmp:
            torch.save(best_state, tmp)
    last = history[-1] if history else {}
    per_epoch = samples if epochs >= start_epoch else 0  # rows per epoch (the same every epoch)
    return FitResult(
        metric=metric, best=best if best is not None else float("nan"), final=last.get(metric, float("nan")),
        test=test_scores, best_epoch=best_epoch, epochs=len(history), params=params, size_kb=size_kb,
        train_time_s=train_time, samples_per_s=(per_epoch * len(history) / train_time) if train_time else 0.0,
        history=history,
    )


# ----------------------------------------------------------------------------- the classify task's student


class StudentJob(Job):
    """The distillation student: length-bucketed batches over the labelled rows plus the transfer rows, the
    distillation loss against cached teacher logits, Adam, StepLR (per epoch) or CyclicLR (per batch)."""

    tb_metrics = ("val/acc", "val/loss")

    def __init__(self, model: torch.nn.Module, train_cfg: TrainConfig, data: EncodedData,
                 teacher_logits: Optional[np.ndarray], num_classes: int, device: torch.device):
        self.model, self.cfg, self.data, self.device = model, train_cfg, data, device
        self.pool = pool = data.train if data.transfer is None else EncodedSplit.concat(data.train, data.transfer)
        # int32 ids: the pool with a large transfer set is hundreds of thousands of rows; batches become int64 on use.
        self.padded, self.lengths = pool.padded(dtype=np.int32), pool.lengths
        self.eval_padded = {"val": data.val.padded(dtype=np.int32), "test": data.test.padded(dtype=np.int32)}
        self.labels = torch.from_numpy(pool.labels).to(device)  # NO_LABEL (-1) on transfer rows
        self.t_logits = (torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32))
                         if teacher_logits is not None else torch.zeros(len(pool), num_classes)).to(device)
        self.opt = make_optimizer(model, train_cfg)
        self.sched = make_scheduler(self.opt, train_cfg, math.ceil(len(pool) / train_cfg.batch_size))
        self.extra = {"transfer_rows": len(pool) - len(data.train)}

    def train_epoch(self, epoch: int, gen: torch.Generator) -> dict[str, float]:
        cfg, model, opt = self.cfg, self.model, self.opt
        sums = torch.zeros(3, dtype=torch.float64)
        for b, idx in enumerate(bucketed_batches(self.lengths, cfg.batch_size, gen)):
            tokens, lens = _batch(self.padded, self.lengths, idx, self.device)
            idx_t = torch.from_numpy(idx).to(self.device)
            logits = model(tokens, lens)  # (B, C)
            loss, parts = distillation_loss(logits, self.t_logits[idx_t], self.labels[idx_t], cfg.alpha,
                                            cfg.temperature, cfg.kd_kind)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"epoch {epoch}, batch {b}: loss is {loss.item()} (ce {parts['ce'].item()}, "
                    f"kd {parts['kd'].item()}); lower train.lr or check the teacher logits")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cfg.scheduler == "cyclic":
                self.sched.step()
            sums += torch.tensor([loss.item(), parts["ce"].item(), parts["kd"].item()], dtype=torch.float64) * len(idx)
        lr = opt.param_groups[0]["lr"]
        if cfg.scheduler == "step":
            self.sched.step()
        mean = (sums / len(self.pool)).tolist()
        return {"loss": mean[0], "ce": mean[1], "kd": mean[2], "lr": lr, "samples": len(self.pool)}

    def evaluate(self, split: str) -> dict[str, float]:
        acc, loss = evaluate(self.model, getattr(self.data, split), self.cfg.eval_batch_size, self.eval_padded[split])
        return {"acc": acc, "loss": loss}

    def cost(self, weights: dict) -> dict[str, float]:
        """Serving cost of `weights` as exported (trainable/cost.py), at the longest training review's length."""
        return measure_cost(weights, self.model, self.padded.shape[1])

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def train_student(
    student_cfg: StudentConfig,
    train_cfg: TrainConfig,
    data: EncodedData,
    teacher_logits: Optional[np.ndarray],
    *,
    num_classes: int = 2,
    run_dir: str | Path | None = None,
    tb_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_epoch: Callable[[dict, Optional[Path]], None] | None = None,
    keep_checkpoints: int = 2,
    log: Callable[[str], None] = print,
    metric: str = METRIC,
    mode: str = MODE,
) -> RunResult:
    """Train one student. `teacher_logits` (N_train + N_transfer, C) are aligned with the rows of `data.train`
    followed by those of `data.transfer` (None only if alpha == 1, and then `data.transfer` must be None too: a
    transfer row without a teacher has no target). `trainable.prepare.student_inputs` builds both for a config.

    With `run_dir`, a checkpoint folder `run_dir/checkpoints/epoch_NNNN` is written after every epoch (the last
    `keep_checkpoints` kept) and handed to `on_epoch` together with the epoch's metrics (a dict: epoch, train_loss,
    train_ce, train_kd, val_acc, val_loss, lr, best_val_acc, best_epoch, test_acc, test_loss, samples_per_s,
    train_time_s, params, size_kb, transfer_rows; with another `metric`, best_<metric> instead of best_val_acc).
    `resume_from` is such a folder: the run continues with the next epoch, its RNG, optimizer and scheduler state
    restored. `metric` ("val_acc" or "val_loss") and `mode` pick the kept weights: the sweep's `sweep.metric`.
    """
    n_pool = len(data.train) + (len(data.transfer) if data.transfer is not None else 0)
    if teacher_logits is None and train_cfg.alpha < 1.0:
        raise ValueError("teacher logits are required unless alpha == 1 (plain cross-entropy)")
    if teacher_logits is None and data.transfer is not None:
        raise ValueError("transfer rows need teacher logits (they have no label)")
    if teacher_logits is not None and len(teacher_logits) != n_pool:
        raise ValueError(f"teacher logits have {len(teacher_logits)} rows, the training rows {n_pool} "
                         f"({len(data.train)} labelled + {n_pool - len(data.train)} transfer)")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)

    device = resolve_device(train_cfg.device)
    model = BiLSTMClassifier(data.vocab_size, student_cfg.embedding_dim, student_cfg.hidden_dim, num_classes,
                             student_cfg.num_layers, student_cfg.dropout)
    if student_cfg.init_from is not None:
        log(init_from_lm(model, student_cfg.init_from, data.tokenizer_file))
    params, size_kb = count_params(model), state_dict_kb(model)
    model.to(device)
    job = StudentJob(model, train_cfg, data, teacher_logits, num_classes, device)
    r = fit(job, epochs=train_cfg.epochs, metric=metric, mode=mode, params=params, size_kb=size_kb,
            run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
            keep_checkpoints=keep_checkpoints, log=log, seed=train_cfg.seed, weights_name="student.pt",
            hparams=_hparams(student_cfg, train_cfg, vocab_size=data.vocab_size))
    nan = float("nan")
    kept = next((m for m in r.history if m["epoch"] == r.best_epoch), {})  # a resumed run's history has every epoch
    return RunResult(
        val_acc=kept.get("val_acc", nan), final_val_acc=r.history[-1]["val_acc"] if r.history else nan,
        test_acc=r.test.get("acc", float("nan")), best_epoch=r.best_epoch, epochs=r.epochs, params=params,
        size_kb=size_kb, train_time_s=r.train_time_s, samples_per_s=r.samples_per_s, history=r.history,
        metric=r.metric, best=r.best,
    )
