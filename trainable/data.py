"""Corpus loading, splitting, the student's WordPiece tokenizer and the encoded-data cache.

    corpus files (NSMC TSV, or CSV/TSV/Parquet with named columns)
      -> Table (ids, texts, labels) per split; validation carved from train with a fixed seed
    transfer set (unlabeled text: a file, and/or augmented copies of the training reviews)
      -> Table with label -1 (no label: the teacher's soft labels are its only target)
      -> tokenizer.json (WordPiece, trained on the training split, optionally on the transfer text too)
      -> encoded splits (flat int32 tokens + offsets), cached as Parquet keyed by (data, tokenizer, max length)

Bad data raises `DataError` with one line naming the file, the line or column, and what was expected.

tokenizers and pyarrow.compute are imported inside the functions that use them, so reading a table or the config does
not load them.
"""
from __future__ import annotations

import csv
import io
import shutil
import sys
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import NSMC_URL, DataConfig, TokenizerConfig
from .errors import DataError
from .cache import cached, entry_path
from .io import sha256_file, sha256_json

Log = Callable[[str], None]
NSMC_ROWS = {"ratings_train.txt": 150_000, "ratings_test.txt": 50_000}
PAD, UNK = 0, 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NO_LABEL = -1  # a transfer row's label


@dataclass(frozen=True)
class Table:
    ids: np.ndarray  # (N,) int64 row ids
    texts: list[str]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray) -> "Table":
        return Table(self.ids[idx], [self.texts[i] for i in idx], self.labels[idx])


@dataclass(frozen=True)
class Corpus:
    train: Table
    val: Table
    test: Table
    key: str  # hash of the file contents and every setting that shaped the splits
    files: tuple[str, str]
    transfer: Table | None = None  # unlabeled rows (label NO_LABEL): the file's in a seeded order, then augmented
    transfer_key: str | None = None  # hash of the transfer file, the augmentation and the rows taken
    transfer_file_rows: int = 0  # how many of the transfer rows came from the file (the rest are augmented copies)

    def split(self, name: str) -> Table:
        table = getattr(self, name)
        if table is None:
            raise ValueError(f"the corpus has no {name} split")
        return table


# ----------------------------------------------------------------------------- reading


def _read_utf8(path: Path) -> str:
    """The file's text (UTF-8, a BOM allowed); an undecodable byte is a DataError naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: expected UTF-8 text, found undecodable byte 0x{raw[e.start]:02x}") from None


def _split_rows(text: str, csv_file: bool) -> list[list[str]]:
    """CSV rows (the csv module), or tab-separated rows: NSMC has literal quotes inside reviews, so a TSV is split on
    tabs and quotes are never interpreted. A final newline ends the last row; CR of CRLF line ends is dropped."""
    if csv_file:
        return list(csv.reader(io.StringIO(text)))
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [[c.rstrip("\r") for c in line.split("\t")] for line in lines]


def _read_rows(path: Path) -> tuple[list[str], list[list[str]], int]:
    """Header, rows and the line number of the first row of a CSV/TSV file (UTF-8, strict)."""
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; expected a header line and at least one row")
    rows = _split_rows(text, path.suffix.lower() == ".csv")
    return rows[0], rows[1:], 2


# What this process has read: (file, its mtime and size, the columns and classes read) -> Table. A sweep's driver
# reads the corpus for the planner's counts and again to prepare; the 150K-row NSMC train file takes about a second.
_READ: dict[tuple, Table] = {}


def read_table(path: str | Path, cfg: DataConfig) -> Table:
    """Read one split. Empty documents are kept as empty strings (the student sees a single [UNK]). A file this
    process read before, unchanged since (same mtime and size), is not parsed again; each caller gets its own
    copy."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, cfg.text_column, cfg.label_column, cfg.id_column,
           cfg.num_classes)
    if key not in _READ:
        if len(_READ) >= 4:
            _READ.pop(next(iter(_READ)))
        _READ[key] = _read_table(path, cfg)
    t = _READ[key]
    return Table(t.ids.copy(), list(t.texts), t.labels.copy())


