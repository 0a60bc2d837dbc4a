"""The copy-before-write target's control socket: stored ranges and their data, and stats.

The plugin listens on a Unix socket (``control=PATH``, mode 0600). A client connects and
sends one command line; the protocol is ASCII lines (and, on ``feed``, the data itself), so
``socat - UNIX:PATH`` can debug it::

    client: feed\\n          server: D <offset> <length>\\n<length bytes>   data, or
                                    Z <offset> <length>\\n   all-zero clusters: every range
                                    stored, first everything stored now (not yet trimmed),
                                    then each later write in the order QEMU made them (runs
                                    of at most 1 MiB), with what is stored there, each byte
                                    sent once; the stream lasts until either side closes
            A <offset> <length>\\n   (any time, client to server) the client has the range and
                                    will not read it through QEMU: the store frees every whole
                                    cluster inside it (:meth:`ClusterStore.take`)
    client: stats\\n         server: {json}\\n                 the store's counters, then closes
    anything else           server: E <message>\\n            then closes

Why ``feed``: the agent used to learn of a copy from a stream of ranges, read it back through QEMU's
snapshot-access node (agent → QEMU → copy-before-write → NBD → this plugin) and trim it there
(through QEMU again) so that the plugin freed it: two more trips through QEMU's main loop per
copied cluster, competing with the guest for it. Sent here, a copy crosses QEMU once, as it
must. Until the client acknowledges a range (``A``) the store keeps it, because a read through
the snapshot view may still come for it (the agent's sweep may have claimed it first); the
client acknowledges only what it will never read that way. Nothing here makes QEMU's copy
wait for the client: a client that reads slowly holds up only the sender thread, the store
fills, and a copy it cannot take fails (ENOSPC: QEMU breaks the snapshot, never the guest).

Why a pushed stream rather than asking the store what it holds: the agent must learn of a
copy soon after QEMU makes it (those clusters cost memory) without polling or scanning; one
line per QEMU write (64 KiB to 1 MiB) is cheap, and the store journals only for connected
clients. A range trimmed before its line is sent is not announced; a line is a hint that data
is there, and reading it may still fail if the agent itself trimmed it meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from types import TracebackType

from agent.cbw.store import ClusterStore, StoreError, Subscription
from agent.errors import AgentError

#: How often server threads look at their stop flag, in seconds.
POLL_INTERVAL = 0.2
#: Longest run of one ``D`` line, and bytes sent in one system call at most.
FEED_RUN = 1 << 20
#: Buffers in one system call at most (IOV_MAX is 1024).
FEED_PARTS = 256
#: How long the feed's sender lets copies gather after sending some, in seconds.
FEED_LINGER = 0.002


class ControlError(AgentError):
    """The copy-before-write plugin's control socket failed or sent something unexpected."""


class ControlServer:
    """Serves :mod:`agent.cbw.control`'s protocol for one store, from daemon threads."""

    def __init__(self, path: str, store: ClusterStore) -> None:
        self.path = path
        self.store = store
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._sock.bind(path)
            os.chmod(path, 0o600)
            self._sock.listen(8)
            self._sock.settimeout(POLL_INTERVAL)
        except OSError as e:
            self._sock.close()
            raise ControlError(f"control socket {path}: {e.strerror or e}") from e
        self._thread = threading.Thread(target=self._accept_loop, name="cbw-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every client's stream, remove the socket. Idempotent."""
        self._stop.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
            # A connection wakes accept() at once instead of after its poll timeout:
            # that wait cost 0.2 s of every backup, 40% of a small incremental.
            wake.settimeout(1)
            wake.connect(self.path)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stop.is_set():  # close() woke us
                conn.close()
                return
            threading.Thread(
                target=self._serve, args=(conn,), name="cbw-control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                command = _read_line(conn)
                if command == "feed":
                    conn.settimeout(None)
                    self._feed(conn)
                elif command == "stats":
                    conn.sendall(json.dumps(self.stats()).encode() + b"\n")
                else:
                    conn.sendall(f"E unknown command {command!r}\n".encode())
            except OSError:
                pass  # the client went away; nothing to tell anyone

    def stats(self) -> dict[str, int]:
        return dict(vars(self.store.stats()))

    def _feed(self, conn: socket.socket) -> None:
        """Send each stored range with its data; free what the client acknowledges."""
        sub: Subscription = self.store.subscribe()
        acks = threading.Thread(target=self._take_acks, args=(conn, sub),
                                name="cbw-control-acks", daemon=True)
        acks.start()
        store = self.store
        try:
            while not self._stop.is_set():
                batch = sub.get(timeout=POLL_INTERVAL)
                if batch is None:
                    return
                parts: list[bytes] = []
                size = 0
                for offset, length in batch:
                    for o, n, chunks in store.data_runs(offset, length, FEED_RUN):
                        if chunks is None:
                            parts.append(f"Z {o} {n}\n".encode())
                        else:
                            parts.append(f"D {o} {n}\n".encode())
                            parts += chunks
                            size += n
                        if size >= FEED_RUN or len(parts) >= FEED_PARTS:
                            _send_parts(conn, parts)
                            parts, size = [], 0
                if parts:
                    _send_parts(conn, parts)
                if batch:
                    # Let copies gather: one wake-up of this thread per few ms of copies,
                    # not one per cluster (each takes the GIL from QEMU's next copy).
                    time.sleep(FEED_LINGER)
        finally:
            sub.close()
            # The acknowledgement thread's file keeps the socket open: end the connection
            # itself, so that the client sees the stream end.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _take_acks(self, conn: socket.socket, sub: Subscription) -> None:
        """Free each range the client acknowledges; end the feed when the client goes."""
        try:
            with conn.makefile("rb") as lines:
                for line in lines:
                    parts = line.split()
                    if len(parts) != 3 or parts[0] != b"A":
                        return  # not our client: end the stream
                    self.store.take(int(parts[1]), int(parts[2]))
        except (OSError, ValueError, StoreError):
            pass  # the client went away, or the store closed
        finally:
            sub.close()  # the sender stops at once
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _send_parts(conn: socket.socket, parts: list[bytes]) -> None:
    """Send ``parts`` in order, as few system calls as the socket allows (no joining)."""
    views = [memoryview(p) for p in parts]
    while views:
        sent = conn.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def _read_line(conn: socket.socket, limit: int = 256) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _peer_closed(conn: socket.socket) -> bool:
    """True when the client has closed its end (readable with nothing to read)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class ControlClient:
    """The agent's side of the control socket's ``stats`` command (``feed`` has a client
    of its own: :class:`agent.cbw.feed.FeedClient`)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self, command: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
            sock.sendall(command.encode() + b"\n")
        except OSError as e:
            sock.close()
            raise ControlError(
                f"copy-before-write plugin control socket {self.path}: {e.strerror or e} "
                "(is the plugin running?)"
            ) from e
        return sock

    def stats(self) -> dict[str, int]:
        """The store's counters (see :class:`agent.cbw.store.StoreStats`)."""
        sock = self._connect("stats")
        with sock:
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError as e:
                raise ControlError(f"control socket {self.path}: {e.strerror or e}") from e
        try:
            stats: dict[str, int] = json.loads(data)
        except ValueError as e:
            raise ControlError(f"control socket {self.path}: bad stats reply {data!r}") from e
        return stats

    def close(self) -> None:
        pass  # each command's connection closes once its answer is read

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
