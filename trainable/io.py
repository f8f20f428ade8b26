"""Small file helpers shared by the data, teacher and loop modules: hashing and atomic writes.

Every file this project writes goes through a temporary name in the same folder and `os.replace`, so a crash
mid-write never leaves a file that later loads as valid. A temporary name says which process made it
(`.NAME.<pid>-<host>-<random>.tmp`): one left by a writer that was killed (SIGKILL: no `finally` ran) is removed
by the next write into that folder, once that process is gone.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import sys
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


# ----------------------------------------------------------------------------- names that say who made them


def _host_id() -> str:
    """This machine (hostname and kernel boot), so that a process id is only ever checked where it means something:
    on a cluster the nodes share the results folder, and node B must not take node A's live writer for dead."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).hexdigest()[:8]


_HOST = _host_id()
_OWNED = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{8}\.(?P<kind>[a-z]+)$")


def owned_sibling(path: str | Path, kind: str) -> Path:
    """`.NAME.<pid>-<host>-<random>.<kind>` beside `path`: a temporary or set-aside name that records which process
    made it, so one left by a process that died can be recognised (`dead_siblings`)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}-{_HOST}-{secrets.token_hex(4)}.{kind}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def dead_siblings(folder: str | Path, kind: str, name: str | None = None) -> list[Path]:
    """The `owned_sibling` names of `kind` in `folder` (for `name` only, if given) whose process, on this machine,
    has exited. Names made elsewhere, or not by `owned_sibling`, are never listed."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for entry in entries:
        m = _OWNED.match(entry.name)
        if (m and m["kind"] == kind and m["host"] == _HOST and (name is None or m["name"] == name)
                and not _alive(int(m["pid"]))):
            out.append(Path(entry.path))
    return sorted(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_dead_temps(folder: str | Path) -> None:
    """Remove the temporary files and folders in `folder` that a killed writer left behind."""
    for tmp in dead_siblings(folder, "tmp"):
        _remove(tmp)


def remove_dead_temps_below(root: str | Path) -> None:
    """`remove_dead_temps` in `root` and every folder under it: for a folder that is never written again, such as
    a checkpoint whose temporary file could not be removed when its storage turned read-only."""
    for folder, _, _ in os.walk(root):
        remove_dead_temps(folder)  # a removed temporary folder is then skipped by os.walk (its scandir fails)


# ----------------------------------------------------------------------------- swapping two names at once


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()  # None where the C library has no renameat2 (not Linux, old glibc, musl < 1.2.?)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap the names `a` and `b` (files or folders) in one step: at no moment is either name missing. False, with
    nothing changed, where the system cannot (no renameat2, or a filesystem without RENAME_EXCHANGE)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent)
    tmp = owned_sibling(path, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _restore_set_aside(path: Path) -> None:
    """Undo what a killed `atomic_dir` (where renameat2 is missing) left between its two renames: the old folder is
    set aside and the new one is not in yet, so the set-aside copy goes back. If `path` is there, the new folder got
    in and the set-aside copy is left-over garbage."""
    for aside in dead_siblings(path.parent, "old", name=path.name):
        if not os.path.lexists(path):
            os.rename(aside, path)
        else:
            _remove(aside)


def _rename_if_missing(tmp: Path, path: Path) -> bool:
    """Rename the folder `tmp` to `path` if nothing is there; False if something is, or came there since the look
    (another process writing the same folder renamed its own in first: `rename` will not replace a full folder)."""
    if os.path.lexists(path):
        return False
    try:
        os.rename(tmp, path)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on error it is removed. At no moment
    is `path` missing: the two names are swapped in one step (renameat2 RENAME_EXCHANGE) and the old contents,
    then under the temporary name, deleted after. Without renameat2 the old folder is set aside, the new one renamed
    in, and only then the old one deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path.parent)
    _restore_set_aside(path)
    tmp = owned_sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        # After a swap, `tmp` holds the old contents: removed below.
        if not _rename_if_missing(tmp, path) and not exchange(tmp, path):
            aside = owned_sibling(path, "old")
            os.rename(path, aside)
            try:
                os.rename(tmp, path)  # killed between the two: the next atomic_dir(path) puts `aside` back
            except BaseException:
                os.rename(aside, path)
                raise
            _remove(aside)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ----------------------------------------------------------------------------- Ray's storage writes


class _ReplaceOnClose:
    """A binary file written under a temporary name and renamed onto its path when closed without error. A partial
    file never gets the final name: closed while an exception raised since it was opened is propagating (a `with`
    block or `finally` the caller left by raising), aborted (`abort`), or dropped unclosed (pyarrow's C++ copy drops
    the stream when a read fails), it is discarded."""

    def __init__(self, path: str):
        self._path = path
        folder = os.path.dirname(path) or "."
        remove_dead_temps(folder)
        self._tmp = str(owned_sibling(path, "tmp"))
        self._f = open(self._tmp, "xb")
        self._raising_at_open = sys.exc_info()[1]  # opened inside an `except`: that exception is not ours
        self._failed = False
        self.closed = False

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except BaseException:
            self.abort()  # the caller may never close a stream whose write failed: leave no temporary behind
            raise

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self._f.tell()

    def writable(self) -> bool:
        return True

    def abort(self) -> None:
        """Close and discard: the final name keeps what it had."""
        self._failed = True
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        raising = sys.exc_info()[1]
        failed = self._failed or (raising is not None and raising is not self._raising_at_open)
        self._raising_at_open = None
        try:
            self._f.close()  # flushes: a full disk can fail here too
            if not failed:
                os.replace(self._tmp, self._path)
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)

    def __del__(self):
        if not getattr(self, "closed", True):
            with contextlib.suppress(Exception):
                self.abort()


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
            except BaseException:
                out.abort()  # a read that failed half-way: `dest` keeps what it had
                raise
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