def _read_table(path: Path, cfg: DataConfig) -> Table:
    wanted = [cfg.text_column, cfg.label_column] + ([cfg.id_column] if cfg.id_column else [])
    if path.suffix.lower() == ".parquet":
        try:
            tbl = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        for col in wanted:
            if col not in tbl.column_names:
                raise DataError(f"{path}: missing column '{col}'; found {tbl.column_names}")
        if tbl.num_rows == 0:
            raise DataError(f"{path}: the file has no rows")
        texts = ["" if t is None else str(t) for t in tbl.column(cfg.text_column).to_pylist()]
        raw_labels = tbl.column(cfg.label_column).to_pylist()
        raw_ids = tbl.column(cfg.id_column).to_pylist() if cfg.id_column else None
        first_line = 1
        labels = [_label(path, first_line + i, v, cfg.num_classes, "row") for i, v in enumerate(raw_labels)]
    else:
        header, rows, first_line = _read_rows(path)
        header = [h.strip() for h in header]
        cols = {}
        for col in wanted:
            if col not in header:
                raise DataError(f"{path}:1: missing column '{col}' in header; found {header}")
            cols[col] = header.index(col)
        if not rows:
            raise DataError(f"{path}: the file has a header but no rows")
        width = max(cols.values()) + 1
        texts, labels, raw_ids = [], [], [] if cfg.id_column else None
        for i, r in enumerate(rows):
            line = first_line + i
            if len(r) < width:
                raise DataError(f"{path}:{line}: expected {len(header)} fields, found {len(r)}")
            texts.append(r[cols[cfg.text_column]])
            labels.append(_label(path, line, r[cols[cfg.label_column]], cfg.num_classes, "line"))
            if raw_ids is not None:
                raw_ids.append(r[cols[cfg.id_column]])
    if raw_ids is None:
        ids = np.arange(len(texts), dtype=np.int64)
    else:
        try:
            ids = np.asarray([int(x) for x in raw_ids], dtype=np.int64)
        except (TypeError, ValueError):
            ids = np.arange(len(texts), dtype=np.int64)  # non-numeric ids: fall back to row numbers
    return Table(ids, texts, np.asarray(labels, dtype=np.int64))


def _label(path: Path, line: int, value: object, num_classes: int, unit: str) -> int:
    try:
        label = int(str(value).strip())
        if 0 <= label < num_classes:
            return label
    except ValueError:
        pass
    where = f"{path}:{line}" if unit == "line" else f"{path}: row {line}"
    raise DataError(f"{where}: expected a label in {list(range(num_classes))}, got {value!r}")


# ----------------------------------------------------------------------------- getting the files


def download_nsmc(url: str, dest: Path, files: tuple[str, ...], log: Log, expected_rows: dict | None = None) -> None:
    """Download the corpus files into `dest`, check header, row count and labels, then rename into place.

    Nothing is left in `dest` unless every file passed its checks.
    """
    if expected_rows is None:
        expected_rows = NSMC_ROWS if url == NSMC_URL else {}
    dest.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for name in files:
            src = url.rstrip("/") + "/" + name
            log(f"downloading {src}")
            tmp = dest / f".{name}.download"
            try:
                with urllib.request.urlopen(src, timeout=60) as resp, open(tmp, "wb") as out:
                    shutil.copyfileobj(resp, out)
            except (urllib.error.URLError, OSError) as e:
                raise DataError(f"{src}: download failed ({e}); put the files in {dest} by hand or fix data.url")
            header, rows, first = _read_rows(tmp)
            if [h.strip() for h in header] != ["id", "document", "label"]:
                raise DataError(f"{src}:1: expected the NSMC header 'id<TAB>document<TAB>label', got {header}")
            want = expected_rows.get(name)
            if want is not None and len(rows) != want:
                raise DataError(f"{src}: expected {want} rows, got {len(rows)}")
            for i, r in enumerate(rows):
                if len(r) != 3 or r[2] not in ("0", "1"):
                    raise DataError(f"{src}:{first + i}: expected 'id<TAB>document<TAB>label' with label 0 or 1")
            staged.append((tmp, dest / name))
        for tmp, final in staged:
            tmp.replace(final)
            log(f"wrote {final} ({final.stat().st_size / 1e6:.1f} MB)")
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for name in files:
            (dest / f".{name}.download").unlink(missing_ok=True)


