"""The lm task (the seed's language-model study): a subword LSTM language model on unlabeled reviews.

Data: `data.transfer_file` (one review per line, or a TSV/CSV/Parquet column; the NSMC corpus's `unlabeled.txt`),
a seeded subset of `lm.rows` reviews, with `lm.val_rows` and `lm.test_rows` held out. A WordPiece tokenizer of
`lm.vocab_size` is trained on the training reviews; each review is encoded once, cached by a hash of the file,
the subset and the tokenizer. A review is modelled as [CLS] w1 .. wn -> w1 .. wn [SEP].

Model: Embedding -> dropout -> LSTM -> dropout -> Linear to the vocabulary; cross-entropy over real tokens
(padding excluded), Adam with gradient clipping and the `train` section's StepLR/CyclicLR. Metric: validation
loss per token (min), also perplexity (`val_ppl` = exp(val_loss)); `test_ppl` on the held-out test reviews.
Loss per token is not comparable across vocabulary sizes (a smaller vocabulary cuts text into more, easier
tokens), so the task also reports `val_bpc`, bits per character: the same summed loss over the characters the
kept tokens cover (spaces not counted, the end of a review counted as one), in bits. A sweep over `lm.vocab_size`
should rank by it (`sweep.metric: val_bpc`, as seed_lm.yaml does).
The budget step ASHA counts is one epoch over the training reviews.

Export: a folder with `lm.pt` (state dict), `tokenizer.json` and `config.json`; `sweep predict` scores texts with
it (loss and perplexity per text).

tokenizers and trainable.data/io/cache/loop (they load pyarrow) are imported inside the functions that use them, so
loading this task with a config does not load them.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from ..config import Section
from ..student import count_params, state_dict_kb
from . import Task, text_splits, write_manifest

BOS, EOS = 2, 3  # [CLS], [SEP] in trainable.data.SPECIAL_TOKENS


class LMConfig(Section):
    """The LSTM language model and its data."""

    vocab_size: int = Field(8000, ge=100)
    embedding_dim: PositiveInt = 128
    hidden_dim: PositiveInt = 256
    num_layers: PositiveInt = 1
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_length: PositiveInt = 64  # tokens per review (longer ones are cut)
    rows: Optional[PositiveInt] = 50_000  # training reviews (a seeded subset of the file); None: all the rest
    val_rows: PositiveInt = 2_000
    test_rows: PositiveInt = 2_000
    clip: float = Field(1.0, gt=0.0)  # gradient norm clipping


class LSTMLanguageModel(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_layers: int = 1,
                 dropout: float = 0.2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded -> next-token logits (B, T, V). Padding only follows a review, so it never
        changes the outputs at real positions of a unidirectional LSTM."""
        h, _ = self.lstm(self.dropout(self.embedding(tokens)))  # (B, T, H)
        return self.out(self.dropout(h))


@dataclass(frozen=True)
class LMData:
    train: object  # trainable.data.EncodedSplit
    val: object
    test: object
    vocab_size: int
    tokenizer_file: str
    chars: dict  # split -> (N,) characters of each review its kept tokens cover (tokenizer offsets; no spaces)


