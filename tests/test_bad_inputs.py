"""Bad input found before any work: one line naming the key or flag and what was expected, exit 2, nothing
created. In-process calls of the CLI's main (a fresh process each would cost seconds of imports)."""
from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from conftest import small_config
from sweep.cli import main


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("size", ["0", "-3"])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_batch_size_below_one_is_refused(tmp_path, capsys, command, size):
    args = [command, str(tmp_path / "model")]
    args += ["some text"] if command == "predict" else [str(tmp_path / "f.tsv")]
    args += ["--batch-size", size]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--batch-size: expected a positive number of reviews per batch, got {size}" in err
    assert _tree(tmp_path) == []


def _read_only(folder):
    """A folder this user cannot write: chmod for a normal user; root ignores modes, so a read-only tmpfs."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        return lambda: folder.chmod(0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "kd-ro", str(folder)], check=True)
    return lambda: subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("key", ["results_dir", "cache_dir"])
@pytest.mark.parametrize("command", ["run", "train"])
def test_unwritable_results_or_cache_dir_is_refused_at_start(nsmc_dir, tmp_path, capsys, key, command):
    locked = tmp_path / "locked"
    undo = _read_only(locked)
    try:
        cfg = small_config(nsmc_dir, tmp_path / "cache", tmp_path / "results")
        cfg[key] = str(locked / "sub")
        cfg["sweep"] = {"space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [32, 64]}}}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{key}: {locked / 'sub'} is not writable by this user" in err, err
        assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
        assert _tree(locked) == []
    finally:
        undo()


def test_results_dir_under_a_file_is_refused(nsmc_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    cfg = small_config(nsmc_dir, tmp_path / "cache", tmp_path / "a-file" / "results")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results_dir:" in err and "is not a folder" in err
    assert (tmp_path / "a-file").read_text() == "mine" and not (tmp_path / "cache").exists()


def test_a_ray_address_nobody_answers_is_one_line(nsmc_dir, tmp_path):
    """`sweep run --address` where no Ray cluster listens: one line naming sweep.address, exit 2, no sweep folder.
    A process of its own, with Ray's retries shortened (conftest.RAY_GIVES_UP_FAST)."""
    import socket

    from conftest import RAY_GIVES_UP_FAST, run_cli

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small_config(nsmc_dir, tmp_path / "cache", tmp_path / "results")
    cfg["sweep"] = {"space": {"parameters": {"student.hidden_dim": {"type": "categorical", "choices": [8]}}},
                    "searcher": "grid"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_cli("run", str(path), "--address", f"127.0.0.1:{port}", env=RAY_GIVES_UP_FAST)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith(f"error: sweep.address: cannot connect to the Ray cluster at "
                                                 f"127.0.0.1:{port}: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "results" / "t").exists()
