"""Ctrl-C still stops a restore when the kernel hands the signal to another thread than the
main one (Linux may pick any thread that does not block it). Python runs the handler in
the main thread, and only once that thread runs Python again, so the main thread must
never wait without a bound: not in a read of a stalled pipe, not for the workers' last
writes. Each program below blocks SIGINT in its main thread, so another thread takes it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Each program runs between these: it defines wait(), which prints one line, then waits
#: on what never comes. Its main thread blocks SIGINT, so another thread must take it.
PROLOGUE = r"""
import io, os, signal, sys, threading, time
# Started before the main thread blocks SIGINT, so it takes every SIGINT sent to us.
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
"""
EPILOGUE = r"""
try:
    wait()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""

PIPE_READ = r"""
from agent.archive.reader import _Input

def wait():
    r, w = os.pipe()  # nobody writes: the read waits
    inp = _Input(io.FileIO(r, "rb"))
    print("reading", flush=True)
    inp.read(10, "a record")
"""

LAST_WRITES = r"""
from agent.archive.format import Compression
from agent.errors import TargetError
from agent.restore import RestoreOptions, restore
from agent.targets.base import Sink
from tests.unit.archive_util import write_archive


class Stalled:
    # A target whose writes wait until the restore stops, as a stalled NBD server's do
    # until the agent cuts the connection.

    name, size, fresh = "stalled", 1 << 20, True
    stopped = staticmethod(lambda: False)

    def stop_when(self, stopped):
        self.stopped = stopped

    def writev(self, offset, parts):
        print("writing", flush=True)
        while not self.stopped():
            time.sleep(0.01)
        raise TargetError("cut")

    def write(self, offset, data): self.writev(offset, [data])
    def zero(self, offset, length): pass
    def flush(self): pass
    def close(self): pass


def build(w):
    dev = w.add_device("d", 1 << 20)
    # Not zeros: those are not written onto a new target (fresh) at all.
    w.write_data(dev.id, 0, 1 << 20, Compression.NONE, b"x" * (1 << 20))


def wait():
    opts = RestoreOptions()
    restore(io.BytesIO(write_archive(build)), lambda dev: Sink(dev, Stalled()), opts)
"""

QMP_WAIT = r"""
import asyncio
from agent.qemu.qmp import _LoopThread

def wait():
    loop = _LoopThread("test")
    print("waiting", flush=True)
    loop.run(asyncio.sleep(60))  # a QMP reply that does not come
"""

RELEASER_CLOSE = r"""
from agent.releaser import Releaser

def wait():
    started = threading.Event()

    def release(device, offset, length):  # a trim QEMU does not answer
        started.set()
        time.sleep(60)

    r = Releaser(release)
    r.start(lambda e: None)
    r.for_device("vda")(0, 65536)
    started.wait(10)
    print("closing", flush=True)
    r.close()
"""

COMMAND_FINISH = r"""
from agent.jobs.command import CommandOutput

def wait():
    with CommandOutput("cat >/dev/null; sleep 60", "output command") as out:
        print("finishing", out.proc.pid, flush=True)
        out.finish()  # the command read the archive, and does not exit
"""


def _interrupt(program: str, ready: str, started: list[str] | None = None) -> None:
    """Run ``program``, SIGINT it once it prints a line starting with ``ready`` (kept in
    ``started``): it must say it was interrupted and exit 3, promptly."""
    proc = subprocess.Popen([sys.executable, "-c", PROLOGUE + program + EPILOGUE],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if started is not None:
            started.append(line)
        assert line.startswith(ready)
        time.sleep(0.3)  # well into the wait
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        assert (code, proc.stdout.read()) == (3, "interrupted\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_taken_by_another_thread_stops_a_read_of_a_stalled_pipe() -> None:
    _interrupt(PIPE_READ, "reading\n")


def test_ctrl_c_taken_by_another_thread_stops_the_wait_for_the_last_writes() -> None:
    _interrupt(LAST_WRITES, "writing\n")


def test_ctrl_c_taken_by_another_thread_stops_a_wait_for_qmp() -> None:
    _interrupt(QMP_WAIT, "waiting\n")


def test_ctrl_c_taken_by_another_thread_stops_the_wait_for_the_releaser() -> None:
    _interrupt(RELEASER_CLOSE, "closing\n")


@pytest.mark.timeout(60)
@pytest.mark.slow
def test_a_qmp_wait_in_steps_keeps_its_timeout_and_the_coroutines_own_errors() -> None:
    from agent.qemu.qmp import _LoopThread

    async def own_timeout() -> None:
        raise TimeoutError("the coroutine's own")

    loop = _LoopThread("test")
    try:
        with pytest.raises(TimeoutError):
            loop.run(asyncio.sleep(60), timeout=0.5)  # the caller's timeout still ends it
        with pytest.raises(TimeoutError, match="the coroutine's own"):
            loop.run(own_timeout())  # not taken for the end of a step
        assert loop.run(asyncio.sleep(0.5, result=7)) == 7  # longer than one step
    finally:
        loop.stop()


def test_ctrl_c_taken_by_another_thread_stops_the_wait_for_an_output_command() -> None:
    started: list[str] = []
    try:
        _interrupt(COMMAND_FINISH, "finishing ", started)
    finally:
        # The program stops its command as it exits; if it had to be killed, we do.
        if started and started[0].split()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(started[0].split()[1]), signal.SIGKILL)
