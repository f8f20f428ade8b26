"""The student's training loop: plain PyTorch, no Ray. Runs and is tested on a laptop; the Ray trainable
(`trainable/adapter.py`) is a thin adapter over `train_student`.

Per epoch: length-bucketed batches (reviews of almost equal length, so little time goes to padding) over the
labelled training rows plus the transfer rows (unlabeled; the teacher's soft labels are their only target), the
distillation loss against cached teacher logits, Adam, StepLR or CyclicLR, evaluation on validation, TensorBoard
scalars, and a checkpoint folder (model, optimizer, scheduler, epoch, RNG state) from which a run continues exactly
where it stopped. Test accuracy is measured on the best-validation weights.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import StudentConfig, TrainConfig
from .data import EncodedData, EncodedSplit
from .io import atomic_path, sha256_file, write_json
from .losses import distillation_loss
from .student import BiLSTMClassifier, count_params, state_dict_kb

METRIC, MODE = "val_acc", "max"  # the one metric every part optimises and reports
BUCKET_BATCHES = 50  # batches per sorted chunk: enough to find equal lengths, small enough to stay random


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run (or trial) is failed, never silently continued."""


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or does not match its recorded hash."""


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    train_ce: float
    train_kd: float
    val_acc: float
    val_loss: float
    lr: float
    best_val_acc: float
    best_epoch: int
    test_acc: float  # of the best-validation weights so far
    samples_per_s: float
    train_time_s: float  # cumulative, training only (no evaluation)
    params: int
    size_kb: float
    transfer_rows: int = 0  # unlabeled rows in each epoch, besides the labelled ones


@dataclass
class RunResult:
    val_acc: float  # best validation accuracy
    final_val_acc: float
    test_acc: float  # of the best-validation weights
    best_epoch: int
    epochs: int
    params: int
    size_kb: float
    train_time_s: float
    samples_per_s: float
    history: list[dict] = field(default_factory=list)


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
                                      "val_acc": state["best_val_acc"]})
    return folder


def load_checkpoint(folder: str | Path) -> dict:
    """Load a checkpoint folder, refusing one whose state file is missing, truncated or altered."""
    folder = Path(folder)
    meta_path, state_path = folder / "meta.json", folder / "state.pt"
    if not meta_path.is_file() or not state_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint (expected meta.json and state.pt)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: unreadable ({e})") from None
    if sha256_file(state_path) != meta.get("sha256"):
        raise CheckpointError(f"{state_path}: content does not match the hash in meta.json (truncated or corrupt)")
    # weights_only: a checkpoint is data, never code.
    return torch.load(state_path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- TensorBoard


def _hparams(student_cfg: StudentConfig, train_cfg: TrainConfig, vocab_size: int) -> dict:
    hp = {"vocab_size": vocab_size, **student_cfg.model_dump(), **train_cfg.model_dump()}
    return {k: (str(v) if isinstance(v, (tuple, list)) else v) for k, v in hp.items() if v is not None}


def _open_writer(tb_dir: Path, hparams: dict):
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    writer = SummaryWriter(str(tb_dir))
    # Written at the start (not at the end, as add_hparams does in a sub-folder) so the HParams view shows the
    # run while it trains and links it to the val/acc curve in the same folder.
    exp, ssi, sei = hparams_summary(hparams, {"val/acc": 0.0, "val/loss": 0.0})
    for s in (exp, ssi, sei):
        writer.file_writer.add_summary(s)
    return writer


# ----------------------------------------------------------------------------- the loop


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
    on_epoch: Callable[[EpochMetrics, Optional[Path]], None] | None = None,
    keep_checkpoints: int = 2,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Train one student. `teacher_logits` (N_train + N_transfer, C) are aligned with the rows of `data.train`
    followed by those of `data.transfer` (None only if alpha == 1, and then `data.transfer` must be None too: a
    transfer row without a teacher has no target). `trainable.prepare.student_inputs` builds both for a config.

    With `run_dir`, a checkpoint folder `run_dir/checkpoints/epoch_NNNN` is written after every epoch (the last
    `keep_checkpoints` kept) and handed to `on_epoch` together with the epoch's metrics. `resume_from` is such a
    folder: the run continues with the next epoch, its RNG, optimizer and scheduler state restored.
    """
    pool = data.train if data.transfer is None else EncodedSplit.concat(data.train, data.transfer)
    if teacher_logits is None and train_cfg.alpha < 1.0:
        raise ValueError("teacher logits are required unless alpha == 1 (plain cross-entropy)")
    if teacher_logits is None and data.transfer is not None:
        raise ValueError("transfer rows need teacher logits (they have no label)")
    if teacher_logits is not None and len(teacher_logits) != len(pool):
        raise ValueError(f"teacher logits have {len(teacher_logits)} rows, the training rows {len(pool)} "
                         f"({len(data.train)} labelled + {len(pool) - len(data.train)} transfer)")
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)

    device = resolve_device(train_cfg.device)
    model = BiLSTMClassifier(data.vocab_size, student_cfg.embedding_dim, student_cfg.hidden_dim, num_classes,
                             student_cfg.num_layers, student_cfg.dropout)
    params, size_kb = count_params(model), state_dict_kb(model)
    model.to(device)
    # int32 ids: the pool with a large transfer set is hundreds of thousands of rows; batches become int64 on use.
    padded, lengths = pool.padded(dtype=np.int32), pool.lengths
    val_padded, test_padded = data.val.padded(dtype=np.int32), data.test.padded(dtype=np.int32)
    labels = torch.from_numpy(pool.labels).to(device)  # NO_LABEL (-1) on transfer rows
    t_logits = (torch.from_numpy(np.ascontiguousarray(teacher_logits, dtype=np.float32)) if teacher_logits is not None
                else torch.zeros(len(pool), num_classes)).to(device)
    n_batches = math.ceil(len(pool) / train_cfg.batch_size)
    opt = make_optimizer(model, train_cfg)
    sched = make_scheduler(opt, train_cfg, n_batches)

    start_epoch, best_val, best_epoch, test_acc, train_time = 1, -1.0, 0, float("nan"), 0.0
    best_state, history = None, []
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch = state["epoch"] + 1
        best_val, best_epoch, test_acc = state["best_val_acc"], state["best_epoch"], state["test_acc"]
        best_state, train_time, history = state["best_model"], state["train_time_s"], state["history"]
        log(f"resumed from {resume_from} (epoch {state['epoch']} done)")

    run_dir = Path(run_dir) if run_dir is not None else None
    tb_dir = Path(tb_dir) if tb_dir is not None else (run_dir / "tb" if run_dir is not None else None)
    writer = _open_writer(tb_dir, _hparams(student_cfg, train_cfg, data.vocab_size)) if tb_dir is not None else None
    model.train()
    try:
        for epoch in range(start_epoch, train_cfg.epochs + 1):
            gen = torch.Generator().manual_seed(train_cfg.seed * 100_003 + epoch)  # epoch order survives a resume
            sums = torch.zeros(3, dtype=torch.float64)
            t0 = time.perf_counter()
            for b, idx in enumerate(bucketed_batches(lengths, train_cfg.batch_size, gen)):
                tokens, lens = _batch(padded, lengths, idx, device)
                idx_t = torch.from_numpy(idx).to(device)
                logits = model(tokens, lens)  # (B, C)
                loss, parts = distillation_loss(logits, t_logits[idx_t], labels[idx_t], train_cfg.alpha,
                                                train_cfg.temperature, train_cfg.kd_kind)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"epoch {epoch}, batch {b}: loss is {loss.item()} (ce {parts['ce'].item()}, "
                        f"kd {parts['kd'].item()}); lower train.lr or check the teacher logits")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if train_cfg.scheduler == "cyclic":
                    sched.step()
                sums += torch.tensor([loss.item(), parts["ce"].item(), parts["kd"].item()], dtype=torch.float64) * len(idx)
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            lr = opt.param_groups[0]["lr"]
            if train_cfg.scheduler == "step":
                sched.step()
            val_acc, val_loss = evaluate(model, data.val, train_cfg.eval_batch_size, val_padded)
            if val_acc > best_val:
                best_val, best_epoch = val_acc, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                test_acc, _ = evaluate(model, data.test, train_cfg.eval_batch_size, test_padded)
            mean = (sums / len(pool)).tolist()
            m = EpochMetrics(epoch, mean[0], mean[1], mean[2], val_acc, val_loss, lr, best_val, best_epoch, test_acc,
                             len(pool) / epoch_time, train_time, params, size_kb, len(pool) - len(data.train))
            history.append(asdict(m))
            log(f"epoch {epoch}/{train_cfg.epochs}: loss {m.train_loss:.4f} val_acc {val_acc:.4f} "
                f"val_loss {val_loss:.4f} lr {lr:.2e} {m.samples_per_s:.0f} samples/s")
            if writer is not None:
                for tag, v in (("train/loss", m.train_loss), ("train/ce", m.train_ce), ("train/kd", m.train_kd),
                               ("val/acc", val_acc), ("val/loss", val_loss), ("lr", lr)):
                    writer.add_scalar(tag, v, epoch)
                writer.flush()
            ckpt = None
            if run_dir is not None:
                ckpt = save_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch:04d}", {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(), "epoch": epoch,
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "best_val_acc": best_val, "best_epoch": best_epoch,
                    "test_acc": test_acc, "best_model": best_state, "train_time_s": train_time, "history": history,
                })
                for old in sorted((run_dir / "checkpoints").glob("epoch_*"))[:-keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            if on_epoch is not None:
                on_epoch(m, ckpt)
    finally:
        if writer is not None:
            writer.close()

    if best_state is not None and run_dir is not None:
        with atomic_path(run_dir / "student.pt") as tmp:
            torch.save(best_state, tmp)
    last = history[-1] if history else {}
    return RunResult(
        val_acc=best_val, final_val_acc=last.get("val_acc", float("nan")), test_acc=test_acc, best_epoch=best_epoch,
        epochs=len(history), params=params, size_kb=size_kb, train_time_s=train_time,
        samples_per_s=len(pool) * len(history) / train_time if train_time else 0.0, history=history,
    )
