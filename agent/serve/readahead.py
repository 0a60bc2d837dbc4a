"""Records a sequential reader will want next, loaded before it asks.

A reader that goes through a device in order and waits for each read (QEMU's
``block-stream`` of a live restore, ``qemu-img convert``, ``nbdcopy`` over one connection)
stands still for every record the plugin reads, checks and decompresses for it. After a
read of at least :data:`MIN_READ` bytes, :class:`Readahead` loads the records that hold the
next :data:`AHEAD` bytes on a thread of its own, into the cache every connection shares:
``pread``, BLAKE3 and zstd release the GIL, so the loading overlaps the reader's own work
and the socket. Small reads (a booting guest, random 4 KiB) ask for nothing ahead.

Best effort, bounded: at most :data:`QUEUED` records wait to be loaded (more are dropped:
the reader loads them itself), each once; a load that fails is forgotten (the reader's own
read of that record then fails with its error, and its log line). The thread starts at the
first request, in the process that serves: a daemonized nbdkit forks after its
configuration, and threads do not survive a fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable

from agent.serve.cache import Buffer, RecordCache

log = logging.getLogger(__name__)

#: Reads shorter than this ask for nothing ahead: they are not a stream.
MIN_READ = 64 << 10
#: How far past the end of a read the records are loaded: one backup record.
AHEAD = 2 << 20
#: Records waiting to be loaded, at most.
QUEUED = 8
#: Large reads from two threads less than SHARED_GAP seconds apart: several connections
#: read at once, and nothing is read ahead for SHARED_HOLD seconds.
SHARED_GAP = 0.05
SHARED_HOLD = 1.0
#: Seconds :meth:`Readahead.close` waits for a load under way (one from a slow bucket).
CLOSE_WAIT = 5.0

_Job = tuple[Hashable, Callable[[], Buffer]]


class Readahead:
    def __init__(self, cache: RecordCache) -> None:
        self._cache = cache
        self._queue: queue.Queue[_Job | None] = queue.Queue(QUEUED)
        self._queued: set[Hashable] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process the thread runs in
        self._closed = False
        self._reader = 0  # the thread of the last large read
        self._last = 0.0  # and when it came
        self._shared_until = 0.0

    def alone(self) -> bool:
        """Whether the large reads come from one thread (nbdkit's thread of one connection)
        of late. Several connections (nbdcopy's four) already load records in parallel, as
        far as the cores go: loading ahead for them as well cost a fifth of their speed on
        two cores. A race between two readers here costs at most a wrong hint."""
        me, now = threading.get_ident(), time.monotonic()
        if me != self._reader:
            if now - self._last < SHARED_GAP:  # another thread read a moment ago
                self._shared_until = now + SHARED_HOLD
            self._reader = me
        self._last = now
        return now >= self._shared_until

    def want(self, key: Hashable, load: Callable[[], Buffer]) -> None:
        """Have the record ``key`` (loaded by ``load``) in the cache soon, unless it is
        there, on its way, or the queue is full."""
        if self._cache.has(key):
            return
        with self._lock:
            if self._closed or key in self._queued:
                return
            if self._thread is None or self._pid != os.getpid():
                self._start()
            try:
                self._queue.put_nowait((key, load))
            except queue.Full:
                return
            self._queued.add(key)

    def _start(self) -> None:
        self._queue = queue.Queue(QUEUED)  # what a parent process queued is not ours
        self._queued.clear()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self._queue
        while True:
            job = q.get()
            if job is None:
                return
            key, load = job
            try:
                self._cache.get(key, load)
            except Exception as e:  # the reader's own read fails, and says why
                log.debug("readahead of %r: %s", key, e)
            finally:
                with self._lock:
                    self._queued.discard(key)

    def close(self) -> None:
        """Stop the thread once the record it loads is loaded (waiting at most
        :data:`CLOSE_WAIT` seconds: a daemon thread dies with the process anyway); what
        waits is dropped."""
        with self._lock:
            self._closed = True
            thread, q = self._thread, self._queue
            self._thread = None
        if thread is None or self._pid != os.getpid():
            return
        with contextlib.suppress(queue.Empty):
            while True:
                q.get_nowait()
        q.put(None)
        thread.join(CLOSE_WAIT)
