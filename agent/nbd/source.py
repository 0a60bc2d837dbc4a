"""NBD sources: libnbd connections to one export, and its allocation map.

A source opens one connection, and more when the server advertises multi-conn.
Every connection negotiates ``base:allocation``, so the thread that owns a
connection asks block status on that same connection: no handle is ever driven
by two threads, and a server limited to N clients (``qemu-nbd --shared=N``) is
served by exactly N connections.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import nbd

from agent.errors import AgentError, SourceError
from agent.tls import TlsCreds

log = logging.getLogger("backup-agent")

# base:allocation flags
_HOLE = 1
_ZERO = 2
# qemu:dirty-bitmap:NAME flags
DIRTY_BITMAP = "qemu:dirty-bitmap:"
_DIRTY = 1


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool  # reads as zeros (a hole or a zero extent): no need to read it


CONNECT_TIMEOUT = 30.0
EXTRA_CONNECT_TIMEOUT = 2.0  # connections beyond the first are optional
POLL_MS = 200  # no libnbd wait is longer: signals and stop flags are seen promptly


def _connect(uri: str, name: str, meta: bool | str, timeout: float = CONNECT_TIMEOUT,
             tls: TlsCreds | None = None) -> nbd.NBD:
    """Connect with a deadline: a server at its connection limit accepts the socket
    and then says nothing, and libnbd's synchronous connect would wait forever."""
    h = nbd.NBD()
    try:
        h.set_handle_name(name)
        if tls is not None:
            tls.nbd_client(h)
        # libnbd zeroes every read buffer first, a guard for careless C callers; we
        # check every reply's status, and the memset cost about 10% of a backup.
        h.set_pread_initialize(False)
        if meta:
            h.add_meta_context(meta if isinstance(meta, str) else nbd.CONTEXT_BASE_ALLOCATION)
        # The URI is the user's own (--source or a job file): let it name its TLS key or
        # certificates (nbds://...?tls-psk-file=FILE, as check_nbd_uri advises).
        h.set_uri_allow_local_file(True)
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        while not h.aio_is_ready():
            left = deadline - time.monotonic()
            if left <= 0:
                # The handle is mid-handshake: shutdown() would fail; dropping it closes it.
                raise SourceError(f"cannot connect to {uri}: no answer within {timeout:.0f} s "
                                  "(is the server at its connection limit?)")
            h.poll(max(1, min(POLL_MS, int(left * 1000))))
    except nbd.Error as e:
        hint = ""
        if tls is not None and ("gnutls" in str(e.string) or "TLS" in str(e.string)):
            hint = (" (TLS refused: the server and the agent need the same PSK, or "
                    "certificates from one CA that the server's tls-authz, if any, accepts; "
                    "see docs/NETWORK.md)")
        raise SourceError(f"cannot connect to {uri}: {e.string}{hint}") from e
    return h


