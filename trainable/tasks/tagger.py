"""The tagger task (the seed's tagging study): Korean part-of-speech tagging with a BiLSTM token classifier.

Data: reviews from `data.transfer_file` (the NSMC corpus's `unlabeled.txt`), a seeded subset of `tagger.rows`
with `tagger.val_rows` and `tagger.test_rows` held out, tagged once by kiwipiepy (its model ships inside the
kiwipiepy-model package: no download at run time) into morphemes and their Sejong-style tags (about 50 classes,
like the seed's 50). Tagged and encoded once, cached by a hash of the file, the split and the kiwipiepy version.
Morpheme forms are numbered by their frequency in the training split, so a trial's `tagger.vocab_size` keeps the
most frequent forms and maps the rest to [UNK] without re-encoding anything.

Model: Embedding -> bidirectional LSTM (packed, so the backward direction starts at each review's last real
token) -> dropout -> Linear to the tags; cross-entropy per token, padding excluded. Metric: token accuracy over
real tokens (`val_acc`, max); `test_acc` of the best-validation weights. The budget step is one epoch.

Export: `tagger.pt`, `vocab.json` (forms in id order), `tags.json` and `config.json`; `sweep predict` tags texts.

kiwipiepy and trainable.data/io/cache/loop (they load pyarrow) are imported inside the functions that use them, so
loading this task with a config does not load them.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from pydantic import Field, PositiveInt

from ..config import Section
from ..student import count_params, state_dict_kb
from . import Task, TaskError, text_splits, write_manifest

UNK = 1  # 0 is padding


class TaggerConfig(Section):
    """The BiLSTM tagger and its data."""

    vocab_size: int = Field(10_000, ge=10)  # the most frequent morpheme forms kept (the rest are [UNK])
    embedding_dim: PositiveInt = 100
    hidden_dim: PositiveInt = 128
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    max_length: PositiveInt = 100  # morphemes per review (the seed's 100)
    rows: Optional[PositiveInt] = 20_000  # training reviews; None: all the rest of the file
    val_rows: PositiveInt = 2_000
    test_rows: PositiveInt = 2_000


class BiLSTMTagger(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, hidden_dim: int, num_tags: int, dropout: float = 0.3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden_dim, num_tags)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) right-padded, lengths (B,) -> tag logits (B, T, K)."""
        x = self.dropout(self.embedding(tokens))  # (B, T, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=tokens.shape[1])  # (B, T, 2H)
        return self.out(self.dropout(h))


@dataclass(frozen=True)
class TagData:
    """Forms and tags of each split as EncodedSplits sharing offsets (tokens: form ids by frequency rank + 2)."""

    forms: dict  # split -> trainable.data.EncodedSplit of form ids
    tags: dict  # split -> EncodedSplit of tag ids
    vocab: list  # forms by id (ids 0 and 1: [PAD], [UNK])
    tag_names: list


def _kiwi():
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise TaskError("tagger: needs the kiwipiepy package (pip install 'kd-sweep[morphemes]')") from None
    return Kiwi()


def tag_texts_kiwi(kiwi, texts: list[str], max_length: int) -> list[list[tuple[str, str]]]:
    """(form, tag) pairs per text, at most `max_length` (an empty text gives [])."""
    return [[(t.form, t.tag) for t in toks][:max_length] for toks in kiwi.tokenize(texts)]


def _encode(pairs: list[list[tuple[str, str]]], form_id: dict, tag_id: dict):
    from ..data import EncodedSplit

    seqs = [p or [("", "UN")] for p in pairs]  # an empty review: one unknown token (every row has length >= 1)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    forms = np.fromiter((form_id.get(f, UNK) for s in seqs for f, _ in s), dtype=np.int32, count=int(offsets[-1]))
    tags = np.fromiter((tag_id.get(t, 0) for s in seqs for _, t in s), dtype=np.int32, count=int(offsets[-1]))
    ids, zeros = np.arange(len(seqs)), np.zeros(len(seqs), dtype=np.int64)
    return EncodedSplit(ids, zeros, forms, offsets), EncodedSplit(ids, zeros, tags, offsets)


def _batch(data_forms, data_tags, idx: np.ndarray, vocab_size: int, device):
    forms, tags = data_forms.take(idx), data_tags.take(idx)
    lengths = forms.lengths
    tokens = forms.padded()
    tokens = np.where(tokens < vocab_size, tokens, UNK)
    targets = np.where(np.arange(tokens.shape[1])[None, :] < lengths[:, None], tags.padded(), -100)
    return (torch.from_numpy(tokens).to(device), torch.from_numpy(lengths).to(device),
            torch.from_numpy(targets).to(device))


