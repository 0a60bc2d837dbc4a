"""Helpers for the command-line tests: run the real ``backup-agent`` console script.

Every command runs as its own process (the installed console script next to the running
interpreter), fed through real pipes where a test says so. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: The installed console script (there is no ``python -m`` entry point).
AGENT = str(Path(sys.executable).parent / "backup-agent")
#: Upper bound for one command; a hang fails the test instead of blocking the suite.
TIMEOUT = 120.0
ERROR_PREFIX = "backup-agent: error: "

KiB = 1024
MiB = 1024 * KiB


def agent(
    *args: str | os.PathLike[str],
    stdin: int | None = subprocess.DEVNULL,
    input: bytes | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``backup-agent ARGS`` to completion, capturing stdout and stderr."""
    argv = [AGENT, *map(str, args)]
    if input is not None:
        stdin = None
    return subprocess.run(argv, stdin=stdin, input=input, capture_output=True,
                          timeout=timeout, check=False)


def agent_into(
    stdout: int, *args: str | os.PathLike[str], timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """``backup-agent ARGS >&FD``: standard output is the given file descriptor (a pipe
    whose reader is gone, /dev/full...); stderr is captured."""
    return subprocess.run([AGENT, *map(str, args)], stdin=subprocess.DEVNULL, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=timeout, check=False)


@contextlib.contextmanager
def closed_pipe() -> Iterator[int]:
    """The write end of a pipe whose read end is already closed, like ``| true`` after
    ``true`` exited: every write to it fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        yield w
    finally:
        os.close(w)


def agent_from_file(
    path: str | os.PathLike[str], *args: str | os.PathLike[str], timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """``cat PATH | backup-agent ARGS``: the agent reads a real pipe, never a file."""
    cat = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE)
    try:
        assert cat.stdout is not None
        proc = subprocess.run([AGENT, *map(str, args)], stdin=cat.stdout, capture_output=True,
                              timeout=timeout, check=False)
    finally:
        if cat.stdout is not None:
            cat.stdout.close()  # cat may get SIGPIPE when the agent stops reading early
        cat.wait(timeout=timeout)
    return proc


def finish_streaming(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes, int]:
    """The rest of a running agent's stdout, all its stderr and its exit code: stdout is
    read on a thread while stderr is read here, so neither pipe can fill and stall it."""
    assert proc.stdout is not None and proc.stderr is not None
    stdout = proc.stdout
    rest: list[bytes] = []
    reader = threading.Thread(target=lambda: rest.append(stdout.read()))
    reader.start()
    err = proc.stderr.read()
    reader.join(timeout)
    return rest[0] if rest else b"", err, proc.wait(timeout)


def describe(proc: subprocess.CompletedProcess[bytes]) -> str:
    """The command, its exit code and its stderr, for assertion messages."""
    argv = proc.args if isinstance(proc.args, list) else [proc.args]
    return (f"{' '.join(map(str, argv))}\nexit {proc.returncode}\nstderr:\n"
            f"{proc.stderr.decode(errors='replace')}")


def assert_ok(proc: subprocess.CompletedProcess[bytes]) -> None:
    """Exit 0 with no error line."""
    assert proc.returncode == 0, describe(proc)
    assert ERROR_PREFIX.encode() not in proc.stderr, describe(proc)


def assert_error(proc: subprocess.CompletedProcess[bytes] | tuple[int, bytes],
                 *words: str) -> str:
    """Exit 1 and exactly one stderr line ``backup-agent: error: ...``; returns the message.

    Every word in ``words`` must appear in the message (case-insensitive).
    """
    if isinstance(proc, tuple):
        code, stderr = proc
        what = f"exit {code}\nstderr:\n{stderr.decode(errors='replace')}"
    else:
        code, stderr, what = proc.returncode, proc.stderr, describe(proc)
    text = stderr.decode(errors="replace")
    assert code == 1, what
    assert "Traceback" not in text, what
    lines = text.splitlines()
    assert len(lines) == 1, what
    assert lines[0].startswith(ERROR_PREFIX), what
    message = lines[0][len(ERROR_PREFIX):]
    assert message.strip(), what
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message\n{what}"
    return message


def assert_usage_error(proc: subprocess.CompletedProcess[bytes], *words: str) -> str:
    """Exit 2, as from argparse: a usage line and an ``error:`` line, no traceback; returns
    the message. Every word in ``words`` must appear in it (case-insensitive)."""
    text = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in text, describe(proc)
    lines = text.splitlines()
    assert lines and lines[0].startswith("usage: backup-agent"), describe(proc)
    assert lines[-1].startswith("backup-agent") and ": error: " in lines[-1], describe(proc)
    message = lines[-1].split(": error: ", 1)[1]
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in message\n{describe(proc)}"
    return message


def info_json(*args: str | os.PathLike[str]) -> dict[str, Any]:
    """``backup-agent info ARGS --json``, parsed."""
    proc = agent("info", *args, "--json")
    assert_ok(proc)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def image_size(path: str | os.PathLike[str], fmt: str) -> int:
    """The virtual size qemu reports for an image (raw files round up to 512 bytes)."""
    out = subprocess.run(["qemu-img", "info", "-f", fmt, "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    size: int = json.loads(out)["virtual-size"]
    return size


def write_random(path: Path, size: int, data_at: Sequence[tuple[int, int]] = ((0, -1),)) -> Path:
    """A sparse raw file of ``size`` bytes with random bytes at each ``(offset, length)``
    (length -1: up to the end)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_at:
            n = size - offset if length < 0 else length
            f.seek(offset)
            while n > 0:
                chunk = os.urandom(min(n, 8 * MiB))
                f.write(chunk)
                n -= len(chunk)
    return path


def partials_of(path: Path) -> list[Path]:
    """Where ``backup -o PATH`` writes until the archive is complete: ``.NAME.RANDOM.partial``
    beside it (none before the agent made it, none once it renamed or removed it)."""
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.partial"))


def partial_size(path: Path) -> int:
    """How much of the archive to ``PATH`` is written so far (0 while there is none)."""
    sizes = []
    for p in partials_of(path):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(p.stat().st_size)
    return max(sizes, default=0)


def leftovers(directory: Path) -> list[str]:
    """Files in ``directory`` that look like unfinished output."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


# -- processes ----------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's), from /proc/PID/task/*/children."""
    kids: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                kids += [int(x) for x in (task / "children").read_text().split()]
    return sorted(set(kids))


def cmdline(pid: int) -> list[str]:
    """A process's command line ([] when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: Sequence[int], limit: float = 10.0) -> list[int]:
    """Wait (bounded) for every pid to exit; returns those still running."""
    deadline = time.monotonic() + limit
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def processes_mentioning(fragment: str) -> list[int]:
    """Live processes (other than this one) whose command line contains ``fragment``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if any(fragment in arg for arg in cmdline(int(entry.name))) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_for(predicate: Any, what: str, proc: subprocess.Popen[bytes] | None = None,
             limit: float = 60.0) -> None:
    """Poll ``predicate()`` until true; fail if ``proc`` exits first or after ``limit``."""
    deadline = time.monotonic() + limit
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def running(argv: Sequence[str | os.PathLike[str]], **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    """Popen that is always stopped by its own pid on the way out."""
    proc = subprocess.Popen([str(a) for a in argv], **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def pause_control(sock: str, command: bytes) -> bytes:
    """Send one command to an nbdkit pause filter's control socket; returns its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(command)
        return s.recv(1)


# -- archive layout (docs/FORMAT.md), just enough to damage chosen records ----------------

PREAMBLE = 16
FRAME = 24
DIGEST = 16
DATA = 0x0010
CONFIG_DATA = 0x0004


@dataclass(frozen=True)
class RecordPos:
    type: int
    start: int  # byte position of the frame header
    body: int  # byte position of the body
    body_len: int


def records(archive: bytes) -> list[RecordPos]:
    """Every record of a well-formed archive, in order (stops at the footer)."""
    out = []
    pos = PREAMBLE
    while pos + FRAME <= len(archive) and archive[pos:pos + 4] == b"BREC":
        rtype, _flags, _seq, body_len, _crc = struct.unpack_from("<HHQII", archive, pos + 4)
        out.append(RecordPos(rtype, pos, pos + FRAME, body_len))
        pos += FRAME + body_len + DIGEST
    return out


def first(archive: bytes, rtype: int) -> RecordPos:
    found = [r for r in records(archive) if r.type == rtype]
    assert found, f"no record of type {rtype:#x} in the archive"
    return found[0]