class NbdSource:
    """One NBD export, read by ``connections`` handles when the server allows it.

    With ``changes`` (a dirty bitmap the server exports, as QEMU does for an incremental
    backup), :meth:`changed` tells which ranges to back up. It is asked on a connection of
    its own that negotiates only that bitmap's context: QEMU answers ``base:allocation`` on
    a copy-before-write snapshot only inside the changed ranges (elsewhere the request fails
    and, asked together with the bitmap, breaks the connection).
    """

    def __init__(self, uri: str, connections: int = 4, label: str = "source",
                 changes: str | None = None, tls: TlsCreds | None = None) -> None:
        self.uri = uri
        self.label = label
        self.changes = changes
        self._context = DIRTY_BITMAP + (changes or "")  # its meta context, with changes
        self._map: nbd.NBD | None = None
        first = _connect(uri, f"{label}-0", meta=True, tls=tls)
        self.handles: list[nbd.NBD] = [first]
        try:
            if changes is not None:
                context = self._context
                self._map = _connect(uri, f"{label}-map", meta=context, tls=tls)
                if not self._map.can_meta_context(context):
                    raise SourceError(f"device {label!r}: the server does not offer the "
                                      f"dirty bitmap {changes!r} ({context})")
            self.size: int = first.get_size()
            self.has_block_status = bool(first.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
            n = max(1, connections) if first.can_multi_conn() else 1
            for i in range(1, n):
                try:
                    self.handles.append(
                        _connect(uri, f"{label}-{i}", meta=True, timeout=EXTRA_CONNECT_TIMEOUT,
                                 tls=tls)
                    )
                except SourceError as e:
                    # A server may have fewer client slots than we asked for
                    # (qemu-nbd --shared=N): read with the connections we have.
                    log.info("device %r: using %d connection(s): %s", label, i, e)
                    break
        except nbd.Error as e:
            self.close()
            raise SourceError(f"device {label!r}: {e.string}") from e
        except BaseException:
            self.close()
            raise

    def extents(
        self, h: nbd.NBD, offset: int, length: int, stopped: Callable[[], bool] = lambda: False
    ) -> list[Extent]:
        """Allocation of [offset, offset+length), asked on handle ``h`` (the caller's own);
        possibly covering less than asked (servers may answer for less), never empty.

        Asked asynchronously and waited for in short polls, so that a stalled server
        cannot keep the caller from noticing ``stopped()``."""
        if not self.has_block_status:
            return [Extent(offset, length, False)]
        found: list[Extent] = []

        def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
            if metacontext != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            pos = off
            for i in range(0, len(entries), 2):
                ln, flags = entries[i], entries[i + 1]
                ln = min(ln, offset + length - pos)
                if ln <= 0:
                    break
                zero = bool(flags & _ZERO)
                if found and found[-1].zero == zero and found[-1].offset + found[-1].length == pos:
                    found[-1] = Extent(found[-1].offset, found[-1].length + ln, zero)
                else:
                    found.append(Extent(pos, ln, zero))
                pos += ln
            return 0

        self._block_status(h, offset, length, cb, stopped)
        if not found or found[0].offset != offset:
            raise SourceError(f"device {self.label!r}: the server answered block status for "
                              "the wrong range")
        return found

    def changed(
        self, offset: int, length: int, stopped: Callable[[], bool] = lambda: False
    ) -> tuple[list[tuple[int, int]], int]:
        """The changed ``(start, end)`` runs in ``[offset, offset+length)`` and the end of
        the range the server answered for (it may answer for less than asked). Without
        ``changes``, everything has changed. Callers serialize calls (one planner each)."""
        if self._map is None:
            return [(offset, offset + length)], offset + length
        context = self._context
        runs: list[tuple[int, int]] = []
        reach = offset

        def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
            nonlocal reach
            if metacontext != context:
                return 0
            pos = off
            for i in range(0, len(entries), 2):
                ln = min(entries[i], offset + length - pos)
                if ln <= 0:
                    break
                if entries[i + 1] & _DIRTY:
                    if runs and runs[-1][1] == pos:
                        runs[-1] = (runs[-1][0], pos + ln)
                    else:
                        runs.append((pos, pos + ln))
                pos += ln
            reach = pos
            return 0

        self._block_status(self._map, offset, length, cb, stopped)
        if reach <= offset:
            raise SourceError(f"device {self.label!r}: the server sent no dirty bitmap for "
                              f"offset {offset}")
        return runs, reach

    def _block_status(self, h: nbd.NBD, offset: int, length: int,
                      cb: Callable[[str, int, list[int], int], int],
                      stopped: Callable[[], bool]) -> None:
        # NBD requests are 32-bit: ask in pieces under 4 GiB.
        try:
            cookie = h.aio_block_status(min(length, 2**32 - 2**20), offset, cb)
            while not h.aio_command_completed(cookie):
                if stopped():
                    raise AgentError("stopped")
                h.poll(POLL_MS)
        except nbd.Error as e:
            raise SourceError(f"device {self.label!r}: block status at offset {offset} "
                              f"failed: {e.string}") from e

    def close(self) -> None:
        """Disconnect politely when idle; after a failure, drop the connection at once
        (shutdown() would wait for replies a stalled server may never send)."""
        for h in [*self.handles, *([self._map] if self._map else [])]:
            with contextlib.suppress(nbd.Error):
                if h.aio_in_flight() == 0:
                    h.shutdown()
        self.handles = []  # the last reference: libnbd closes the socket
        self._map = None