def _inputs_targets(split, idx: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + ids -> ids + [SEP] for the rows `idx`: inputs (B, L+1) padded with 0, targets (B, L+1) with -100."""
    lengths = split.lengths[idx]
    width = int(lengths.max()) + 1
    ids = split.take(idx).padded(max_len=width - 1)  # (B, W-1), 0-padded
    inputs = np.zeros((len(idx), width), dtype=np.int64)
    inputs[:, 0], inputs[:, 1:] = BOS, ids
    targets = np.full((len(idx), width), -100, dtype=np.int64)
    targets[:, :-1] = np.where(np.arange(width - 1)[None, :] < lengths[:, None], ids, -100)
    targets[np.arange(len(idx)), lengths] = EOS
    return torch.from_numpy(inputs).to(device), torch.from_numpy(targets).to(device)


@torch.no_grad()
def text_losses(model: LSTMLanguageModel, split, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(summed cross-entropy, tokens) per row, in the split's order; batches sorted by length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort(split.lengths, kind="stable")
    sums, counts = np.zeros(len(split)), np.zeros(len(split))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        inputs, targets = _inputs_targets(split, idx, device)
        logits = model(inputs)
        ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")  # (B, T)
        sums[idx] = ce.sum(1).double().cpu().numpy()
        counts[idx] = (targets != -100).sum(1).cpu().numpy()
    model.train(was_training)
    return sums, counts


class LMJob:
    """The LM's part of `fit`: batches, loss, evaluation."""

    tb_metrics = ("val/loss", "val/ppl", "val/bpc")
    extra: dict = {}

    def __init__(self, model, cfg, data: LMData, device):
        from ..loop import make_optimizer, make_scheduler

        self.model, self.cfg, self.data, self.device = model, cfg, data, device
        self.opt = make_optimizer(model, cfg.train)
        self.sched = make_scheduler(self.opt, cfg.train, math.ceil(len(data.train) / cfg.train.batch_size))

    def train_epoch(self, epoch: int, gen: torch.Generator) -> dict:
        from ..loop import NonFiniteLossError, bucketed_batches

        tcfg, split = self.cfg.train, self.data.train
        total, tokens = 0.0, 0
        for b, idx in enumerate(bucketed_batches(split.lengths, tcfg.batch_size, gen)):
            inputs, targets = _inputs_targets(split, idx, self.device)
            logits = self.model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"epoch {epoch}, batch {b}: loss is {loss.item()}; lower train.lr")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.lm.clip)
            self.opt.step()
            if tcfg.scheduler == "cyclic":
                self.sched.step()
            n = int((targets != -100).sum())
            total += loss.item() * n
            tokens += n
        lr = self.opt.param_groups[0]["lr"]
        if tcfg.scheduler == "step":
            self.sched.step()
        return {"loss": total / tokens, "lr": lr, "samples": len(split)}

    def evaluate(self, split: str) -> dict:
        data = getattr(self.data, split)
        sums, counts = text_losses(self.model, data, self.cfg.train.eval_batch_size)
        loss = float(sums.sum() / counts.sum())
        chars = int(self.data.chars[split].sum()) + len(data)  # + the end of each review
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpc": float(sums.sum() / chars / math.log(2))}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def covered_chars(tok, texts: list[str], max_length: int) -> np.ndarray:
    """(N,) characters each text's first `max_length` tokens cover, from the tokenizer's offsets: spaces are not
    counted, a word the vocabulary cannot spell ([UNK]) counts with all its characters."""
    encs = tok.encode_batch(texts, add_special_tokens=False)
    return np.array([sum(b - a for a, b in e.offsets[:max_length]) for e in encs], dtype=np.int64)


def _prepare_one(cfg, texts: dict[str, list[str]], file_key: str, vocab: int, log) -> LMData:
    from tokenizers import Tokenizer

    from ..cache import cached
    from ..data import EncodedSplit, encode_texts, train_wordpiece
    from ..io import sha256_json

    key = sha256_json({"v": 2, "file": file_key, "vocab": vocab, "max_length": cfg.lm.max_length,
                       "min_freq": cfg.tokenizer.min_frequency, "alpha": cfg.tokenizer.limit_alphabet})[:16]

    def build(tmp: Path) -> None:
        """The tokenizer, then the encodings (the entry's marker) in `tmp`."""
        log(f"lm: training WordPiece tokenizer (vocab {vocab}) on {len(texts['train'])} reviews")
        tok = train_wordpiece(texts["train"], vocab, cfg.tokenizer.min_frequency, cfg.tokenizer.limit_alphabet)
        tok.save(str(tmp / "tokenizer.json"))
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))  # as a hit reads it
        arrays = {}
        for name, t in texts.items():
            arrays[f"{name}_tokens"], arrays[f"{name}_offsets"] = encode_texts(tok, t, cfg.lm.max_length)
            arrays[f"{name}_chars"] = covered_chars(tok, t, cfg.lm.max_length)
        with open(tmp / "encoded.npz", "wb") as f:
            np.savez(f, **arrays)

    entry = cached(cfg.cache_dir, "lm", key, build, marker="encoded.npz")  # a hit is silent, as it was
    folder = entry.path
    tok_file, enc_file = folder / "tokenizer.json", folder / "encoded.npz"
    if not entry.hit:
        log(f"lm: encoded {sum(len(t) for t in texts.values())} reviews (vocab {vocab}) into {folder}")
    with np.load(enc_file) as z:
        splits, chars = {}, {}
        for name in ("train", "val", "test"):
            chars[name] = z[f"{name}_chars"]
            offsets = z[f"{name}_offsets"]
            n = len(offsets) - 1
            splits[name] = EncodedSplit(np.arange(n), np.zeros(n, dtype=np.int64), z[f"{name}_tokens"], offsets)
    # The trained vocabulary can exceed the asked size (the alphabet is kept whole): size the model by the real one.
    real = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    return LMData(splits["train"], splits["val"], splits["test"], real, str(tok_file), chars)