def locate_files(cfg: DataConfig, log: Log, download: bool = True) -> tuple[Path, Path]:
    """The train and test files: from the first mirror that has both, else `dir`, downloading there if allowed."""
    for folder in [*cfg.mirrors, cfg.dir]:
        train, test = Path(folder) / cfg.train_file, Path(folder) / cfg.test_file
        if train.is_file() and test.is_file():
            return train, test
    folder = Path(cfg.dir)
    if not (download and cfg.download):
        missing = folder / cfg.train_file
        raise DataError(f"{missing}: file not found (data.download is off; looked in {[*cfg.mirrors, cfg.dir]})")
    missing = tuple(n for n in (cfg.train_file, cfg.test_file) if not (folder / n).is_file())
    log(f"corpus not found in {[*cfg.mirrors, cfg.dir]}; downloading into {folder}")
    download_nsmc(cfg.url, folder, missing, log)
    return folder / cfg.train_file, folder / cfg.test_file


def load_corpus(cfg: DataConfig, log: Log = print, download: bool = True, transfer_rows: int | None = -1) -> Corpus:
    """Read train and test, take the configured subsets, carve validation from train with `cfg.seed`, and load the
    transfer set (`transfer_rows` rows of the file; -1: `cfg.transfer_rows`; the most any trial of a sweep uses)."""
    train_path, test_path = locate_files(cfg, log, download)
    full_train = read_table(train_path, cfg)
    test = read_table(test_path, cfg)
    rng = np.random.default_rng(cfg.seed)
    if cfg.train_rows is not None and cfg.train_rows < len(full_train):
        full_train = full_train.take(np.sort(rng.choice(len(full_train), cfg.train_rows, replace=False)))
    if cfg.test_rows is not None and cfg.test_rows < len(test):
        test = test.take(np.sort(rng.choice(len(test), cfg.test_rows, replace=False)))
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(full_train))
    n_val = max(1, int(round(len(full_train) * cfg.val_fraction)))
    if n_val >= len(full_train):
        raise DataError(f"{train_path}: {len(full_train)} rows is too few to carve a validation split")
    val, train = full_train.take(np.sort(perm[:n_val])), full_train.take(np.sort(perm[n_val:]))
    settings = cfg.model_dump(exclude={"dir", "mirrors", "download", "url", "transfer_file", "transfer_rows", "augment"})
    key = sha256_json({"train": sha256_file(train_path), "test": sha256_file(test_path), "cfg": settings})
    log(f"data: train {len(train)}, validation {len(val)}, test {len(test)} rows from {train_path.parent}")
    transfer, transfer_key, n_file = load_transfer(cfg, train, cfg.transfer_rows if transfer_rows == -1 else transfer_rows,
                                                   log)
    return Corpus(train, val, test, key[:16], (str(train_path), str(test_path)), transfer, transfer_key, n_file)


# ----------------------------------------------------------------------------- transfer set


def locate_transfer(cfg: DataConfig) -> Path:
    """The transfer file: an absolute path, else the first of mirrors/dir/working directory that has it."""
    name = Path(cfg.transfer_file)
    if name.is_absolute():
        candidates = [name]
    else:
        candidates = [Path(folder) / name for folder in [*cfg.mirrors, cfg.dir]] + [name]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise DataError(f"data.transfer_file: {cfg.transfer_file} not found (looked in "
                    f"{[str(c.parent) for c in candidates]}); expected unlabeled text, one review per line or a "
                    f"TSV/CSV/Parquet with a '{cfg.text_column}' column")


def read_texts(path: Path | str, text_column: str, tab_means_table: bool = False) -> list[str]:
    """Unlabeled text, from a file or "-" (stdin): Parquet/CSV/TSV with `text_column`, or one review per line. A
    plain file whose first line, split on tabs, names `text_column` is read as TSV; with `tab_means_table`, any
    first line holding a tab is taken for a table header, so a TSV without the column is an error rather than its
    raw lines taken for reviews. The one reader of corpus-like text files (corpus splits: `read_table`)."""
    name = "<stdin>" if str(path) == "-" else str(path)
    suffix = "" if str(path) == "-" else Path(path).suffix.lower()
    if suffix == ".parquet":
        try:
            tbl = pq.read_table(path, columns=[text_column])
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise DataError(f"{path}: expected a Parquet file with a '{text_column}' column ({e})") from None
        texts = ["" if t is None else str(t) for t in tbl.column(text_column).to_pylist()]
    else:
        text = sys.stdin.read() if str(path) == "-" else _read_utf8(Path(path))
        rows = _split_rows(text, suffix == ".csv")
        header = [h.strip() for h in rows[0]] if rows else []
        if suffix == ".csv" or text_column in header or (tab_means_table and len(header) > 1):
            if text_column not in header:
                kind = "CSV" if suffix == ".csv" else "tab-separated"
                raise DataError(f"{name}:1: missing column '{text_column}' in the {kind} header; found {header}")
            col = header.index(text_column)
            texts = []
            for i, r in enumerate(rows[1:], 2):
                if len(r) <= col and suffix != ".csv":
                    raise DataError(f"{name}:{i}: expected {len(header)} tab-separated fields, found {len(r)}")
                texts.append(r[col] if len(r) > col else "")
        else:
            texts = ["\t".join(r) for r in rows]  # one review per line
    if not texts:
        raise DataError(f"{name}: no text rows; expected unlabeled reviews, one per line or a table with a "
                        f"'{text_column}' column")
    return texts


