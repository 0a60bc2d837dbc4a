"""SIGTERM and Ctrl-C (SIGINT to the process group, as a terminal sends it) during a
restore: exit 1 with one line, every helper process gone, nothing left that looks like a
restore, and a target written in place said to be partly written. Promptly too when the
NBD target stops answering (nbdkit's pause filter).

The archive comes through a real pipe whose writer (the test) stops half-way, so the
restore is mid-way when the signal comes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import (
    AGENT,
    MiB,
    assert_error,
    children,
    cmdline,
    pause_control,
    running,
    wait_for,
    wait_gone,
)
from tests.integration.conftest import NbdServerFactory
from tests.unit.archive_util import write_archive

pytestmark = pytest.mark.integration

SIZE = 16 * MiB
#: Generous bound for "promptly": the agent must be gone this long after the signal.
PROMPTLY = 10.0
SIGNALS = ["SIGTERM", "SIGINT"]


def _build(w: ArchiveWriter) -> None:
    dev = w.add_device("d", SIZE)
    for i, offset in enumerate(range(0, SIZE, MiB)):
        w.write_data(dev.id, offset, MiB, Compression.NONE, bytes([i + 1]) * MiB)


@pytest.fixture(scope="module")
def archive() -> bytes:
    return write_archive(_build)


def _signal(proc: subprocess.Popen[bytes], name: str) -> None:
    """SIGTERM to the agent; SIGINT to its process group, as Ctrl-C on a terminal."""
    if name == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)


def _words(name: str) -> tuple[str, ...]:
    return ("SIGTERM",) if name == "SIGTERM" else ("interrupted",)


def _finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    """The agent's exit code and stderr; it must exit within PROMPTLY seconds."""
    assert proc.stderr is not None
    try:
        code = proc.wait(timeout=PROMPTLY)  # its one line fits in the pipe meanwhile
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent still runs {PROMPTLY:.0f} s after the signal")
    return code, proc.stderr.read()


def _temps(out: Path) -> list[os.stat_result]:
    """The restore's temporary files in ``out`` (``.d.FORMAT.RANDOM.partial``)."""
    found = []
    for p in out.glob(".d.*.partial") if out.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            found.append(p.stat())
    return found


def _temp_blocks(out: Path) -> int:
    return max((st.st_blocks for st in _temps(out)), default=0)


def _temp_size(out: Path) -> int:
    return max((st.st_size for st in _temps(out)), default=0)


def _qemu_nbd_children(pid: int) -> list[int]:
    return [c for c in children(pid) if "qemu-nbd" in " ".join(cmdline(c))]


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_restore_to_dir_raw(short_tmp: Path, archive: bytes, sig: str) -> None:
    out = short_tmp / "out"
    with running([AGENT, "restore", "-", "--to-dir", out], stdin=subprocess.PIPE,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 start_new_session=True) as proc:
        assert proc.stdin is not None
        proc.stdin.write(archive[:len(archive) // 2])
        proc.stdin.flush()
        wait_for(lambda: _temp_blocks(out) > 0, "the first write", proc)
        _signal(proc, sig)
        code, err = _finish(proc)
    assert_error((code, err), *_words(sig))
    assert not out.exists()  # made by the restore: gone with its temporary file


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_restore_to_dir_qcow2(short_tmp: Path, archive: bytes, sig: str) -> None:
    out = short_tmp / "out"
    with running([AGENT, "restore", "-", "--to-dir", out, "--format", "qcow2"],
                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 start_new_session=True) as proc:
        assert proc.stdin is not None
        proc.stdin.write(archive[:len(archive) // 2])
        proc.stdin.flush()
        wait_for(lambda: bool(_qemu_nbd_children(proc.pid)), "its qemu-nbd", proc)
        kids = _qemu_nbd_children(proc.pid)
        wait_for(lambda: _temp_size(out) > 1 * MiB, "the first writes", proc)
        _signal(proc, sig)
        code, err = _finish(proc)
    assert_error((code, err), *_words(sig))
    assert wait_gone(kids) == []
    assert not out.exists()


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_restore_into_a_file(short_tmp: Path, archive: bytes, sig: str) -> None:
    target = short_tmp / "t.raw"
    target.write_bytes(b"\xff" * SIZE)

    def written() -> bool:
        with open(target, "rb") as f:
            return f.read(1) == b"\x01"

    with running([AGENT, "restore", "-", "--device", "d", "--to", target],
                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                 start_new_session=True) as proc:
        assert proc.stdin is not None
        proc.stdin.write(archive[:len(archive) // 2])
        proc.stdin.flush()
        wait_for(written, "the first write", proc)
        _signal(proc, sig)
        code, err = _finish(proc)
    assert_error((code, err), *_words(sig), str(target), "partly written")


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_while_nbd_target_stalls(short_tmp: Path, nbd_server: NbdServerFactory,
                                        archive: bytes, sig: str) -> None:
    """The server takes the writes and never answers: the signal still ends the restore."""
    ctl = str(short_tmp / "pause.ctl")
    log = short_tmp / "nbdkit.log"
    arc = short_tmp / "a.arc"
    arc.write_bytes(archive)
    # log before pause: a request is logged when it arrives, then held
    server = nbd_server.nbdkit(["memory", f"size={SIZE}", f"pause-control={ctl}",
                                f"logfile={log}"], filters=["log", "pause"])
    assert pause_control(ctl, b"p") == b"P"  # every request now waits, forever
    try:
        with running([AGENT, "restore", arc, "--device", "d", "--to", server.uri],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, start_new_session=True) as proc:
            wait_for(lambda: " Write id=" in log.read_text() if log.exists() else False,
                     "a write to reach the server", proc)
            _signal(proc, sig)
            code, err = _finish(proc)
    finally:
        pause_control(ctl, b"r")  # so the server can stop at teardown
    assert_error((code, err), *_words(sig), "partly written")
    assert server.running()  # the agent stops itself, not the server it wrote to
