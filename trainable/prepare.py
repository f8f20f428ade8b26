"""Prepare once, on the driver: corpus (+ transfer set) -> student encodings -> teacher(s) -> teacher logits.
Idempotent: every step is cached by a hash of what produced it, so a second call only reads files.

`student_inputs` then gives one student (one trial) its training rows and targets: the labelled rows plus the
first `data.transfer_rows` transfer rows, and the teacher logits aligned with them; with `train.alpha` 1 (no
teacher) the transfer rows are dropped, since they have no label.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np

from .config import ExperimentConfig
from .data import Corpus, EncodedData, encode_corpus, load_corpus
from .teacher import TeacherSet, get_teachers


@dataclass(frozen=True)
class Prepared:
    corpus: Corpus
    encoded: dict[int, EncodedData]  # by student vocab size
    teacher: TeacherSet | None  # None when no student needs one (alpha == 1 everywhere)

    @property
    def logits(self) -> dict[str, np.ndarray] | None:
        """{"train", "val", "test"[, "transfer"]: (N, C)} the (combined) teacher logits, in corpus row order."""
        return self.teacher.logits if self.teacher is not None else None


def prepare(cfg: ExperimentConfig, log: Callable[[str], None] = print, vocab_sizes: Iterable[int] | None = None,
            need_teacher: bool = True, transfer_rows: int | None = -1) -> Prepared:
    """`transfer_rows`: how many transfer-file rows to prepare (-1: `data.transfer_rows`; a sweep passes the most
    any of its trials takes). Without a teacher no transfer set is prepared (it would have no targets)."""
    corpus = load_corpus(cfg.data, log, transfer_rows=transfer_rows if need_teacher else 0)
    if not need_teacher and corpus.transfer is not None:
        corpus = replace(corpus, transfer=None, transfer_key=None, transfer_file_rows=0)
    sizes = sorted(set(vocab_sizes or [cfg.tokenizer.vocab_size]))
    encoded = {v: encode_corpus(corpus, cfg.tokenizer, cfg.cache_dir, log, v) for v in sizes}
    teacher = None
    if need_teacher:
        teacher = get_teachers(cfg.teacher, corpus, cfg.data.num_classes, cfg.cache_dir, log)
    return Prepared(corpus, encoded, teacher)


def student_inputs(encoded: dict[int, EncodedData], logits: dict[str, np.ndarray] | None,
                   cfg: ExperimentConfig) -> tuple[EncodedData, np.ndarray | None]:
    """(data, teacher logits) for one student: the encoding of its vocab size, with its transfer rows (the first
    `data.transfer_rows` rows that came from the transfer file, plus every augmented row), and the teacher logits
    aligned with train rows followed by those transfer rows. alpha == 1: no teacher logits and no transfer rows."""
    data = encoded[cfg.tokenizer.vocab_size]
    if cfg.train.alpha >= 1.0 or logits is None:
        return replace(data, transfer=None), None
    if data.transfer is None:
        return data, logits["train"]
    n_file = data.transfer_file_rows
    take = n_file if cfg.data.transfer_rows is None else min(cfg.data.transfer_rows, n_file)
    idx = np.r_[np.arange(take), np.arange(n_file, len(data.transfer))]
    if len(idx) == 0:
        return replace(data, transfer=None), logits["train"]
    transfer = data.transfer if len(idx) == len(data.transfer) else data.transfer.take(idx)
    return replace(data, transfer=transfer), np.concatenate([logits["train"], logits["transfer"][idx]])