class TaggerJob:
    tb_metrics = ("val/acc", "val/loss")
    extra: dict = {}

    def __init__(self, model, cfg, data: TagData, vocab_size: int, device):
        from ..loop import make_optimizer, make_scheduler

        self.model, self.cfg, self.data, self.vocab_size, self.device = model, cfg, data, vocab_size, device
        self.opt = make_optimizer(model, cfg.train)
        self.sched = make_scheduler(self.opt, cfg.train, math.ceil(len(data.forms["train"]) / cfg.train.batch_size))

    def train_epoch(self, epoch: int, gen: torch.Generator) -> dict:
        from ..loop import NonFiniteLossError, bucketed_batches

        tcfg, forms, tags = self.cfg.train, self.data.forms["train"], self.data.tags["train"]
        total, tokens = 0.0, 0
        for b, idx in enumerate(bucketed_batches(forms.lengths, tcfg.batch_size, gen)):
            x, lengths, y = _batch(forms, tags, idx, self.vocab_size, self.device)
            loss = F.cross_entropy(self.model(x, lengths).transpose(1, 2), y, ignore_index=-100)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"epoch {epoch}, batch {b}: loss is {loss.item()}; lower train.lr")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            if tcfg.scheduler == "cyclic":
                self.sched.step()
            n = int(lengths.sum())
            total += loss.item() * n
            tokens += n
        lr = self.opt.param_groups[0]["lr"]
        if tcfg.scheduler == "step":
            self.sched.step()
        return {"loss": total / tokens, "lr": lr, "samples": len(forms)}

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Token accuracy and mean cross-entropy over real tokens (padding excluded)."""
        was_training = self.model.training
        self.model.eval()
        forms, tags = self.data.forms[split], self.data.tags[split]
        order = np.argsort(forms.lengths, kind="stable")
        correct = loss = 0.0
        n = 0
        for start in range(0, len(order), self.cfg.train.eval_batch_size):
            x, lengths, y = _batch(forms, tags, order[start:start + self.cfg.train.eval_batch_size], self.vocab_size,
                                   self.device)
            logits = self.model(x, lengths)  # (B, T, K)
            real = y != -100
            correct += (logits.argmax(-1)[real] == y[real]).sum().item()
            loss += F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="sum").item()
            n += int(real.sum())
        self.model.train(was_training)
        return {"acc": correct / n, "loss": loss / n}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


class Tagger(Task):
    name = "tagger"
    section = TaggerConfig
    metrics = {"val_acc": "max", "val_loss": "min"}
    test_key = "test_acc"
    model_label = "BiLSTM-tagger"
    description = "Korean part-of-speech tagging (kiwipiepy tags), token accuracy"
    columns = {"vocab size": "hp:tagger.vocab_size", "embedding dim": "hp:tagger.embedding_dim",
               "hidden dim": "hp:tagger.hidden_dim", "dropout": "hp:tagger.dropout", "lr": "hp:train.lr"}

    def check(self, cfg) -> None:
        try:
            import kiwipiepy  # noqa: F401 - present, or the task cannot tag
        except ImportError:
            raise ValueError("task tagger: needs the kiwipiepy package, which ships its tagging model "
                             "(pip install 'kd-sweep[morphemes]')") from None
        if cfg.data.transfer_file is None:
            raise ValueError("data.transfer_file: the tagger task tags unlabeled reviews; name a file of reviews "
                             "(e.g. unlabeled.txt)")

    def prepare(self, cfg, log, space=None):
        import kiwipiepy

        from ..cache import cached, entry_path
        from ..data import EncodedSplit
        from ..io import sha256_json

        c = cfg.tagger
        rows = (space.values_of("tagger.rows", numeric_ok=True) if space is not None else []) or [c.rows]
        texts, file_key = text_splits(cfg.data, rows, c.val_rows, c.test_rows)
        key = sha256_json({"file": file_key, "kiwi": kiwipiepy.__version__, "max_length": c.max_length})[:16]

        def build(tmp: Path) -> None:
            """The encodings, then the vocabularies (the entry's marker) in `tmp`."""
            log(f"tagger: tagging {sum(len(t) for t in texts.values())} reviews with kiwipiepy "
                f"{kiwipiepy.__version__} (once; cached in {entry_path(cfg.cache_dir, 'tagger', key)})")
            kiwi = _kiwi()
            pairs = {k: tag_texts_kiwi(kiwi, v, c.max_length) for k, v in texts.items()}
            counts = Counter(f for seq in pairs["train"] for f, _ in seq)
            vocab = ["[PAD]", "[UNK]"] + [f for f, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]
            tag_names = sorted({t for seqs in pairs.values() for seq in seqs for _, t in seq} | {"UN"})
            form_id, tag_id = {f: i for i, f in enumerate(vocab)}, {t: i for i, t in enumerate(tag_names)}
            arrays = {}
            for split, p in pairs.items():
                f, t = _encode(p, form_id, tag_id)
                arrays.update({f"{split}_forms": f.tokens, f"{split}_tags": t.tokens, f"{split}_offsets": f.offsets})
            with open(tmp / "encoded.npz", "wb") as fh:
                np.savez(fh, **arrays)
            (tmp / "meta.json").write_text(json.dumps({"vocab": vocab, "tags": tag_names}, ensure_ascii=False))

        folder = cached(cfg.cache_dir, "tagger", key, build, marker="meta.json").path  # a hit is silent, as it was
        enc_file, meta_file = folder / "encoded.npz", folder / "meta.json"
        meta = json.loads(meta_file.read_text())
        forms, tags = {}, {}
        with np.load(enc_file) as z:
            for split in ("train", "val", "test"):
                offsets = z[f"{split}_offsets"]
                ids, zeros = np.arange(len(offsets) - 1), np.zeros(len(offsets) - 1, dtype=np.int64)
                forms[split] = EncodedSplit(ids, zeros, z[f"{split}_forms"], offsets)
                tags[split] = EncodedSplit(ids, zeros, z[f"{split}_tags"], offsets)
        log(f"tagger: {len(forms['train'])} training reviews, {int(forms['train'].offsets[-1])} morphemes, "
            f"{len(meta['vocab'])} forms, {len(meta['tags'])} tags")
        return TagData(forms, tags, meta["vocab"], meta["tags"])

    def trial_inputs(self, prepared) -> dict:
        return {"data": prepared}

    def save_artifacts(self, folder: Path, prepared) -> None:
        from ..io import write_json

        write_json(folder / "tagger_vocab.json", {"vocab": prepared.vocab, "tags": prepared.tag_names})

    def train(self, cfg, inputs, *, run_dir, tb_dir, resume_from, on_epoch, keep_checkpoints, log, metric=None,
              mode=None):
        from ..loop import _hparams, fit, resolve_device

        data, c = inputs["data"], cfg.tagger
        if c.rows is not None and c.rows < len(data.forms["train"]):  # a smaller trial: the first rows
            first = np.arange(c.rows)
            data = TagData({**data.forms, "train": data.forms["train"].take(first)},
                           {**data.tags, "train": data.tags["train"].take(first)}, data.vocab, data.tag_names)
        vocab_size = min(c.vocab_size, len(data.vocab))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        device = resolve_device(cfg.train.device)
        model = BiLSTMTagger(vocab_size, c.embedding_dim, c.hidden_dim, len(data.tag_names), c.dropout)
        params, size_kb = count_params(model), state_dict_kb(model)
        model.to(device)
        metric, mode = self.objective(metric, mode)
        return fit(TaggerJob(model, cfg, data, vocab_size, device), epochs=cfg.train.epochs, metric=metric,
                   mode=mode, params=params, size_kb=size_kb, run_dir=run_dir, tb_dir=tb_dir,
                   resume_from=resume_from, on_epoch=on_epoch, keep_checkpoints=keep_checkpoints, log=log,
                   seed=cfg.train.seed, weights_name="tagger.pt", hparams=_hparams(c, cfg.train))

    def export(self, trial_dir: Path, cfg, row: dict, out: Path, log, state: dict, **options) -> None:
        from ..io import atomic_path, write_json
        from ..loop import kept_epoch

        weights = state["best_model"]
        meta = json.loads((Path(trial_dir).parent / "tagger_vocab.json").read_text())
        vocab_size = int(weights["embedding.weight"].shape[0])
        with atomic_path(out / "tagger.pt") as tmp:
            torch.save(weights, tmp)
        write_json(out / "vocab.json", meta["vocab"][:vocab_size])
        write_json(out / "tags.json", meta["tags"])
        write_manifest(out, self.name, {
            "architecture": "BiLSTMTagger", "vocab_size": vocab_size,
            "embedding_dim": cfg.tagger.embedding_dim, "hidden_dim": cfg.tagger.hidden_dim,
            "dropout": cfg.tagger.dropout, "max_length": cfg.tagger.max_length, "num_tags": len(meta["tags"]),
            "sweep": cfg.name, "trial_id": row["trial_id"], "metric": state.get("metric"),
            "best_epoch": state.get("best_epoch"), "val_acc": kept_epoch(state).get("val_acc"),
            "test_acc": row.get("test_acc")})

    def predict(self, folder: Path, texts: list[str]) -> list[dict]:
        """Morphemes and their predicted tags per text (kiwipiepy splits the text; the model tags it)."""
        meta = json.loads((folder / "config.json").read_text())
        vocab = json.loads((folder / "vocab.json").read_text())
        tag_names = json.loads((folder / "tags.json").read_text())
        model = BiLSTMTagger(meta["vocab_size"], meta["embedding_dim"], meta["hidden_dim"], meta["num_tags"],
                             meta["dropout"])
        model.load_state_dict(torch.load(folder / "tagger.pt", map_location="cpu", weights_only=True))
        model.eval()
        pairs = tag_texts_kiwi(_kiwi(), texts, meta["max_length"])
        form_id = {f: i for i, f in enumerate(vocab)}
        out = []
        with torch.no_grad():
            for text, seq in zip(texts, pairs):
                forms = [f for f, _ in seq] or [""]
                x = torch.tensor([[form_id.get(f, UNK) for f in forms]])
                tags = model(x, torch.tensor([len(forms)])).argmax(-1)[0].tolist()
                out.append({"text": text, "tokens": [[f, tag_names[t]] for f, t in zip(forms, tags)]})
        return out


TASK = Tagger()
