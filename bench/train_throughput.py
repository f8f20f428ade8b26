"""Training throughput: our student loop against a seed-style loop, same CPU, same student, same data, one run.

    python bench/train_throughput.py [--rows 20000] [--epochs 3] [--threads 2]

Student: embedding 64, hidden 128, vocab 3000, batch 64, KD loss (alpha 0.5, T 2) against the logits of a tiny
scratch teacher (prepared once and cached). The seed-style loop is what the original study's notebooks did: every
review padded to a fixed max length, the LSTM run over the padding, teacher logits looked up per example from a
Python dict inside the batch loop, no length bucketing. Prints samples/s and validation accuracy of each, and the
speed-up ratio. Then the loop against the kernel: the bare fused bidirectional `nn.LSTM` forward + backward + Adam
step over the very batches our loop trains on (the same length buckets, built as tensors beforehand: no data
loading, no loss bookkeeping, no evaluation), and our loop's samples/s over the kernel's (goal >= 0.9).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainable.config import ExperimentConfig, StudentConfig, TrainConfig  # noqa: E402
from trainable.losses import distillation_loss  # noqa: E402
from trainable.loop import train_student  # noqa: E402
from trainable.prepare import prepare  # noqa: E402


class SeedBiLSTM(nn.Module):
    """The seed notebooks' student: the same layers, final hidden states taken after the padding."""

    def __init__(self, vocab, emb, hid, n_cls=2, dropout=0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hid, 1, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hid, n_cls)

    def forward(self, x):
        _, (h, _) = self.lstm(self.embedding(x))
        return self.fc(self.dropout(torch.cat([h[-2], h[-1]], dim=1)))


def seed_style(data, logits: np.ndarray, cfg: TrainConfig, max_len: int, emb: int, hid: int) -> tuple[float, float]:
    torch.manual_seed(cfg.seed)
    x = torch.from_numpy(data.train.padded(max_len))  # (N, max_len): every review padded to the fixed length
    y = torch.from_numpy(data.train.labels)
    ids = data.train.ids
    teacher = {int(i): logits[k].tolist() for k, i in enumerate(ids)}  # looked up per example, as the seeds did
    model = SeedBiLSTM(data.vocab_size, emb, hid)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    n, t_train = len(y), 0.0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        model.train()
        for s in range(0, n, cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            t_logits = torch.tensor([teacher[int(ids[i])] for i in idx])
            loss, _ = distillation_loss(model(x[idx]), t_logits, y[idx], cfg.alpha, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        t_train += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        xv, yv = torch.from_numpy(data.val.padded(max_len)), torch.from_numpy(data.val.labels)
        acc = sum((model(xv[s:s + 512]).argmax(1) == yv[s:s + 512]).sum().item() for s in range(0, len(yv), 512)) / len(yv)
    return n * cfg.epochs / t_train, acc


def bare_kernel(data, cfg: TrainConfig, emb: int, hid: int, student: bool = False) -> float:
    """Samples/s of the fused kernel alone on the loop's own batches (trainable.loop.bucketed_batches, same seeds).
    With `student`, our BiLSTMClassifier's forward instead of the one bidirectional `nn.LSTM` call (its two
    directions run separately, each review's last real token read, so padding never counts): the model's share of
    what the loop adds, the rest (KD loss, logits gather, checks, batch building) being the loop's."""
    from trainable.loop import bucketed_batches
    from trainable.student import BiLSTMClassifier

    torch.manual_seed(cfg.seed)
    padded, lengths, labels = data.train.padded(), data.train.lengths, torch.from_numpy(data.train.labels)
    if student:
        model = BiLSTMClassifier(data.vocab_size, emb, hid, 2)
        params = list(model.parameters())
    else:
        emb_l = nn.Embedding(data.vocab_size, emb, padding_idx=0)
        lstm = nn.LSTM(emb, hid, 1, batch_first=True, bidirectional=True)
        fc = nn.Linear(2 * hid, 2)
        params = [*emb_l.parameters(), *lstm.parameters(), *fc.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    rows, seconds = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        batches = [(torch.from_numpy(padded[i, : int(lengths[i].max())]), torch.from_numpy(lengths[i]), labels[i])
                   for i in bucketed_batches(lengths, cfg.batch_size, gen)]
        t0 = time.perf_counter()
        for tokens, lens, y in batches:
            if student:
                out = model(tokens, lens)
            else:
                _, (h, _) = lstm(emb_l(tokens))  # (2, B, H)
                out = fc(torch.cat([h[0], h[1]], dim=1))
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - t0
        rows += len(labels)
    return rows / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default=".cache/kd")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ExperimentConfig.model_validate({
        "data": {"mirrors": ["../shared/data/nsmc"], "train_rows": args.rows, "test_rows": 2000},
        "tokenizer": {"vocab_size": 3000, "max_length": 128},
        "teacher": {"preset": "tiny", "epochs": 1, "max_length": 128, "vocab_size": 4000},
        "cache_dir": args.cache_dir,
    })
    prep = prepare(cfg, log=lambda m: None)
    data, logits = prep.encoded[3000], prep.logits["train"]
    tcfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=1e-3, alpha=0.5, temperature=2.0, step_size=1,
                       threads=args.threads, seed=0)
    scfg = StudentConfig(embedding_dim=64, hidden_dim=128)
    max_len = int(data.train.lengths.max())
    print(f"data: {len(data.train)} train / {len(data.val)} val reviews, longest {max_len} tokens, "
          f"mean {data.train.lengths.mean():.1f}; {args.epochs} epochs, {args.threads} threads")

    seed_sps, seed_acc = seed_style(data, logits, tcfg, max_len, scfg.embedding_dim, scfg.hidden_dim)
    print(f"seed-style loop: {seed_sps:8.0f} samples/s  val_acc {seed_acc:.4f}")
    ours = train_student(scfg, tcfg, data, logits, log=lambda m: None)
    print(f"our loop:        {ours.samples_per_s:8.0f} samples/s  val_acc {ours.final_val_acc:.4f} "
          f"(best {ours.val_acc:.4f})")
    print(f"accuracy difference (ours - seed): {100 * (ours.final_val_acc - seed_acc):+.2f} pt")
    print(f"speed-up (ours / seed-style): {ours.samples_per_s / seed_sps:.2f}x")
    kernel_sps = bare_kernel(data, tcfg, scfg.embedding_dim, scfg.hidden_dim)
    print(f"bare fused kernel on the same batches: {kernel_sps:8.0f} samples/s")
    print(f"loop / kernel: {ours.samples_per_s / kernel_sps:.2f}")
    model_sps = bare_kernel(data, tcfg, scfg.embedding_dim, scfg.hidden_dim, student=True)
    print(f"our student's forward, same bare step:  {model_sps:8.0f} samples/s")
    print(f"of the gap: student forward / kernel {model_sps / kernel_sps:.2f}, loop / student forward "
          f"{ours.samples_per_s / model_sps:.2f}")


if __name__ == "__main__":
    main()
