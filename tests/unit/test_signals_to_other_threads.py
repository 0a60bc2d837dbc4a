"""Ctrl-C still stops a restore when the kernel hands the signal to another thread than the
main one (Linux may pick any thread that does not block it). Python runs the handler in
the main thread, and only once that thread runs Python again, so the main thread must
never wait without a bound: not in a read of a stalled pipe, not for the workers' last
writes. Each program below blocks SIGINT in its main thread, so another thread takes it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import io, os, signal, sys, threading, time
from agent.archive.reader import _Input

# Started before the main thread blocks SIGINT, so it takes every SIGINT sent to us.
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
r, w = os.pipe()  # nobody writes: the read waits
inp = _Input(io.FileIO(r, "rb"))
print("reading", flush=True)
try:
    inp.read(10, "a record")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


LAST_WRITES = r"""
import io, os, signal, sys, threading, time
from agent.archive.format import Compression
from agent.errors import TargetError
from agent.restore import RestoreOptions, _Sink, restore
from tests.unit.archive_util import write_archive

threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


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
    w.write_data(dev.id, 0, 1 << 20, Compression.NONE, bytes(1 << 20))


opts = RestoreOptions()
try:
    restore(io.BytesIO(write_archive(build)), lambda dev: _Sink(dev, Stalled()), opts)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""


def _interrupt(program: str, ready: str) -> None:
    """Run ``program``, SIGINT it once it prints ``ready``: it must say it was interrupted
    and exit 3, promptly."""
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == ready
        time.sleep(0.3)  # well into the wait
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        assert (code, proc.stdout.read()) == (3, "interrupted\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_taken_by_another_thread_stops_a_read_of_a_stalled_pipe() -> None:
    _interrupt(PROGRAM, "reading\n")


def test_ctrl_c_taken_by_another_thread_stops_the_wait_for_the_last_writes() -> None:
    _interrupt(LAST_WRITES, "writing\n")
