"""Teachers: built or loaded once, their logits computed once per split and cached; several make an ensemble.

    teacher.source = "scratch"        -> a small BERT/ELECTRA from a preset, its own WordPiece vocabulary,
                                         optionally pre-trained with masked-LM on unlabeled text (trainable/pretrain.py)
                   = "ngram"          -> TF-IDF over character+word or Korean-morpheme n-grams, logistic regression
                   = "bilstm"         -> a wide BiLSTM trained here with the student loop, saved as a student folder
                   = hub id or folder -> AutoModelForSequenceClassification.from_pretrained (trust_remote_code off
                                         unless asked), or a student folder from `sweep export` (two-stage KD)
                   = [member, ...]    -> an ensemble (see `combine`)
    fine-tune (transformers: AdamW, linear warm-up/decay, gradient clipping) -> save_pretrained into the cache,
    keyed by (teacher config, data)
    logits -> Parquet (split, row_id, logit_0..logit_{C-1}): one file for the labelled splits (train, val, test)
    keyed by (checkpoint hash, tokenizer hash, data key, max length), one for the transfer rows keyed by
    (checkpoint hash, tokenizer hash, transfer key, max length). The metadata is checked again on read, so a
    mismatch means recompute, never re-use; a new transfer file recomputes only the transfer logits.

An n-gram teacher is not saved: it is refitted (deterministically, about a minute on the whole training split) when
logits it has not cached are needed.

transformers, tokenizers, sklearn, scipy and kiwipiepy are imported inside the teacher kinds that use them, so one kind
does not load another's libraries.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config import StudentConfig, TeacherConfig, TokenizerConfig, TrainConfig
from .data import Corpus, EncodedData, EncodedSplit, Table, encode_texts, get_tokenizer, train_wordpiece
from .errors import TeacherError
from .cache import cached, entry_path
from .io import sha256_dir, sha256_json, write_json
from .loop import bucketed_batches, predict_split, train_student
from .pretrain import pretrain_encoder
from .student import is_student_folder, load_student_folder

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


@dataclass(frozen=True)
class Teacher:
    """One trained teacher (an ensemble member): where it lives in the cache and what identifies it."""

    path: Path  # a save_pretrained folder, a student folder, or (ngram) a folder holding teacher.json only
    checkpoint_hash: str
    tokenizer_hash: str
    metrics: dict  # val_acc, test_acc, train_time_s, ...
    kind: str = "hf"  # hf (transformers), student (BiLSTM folder), ngram (refitted on demand)
    cfg: TeacherConfig | None = None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- building and loading


def build_scratch(cfg: TeacherConfig, corpus: Corpus, num_classes: int, max_positions: int,
                  cache_dir: str | Path | None = None):
    """A randomly initialised BERT/ELECTRA classifier and a WordPiece tokenizer trained on the training split.

    With `cache_dir` the tokenizer comes from the tokenizer cache (keyed by data and vocab size): WordPiece can number
    pieces of equal count differently from one training to the next, and a pre-trained encoder is only valid with
    the exact vocabulary it was trained on."""
    from tokenizers.processors import TemplateProcessing
    from transformers import (BertConfig, BertForSequenceClassification, ElectraConfig,
                              ElectraForSequenceClassification, PreTrainedTokenizerFast)

    if cache_dir is None:
        tok = train_wordpiece(corpus.train.texts, cfg.vocab_size)
    else:
        from tokenizers import Tokenizer


        tok = Tokenizer.from_file(str(get_tokenizer(corpus, TokenizerConfig(vocab_size=cfg.vocab_size), cache_dir,
                                                    lambda m: None, cfg.vocab_size)))
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


def _check_head(src: str, num_classes: int | None, trust_remote_code: bool) -> None:
    """A folder saved as a classifier with another number of labels is refused (from_pretrained would fail on the
    head's shape with a traceback, or, told to ignore it, silently throw the trained head away). A base model
    (no sequence-classification head) gets a new head of the data's size."""
    from transformers import AutoConfig

    if num_classes is None:
        return
    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels != num_classes:
        raise TeacherError(f"teacher.source: {src} is a classifier with {config.num_labels} labels; the data has "
                           f"{num_classes} (give a base model, or one trained on these labels)")


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
        _check_head(src, num_classes, trust_remote_code)
        tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(src, **kwargs)
    except TeacherError:
        raise
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


def teacher_key(cfg: TeacherConfig, corpus: Corpus, num_classes: int, texts_key: str | None = None) -> str:
    settings = cfg.model_dump(exclude={"eval_batch_size", "threads", "weights", "trust_remote_code"})
    if cfg.kind != "ngram":
        settings.pop("ngram")
    if cfg.kind != "bilstm":
        settings.pop("bilstm")
    if not (cfg.kind == "scratch" and cfg.pretrain.steps > 0):
        settings.pop("pretrain")
    parts = {"teacher": settings, "data": corpus.key, "classes": num_classes}
    if texts_key is not None:
        parts["pretrain_texts"] = texts_key
    return sha256_json(parts)[:16]


def _pretrain_texts(cfg: TeacherConfig, corpus: Corpus) -> tuple[list[str], str]:
    """Masked-LM text: the transfer set (unlabeled reviews) plus the training reviews."""
    texts = (corpus.transfer.texts if corpus.transfer is not None else []) + corpus.train.texts
    return texts, sha256_json([corpus.transfer_key, corpus.key])[:16]


def get_teacher(cfg: TeacherConfig, corpus: Corpus, num_classes: int, cache_dir: str | Path, log: Log = print) -> Teacher:
    """One teacher (not an ensemble) for this config and data: from the cache, or built, trained and saved."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pre_texts = _pretrain_texts(cfg, corpus) if cfg.kind == "scratch" and cfg.pretrain.steps > 0 else None
    key = teacher_key(cfg, corpus, num_classes, pre_texts[1] if pre_texts else None)
    if cfg.kind == "pretrained" and is_student_folder(cfg.source):
        folder = Path(cfg.source)  # a student from an earlier sweep teaches as it is (two-stage distillation)
        meta = json.loads((folder / "config.json").read_text())
        log(f"teacher: student folder {folder} (val {meta.get('val_acc', float('nan')):.4f}, "
            f"test {meta.get('test_acc', float('nan')):.4f})")
        return Teacher(folder, sha256_dir(folder, ("student.pt",)), sha256_dir(folder, ("tokenizer.json",)),
                       {k: meta.get(k) for k in ("val_acc", "test_acc")}, "student", cfg)
    folder = entry_path(cache_dir, "teachers", key)
    kind = {"bilstm": "student", "ngram": "ngram"}.get(cfg.kind, "hf")

    def hit_note(folder: Path) -> str:
        metrics = json.loads((folder / "teacher.json").read_text())["metrics"]
        return (f"{cfg.kind}; val {metrics.get('val_acc', float('nan')):.4f}, "
                f"test {metrics.get('test_acc', float('nan')):.4f}")

    def build(tmp: Path) -> tuple[dict, str | None]:
        """The teacher's files and its teacher.json (last) in `tmp`; its meta and what to log once it is in."""
        if cfg.kind == "ngram":
            # Nothing to train up front: the model is fitted when its logits are first needed (see ngram_logits).
            meta = {"source": cfg.source, "config": cfg.model_dump(), "metrics": {},
                    "checkpoint_hash": sha256_json({"ngram": key}), "tokenizer_hash": "ngram"}
            write_json(tmp / "teacher.json", meta)
            return meta, None
        if cfg.kind == "bilstm":
            meta = _build_bilstm(cfg, corpus, num_classes, tmp, log)
            return meta, (f"teacher: BiLSTM val {meta['metrics']['val_acc']:.4f}, "
                          f"test {meta['metrics']['test_acc']:.4f}; saved to {folder}")
        if cfg.is_scratch:
            log(f"teacher: building a {cfg.preset} {cfg.arch} from scratch (vocab {cfg.vocab_size})")
            model, tok = build_scratch(cfg, corpus, num_classes, cfg.max_length + 2, cache_dir)
            metrics = {}
            if pre_texts is not None:
                metrics["pretrain"] = pretrain_encoder(model, tok, pre_texts[0], cfg.pretrain,
                                                       max_length=cfg.max_length, seed=cfg.seed, cache_dir=cache_dir,
                                                       log=log)
        else:
            model, tok = load_pretrained(cfg.source, num_classes, cfg.trust_remote_code)
            metrics = {}
        if cfg.epochs > 0:
            metrics.update(fine_tune(model, tok, corpus, cfg, log))
        model.to("cpu")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"source": cfg.source, "config": cfg.model_dump(), "metrics": metrics,
                "checkpoint_hash": sha256_dir(tmp, MODEL_FILES), "tokenizer_hash": sha256_dir(tmp, TOKENIZER_FILES)}
        write_json(tmp / "teacher.json", meta)
        return meta, f"teacher: saved to {folder}"

    entry = cached(cache_dir, "teachers", key, build, marker="teacher.json", what="teacher", log=log, note=hit_note)
    if entry.hit:
        meta = json.loads((entry.path / "teacher.json").read_text())
    else:
        meta, saved = entry.built
        if saved is not None:
            log(saved)
    return Teacher(entry.path, meta["checkpoint_hash"], meta["tokenizer_hash"], meta["metrics"], kind, cfg)


