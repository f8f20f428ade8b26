"""Prepare once, on the driver: corpus -> student encodings -> teacher -> teacher logits. Idempotent: every step
is cached by a hash of what produced it, so a second call only reads files."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from .config import ExperimentConfig
from .data import Corpus, EncodedData, encode_corpus, load_corpus
from .teacher import Teacher, get_logits, get_teacher


@dataclass(frozen=True)
class Prepared:
    corpus: Corpus
    encoded: dict[int, EncodedData]  # by student vocab size
    teacher: Teacher | None  # None when no student needs one (alpha == 1 everywhere)
    logits: dict[str, np.ndarray] | None  # {"train": (N, C), "val": (N_val, C)} in corpus row order


def prepare(cfg: ExperimentConfig, log: Callable[[str], None] = print, vocab_sizes: Iterable[int] | None = None,
            need_teacher: bool = True) -> Prepared:
    corpus = load_corpus(cfg.data, log)
    sizes = sorted(set(vocab_sizes or [cfg.tokenizer.vocab_size]))
    encoded = {v: encode_corpus(corpus, cfg.tokenizer, cfg.cache_dir, log, v) for v in sizes}
    teacher = logits = None
    if need_teacher:
        teacher = get_teacher(cfg.teacher, corpus, cfg.data.num_classes, cfg.cache_dir, log)
        logits = get_logits(teacher, corpus, cfg.teacher, cfg.cache_dir, log)
    return Prepared(corpus, encoded, teacher, logits)
