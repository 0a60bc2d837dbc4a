"""A slow output slows the reads and never grows a buffer: a 512 MiB backup into a pipe
whose reader takes its time. No wall-clock assertion: what is checked is how far the reads
(nbdkit's log) ran ahead of what the reader took, and the agent's peak resident memory."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.cli_util import AGENT, TIMEOUT, KiB, MiB, running
from tests.integration.conftest import NbdServerFactory

pytestmark = pytest.mark.integration

F_GETPIPE_SZ = 1032
SIZE = 512 * MiB
MEMORY = 16 * MiB
REQUEST = 1 * MiB
#: Resident memory the agent has whatever it backs up: the interpreter, libnbd, zstd,
#: the archive writer (~35 MiB measured for a 1 MiB disk); with margin.
BASE_ALLOWANCE = 64 * MiB
#: Bytes the reader takes at which it stops for a while, letting the agent run as far
#: ahead as it will, before the reads so far are counted.
PAUSES = (64 * MiB, 256 * MiB, 448 * MiB)
#: How long each pause lasts: at full speed (hundreds of MiB/s) an agent that did not
#: wait for its output would have read the rest of the disk long before.
PAUSE = 1.0
#: Archive bytes that are not device bytes (header, frames, digests) are few: a frame and
#: a digest per 1 MiB record. And records of one read may wait in the writer's batch.
SLACK = 4 * MiB


def _hwm(pid: int) -> int | None:
    """The process's peak resident memory (VmHWM) in bytes; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) * KiB if m else None


def _bytes_read(log: Path) -> int:
    """Bytes of every read the server was asked for so far (the log's request starts)."""
    total = 0
    for line in log.read_text().splitlines():
        m = re.search(r" Read id=\d+ offset=0x[0-9a-f]+ count=(0x[0-9a-f]+)", line)
        if m:
            total += int(m.group(1), 16)
    return total


@pytest.mark.slow
def test_slow_output_keeps_memory_bounded(tmp_path: Path, nbd_server: NbdServerFactory) -> None:
    log = tmp_path / "nbdkit.log"
    # nbdkit's pattern plugin: 512 MiB of data (every byte allocated, hardly zero), no file.
    server = nbd_server.nbdkit(["pattern", f"size={SIZE}", f"logfile={log}"], filters=["log"],
                               readonly=True)
    argv = [AGENT, "backup", "--source", f"p={server.uri}", "--compress", "none",
            "--memory", str(MEMORY), "--request-size", str(REQUEST), "--connections", "2",
            "--quiet", "-o", "-"]
    peak = [0]
    ahead: list[tuple[int, int, int]] = []  # (taken by the reader, read by the agent, pipe)
    done = threading.Event()
    with running(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None

        def watch() -> None:
            while not done.is_set():
                got = _hwm(proc.pid)
                if got is not None:
                    peak[0] = max(peak[0], got)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, name="test-vmhwm", daemon=True)
        watcher.start()
        fd = proc.stdout.fileno()
        taken = 0
        pauses = list(PAUSES)
        try:
            while True:
                chunk = os.read(fd, 256 * KiB)
                if not chunk:
                    break
                taken += len(chunk)
                time.sleep(0.002)  # a slow reader: at most 128 MiB/s
                if pauses and taken >= pauses[0]:
                    pauses.pop(0)
                    time.sleep(PAUSE)
                    got = _hwm(proc.pid)
                    if got is not None:
                        peak[0] = max(peak[0], got)
                    ahead.append((taken, _bytes_read(log), fcntl.fcntl(fd, F_GETPIPE_SZ)))
            err = proc.stderr.read()
            code = proc.wait(timeout=TIMEOUT)
        finally:
            done.set()
            watcher.join(5)
    assert code == 0, err.decode(errors="replace")
    assert taken > SIZE  # the whole archive came through
    assert len(ahead) == len(PAUSES)
    for taken_then, read_then, pipe in ahead:
        # What the agent read but the reader had not taken sits in the pipe or in the
        # agent's buffers (--memory, and one request that may go alone over the budget).
        limit = taken_then + pipe + MEMORY + REQUEST + SLACK
        assert read_then <= limit, (
            f"with {taken_then // MiB} MiB taken by the reader, the agent had read "
            f"{read_then // MiB} MiB (at most {limit // MiB} MiB expected): reads ran ahead "
            "of the output")
    # Read well ahead of the first pause it could not be: still reading when it came.
    assert ahead[0][1] < SIZE
    assert 0 < peak[0] < MEMORY + BASE_ALLOWANCE, (
        f"peak RSS {peak[0] // MiB} MiB with --memory {MEMORY // MiB}M backing up "
        f"{SIZE // MiB} MiB into a slow pipe")