def _build_bilstm(cfg: TeacherConfig, corpus: Corpus, num_classes: int, tmp: Path, log: Log) -> dict:
    """A wide BiLSTM trained with the student loop on the labelled rows (no teacher), saved as a student folder in
    `tmp` (a cache entry's temporary folder); returns its teacher.json."""
    b = cfg.bilstm
    log(f"teacher: training a BiLSTM (embedding {b.embedding_dim}, hidden {b.hidden_dim}, vocab {cfg.vocab_size}) "
        f"for {cfg.epochs} epoch(s)")
    tok = train_wordpiece(corpus.train.texts, cfg.vocab_size)
    splits = {}
    for name in ("train", "val", "test"):
        table = corpus.split(name)
        splits[name] = EncodedSplit(table.ids, table.labels, *encode_texts(tok, table.texts, cfg.max_length))
    student = StudentConfig(embedding_dim=b.embedding_dim, hidden_dim=b.hidden_dim, dropout=b.dropout)
    train = TrainConfig(epochs=max(cfg.epochs, 1), batch_size=cfg.batch_size, lr=cfg.resolved_lr, alpha=1.0,
                        scheduler="step", step_size=1, gamma=0.8, seed=cfg.seed, threads=cfg.threads)
    tok.save(str(tmp / "tokenizer.json"))
    data = EncodedData(splits["train"], splits["val"], splits["test"], tok.get_vocab_size(),
                       str(tmp / "tokenizer.json"), "bilstm-teacher")
    t0 = time.perf_counter()
    result = train_student(student, train, data, None, num_classes=num_classes, run_dir=tmp / "run", log=log)
    (tmp / "run" / "student.pt").replace(tmp / "student.pt")
    shutil.rmtree(tmp / "run")
    metrics = {"val_acc": result.val_acc, "test_acc": result.test_acc, "train_time_s": time.perf_counter() - t0,
               "params": result.params}
    write_json(tmp / "config.json", {
        "architecture": "BiLSTMClassifier", "vocab_size": tok.get_vocab_size(), "embedding_dim": b.embedding_dim,
        "hidden_dim": b.hidden_dim, "num_layers": 1, "dropout": b.dropout, "num_classes": num_classes,
        "max_length": cfg.max_length, **metrics})
    meta = {"source": cfg.source, "config": cfg.model_dump(), "metrics": metrics,
            "checkpoint_hash": sha256_dir(tmp, ("student.pt",)), "tokenizer_hash": sha256_dir(tmp, ("tokenizer.json",))}
    write_json(tmp / "teacher.json", meta)
    return meta