def augment_texts(texts: list[str], samples: int, mask_prob: float, ngram_prob: float, max_ngram: int,
                  seed: int) -> list[str]:
    """Tang et al. 2019's augmentation, on words: `samples` copies of each text; in each copy every word is
    replaced by [MASK] with probability `mask_prob`, then with probability `ngram_prob` the copy is cut to a random
    window of 1..`max_ngram` words. Copies identical to their source are kept (the teacher labels them anyway)."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = text.split()
        for _ in range(samples):
            if not words:
                out.append(text)
                continue
            masked = np.where(rng.random(len(words)) < mask_prob, "[MASK]", np.asarray(words, dtype=object))
            if rng.random() < ngram_prob:
                n = int(rng.integers(1, min(max_ngram, len(words)) + 1))
                start = int(rng.integers(0, len(words) - n + 1))
                masked = masked[start:start + n]
            out.append(" ".join(masked))
    return out


def load_transfer(cfg: DataConfig, train: Table, rows: int | None,
                  log: Log = print) -> tuple[Table | None, str | None, int]:
    """The transfer set: the file's rows in a seeded order (first `rows` of them), then the augmented copies of the
    training reviews. Labels are NO_LABEL. None when neither is configured."""
    if cfg.transfer_file is None and cfg.augment.samples == 0:
        return None, None, 0
    texts, parts = [], {}
    if cfg.transfer_file is not None and rows != 0:
        path = locate_transfer(cfg)
        file_texts = read_texts(path, cfg.text_column)
        order = np.random.default_rng(cfg.seed + 2).permutation(len(file_texts))
        if rows is not None:
            order = order[:rows]
        texts = [file_texts[i] for i in order]
        parts["file"] = {"sha256": sha256_file(path), "rows": len(texts), "column": cfg.text_column, "seed": cfg.seed}
        log(f"transfer set: {len(texts)} of {len(file_texts)} reviews from {path}")
    n_file = len(texts)
    if cfg.augment.samples > 0:
        a = cfg.augment
        aug = augment_texts(train.texts, a.samples, a.mask_prob, a.ngram_prob, a.max_ngram, a.seed)
        parts["augment"] = {**a.model_dump(), "train": sha256_json(train.texts)}
        log(f"transfer set: {len(aug)} augmented copies of {len(train)} training reviews")
        texts += aug
    if not texts:
        return None, None, 0
    table = Table(np.arange(len(texts), dtype=np.int64), texts, np.full(len(texts), NO_LABEL, dtype=np.int64))
    return table, sha256_json(parts)[:16], n_file


# ----------------------------------------------------------------------------- tokenizer


def train_wordpiece(texts: list[str], vocab_size: int, min_frequency: int = 2, limit_alphabet: int = 1500):
    """A WordPiece tokenizer (NFKC, whitespace pre-tokenizer) trained on `texts`; [PAD] is id 0, [UNK] id 1.

    Deterministic: the same texts give the same tokenizer, in any process. The trainer alone is not: it keeps the
    `limit_alphabet` most frequent characters but breaks ties among equally rare ones in hash-map order, and it
    numbers the "##" continuation characters in hash-map order too, which then decides which of two equally
    frequent merges enters the vocabulary. So the alphabet is chosen here (by count, then by character) and handed
    to the trainer with a limit of its own size, and the continuation characters the trainer would add are handed
    to it first, in character order, as reserved tokens. The result is then renumbered (special tokens first, every
    other token in string order) into a plain WordPiece model, with only the real special tokens marked special."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def blank():
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        return tok

    tok = blank()
    counts: Counter = Counter()
    inner: set[str] = set()  # characters seen inside a word, after its first
    for t in texts:
        norm = tok.normalizer.normalize_str(t)
        counts.update(norm)
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(norm):
            inner.update(word[1:])
    alphabet = sorted((c for c in counts if not c.isspace()), key=lambda c: (-counts[c], c))[:limit_alphabet]
    continuation = ["##" + c for c in sorted(inner.intersection(alphabet))]
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=len(alphabet), initial_alphabet=alphabet,
        special_tokens=SPECIAL_TOKENS + continuation, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    rest = sorted(t for t in tok.get_vocab() if t not in SPECIAL_TOKENS)
    out = blank()
    out.model = models.WordPiece({t: i for i, t in enumerate(SPECIAL_TOKENS + rest)}, unk_token="[UNK]")
    out.add_special_tokens(SPECIAL_TOKENS)
    return out


