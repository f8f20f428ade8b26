"""The content-addressed caches under a config's `cache_dir`: one way to find an entry, tell whether it is whole,
and build it.

An entry is `<cache_dir>/<kind>/<name>`, its name made from a hash of what produced it (a tokenizer, the student's
encodings, a teacher, its logits, a pre-trained encoder, a task's encodings). A file entry is complete when it is
there; a folder entry when its marker file (written last) is in it. A missing or incomplete entry is built under a
temporary name beside it and renamed in (`trainable/io.py`: `atomic_path`, `atomic_dir`), so a reader never sees
half of one, a builder that fails leaves nothing, and two processes building the same entry at once both succeed:
each wrote it whole and the last rename wins. Checks that need an entry's contents (the logits' metadata and row
ids) stay with the module that owns it; it says `stale` when the entry it read must be built again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from .io import atomic_dir, atomic_path

Log = Callable[[str], None]


class Entry(NamedTuple):
    path: Path  # the entry's final name
    hit: bool  # found complete: the builder did not run
    built: Any = None  # what the builder returned (None on a hit)


def entry_path(root: str | Path, kind: str, name: str) -> Path:
    return Path(root) / kind / name


def is_complete(path: Path, marker: str | None = None) -> bool:
    """A folder entry is whole once its marker is in it; a file entry once it has its name."""
    return (path / marker).is_file() if marker is not None else path.is_file()


def cached(root: str | Path, kind: str, name: str, build: Callable[[Path], Any], *, marker: str | None = None,
           what: str | None = None, log: Log = print, note: Callable[[Path], str] | None = None,
           stale: bool = False) -> Entry:
    """The entry `<root>/<kind>/<name>`: a hit when it is complete (and not `stale`), else built by `build(tmp)`,
    which writes a file at `tmp` (no `marker`) or fills the folder `tmp` ending with `marker`, then renamed in.

    A hit is logged as "<what>: cache hit <path>", followed by " (<note(path)>)" when `note` is given; without
    `what` a hit is silent (the tokenizers: asked for many times a run)."""
    path = entry_path(root, kind, name)
    if not stale and is_complete(path, marker):
        if what is not None:
            log(f"{what}: cache hit {path}" + (f" ({note(path)})" if note is not None else ""))
        return Entry(path, True)
    with (atomic_path(path) if marker is None else atomic_dir(path)) as tmp:
        built = build(tmp)
        if marker is not None and not (tmp / marker).is_file():  # it would never hit: every call would build again
            raise RuntimeError(f"{path}: the builder wrote no {marker}")
    return Entry(path, False, built)