# ----------------------------------------------------------------------------- n-gram teacher


_NGRAM_MODELS: dict[str, object] = {}  # fitted models of this process, by checkpoint hash (fitted once per prepare)


def _morphemes(texts: list[str]) -> list[str]:
    try:
        from kiwipiepy import Kiwi
    except ImportError:
        raise TeacherError("teacher.ngram.analyzer: 'morphemes' needs the kiwipiepy package "
                           "(pip install kiwipiepy; it ships its model)") from None
    kiwi = Kiwi(num_workers=max(2, os.cpu_count() or 2))  # batch tokenizing needs worker threads
    return [" ".join(f"{t.form}/{t.tag}" for t in toks) for toks in kiwi.tokenize(texts)]


class NgramModel:
    """TF-IDF n-gram features and a logistic regression (scikit-learn), the text seen as characters + words, or as
    Korean morphemes with their part-of-speech tags."""

    def __init__(self, cfg: TeacherConfig):
        from sklearn.feature_extraction.text import TfidfVectorizer

        n = cfg.ngram
        common = dict(sublinear_tf=True, min_df=2, max_features=n.max_features, dtype=np.float32)
        if n.analyzer == "chars_words":
            self.vectorizers = [TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), **common),
                                TfidfVectorizer(analyzer="word", ngram_range=(1, 2), token_pattern=r"\S+", **common)]
        else:
            self.vectorizers = [TfidfVectorizer(analyzer="word", ngram_range=(1, 3), token_pattern=r"\S+",
                                                lowercase=False, **common)]
        self.cfg = cfg

    def _inputs(self, texts: list[str]) -> list[str]:
        return _morphemes(texts) if self.cfg.ngram.analyzer == "morphemes" else texts

    def _features(self, texts: list[str], fit: bool = False):
        from scipy.sparse import hstack

        texts = self._inputs(texts)
        mats = [v.fit_transform(texts) if fit else v.transform(texts) for v in self.vectorizers]
        return hstack(mats).tocsr()

    def fit(self, texts: list[str], labels: np.ndarray) -> "NgramModel":
        from sklearn.linear_model import LogisticRegression

        self.clf = LogisticRegression(C=self.cfg.ngram.C, max_iter=2000, random_state=self.cfg.seed)
        self.clf.fit(self._features(texts, fit=True), labels)
        return self

    def logits(self, texts: list[str]) -> np.ndarray:
        """Log-probabilities (N, C), float32: the logits of a softmax over the classes."""
        return self.clf.predict_log_proba(self._features(texts)).astype(np.float32)


