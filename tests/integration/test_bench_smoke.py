"""The benchmark scripts still run: each at --smoke scale, its table printed.

No figure is judged here (timing belongs to the benchmarks, never to tests): this
catches what an API change in the agent breaks in bench/, which nothing else runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent

# Each script, and rows its table must print (a row's first cell, then a number).
CASES = {
    "run.py": ["half-data raw, --compress none, into a pipe",
               "restore of that archive from a pipe to raw",
               "half-data raw, zstd, encrypted, into a pipe",
               "restore of the encrypted archive from a pipe",
               "1 TiB empty qcow2, full backup",
               "0.25 GiB fully written raw, peak RSS"],
    "incremental.py": ["full live backup, 0.25 GiB half data, pipe",
                       "incremental, 1% of clusters changed"],
    "guest_cost.py": ["our nbdkit plugin (memory)", "during a live backup",
                      "QEMU fleecing, qcow2 scratch", "live, --max-rate auto",
                      "live, sweep stopped (4K/s)"],
    "network.py": ["hypervisor       |   1ms", "backup server    |   5ms"],
    "s3.py": ["0.0625 GiB half data, backup to s3://", "same, vs boto3 upload_fileobj",
              "restore from s3:// to raw", "0.25 GiB fully written raw to s3://, peak RSS"],
    "serve.py": ["sequential read, 0.0625 GiB half data, zstd",
                 "random 4K QD16, warm cache", "1 TiB sparse archive, serve to first byte",
                 "1 TiB sparse archive, nbdkit peak RSS", "live restore, 0.0625 GiB, until",
                 "live restore, until the VM runs"],
    "vma.py": ["backup into a pipe: VMA vs ours uncompressed",
               "restore from a pipe: VMA vs ours (zstd:1)"],
}


# network.py runs its hosts in network namespaces: root only.
NETNS = pytest.mark.root("bench/network.py makes network namespaces"), pytest.mark.network


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", [pytest.param(s, marks=NETNS if s == "network.py" else ())
                                    for s in sorted(CASES)])
def test_bench_script_runs(script: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "bench" / script), "--smoke"]
    if script == "run.py":
        argv += ["--out", str(tmp_path / "out")]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    for label in CASES[script]:
        row = next((r for r in rows if r.startswith(f"| {label}")), None)
        assert row is not None, f"{script} printed no row {label!r}:\n{proc.stdout}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert any(c.replace(".", "", 1).rstrip("x").isdigit() for c in cells[1:]), row
    assert "smoke run at the smallest scale" in proc.stdout
    if script == "run.py":
        assert not (tmp_path / "out").exists()  # its scratch directory is removed