def tokenizer_path(corpus: Corpus, cfg: TokenizerConfig, cache_dir: str | Path, vocab_size: int | None = None) -> Path:
    vocab = vocab_size or cfg.vocab_size
    parts = {"data": corpus.key, "vocab": vocab, "min_freq": cfg.min_frequency, "alpha": cfg.limit_alphabet}
    if cfg.train_on_transfer and corpus.transfer is not None:
        parts["transfer"] = corpus.transfer_key
    key = sha256_json(parts)
    return entry_path(cache_dir, "tokenizers", f"wordpiece-{vocab}-{key[:12]}.json")


def get_tokenizer(corpus: Corpus, cfg: TokenizerConfig, cache_dir: str | Path, log: Log = print,
                  vocab_size: int | None = None) -> Path:
    """The cached tokenizer.json for this training split and vocab size, trained if missing (or `tokenizer.file`)."""
    if cfg.file is not None:
        if not Path(cfg.file).is_file():
            raise DataError(f"tokenizer.file: {cfg.file} not found (expected a tokenizer.json)")
        return Path(cfg.file)
    path = tokenizer_path(corpus, cfg, cache_dir, vocab_size)

    def build(tmp: Path) -> None:
        vocab = vocab_size or cfg.vocab_size
        texts = corpus.train.texts
        if cfg.train_on_transfer and corpus.transfer is not None:
            texts = texts + corpus.transfer.texts
        log(f"training WordPiece tokenizer (vocab {vocab}) on {len(texts)} reviews")
        train_wordpiece(texts, vocab, cfg.min_frequency, cfg.limit_alphabet).save(str(tmp))

    return cached(cache_dir, "tokenizers", path.name, build).path  # a hit is silent: asked for many times a run


# ----------------------------------------------------------------------------- encoded data


@dataclass(frozen=True)
class EncodedSplit:
    """A split as flat int32 token ids plus offsets: compact, zero-copy through Ray's object store."""

    ids: np.ndarray  # (N,) int64 row ids
    labels: np.ndarray  # (N,) int64
    tokens: np.ndarray  # (sum of lengths,) int32
    offsets: np.ndarray  # (N + 1,) int64

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, idx: np.ndarray) -> "EncodedSplit":
        """The rows `idx`, in that order (a copy)."""
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[:-1][idx]
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return EncodedSplit(self.ids[idx], self.labels[idx], self.tokens[flat], offsets)

    @staticmethod
    def concat(a: "EncodedSplit", b: "EncodedSplit") -> "EncodedSplit":
        return EncodedSplit(np.concatenate([a.ids, b.ids]), np.concatenate([a.labels, b.labels]),
                            np.concatenate([a.tokens, b.tokens]),
                            np.concatenate([a.offsets, b.offsets[1:] + a.offsets[-1]]))

    def padded(self, max_len: int | None = None, dtype=np.int64) -> np.ndarray:
        """(N, max_len) token ids, right-padded with PAD."""
        lengths = self.lengths
        width = int(lengths.max()) if max_len is None else max_len
        out = np.full((len(self), width), PAD, dtype=dtype)
        mask = np.arange(width)[None, :] < np.minimum(lengths, width)[:, None]
        row_start = self.offsets[:-1]
        cols = np.nonzero(mask)
        out[cols] = self.tokens[row_start[cols[0]] + cols[1]]
        return out


