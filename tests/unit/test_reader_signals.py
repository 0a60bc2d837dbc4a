"""A reader waiting on a stalled pipe still yields to Ctrl-C when the kernel hands the
signal to another thread than the main one (Linux may pick any thread that does not block
it): the main thread's read must not wait for ever without running Python."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

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


def test_ctrl_c_taken_by_another_thread_stops_a_read_of_a_stalled_pipe() -> None:
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "reading\n"
        time.sleep(0.3)  # well into the read
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
        assert (code, proc.stdout.read()) == (3, "interrupted\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