def _ngram_model(teacher: Teacher, corpus: Corpus, log: Log) -> NgramModel:
    model = _NGRAM_MODELS.get(teacher.checkpoint_hash)
    if model is None:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            raise TeacherError("teacher.source: 'ngram' needs scikit-learn (pip install scikit-learn)") from None
        t0 = time.perf_counter()
        log(f"teacher: fitting the n-gram model ({teacher.cfg.ngram.analyzer}) on {len(corpus.train)} reviews")
        model = NgramModel(teacher.cfg).fit(corpus.train.texts, corpus.train.labels)
        log(f"teacher: n-gram model fitted in {time.perf_counter() - t0:.0f} s")
        _NGRAM_MODELS[teacher.checkpoint_hash] = model
    return model


# ----------------------------------------------------------------------------- logits of one teacher


def _compute_logits(teacher: Teacher, corpus: Corpus, names: tuple[str, ...], log: Log) -> dict[str, np.ndarray]:
    cfg = teacher.cfg
    n_rows = sum(len(corpus.split(n)) for n in names)
    if teacher.kind == "ngram":
        model = _ngram_model(teacher, corpus, log)
        log(f"teacher logits ({cfg.source}): {n_rows} reviews")
        return {n: model.logits(corpus.split(n).texts) for n in names}
    if teacher.kind == "student":
        model, tok, meta = load_student_folder(teacher.path)
        model.to(_device())
        log(f"teacher logits ({teacher.path.name}): {n_rows} reviews")
        out = {}
        for n in names:
            table = corpus.split(n)
            split = EncodedSplit(table.ids, table.labels, *encode_texts(tok, table.texts, meta["max_length"]))
            out[n] = predict_split(model, split, cfg.eval_batch_size if cfg else 512)
        return out
    model, tok = load_pretrained(teacher.path, None, cfg.trust_remote_code)
    model.to(_device())
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    log(f"teacher logits ({teacher.path.name}): one pass over {n_rows} reviews")
    return {n: predict_logits(model, _tokenize(tok, corpus.split(n), cfg.max_length), pad_id, cfg.eval_batch_size,
                              log, n) for n in names}