class LanguageModel(Task):
    name = "lm"
    section = LMConfig
    metrics = {"val_loss": "min", "val_ppl": "min", "val_bpc": "min"}
    test_key = "test_ppl"
    model_label = "LSTM-LM"
    description = "an LSTM language model on unlabeled text (validation loss per token, or bits per character)"
    columns = {"vocab size": "hp:lm.vocab_size", "embedding dim": "hp:lm.embedding_dim",
               "hidden dim": "hp:lm.hidden_dim", "dropout": "hp:lm.dropout", "lr": "hp:train.lr",
               "Best": "@best", "Test PPL": "test_ppl",
               "Step": "@step", "Train Time": "@time", "Params": "params", "Size": "@size"}

    def check(self, cfg) -> None:
        if cfg.data.transfer_file is None:
            raise ValueError("data.transfer_file: the lm task learns from unlabeled text; name a file of reviews "
                             "(e.g. unlabeled.txt)")

    def prepare(self, cfg, log, space=None):
        rows = (space.values_of("lm.rows", numeric_ok=True) if space is not None else []) or [cfg.lm.rows]
        split_texts, file_key = text_splits(cfg.data, rows, cfg.lm.val_rows, cfg.lm.test_rows)
        sizes = space.values_of("lm.vocab_size") if space is not None else []
        return {v: _prepare_one(cfg, split_texts, file_key, v, log) for v in sorted(set(sizes or [cfg.lm.vocab_size]))}

    def trial_inputs(self, prepared) -> dict:
        return {"data": prepared}

    def save_artifacts(self, folder: Path, prepared) -> None:
        from ..io import atomic_path

        tok_dir = folder / "tokenizers"
        tok_dir.mkdir(exist_ok=True)
        for vocab, d in prepared.items():
            with atomic_path(tok_dir / f"vocab{vocab}.json") as tmp:
                shutil.copyfile(d.tokenizer_file, tmp)

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log, metric=None,
              mode=None):
        from ..loop import _hparams, fit, resolve_device

        data = inputs["data"][cfg.lm.vocab_size]
        rows = cfg.lm.rows
        if rows is not None and rows < len(data.train):  # a smaller trial takes the first rows (nested subsets)
            data = replace(data, train=data.train.take(np.arange(rows)))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        device = resolve_device(cfg.train.device)
        c = cfg.lm
        model = LSTMLanguageModel(data.vocab_size, c.embedding_dim, c.hidden_dim, c.num_layers, c.dropout)
        params, size_kb = count_params(model), state_dict_kb(model)
        model.to(device)
        job = LMJob(model, cfg, data, device)
        # val_loss and val_bpc divide one summed loss by constants of the validation set: within a trial they pick
        # the same best epoch; the sweep's metric is still the one fit tracks (best_<metric> in every report).
        metric, mode = self.objective(metric, mode)
        return fit(job, epochs=cfg.train.epochs, metric=metric, mode=mode, params=params, size_kb=size_kb,
                   run_dir=run_dir, tb_dir=tb_dir, resume_from=resume_from, on_epoch=on_epoch,
                   keep_checkpoints=keep_checkpoints, log=log, seed=cfg.train.seed, weights_name="lm.pt",
                   hparams=_hparams(c, cfg.train))

    def export(self, trial_dir: Path, cfg, row: dict, out: Path, log, state: dict, **options) -> None:
        from ..io import atomic_path

        with atomic_path(out / "lm.pt") as tmp:
            torch.save(state["best_model"], tmp)
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(Path(trial_dir).parent / "tokenizers" / f"vocab{cfg.lm.vocab_size}.json", tmp)
        write_manifest(out, self.name, {
            "architecture": "LSTMLanguageModel",
            "vocab_size": int(state["best_model"]["embedding.weight"].shape[0]),  # the tokenizer's real size
            "embedding_dim": cfg.lm.embedding_dim, "hidden_dim": cfg.lm.hidden_dim, "num_layers": cfg.lm.num_layers,
            "dropout": cfg.lm.dropout, "max_length": cfg.lm.max_length, "sweep": cfg.name,
            "trial_id": row["trial_id"], "test_ppl": row.get("test_ppl"), "metric": state.get("metric"),
            "best_epoch": state.get("best_epoch"),
            **{k: v for k, v in row.items() if k.startswith("best_val_")}})  # the sweep's metric, e.g. best_val_bpc

    def predict(self, folder: Path, texts: list[str]) -> list[dict]:
        return score_texts(folder, texts)


def load_lm(folder: str | Path) -> tuple[LSTMLanguageModel, object, dict]:
    """(model in eval mode, tokenizers.Tokenizer, config) from an exported LM folder."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    model = LSTMLanguageModel(meta["vocab_size"], meta["embedding_dim"], meta["hidden_dim"], meta["num_layers"],
                              meta["dropout"])
    model.load_state_dict(torch.load(folder / "lm.pt", map_location="cpu", weights_only=True))
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json")), meta


def score_texts(folder: str | Path, texts: list[str]) -> list[dict]:
    """Per text: mean cross-entropy per token and perplexity under the exported LM."""
    from ..data import EncodedSplit, encode_texts

    model, tok, meta = load_lm(folder)
    tokens, offsets = encode_texts(tok, texts, meta["max_length"])
    split = EncodedSplit(np.arange(len(texts)), np.zeros(len(texts), dtype=np.int64), tokens, offsets)
    sums, counts = text_losses(model, split)
    return [{"text": t, "loss": round(float(s / c), 4), "ppl": round(math.exp(min(s / c, 50.0)), 2)}
            for t, s, c in zip(texts, sums, counts)]


TASK = LanguageModel()
