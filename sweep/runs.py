"""Run and results folders: claimed without overwriting, and stamped with the resolved config, the command line
and the code version."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import yaml

from trainable.io import dead_siblings, exchange, owned_sibling, write_json, write_text

from .config import Config, ConfigError


class StorageError(RuntimeError):
    """The results folder became unwritable mid-sweep (full disk, read-only mount)."""


def code_version() -> dict:
    """The package version and, inside a git checkout, the commit and whether the tree had changes."""
    try:
        pkg = version("kd-sweep")
    except PackageNotFoundError:
        pkg = "unknown"
    out = {"package": pkg}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10)
            out["dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class Claim:
    """`path` made ready for a new run, without losing the one there before until the new one has started.

    An existing non-empty folder is an error unless `force` or `resume`. With `resume` it is kept as it is. With
    `force` it is renamed aside (`.NAME.<pid>-<host>-<random>.prev`) and an empty folder takes its name; `commit()`
    (the new run passed its checks and started) deletes the old one, `rollback()` (anything failed before that, or
    Ctrl-C) swaps it back and removes what the new run wrote. Rollback never deletes a folder the claim did not
    make: a folder that was there empty is emptied again, a resumed one is left alone. Used as a context manager:
    rollback on any exception, including KeyboardInterrupt; `commit()` is the caller's to call."""

    def __init__(self, path: Path, force: bool = False, resume: bool = False, what: str = "run",
                 log: Callable[[str], None] | None = None):
        self.path, self.what = Path(path), what
        self._log = log or (lambda msg: print(msg, file=sys.stderr))
        self.aside: Path | None = None
        self.made = self.emptied = False
        self._done = False
        for aside in dead_siblings(self.path.parent, "trash", name=self.path.name):
            shutil.rmtree(aside, ignore_errors=True)  # a commit killed while deleting the old folder
        for aside in dead_siblings(self.path.parent, "prev", name=self.path.name):
            raise ConfigError(f"{aside}: the previous {what} {self.path.name}, set aside by a --force run that was "
                              f"killed before it started; move it back to {self.path} (or delete it), then run again")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: exists and is not a folder")
        if self.path.exists() and any(self.path.iterdir()):
            if resume:
                self._done = True  # nothing to undo or delete: the folder is the run's own
                return
            if not force:
                raise ConfigError(f"{self.path}: a {what} with this name exists; pass --resume to continue it or "
                                  f"--force to replace it (or change `name`)")
            self.aside = owned_sibling(self.path, "prev")
            os.rename(self.path, self.aside)
        self.emptied = self.path.is_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        self.made = not self.emptied

    def commit(self) -> None:
        """The new run stands: delete the one it replaces (renamed first, so a kill mid-delete leaves no doubt)."""
        if self._done:
            return
        self._done = True
        if self.aside is not None:
            trash = owned_sibling(self.path, "trash")
            os.rename(self.aside, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def rollback(self) -> None:
        """Put the old folder back and remove what the new run wrote; a no-op after `commit()`."""
        if self._done:
            return
        self._done = True
        if self.aside is not None:
            # The old folder back in one step; the new one, now under the aside name, then deleted.
            if os.path.lexists(self.path) and exchange(self.aside, self.path):
                shutil.rmtree(self.aside, ignore_errors=True)
                return
            shutil.rmtree(self.path, ignore_errors=True)
            try:
                os.rename(self.aside, self.path)
            except OSError as e:
                self._log(f"warning: could not move the previous {self.what} back from {self.aside} to {self.path} "
                          f"({e}); it is intact there")
        elif self.made:
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.emptied:  # the folder was there, empty: what is in it now is the new run's
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.rollback()


def stamp(path: Path, cfg: Config) -> None:
    """Record how this folder was made: resolved config, command line, code version."""
    write_text(path / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_text(path / "command.txt", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) + f"\n# cwd: {os.getcwd()}\n")
    write_json(path / "version.json", code_version())


def launch_dir(folder: Path) -> Path | None:
    """The working directory `folder` was made from: command.txt's `# cwd:` line (see `stamp`); None if absent."""
    try:
        lines = (Path(folder) / "command.txt").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    cwd = next((ln[len("# cwd: "):] for ln in reversed(lines) if ln.startswith("# cwd: ")), None)
    return Path(cwd) if cwd else None


@contextmanager
def in_launch_dir(folder: Path, log: Callable[[str], None]):
    """Run the block in the directory the run in `folder` was launched from, so that the relative paths of its
    stamped config.yaml (data.dir, mirrors, cache_dir, a teacher or tokenizer file, ...) mean what they meant
    then, wherever `sweep resume/report/export` is run from. Paths given on the command line must be made absolute
    before. A launch directory that does not exist here (the folder came from another machine) is said, and the
    block runs where it is."""
    here, then = Path.cwd(), launch_dir(folder)
    if then is None or then == here:
        yield
        return
    if not then.is_dir():
        log(f"warning: {folder} was made from {then}, which is not on this machine; relative paths in its "
            f"config.yaml are read from {here}")
        yield
        return
    os.chdir(then)
    try:
        yield
    finally:
        os.chdir(here)
