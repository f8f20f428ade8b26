"""The teacher: any Hugging Face sequence classifier, fine-tuned once, and its logits computed once and cached.

    teacher.source = "scratch"      -> a small BERT/ELECTRA from a preset, with its own WordPiece vocabulary
                   = hub id or path -> AutoModelForSequenceClassification.from_pretrained (trust_remote_code off
                                       unless the config asks)
    fine-tune (AdamW, linear warm-up/decay) -> save_pretrained into the cache, keyed by (teacher config, data)
    logits over train + validation -> Parquet (split, row_id, logit_0..logit_{C-1}) with metadata naming the
    teacher, its checkpoint hash, its tokenizer hash, the data key and the max length. The file name is a hash of
    those; the metadata is checked again on read, so a mismatch means recompute, never re-use.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import TeacherConfig
from .data import Corpus, Table, train_wordpiece
from .io import atomic_dir, atomic_path, sha256_dir, sha256_json, write_json
from .loop import bucketed_batches

Log = Callable[[str], None]

# Small transformer sizes for a teacher trained from scratch (no hub). "base" is ELECTRA-small's shape.
PRESETS = {
    "tiny": dict(embedding_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "small": dict(embedding_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024),
    "base": dict(embedding_size=128, hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                 intermediate_size=1024),
}
MODEL_FILES = ("config.json", "*.safetensors", "*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "*.model")


class TeacherError(ValueError):
    """The teacher cannot be loaded or built; one line naming the source and what was expected."""


@dataclass(frozen=True)
class Teacher:
    path: Path  # a save_pretrained folder (model + tokenizer)
    checkpoint_hash: str
    tokenizer_hash: str
    metrics: dict  # val_acc, test_acc, train_time_s, ...


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- building and loading


def build_scratch(cfg: TeacherConfig, corpus: Corpus, num_classes: int, max_positions: int):
    """A randomly initialised BERT/ELECTRA classifier and a WordPiece tokenizer trained on the training split."""
    from tokenizers.processors import TemplateProcessing
    from transformers import (BertConfig, BertForSequenceClassification, ElectraConfig,
                              ElectraForSequenceClassification, PreTrainedTokenizerFast)

    tok = train_wordpiece(corpus.train.texts, cfg.vocab_size)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]", model_max_length=cfg.max_length)
    sizes = dict(PRESETS[cfg.preset])
    common = dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=max(512, max_positions), num_labels=num_classes,
                  pad_token_id=0)
    torch.manual_seed(cfg.seed)
    if cfg.arch == "electra":
        model = ElectraForSequenceClassification(ElectraConfig(**sizes, **common))
    else:
        sizes.pop("embedding_size")
        model = BertForSequenceClassification(BertConfig(**sizes, **common))
    return model, hf_tok


def load_pretrained(source: str | Path, num_classes: int | None, trust_remote_code: bool = False):
    """Model and tokenizer from a hub id or a local folder. A path that exists but is not a model is refused."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    src = str(source)
    p = Path(src)
    looks_local = p.exists() or src.startswith((".", "/", "~")) or src.count("/") > 1
    if looks_local and not (p / "config.json").is_file():
        raise TeacherError(f"teacher.source: {src} is not a model folder (expected config.json from save_pretrained)")
    kwargs = {"trust_remote_code": trust_remote_code}
    if num_classes is not None:
        kwargs["num_labels"] = num_classes
    try:
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ""
        if "connect" in first and not os.environ.get("HF_HUB_OFFLINE"):
            hint = ("; without network, give a local folder made by save_pretrained, or set HF_HUB_OFFLINE=1 to use "
                    "the Hugging Face cache only (and fail at once)")
        raise TeacherError(f"teacher.source: cannot load {src!r} as a sequence classifier ({first}){hint}") from None
    return model, tok


# ----------------------------------------------------------------------------- batches of text


