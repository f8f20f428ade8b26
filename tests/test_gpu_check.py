"""The GPU check's dry run (`bench/gpu_check.sh --dry-run`): every step of the GPU run, through real `sweep run`s on
local Ray, on a CPU with one logical GPU declared to Ray. Ray's own accounting (CPUs in use, sampled by the driver)
says how many trials ran at once at each fraction; each fraction has one trial more than fits, so a fraction that
did not reach Ray shows as one too many."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CARRY = ROOT / f".carry-py{sys.version_info[0]}.{sys.version_info[1]}"


def test_dry_run_schedules_each_fraction_and_writes_the_table(nsmc_dir, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--work",
                        str(tmp_path / "work"), "--data", str(nsmc_dir)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-4000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["dry_run"] is True and rep["environment"]["cuda"] is False
    rows = {row["gpu"]: row for row in rep["fractions"]}
    assert {f: row["trials_at_once"] for f, row in rows.items()} == {1.0: 1, 0.25: 4}
    for f, row in rows.items():
        assert row["expected_at_once"] == int(1 / f)
        assert row["trials"] == row["finished"] == int(1 / f) + 1, row
        assert row["exit"] == 0 and row["failed"] == 0
        assert row["samples"] == row["trials"] * 540 and row["aggregate_samples_per_s"] > 0  # 600 reviews - 60 val
        assert row["estimate_mb"] > 0 and row["gpu_mem_peak_mb_max"] is None  # no CUDA: nothing measured
    assert rows[1.0]["speedup"] == 1.0 and rows[0.25]["speedup"] > 0

    grid = rep["grid"]
    assert grid["exit"] == 0 and grid["finished"] == 3 and grid["oom"] == 0 and grid["grid_size"] == 200
    assert grid["gpu_sizing"]["gpu_bytes"] is None and grid["auto_fraction"] == 0.0  # auto on a CPU-only cluster
    assert grid["trials_at_once"] == grid["expected_at_once"] == 3
    assert sum(d["trials"] for d in grid["by_dims"].values()) == 3
    ex = grid["extrapolation"]
    assert ex["worst_case"]["trial_epochs"] == 203 * 5  # 200 grid trials + 3 twins, 5 epochs each
    assert 0 < ex["asha_expected"]["gpu_hours_charged"] < ex["worst_case"]["gpu_hours_charged"]
    assert set(rep["goals"]) == {"seed_study"}  # no memory goal without a GPU, no packing goal without 0.125

    md = (out / "gpu_check.md").read_text()
    assert md in r.stdout  # the table is printed too
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [line.split(" | ")[0] for line in table[:2]] == ["| 1", "| 0.25"]
    assert [line.split(" | ")[2] for line in table[:2]] == ["1", "4"]  # at once (Ray)
    assert "**The seed study at its real budget**" in md and "GPU-hours" in md
    assert (out / "gpu_check.log").stat().st_size > 0


@pytest.mark.skipif(not (CARRY / f"site-py{sys.version_info[0]}.{sys.version_info[1]}.tar.xz").is_file(),
                    reason=f"no carry for this Python ({CARRY.name}: bash bench/gpu_carry.sh --python-version "
                           f"{sys.version_info[0]}.{sys.version_info[1]})")
def test_the_carry_brings_what_the_gpu_image_lacks(tmp_path):
    """A sweep's imports, with site-packages cut down to the GPU image's packages (bench/bare_image): Ray, Optuna,
    pydantic and the rest come from the carry."""
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--carry", str(CARRY), "--bare-image",
                        "--check-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable, "KD_CARRY_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    where = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    for name in ("ray", "optuna", "pydantic", "sqlalchemy", "tensorboardX"):
        assert str(tmp_path) in where[name], (name, where[name])
