"""Small file helpers shared by the data, teacher and loop modules: hashing and atomic writes.

Every file this project writes goes through a temporary name in the same folder and `os.replace`, so a crash
mid-write never leaves a file that later loads as valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pyarrow import PythonFile
from pyarrow import fs as pafs


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_dir(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """Hash of the names and contents of the files directly in `path` that match `patterns`."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in Path(path).glob(pat) if p.is_file()})
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------- Ray's storage writes


class _ReplaceOnClose:
    """A binary file written under a temporary name and renamed onto its path when closed without error."""

    def __init__(self, path: str):
        self._path = path
        fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=os.path.dirname(path) or ".")
        self._f = os.fdopen(fd, "wb")
        self._failed = False
        self.closed = False

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self._failed = True
            self.close()  # the caller may never close a stream whose write failed: leave no temporary behind
            raise

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._f.close()  # flushes: a full disk can fail here too
            if not self._failed:
                os.replace(self._tmp, self._path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


class AtomicLocalFS(pafs.FileSystemHandler):
    """A pyarrow filesystem handler for local (or NFS) storage whose every written file appears whole or not at all.

    Ray Tune copies its experiment state, per-trial results and checkpoints into the storage path with plain
    writes; when the disk fills mid-copy, the old `experiment_state-*.json` is left truncated and a later resume
    starts the sweep over. Given to Ray as `storage_filesystem`, this handler writes each file to a temporary name
    beside it and renames it on success, so the last good state and checkpoints stay readable.
    No fsync: this guards against failed writes and crashed processes, not against power loss.
    """

    def __init__(self):
        self._fs = pafs.LocalFileSystem()

    def __reduce__(self):  # pickled with Ray's storage context to every trial
        return (AtomicLocalFS, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalFS)

    def __ne__(self, other) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "local+atomic"

    def normalize_path(self, path):
        return self._fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self._fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self._fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path):
        self._fs.delete_file(path)

    def move(self, src, dest):
        self._fs.move(src, dest)

    def copy_file(self, src, dest):
        with open(src, "rb") as fin:
            out = _ReplaceOnClose(dest)
            try:
                shutil.copyfileobj(fin, out)
            finally:
                out.close()

    def open_input_stream(self, path):
        return self._fs.open_input_stream(path)

    def open_input_file(self, path):
        return self._fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return PythonFile(_ReplaceOnClose(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self._fs.open_append_stream(path)


def atomic_local_filesystem():
    """`AtomicLocalFS` as a pyarrow filesystem (what Ray's `storage_filesystem` takes)."""
    return pafs.PyFileSystem(AtomicLocalFS())