def _tokenize(tok, table: Table, max_length: int) -> list[list[int]]:
    # Empty reviews still get the special tokens, so no sequence is empty.
    return tok(table.texts, truncation=True, max_length=max_length)["input_ids"]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def predict_logits(model, seqs: list[list[int]], pad_id: int, batch_size: int, log: Log | None = None,
                   what: str = "") -> np.ndarray:
    """(N, C) float32 logits, batches sorted by length so little time goes to padding."""
    model.eval()
    device = next(model.parameters()).device
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = np.zeros((len(seqs), model.config.num_labels), dtype=np.float32)
    t0, last = time.perf_counter(), time.perf_counter()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = _pad([seqs[i] for i in idx], pad_id)
        out[idx] = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu().numpy()
        if log is not None and time.perf_counter() - last > 30:
            done = start + len(idx)
            log(f"  {what} logits {done}/{len(seqs)} ({done / (time.perf_counter() - t0):.0f} samples/s)")
            last = time.perf_counter()
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


# ----------------------------------------------------------------------------- fine-tuning


def fine_tune(model, tok, corpus: Corpus, cfg: TeacherConfig, log: Log = print) -> dict:
    """AdamW with linear warm-up and decay over `cfg.epochs`; progress every ~20 s; returns accuracies."""
    from transformers import get_linear_schedule_with_warmup

    device = _device()
    model.to(device)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_seqs = _tokenize(tok, corpus.train, cfg.max_length)
    lengths = np.array([len(s) for s in train_seqs])
    labels = torch.from_numpy(corpus.train.labels)
    steps_per_epoch = math.ceil(len(train_seqs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    torch.manual_seed(cfg.seed)
    t0 = last = time.perf_counter()
    step, seen = 0, 0
    log(f"teacher: fine-tuning {cfg.source} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
        f"for {cfg.epochs} epoch(s), {total} steps on {device}")
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        for idx in bucketed_batches(lengths, cfg.batch_size, gen):
            ids, mask = _pad([train_seqs[i] for i in idx], pad_id)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels[idx].to(device))
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"teacher fine-tuning: loss is {out.loss.item()} at step {step}; lower teacher.lr")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step, seen = step + 1, seen + len(idx)
            now = time.perf_counter()
            if now - last > 20 or step == total:
                rate = seen / (now - t0)
                eta = (total - step) * cfg.batch_size / rate
                log(f"  teacher epoch {epoch} step {step}/{total} loss {out.loss.item():.4f} "
                    f"{rate:.0f} samples/s, ETA {eta:.0f} s")
                last = now
    train_time = time.perf_counter() - t0
    val_acc = accuracy(predict_logits(model, _tokenize(tok, corpus.val, cfg.max_length), pad_id, cfg.eval_batch_size),
                       corpus.val.labels)
    test_acc = accuracy(predict_logits(model, _tokenize(tok, corpus.test, cfg.max_length), pad_id, cfg.eval_batch_size,
                                       log, "test"), corpus.test.labels)
    log(f"teacher: validation accuracy {val_acc:.4f}, test accuracy {test_acc:.4f} ({train_time:.0f} s)")
    return {"val_acc": val_acc, "test_acc": test_acc, "train_time_s": train_time, "steps": step}


def teacher_key(cfg: TeacherConfig, corpus: Corpus, num_classes: int) -> str:
    settings = cfg.model_dump(exclude={"eval_batch_size"})
    return sha256_json({"teacher": settings, "data": corpus.key, "classes": num_classes})[:16]


def get_teacher(cfg: TeacherConfig, corpus: Corpus, num_classes: int, cache_dir: str | Path, log: Log = print) -> Teacher:
    """The fine-tuned teacher for this config and data: from the cache, or built, fine-tuned and saved."""
    folder = Path(cache_dir) / "teachers" / teacher_key(cfg, corpus, num_classes)
    info = folder / "teacher.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        log(f"teacher: cache hit {folder} (val {meta['metrics'].get('val_acc', float('nan')):.4f}, "
            f"test {meta['metrics'].get('test_acc', float('nan')):.4f})")
        return Teacher(folder, meta["checkpoint_hash"], meta["tokenizer_hash"], meta["metrics"])
    if cfg.is_scratch:
        log(f"teacher: building a {cfg.preset} {cfg.arch} from scratch (vocab {cfg.vocab_size})")
        model, tok = build_scratch(cfg, corpus, num_classes, cfg.max_length + 2)
    else:
        model, tok = load_pretrained(cfg.source, num_classes, cfg.trust_remote_code)
    metrics = fine_tune(model, tok, corpus, cfg, log) if cfg.epochs > 0 else {}
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"source": cfg.source, "config": cfg.model_dump(), "metrics": metrics,
                "checkpoint_hash": sha256_dir(tmp, MODEL_FILES), "tokenizer_hash": sha256_dir(tmp, TOKENIZER_FILES)}
        write_json(tmp / "teacher.json", meta)
    log(f"teacher: saved to {folder}")
    return Teacher(folder, meta["checkpoint_hash"], meta["tokenizer_hash"], metrics)


