"""Reading archives in a bucket.

- :class:`ObjectStream`: the whole object, read in order (``restore``, ``verify``,
  ``config``), fetched as ranged GETs of 8 MiB, four in flight. Every GET is bound to the
  object's ETag (``If-Match``), so the bytes can only come from the same object; a chunk
  whose connection breaks is fetched again, and after :data:`RESUMES` failures in a row
  the command fails.
- :class:`RangedObject`: a seekable read-only file over ranged GETs, in blocks of
  :data:`BLOCK` bytes fetched :data:`FETCH` at a time, with a few kept, so the archive's
  random-access reader (agent/archive/indexed.py) reads the footer, seal, index and
  header of an object as it does of a file, touching only those (``info``).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import time
from collections import OrderedDict, deque
from typing import Any

from agent import interrupts
from agent.errors import ArchiveError
from agent.s3 import client as s3client
from agent.s3.names import S3Name, parse_object

log = logging.getLogger(__name__)

RESUMES = 5
CHUNK = 8 << 20  # bytes per ranged GET of a stream
FIRST_CHUNK = 4 << 20  # the first: header, devices, configs and the first record
AHEAD = 4  # such GETs in flight (memory: AHEAD chunks, plus the one being read)
BLOCK = 1 << 20  # bytes cached as one piece
FETCH = 4  # blocks at least per ranged GET
_KEEP = 16  # blocks kept (16 MiB): the tail and the head each stay whole


def _head(c: Any, name: S3Name) -> tuple[int, str]:
    """(size, ETag) of the object, or ArchiveError."""
    try:
        head = c.head_object(Bucket=name.bucket, Key=name.key)
    except Exception as e:
        if s3client.is_missing(e):
            raise ArchiveError(f"cannot open {name}: no such object (or no such bucket)") from e
        raise ArchiveError(s3client.describe(e, f"cannot open {name}")) from e
    return int(head["ContentLength"]), str(head["ETag"])


class _Counted(io.RawIOBase):
    """GETs sent and bytes fetched, for tests and debug logs."""

    gets = 0
    fetched = 0
    target: S3Name
    etag: str
    _client: Any

    def _get(self, first: int, last: int) -> bytes:
        """Bytes ``first``..``last`` of the object, its ETag pinned: a broken connection is
        tried again with backoff; a replaced object or a refusal is an ArchiveError."""
        failures = 0
        while True:
            _Counted.gets += 1
            try:
                reply = self._client.get_object(Bucket=self.target.bucket, Key=self.target.key,
                                                Range=f"bytes={first}-{last}",
                                                IfMatch=self.etag)
                data: bytes = reply["Body"].read()
                if len(data) != last - first + 1:
                    raise ConnectionError(f"{len(data)} bytes came, {last - first + 1} asked")
            except Exception as e:  # sorted out below
                code, status = s3client.error_code(e)
                if code == "PreconditionFailed" or status == 412:
                    raise ArchiveError(f"{self.target} was replaced while it was being "
                                       "read") from e
                failures += 1
                if status in (403, 404) or failures > RESUMES:
                    raise ArchiveError(s3client.describe(
                        e, f"{self.target}: reading bytes {first}-{last}")) from e
                log.debug("%s: fetching bytes %d-%d again after %s", self.target, first, last,
                          e)
                time.sleep(min(8.0, 0.25 * 2 ** failures))
                continue
            _Counted.fetched += len(data)
            return data


class ObjectStream(_Counted):
    """The object, read once from start to end: ranged GETs of :data:`CHUNK` bytes, up to
    :data:`AHEAD` of them in flight on their own connections (one GET stream was bound by
    its round trips, not by either end's CPU), handed out in order. A chunk whose
    connection breaks is fetched again from the start of the chunk, bound to the ETag."""

    def __init__(self, name: str) -> None:
        self.target = parse_object(name)
        self._client = s3client.client(AHEAD + 1)
        self.size, self.etag = _head(self._client, self.target)
        self._pool = cf.ThreadPoolExecutor(AHEAD, thread_name_prefix="s3-read")
        self._chunks: deque[cf.Future[bytes]] = deque()
        self._next = 0  # the first byte of the next chunk to ask for
        self._taken = 0  # chunks handed to the reader so far
        self._chunk = memoryview(b"")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        """What the current chunk still holds, up to ``len(b)`` (a short read, as from a
        pipe: the reader asks again); the next chunk only when this one is used up."""
        out = memoryview(b).cast("B")
        if not len(out) or self._pos >= self.size:
            return 0
        if not len(self._chunk):
            self._chunk = memoryview(self._take())
        n = min(len(out), len(self._chunk))
        out[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        self._pos += n
        return n

    def _take(self) -> bytes:
        """The next chunk, asking for the ones after it first."""
        # The window opens as the reader goes on: a restore of a long chain opens every
        # archive first and reads only its start for a while, and should hold one chunk of
        # each meanwhile, not AHEAD.
        window = 1 if self._taken < 2 else min(AHEAD, self._taken)
        while self._next < self.size and len(self._chunks) < window:
            size = CHUNK if self._next else FIRST_CHUNK
            first, last = self._next, min(self.size, self._next + size) - 1
            with interrupts.held():  # submit may start a thread
                self._chunks.append(self._pool.submit(self._get, first, last))
            self._next = last + 1
        future = self._chunks.popleft()
        self._taken += 1
        while True:
            try:
                return future.result(timeout=interrupts.STEP)  # in steps: Ctrl-C
            except cf.TimeoutError:
                continue

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._chunks.clear()
        super().close()


class RangedObject(_Counted):
    """A seekable read-only file over ranged GETs of one object (its ETag pinned)."""

    def __init__(self, name: str, *, block: int = BLOCK, fetch: int = FETCH,
                 client: Any = None, size: int | None = None, etag: str = "",
                 connections: int = 2) -> None:
        """``block``, ``fetch``: bytes cached as a piece, pieces per GET at least (a prune
        reading the two ends of many archives asks for less). ``size`` and ``etag``: known
        from a listing (no HEAD then). ``connections``: GETs at once (:meth:`pread` from
        several threads)."""
        self.target = parse_object(name)
        self._client = client if client is not None else s3client.client(connections)
        if size is None:
            size, etag = _head(self._client, self.target)
        self.size, self.etag = size, etag
        self._block_size, self._fetch = block, fetch
        self._pos = 0
        self._blocks: OrderedDict[int, bytes] = OrderedDict()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def pread(self, n: int, pos: int) -> bytes:
        """Up to ``n`` bytes at ``pos`` in one ranged GET, fewer only at the end of the
        object: neither the position nor the cache is touched, so threads may share it
        (a served archive's records, agent/serve/image.py)."""
        last = min(self.size, pos + n) - 1
        if n <= 0 or last < pos:
            return b""
        return self._get(pos, last)

    def readinto(self, b: Any) -> int:
        """As many bytes as asked, fewer only at the end of the object."""
        out = memoryview(b).cast("B")
        got = 0
        while got < len(out) and self._pos < self.size:
            block_no = self._pos // self._block_size
            block = self._block(block_no, len(out) - got)
            start = self._pos - block_no * self._block_size
            n = min(len(out) - got, len(block) - start)
            out[got:got + n] = block[start:start + n]
            got += n
            self._pos += n
        return got

    def _block(self, block_no: int, wanted: int) -> bytes:
        """Block ``block_no``. A miss fetches at least ``fetch`` blocks in one GET, those
        around it that fit in the object, so that the tail (footer, seal, index) and the
        head (header, devices, the first record) cost one GET each."""
        block = self._blocks.get(block_no)
        if block is not None:
            self._blocks.move_to_end(block_no)
            return block
        bs = self._block_size
        count = max(self._fetch, -(-(self._pos - block_no * bs + wanted) // bs))
        blocks = -(-self.size // bs)
        first_no = max(0, min(block_no, blocks - count))
        first = first_no * bs
        last = min(self.size, first + count * bs) - 1
        data = self._get(first, last)
        for i in range(0, len(data), bs):
            self._blocks[first_no + i // bs] = data[i:i + bs]
            self._blocks.move_to_end(first_no + i // bs)
        while len(self._blocks) > _KEEP:
            self._blocks.popitem(last=False)
        start = (block_no - first_no) * bs
        return data[start:start + bs]
