"""Restore into an NBD export: the agent's own qemu-nbd over a new qcow2 image, or a
server the user names (``restore --to nbd://...``).

Its own module so that restores into files never import libnbd (start-up time).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

import nbd

from agent import interrupts
from agent.errors import TargetError
from agent.targets.base import ZEROS

# Write requests (data pieces, and zeros written where the server cannot write-zeroes)
# are at most this long, or the server's advertised maximum: servers refuse larger ones
# ("request too large: maximum request size is 67108864"; qemu-nbd's limit is 32 MiB).
_MAX_WRITE = 32 * 1024 * 1024
# How often the watcher looks at the restores' stop flags.
_WATCH_INTERVAL = 0.2
# Longest a polite disconnect may take before the connection is simply dropped.
_DISCONNECT_TIMEOUT = 2.0
_POLL_MS = 200  # one wait of that disconnect


class _Conn:
    """One NBD connection, its socket, and the lock of the thread using it."""

    def __init__(self, h: nbd.NBD) -> None:
        self.h = h
        self.fd = h.aio_get_fd()  # taken now: a blocked call holds the handle's lock
        self.lock = threading.Lock()


class _Watcher:
    """One thread for the process that cuts the connections of stopped targets.

    The requests themselves are libnbd's blocking calls, which loop in C without the
    GIL (the asynchronous calls driven from Python made a restore into qcow2 14% slower:
    every socket wake-up came back to the interpreter). A blocking call waits for its
    server for ever, though, holding the handle's lock; so once a restore stops, this
    thread shuts the target's sockets down under it, and the call fails at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: dict[int, tuple[NbdTarget, Callable[[], bool]]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, target: NbdTarget, stopped: Callable[[], bool]) -> None:
        with self._lock:
            self._targets[id(target)] = (target, stopped)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ba-nbd-watch",
                                                daemon=True)
                with interrupts.held():  # see agent.interrupts
                    self._thread.start()

    def forget(self, target: NbdTarget) -> None:
        with self._lock:
            self._targets.pop(id(target), None)

    def _run(self) -> None:
        while True:
            time.sleep(_WATCH_INTERVAL)
            with self._lock:
                due = [t for t, stopped in self._targets.values() if stopped()]
            for t in due:
                self.forget(t)
                t.cut()


_watcher = _Watcher()


class NbdTarget:
    """A writable NBD export; each worker thread uses its own connection when allowed.

    Once the restore stops (:meth:`stop_when`), a request waiting on a stalled server
    fails within a fraction of a second (see :class:`_Watcher`) instead of when, or if,
    the server answers.
    """

    def __init__(self, uri: str, connections: int = 4, *, fresh: bool = False,
                 label: str | None = None) -> None:
        self.uri = uri
        # What messages call it: the file a restore makes, not the agent's own qemu-nbd.
        self.name = label or uri
        self.fresh = fresh
        self._stopped: Callable[[], bool] = lambda: False
        self._cut = False  # sockets shut down: no polite goodbye
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        first = self._connect()
        try:
            if first.h.is_read_only():
                raise TargetError(f"{self.name}: the NBD export is read-only")
            self.size: int = first.h.get_size()
            self._max = max(1, connections) if first.h.can_multi_conn() else 1
            self._can_zero = bool(first.h.can_zero())
            advertised = first.h.get_block_size(nbd.SIZE_MAXIMUM)  # 0: none advertised
            self._max_write = min(_MAX_WRITE, advertised) if advertised > 0 else _MAX_WRITE
        except nbd.Error as e:
            self.close()
            raise TargetError(f"{self.name}: {e.string}") from e
        except BaseException:
            self.close()
            raise

    def stop_when(self, stopped: Callable[[], bool]) -> None:
        """Cut the connections (failing any request in progress) once ``stopped()``."""
        self._stopped = stopped
        _watcher.watch(self, stopped)

    def cut(self) -> None:
        """Shut every connection's socket down: blocked requests fail at once. The
        handles stay open (their owners may be inside a call) until :meth:`close`."""
        self._cut = True
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the socket itself, not just this fd

    def _connect(self) -> _Conn:
        h = nbd.NBD()
        try:
            # The URI is the user's own (a command-line argument or job file): let it
            # name its TLS key or certificates (tls-psk-file=, tls-certificates=).
            h.set_uri_allow_local_file(True)
            h.connect_uri(self.uri)
        except nbd.Error as e:
            raise TargetError(f"cannot connect to {self.name}: {e.string}") from e
        conn = _Conn(h)
        self._conns.append(conn)
        return conn

    def _conn(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if len(self._conns) < self._max:
                    conn = self._connect()
                else:
                    conn = self._conns[threading.get_ident() % len(self._conns)]
            self._local.conn = conn
        return conn

    def _call(self, what: str, request: Callable[..., object], *args: object,
              conn: _Conn | None = None) -> None:
        """``request(handle, *args)``, a blocking libnbd call, on this thread's connection;
        TargetError if it fails, or if the restore stopped (the watcher then cut the
        connection under it)."""
        conn = conn or self._conn()
        if self._cut:
            raise TargetError(f"{self.name}: {what}: stopped")
        try:
            with conn.lock:  # threads sharing a connection take turns, as libnbd would
                request(conn.h, *args)
        except nbd.Error as e:
            if self._cut:
                raise TargetError(f"{self.name}: {what}: stopped before the server "
                                  "answered") from e
            raise TargetError(f"{self.name}: {what} failed: {e.string}") from e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        step = self._max_write
        for pos in range(0, len(view), step):
            self._call(f"write at offset {offset + pos}", nbd.NBD.pwrite,
                       view[pos:pos + step], offset + pos)

    def writev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        for part in parts:  # NBD has no vectored write: one request per part
            self.write(offset, part)
            offset += len(part)

    def zero(self, offset: int, length: int) -> None:
        if self.fresh:
            return
        end = offset + length
        if self._can_zero:
            step = 1 << 30  # servers may refuse 4 GiB and over in one request
            for off in range(offset, end, step):
                n = min(step, end - off)
                # Without NO_HOLE the server may trim.
                self._call(f"zeroing at offset {off}", nbd.NBD.zero, n, off)
            return
        # Zeros written from one shared buffer, in requests the server accepts.
        zeros = memoryview(ZEROS)
        step = self._max_write
        for off in range(offset, end, step):
            self._call(f"zeroing at offset {off}", nbd.NBD.pwrite,
                       zeros[:min(step, end - off)], off)

    def flush(self) -> None:
        for conn in list(self._conns):
            self._call("flush", nbd.NBD.flush, conn=conn)

    def close(self) -> None:
        """Disconnect politely unless the connections were cut or the restore stopped
        (a polite disconnect waits for a server that may never answer)."""
        _watcher.forget(self)
        with self._lock:  # cut() must not reach a socket whose handle is gone
            conns, self._conns = self._conns, []
        self._local = threading.local()  # the last references: libnbd closes the sockets
        for conn in conns:
            with contextlib.suppress(nbd.Error):
                # Blocking calls leave nothing in flight unless cut or stopped.
                if not self._cut and not self._stopped():
                    self._disconnect(conn.h)

    @staticmethod
    def _disconnect(h: nbd.NBD) -> None:
        h.aio_disconnect()
        deadline = time.monotonic() + _DISCONNECT_TIMEOUT
        while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
            h.poll(_POLL_MS)
