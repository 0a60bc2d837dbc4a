"""The agent's end of the target's ``feed`` stream: copied clusters straight into the archive.

QEMU copies the old contents of a cluster to our nbdkit plugin before a guest write; the
plugin sends them on here (protocol: :mod:`agent.cbw.control`). For each run it sends, a
:class:`CopyFeed` thread takes a read buffer from the backup's budget, receives the bytes
into it and hands them to the engine (:meth:`agent.engine.BackupEngine.push`), which claims
the parts nobody claimed yet and queues their records. It then acknowledges exactly those
parts, and the plugin frees them::

    plugin ── D off len + bytes ──▶ FeedClient ──▶ engine.push ──▶ workers ──▶ writer
                                   (runs that arrive together: one buffer, one push)
       ▲                                │ owned parts
       └────────── A off len ───────────┘

Why the acknowledgement names only the claimed parts: a part the sweep claimed first is read
through QEMU's snapshot view, which reads copied clusters from the plugin, so the plugin must
keep it until QEMU's trim (the sweep's release) frees it; its pushed bytes are dropped here
(both hold the same point-in-time data). A claimed part is never read through QEMU, so the
plugin may drop it at once, before the record is even written: from then on the bytes count
against the agent's read-buffer budget. When that budget is spent the thread waits for a
buffer and stops reading the socket; the plugin's sender then waits and the copies stay in
the plugin's memory and spool. QEMU's copies never wait for us: when the plugin is full it
refuses a copy and QEMU breaks the snapshot (the backup fails, the guest writes on).

Acknowledgements are sent in one batch whenever the thread is about to wait for the socket.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable
from typing import Protocol

from agent import interrupts
from agent.cbw.control import ControlError

#: Bytes asked of the socket at once for headers (data goes straight into its buffer).
RECV = 1 << 16
#: Runs handed to the engine at once at most (besides the buffer's size).
GATHER = 64


class Sink(Protocol):
    """Where pushed copies go: :class:`agent.engine.BackupEngine`."""

    def push_buffer(self, n: int, block: bool = True) -> bytearray | None: ...

    def push(self, device_id: int, parts: list[tuple[int, int]], buf: bytearray | None
             ) -> list[tuple[int, int]]: ...


class FeedClient:
    """One ``feed`` connection: headers and data in, acknowledgements out.

    Not thread-safe, except :meth:`shutdown`, which ends a blocked :meth:`next` from
    another thread.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self._pending = bytearray()  # received, not consumed yet
        self._acks: list[bytes] = []
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"feed\n")
            sock.settimeout(None)  # blocking from now on: shutdown() ends a wait
        except OSError as e:
            sock.close()
            raise self.error(f"{e.strerror or e} (is the plugin running?)") from e
        self._sock = sock

    def error(self, what: str) -> ControlError:
        return ControlError(f"copy-before-write plugin control socket {self.path}: {what}")

    def _recv(self) -> bool:
        """Append what the socket has to the pending bytes (sending the acknowledgements
        first: we are about to wait); False at the end of the stream."""
        self.flush()
        try:
            chunk = self._sock.recv(RECV)
        except ConnectionResetError:
            chunk = b""  # the plugin went away: the end of the stream
        except OSError as e:
            raise self.error(e.strerror or str(e)) from e
        self._pending += chunk
        return bool(chunk)

    def next(self) -> tuple[bytes, int, int] | None:
        """The next header, ``(b"D" or b"Z", offset, length)``; None when the stream ends
        (the plugin closed it, or :meth:`shutdown`). After ``D``, read exactly ``length``
        bytes with :meth:`read_into` before the next header."""
        while (end := self._pending.find(b"\n")) < 0:
            if len(self._pending) > 256:
                raise self.error(f"unexpected data {bytes(self._pending[:40])!r}")
            if not self._recv():
                if self._pending:
                    raise self.error("the stream ended inside a header")
                return None
        line = bytes(self._pending[:end])
        del self._pending[:end + 1]
        parts = line.split()
        try:
            kind, offset, length = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            kind, offset, length = b"", -1, -1
        if len(parts) != 3 or kind not in (b"D", b"Z") or offset < 0 or length <= 0:
            raise self.error(f"unexpected line {line!r}")
        return kind, offset, length

    def ready(self) -> bool:
        """Whether :meth:`next` has a header to return without waiting for the socket."""
        if b"\n" in self._pending:
            return True
        readable, _, _ = select.select([self._sock], [], [], 0)
        return bool(readable)

    def read_into(self, view: memoryview) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes of data."""
        got = min(len(view), len(self._pending))
        view[:got] = self._pending[:got]
        del self._pending[:got]
        while got < len(view):
            if not self._pending:
                self.flush()
            try:
                n = self._sock.recv_into(view[got:])
            except OSError as e:
                raise self.error(e.strerror or str(e)) from e
            if not n:
                raise self.error("the stream ended inside a run of data")
            got += n

    def ack(self, ranges: list[tuple[int, int]]) -> None:
        """Queue acknowledgements of ``(start, end)`` ranges; sent before the next wait."""
        self._acks += [f"A {a} {b - a}\n".encode() for a, b in ranges]

    def flush(self) -> None:
        if self._acks:
            data, self._acks = b"".join(self._acks), []
            try:
                self._sock.sendall(data)
            except OSError as e:
                raise self.error(e.strerror or str(e)) from e

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


class CopyFeed:
    """One thread per disk feeding its target's copies into ``sink``.

    ``targets`` maps the archive's device id to the control socket of that disk's target;
    ``piece`` is the most bytes pushed at once (the engine's read size). The first error
    goes to ``failed`` (not after :meth:`close` began: the stream's end is then expected).
    """

    def __init__(self, sink: Sink, targets: dict[int, str], piece: int,
                 failed: Callable[[BaseException], None]) -> None:
        self._sink = sink
        self._piece = piece
        self._failed = failed
        self._stopping = threading.Event()
        self._clients: dict[int, FeedClient] = {}
        try:
            for device_id, path in targets.items():
                self._clients[device_id] = FeedClient(path)
        except BaseException:
            self.close()
            raise
        self._threads = [threading.Thread(target=self._run, args=(i, c), daemon=True,
                                          name=f"ba-cbw-feed{i}")
                         for i, c in self._clients.items()]
        with interrupts.held():  # see agent.interrupts
            for t in self._threads:
                t.start()

    def close(self) -> None:
        """End every stream and wait (briefly) for the threads. Idempotent."""
        self._stopping.set()
        for client in self._clients.values():
            client.shutdown()
        for t in getattr(self, "_threads", []):
            if t.ident is not None:
                t.join(2)
        for client in self._clients.values():
            client.close()

    def _run(self, device_id: int, client: FeedClient) -> None:
        try:
            self._feed(device_id, client)
        except BaseException as e:
            if not self._stopping.is_set():
                self._failed(e)

    def _feed(self, device_id: int, client: FeedClient) -> None:
        # Runs that arrive together go to the engine together, in one buffer (as a gathered
        # read does): one hand-off between the agent's threads per batch, not per cluster.
        sink, piece = self._sink, self._piece
        parts: list[tuple[int, int]] = []  # in buf, one after another
        buf: bytearray | None = None
        used = 0
        while True:
            if parts and not client.ready():  # nothing more for now: hand these over
                client.ack(sink.push(device_id, parts, buf))
                parts, buf, used = [], None, 0
            header = client.next()
            if header is None:
                if parts:  # (only the buffer matters now: nothing can be acknowledged)
                    sink.push(device_id, parts, buf)
                break
            kind, offset, length = header
            if kind == b"Z":
                client.ack(sink.push(device_id, [(offset, length)], None))
                continue
            end = offset + length
            for pos in range(offset, end, piece):
                n = min(piece, end - pos)
                if buf is not None and (used + n > len(buf) or len(parts) == GATHER):
                    client.ack(sink.push(device_id, parts, buf))
                    parts, buf, used = [], None, 0
                if buf is None:
                    buf = sink.push_buffer(piece, block=False)
                    if buf is None:  # the budget is spent: free what the plugin may, wait
                        client.flush()
                        buf = sink.push_buffer(piece)
                    if buf is None:  # the backup stops
                        return
                client.read_into(memoryview(buf)[used:used + n])
                parts.append((pos, n))
                used += n
        if not self._stopping.is_set():
            raise client.error("the plugin closed the stream")