# ----------------------------------------------------------------------------- logits cache


def logits_meta(teacher: Teacher, corpus: Corpus, max_length: int) -> dict[str, str]:
    return {"teacher": str(teacher.path), "checkpoint_hash": teacher.checkpoint_hash,
            "tokenizer_hash": teacher.tokenizer_hash, "data_key": corpus.key, "max_length": str(max_length)}


def logits_path(meta: dict[str, str], cache_dir: str | Path) -> Path:
    key = sha256_json({k: v for k, v in meta.items() if k != "teacher"})[:16]
    return Path(cache_dir) / "logits" / f"logits-{key}.parquet"


def read_logits(path: Path, expected_meta: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{split: (row_ids, logits)} if the file exists and its metadata matches; None otherwise."""
    if not path.is_file():
        return None
    try:
        tbl = pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        return None
    meta = {k.decode(): v.decode() for k, v in (tbl.schema.metadata or {}).items()}
    if any(meta.get(k) != v for k, v in expected_meta.items() if k != "teacher"):
        return None
    cols = sorted((c for c in tbl.column_names if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    split = np.asarray(tbl.column("split").to_pylist())
    ids = tbl.column("row_id").to_numpy()
    logits = np.stack([tbl.column(c).to_numpy() for c in cols], axis=1).astype(np.float32)
    return {s: (ids[split == s], logits[split == s]) for s in ("train", "val")}


def get_logits(teacher: Teacher, corpus: Corpus, cfg: TeacherConfig, cache_dir: str | Path,
               log: Log = print) -> dict[str, np.ndarray]:
    """{"train": (N_train, C), "val": (N_val, C)} teacher logits in corpus row order, computed at most once."""
    meta = logits_meta(teacher, corpus, cfg.max_length)
    path = logits_path(meta, cache_dir)
    cached = read_logits(path, meta)
    if cached is None:
        if path.exists():
            log(f"teacher logits: {path} does not match this teacher/data; recomputing")
        model, tok = load_pretrained(teacher.path, None, cfg.trust_remote_code)
        model.to(_device())
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        log(f"teacher logits: one pass over {len(corpus.train) + len(corpus.val)} reviews")
        parts = {}
        for name in ("train", "val"):
            table = getattr(corpus, name)
            parts[name] = (table.ids, predict_logits(model, _tokenize(tok, table, cfg.max_length), pad_id,
                                                     cfg.eval_batch_size, log, name))
        n_cls = parts["train"][1].shape[1]
        tbl = pa.table({
            "split": pa.array(["train"] * len(corpus.train) + ["val"] * len(corpus.val)),
            "row_id": pa.array(np.concatenate([parts["train"][0], parts["val"][0]])),
            **{f"logit_{c}": pa.array(np.concatenate([parts["train"][1][:, c], parts["val"][1][:, c]]))
               for c in range(n_cls)},
        }).replace_schema_metadata(meta)
        with atomic_path(path) as tmp:
            pq.write_table(tbl, tmp)
        log(f"teacher logits: wrote {path}")
        cached = read_logits(path, meta)
    else:
        log(f"teacher logits: cache hit {path}")
    out = {}
    for name in ("train", "val"):
        ids, logits = cached[name]
        if not np.array_equal(ids, getattr(corpus, name).ids):
            raise RuntimeError(f"{path}: {name} row ids do not match the corpus; delete the file to recompute")
        out[name] = logits
    return out