@dataclass(frozen=True)
class EncodedData:
    train: EncodedSplit
    val: EncodedSplit
    test: EncodedSplit
    vocab_size: int
    tokenizer_file: str
    key: str
    transfer: EncodedSplit | None = None  # unlabeled rows (label NO_LABEL), in the corpus's order
    transfer_file_rows: int = 0  # the first rows of `transfer` came from the file; the rest are augmented copies


def encode_texts(tok, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat tokens and offsets; an empty review becomes a single [UNK] so every sequence has length >= 1."""
    encs = tok.encode_batch(texts, add_special_tokens=False)
    seqs = [e.ids[:max_length] or [UNK] for e in encs]
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return tokens, offsets


def _write_split(path: Path, splits: dict[str, tuple[Table, np.ndarray, np.ndarray]], meta: dict) -> None:
    """The splits as one Parquet file at `path` (a cache entry's temporary name)."""
    arrays = {"split": [], "row_id": [], "label": [], "tokens": []}
    for name, (table, tokens, offsets) in splits.items():
        arrays["split"] += [name] * len(table)
        arrays["row_id"].append(table.ids)
        arrays["label"].append(table.labels)
        arrays["tokens"].append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens)))
    tbl = pa.table({
        "split": pa.array(arrays["split"], pa.string()),
        "row_id": pa.array(np.concatenate(arrays["row_id"])),
        "label": pa.array(np.concatenate(arrays["label"])),
        "tokens": pa.concat_arrays(arrays["tokens"]),
    }).replace_schema_metadata({k: str(v) for k, v in meta.items()})
    pq.write_table(tbl, path)


def _read_split(tbl: pa.Table, name: str) -> EncodedSplit:
    import pyarrow.compute as pc

    part = tbl.filter(pc.equal(tbl.column("split"), name))
    lists = part.column("tokens").combine_chunks()
    offsets = np.asarray(lists.offsets, dtype=np.int64)
    tokens = np.asarray(lists.values, dtype=np.int32)
    offsets = offsets - offsets[0]
    return EncodedSplit(
        part.column("row_id").to_numpy().astype(np.int64), part.column("label").to_numpy().astype(np.int64),
        tokens[: offsets[-1]].copy(), offsets,
    )


def encode_corpus(corpus: Corpus, cfg: TokenizerConfig, cache_dir: str | Path, log: Log = print,
                  vocab_size: int | None = None) -> EncodedData:
    """Encoded train/val/test for the student, from the cache when (data, tokenizer, max length) match."""
    from tokenizers import Tokenizer

    tok_path = get_tokenizer(corpus, cfg, cache_dir, log, vocab_size)
    key = sha256_json({"data": corpus.key, "tokenizer": sha256_file(tok_path), "max_length": cfg.max_length})[:16]
    tok = Tokenizer.from_file(str(tok_path))

    def build(tmp: Path) -> None:
        log(f"encoding {len(corpus.train) + len(corpus.val) + len(corpus.test)} reviews (max length {cfg.max_length})")
        splits = {}
        for name in ("train", "val", "test"):
            table = getattr(corpus, name)
            splits[name] = (table, *encode_texts(tok, table.texts, cfg.max_length))
        _write_split(tmp, splits, {"data_key": corpus.key, "tokenizer": str(tok_path), "max_length": cfg.max_length})

    path = cached(cache_dir, "encoded", f"encoded-{key}.parquet", build, what="encoded data", log=log).path
    tbl = pq.read_table(path)
    transfer = None
    if corpus.transfer is not None:
        tkey = sha256_json({"transfer": corpus.transfer_key, "tokenizer": sha256_file(tok_path),
                            "max_length": cfg.max_length})[:16]

        def build_transfer(tmp: Path) -> None:
            log(f"encoding {len(corpus.transfer)} transfer reviews")
            _write_split(tmp, {"transfer": (corpus.transfer, *encode_texts(tok, corpus.transfer.texts, cfg.max_length))},
                         {"transfer_key": corpus.transfer_key, "tokenizer": str(tok_path), "max_length": cfg.max_length})

        tpath = cached(cache_dir, "encoded", f"transfer-{tkey}.parquet", build_transfer, what="encoded transfer set",
                       log=log).path
        transfer = _read_split(pq.read_table(tpath), "transfer")
    return EncodedData(
        _read_split(tbl, "train"), _read_split(tbl, "val"), _read_split(tbl, "test"),
        tok.get_vocab_size(), str(tok_path), key, transfer, corpus.transfer_file_rows,
    )
