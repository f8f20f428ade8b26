"""Run and results folders: claimed without overwriting, and stamped with the resolved config, the command line
and the code version."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import yaml

from trainable.io import write_json, write_text

from .config import Config, ConfigError


class StorageError(RuntimeError):
    """The results folder became unwritable mid-sweep (full disk, read-only mount)."""


def code_version() -> dict:
    """The package version and, inside a git checkout, the commit and whether the tree had changes."""
    from importlib.metadata import PackageNotFoundError, version

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


def claim_dir(path: Path, force: bool = False, resume: bool = False, what: str = "run") -> None:
    """Make `path` for a new run. An existing one is an error unless `force` (deleted) or `resume` (kept)."""
    if path.exists() and any(path.iterdir()):
        if resume:
            return
        if not force:
            raise ConfigError(f"{path}: a {what} with this name exists; pass --resume to continue it or --force to "
                              f"replace it (or change `name`)")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


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
