"""Many jobs at once, each in its own ``backup-agent job run JOB`` process, at most N running.

One process per job keeps each backup as it is alone: its own memory bounds (``--memory``,
the copy-before-write memory and spool), its own NBD and S3 connections, its own signal
handling and clean-up; the whole run then holds at most N times one backup's memory and
connections. The children write their own lines to the shared stderr (each names its job).
On Ctrl-C or SIGTERM no further job starts and the running ones get SIGTERM, by their pid,
and are waited for: each removes what it added to its VM and aborts its upload.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Sequence

from agent import interrupts

log = logging.getLogger("backup-agent")

STOP_TIMEOUT = 120.0  # seconds a child gets to clean up after SIGTERM before SIGKILL


def run_parallel(names: Sequence[str], argv: Callable[[str], list[str]],
                 parallel: int) -> dict[str, int]:
    """Run ``argv(name)`` for every name, at most ``parallel`` at once, in the order given;
    returns each job's exit status."""
    waiting = list(names)
    running: dict[str, subprocess.Popen[bytes]] = {}
    done: dict[str, int] = {}
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                name = waiting.pop(0)
                with interrupts.held():  # a SIGTERM now is raised once the child is known
                    running[name] = subprocess.Popen(argv(name), stdin=subprocess.DEVNULL)
                log.debug("job %s: started (pid %d)", name, running[name].pid)
            for name, proc in list(running.items()):
                status = proc.poll()
                if status is not None:
                    done[name] = status
                    del running[name]
            if running:
                time.sleep(interrupts.STEP)  # in steps: Ctrl-C is answered
    finally:
        _stop(running)
    return done


def _stop(running: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every child still running (by its pid), then wait; SIGKILL at the end."""
    for proc in running.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in running.values():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
