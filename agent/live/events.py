"""The copy-before-write events of a live backup: which clusters QEMU copied before a guest
write, heard from each disk's target (agent/cbw/control.py) and passed to its tracker, whose
planner then reads them ahead of the sweep (they cost memory in the target)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from types import TracebackType

from agent import interrupts
from agent.cbw.control import ControlError
from agent.cbw.server import CbwTargetServer
from agent.tracker import DeviceTracker

POLL = 0.05  # seconds each target's events are waited for before the next target's


class CopyListener:
    """A thread, while in the ``with`` block, feeding every disk's copy-before-write events
    to its tracker (both by device id). Its first error goes to ``failed``."""

    def __init__(self, servers: Mapping[str, CbwTargetServer],
                 trackers: Mapping[str, DeviceTracker],
                 failed: Callable[[BaseException], None]) -> None:
        self._servers = servers
        self._trackers = trackers
        self._failed = failed
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # ends the thread's wait at once
        self._thread = threading.Thread(target=self._run, name="ba-cbw-events", daemon=True)

    def __enter__(self) -> CopyListener:
        with interrupts.held():  # see agent.interrupts
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        os.write(self._wake_w, b"x")  # the listener's wait ends now, not at its timeout
        self._thread.join(2)
        if not self._thread.is_alive():  # else it may still select() on the pipe: keep it
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for name, server in self._servers.items():
                    for off, length in server.control.poll_events(timeout=POLL,
                                                                  wake=self._wake_r):
                        self._trackers[name].copied(off, length)
        except ControlError as e:
            if not self._stop.is_set():
                self._failed(e)
