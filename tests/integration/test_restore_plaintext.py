"""``restore --to nbd://HOST`` on another host: refused in clear text, as ``backup --source``
is, unless ``--insecure-plaintext`` says so.

The NBD export runs on the "backup server" of two network namespaces (tests/integration/
netns.py), the restore on the "hypervisor": a real TCP connection between two addresses, not
loopback. nbdkit's log filter records every connection, so a refusal is shown to have sent
nothing at all.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import AGENT, assert_error, describe
from tests.integration.netns import BK_ADDR, TwoHosts, two_hosts
from tests.unit.archive_util import write_archive

pytestmark = [pytest.mark.integration, pytest.mark.root("network namespaces"), pytest.mark.network]

MiB = 1024 * 1024
PORT = 10811
DATA = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    with two_hosts() as h:
        yield h


@pytest.fixture
def export(hosts: TwoHosts, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """nbdkit serving a 2 MiB file of zeros on BK_ADDR:PORT, plain TCP, logging every
    connection: (the file, the log)."""
    disk, logfile = tmp_path / "disk.raw", tmp_path / "nbdkit.log"
    disk.write_bytes(bytes(2 * MiB))
    proc = subprocess.Popen(hosts.run_in(hosts.bk, [
        "nbdkit", "--foreground", "-i", BK_ADDR, "-p", str(PORT), "--filter=log",
        "file", str(disk), f"logfile={logfile}"]), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(hosts.run_in(hosts.bk, ["nbdinfo", "--size",
                             f"nbd://{BK_ADDR}:{PORT}"]), capture_output=True,
                             check=False).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        logfile.write_text("")  # forget nbdinfo's connections
        yield disk, logfile
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _archive(path: Path) -> Path:
    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("d", 2 * MiB)
        w.write_data(dev.id, 0, MiB, Compression.NONE, DATA)
        w.write_zero(dev.id, MiB, MiB)

    path.write_bytes(write_archive(build))
    return path


def _restore(hosts: TwoHosts, arc: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(hosts.run_in(hosts.hv, [
        AGENT, "restore", str(arc), "--device", "d", "--to", f"nbd://{BK_ADDR}:{PORT}/",
        *extra]), stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False)


def test_restore_to_nbd_on_another_host_in_clear_text_is_refused(
    hosts: TwoHosts, export: tuple[Path, Path], tmp_path: Path
) -> None:
    disk, logfile = export
    done = _restore(hosts, _archive(tmp_path / "a.arc"))
    msg = assert_error(done, "clear text", "--insecure-plaintext", "nbds://")
    assert f"nbd://{BK_ADDR}:{PORT}/ is NBD over TCP in clear text" in msg
    assert logfile.read_text() == "", "the agent connected to the export"
    assert disk.read_bytes() == bytes(2 * MiB)


def test_restore_to_nbd_in_clear_text_when_asked_for(
    hosts: TwoHosts, export: tuple[Path, Path], tmp_path: Path
) -> None:
    disk, logfile = export
    done = _restore(hosts, _archive(tmp_path / "a.arc"), "--insecure-plaintext")
    assert done.returncode == 0, describe(done)
    assert disk.read_bytes() == DATA + bytes(MiB)
    assert "connect" in logfile.read_text().lower()