def logits_meta(teacher: Teacher, data_key: str, max_length: int) -> dict[str, str]:
    return {"teacher": str(teacher.path), "checkpoint_hash": teacher.checkpoint_hash,
            "tokenizer_hash": teacher.tokenizer_hash, "data_key": data_key, "max_length": str(max_length)}


def logits_path(meta: dict[str, str], cache_dir: str | Path) -> Path:
    key = sha256_json({k: v for k, v in meta.items() if k != "teacher"})[:16]
    return entry_path(cache_dir, "logits", f"logits-{key}.parquet")


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
    return {s: (ids[split == s], logits[split == s]) for s in dict.fromkeys(split.tolist())}


def _write_logits(path: Path, parts: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict[str, str]) -> None:
    """{split: (row_ids, logits)} as one Parquet file at `path` (a cache entry's temporary name)."""
    names = list(parts)
    n_cls = parts[names[0]][1].shape[1]
    tbl = pa.table({
        "split": pa.array([n for n in names for _ in range(len(parts[n][0]))], pa.string()),
        "row_id": pa.array(np.concatenate([parts[n][0] for n in names])),
        **{f"logit_{c}": pa.array(np.concatenate([parts[n][1][:, c] for n in names])) for c in range(n_cls)},
    }).replace_schema_metadata(meta)
    pq.write_table(tbl, path)


def get_logits(teacher: Teacher, corpus: Corpus, cache_dir: str | Path, log: Log = print) -> dict[str, np.ndarray]:
    """{"train", "val", "test"[, "transfer"]: (N, C)} logits of one teacher in corpus row order, each group computed
    at most once: the labelled splits in one file, the transfer rows in another."""
    max_length = teacher.cfg.max_length if teacher.cfg is not None else 0
    groups = [(("train", "val", "test"), corpus.key)]
    if corpus.transfer is not None:
        groups.append((("transfer",), corpus.transfer_key))
    out = {}
    for names, data_key in groups:
        meta = logits_meta(teacher, data_key, max_length)
        path = logits_path(meta, cache_dir)
        found = read_logits(path, meta)
        stale = found is None or any(n not in found for n in names)
        if stale and path.exists():
            log(f"teacher logits: {path} does not match this teacher/data; recomputing")

        def build(tmp: Path, names=names, meta=meta) -> None:
            computed = _compute_logits(teacher, corpus, names, log)
            _write_logits(tmp, {n: (corpus.split(n).ids, computed[n]) for n in names}, meta)

        entry = cached(cache_dir, "logits", path.name, build, what="teacher logits", log=log, stale=stale)
        if not entry.hit:
            log(f"teacher logits: wrote {path}")
            found = read_logits(path, meta)
        for n in names:
            ids, logits = found[n]
            if not np.array_equal(ids, corpus.split(n).ids):
                raise RuntimeError(f"{path}: {n} row ids do not match the corpus; delete the file to recompute")
            out[n] = logits
    return out


