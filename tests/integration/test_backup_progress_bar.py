"""The progress bar on a terminal: a backup whose stderr is a pseudo-terminal (with a window
size, as a terminal has) draws a tqdm bar with a percentage, a rate and an ETA."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from tests.integration.cli_util import AGENT, TIMEOUT, running
from tests.integration.conftest import NbdServerFactory

pytestmark = pytest.mark.integration

#: A tqdm frame: ``backup:  42%|████▏     | 215M/512M [00:00<00:01, 402MB/s]`` (the
#: percentage and bar, done/total, elapsed<remaining, a rate with a number).
FRAME = re.compile(r"backup:\s+\d+%\|[^|]*\| [\d.]+\w?/[\d.]+\w? "
                   r"\[\d\d:\d\d<(?P<eta>\d\d:\d\d), (?P<rate>[\d.]+ ?\w?i?B/s)\]")


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> bytes:
    """Everything written to the terminal until the agent exits and its side is closed."""
    got = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.slow
def test_bar_with_rate_and_eta_on_a_terminal(nbd_server: NbdServerFactory) -> None:
    # 512 MiB whose reads nbdkit holds 50 ms each: the backup lasts about a second, long
    # enough for the bar to be redrawn with a measured rate (it redraws every 0.2 s).
    server = nbd_server.nbdkit(["pattern", "size=512M", "delay-read=50ms"], filters=["delay"],
                               readonly=True)
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        with running([AGENT, "backup", "--source", f"p={server.uri}", "-o", "-"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave) as proc:
            os.close(slave)
            slave = -1
            out = _read_all(master, proc)
            code = proc.wait(timeout=TIMEOUT)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    text = out.decode(errors="replace")
    assert code == 0, text
    frames = [m for f in re.split(r"[\r\n]", text) if (m := FRAME.search(f))]
    assert frames, f"no tqdm frame with a rate and an ETA in:\n{text!r}"
    assert any(m["eta"] and m["rate"][0].isdigit() for m in frames)
    assert "backed up 1 device(s)" in text  # and the summary after it