# ----------------------------------------------------------------------------- ensembles


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def choose_weights(val_logp: list[np.ndarray], labels: np.ndarray, step: float = 0.1) -> list[float]:
    """Ensemble weights on the simplex (multiples of `step`) that maximise validation accuracy; among ties the
    most even weights (highest entropy) win, so the choice is deterministic and does not overfit to one member."""
    n = len(val_logp)
    k = int(round(1 / step)) if n <= 4 else 4  # 11^(n-1) points for n <= 4; a coarser grid for bigger ensembles
    best = None
    for combo in itertools.product(range(k + 1), repeat=n - 1):
        rest = k - sum(combo)
        if rest < 0:
            continue
        w = np.array([*combo, rest], dtype=np.float64) / k
        acc = float((sum(wi * lp for wi, lp in zip(w, val_logp)).argmax(1) == labels).mean())
        entropy = float(-(w[w > 0] * np.log(w[w > 0])).sum())
        if best is None or (acc, entropy) > best[0]:
            best = ((acc, entropy), w)
    return [float(x) for x in best[1]]


def combine(member_logits: list[dict[str, np.ndarray]], weights: list[float] | None,
            val_labels: np.ndarray) -> tuple[dict[str, np.ndarray], list[float]]:
    """The ensemble's logits: sum_i w_i * log_softmax(logits_i), with the weights normalised to sum to 1, per row
    and split. `weights` None: chosen on the validation split (`choose_weights`). One member: its logits as they
    are (weight 1)."""
    if len(member_logits) == 1:
        return dict(member_logits[0]), [1.0]
    logp = [{s: log_softmax(m[s]) for s in m} for m in member_logits]
    if weights is None:
        weights = choose_weights([lp["val"] for lp in logp], val_labels)
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    out = {s: sum(wi * lp[s] for wi, lp in zip(w, logp)).astype(np.float32) for s in logp[0]}
    return out, [float(x) for x in w]


@dataclass(frozen=True)
class TeacherSet:
    """The teacher(s) of an experiment and the logits the students learn from."""

    members: list[Teacher]
    weights: list[float]
    logits: dict[str, np.ndarray]  # train, val, test[, transfer]: combined
    metrics: dict  # val_acc, test_acc of the combination; members' own accuracies


def get_teachers(cfg: TeacherConfig, corpus: Corpus, num_classes: int, cache_dir: str | Path,
                 log: Log = print) -> TeacherSet:
    """Every member built or loaded (cached), its logits computed (cached), and the combination."""
    members, member_logits, member_metrics = [], [], []
    for i, mcfg in enumerate(cfg.members()):
        t0 = time.perf_counter()
        teacher = get_teacher(mcfg, corpus, num_classes, cache_dir, log)
        logits = get_logits(teacher, corpus, cache_dir, log)
        acc = {f"{s}_acc": accuracy(logits[s], corpus.split(s).labels) for s in ("val", "test")}
        members.append(teacher)
        member_logits.append(logits)
        member_metrics.append({"source": mcfg.source, **acc, "build_s": teacher.metrics.get("train_time_s"),
                               "prepare_s": time.perf_counter() - t0})
        if cfg.is_ensemble:
            log(f"teacher member {i + 1}/{len(cfg.members())} ({mcfg.source}): val {acc['val_acc']:.4f}, "
                f"test {acc['test_acc']:.4f}")
    logits, weights = combine(member_logits, cfg.weights, corpus.val.labels)
    metrics = {"val_acc": accuracy(logits["val"], corpus.val.labels),
               "test_acc": accuracy(logits["test"], corpus.test.labels), "weights": weights}
    if cfg.is_ensemble:
        metrics["members"] = member_metrics
        log(f"teacher ensemble: weights {[round(w, 2) for w in weights]}, val {metrics['val_acc']:.4f}, "
            f"test {metrics['test_acc']:.4f}")
    else:
        metrics.update({k: v for k, v in members[0].metrics.items() if k not in metrics})
    return TeacherSet(members, weights, logits, metrics)
