"""Reading archives in a bucket.

- :class:`ObjectStream`: the whole object as one GET, read in order (``restore``,
  ``verify``, ``config``). A connection that breaks mid-way is resumed with a ranged GET
  from the byte reached, bound to the object's ETag (``If-Match``), so the bytes can only
  come from the same object; after :data:`RESUMES` failures in a row it gives up.
- :class:`RangedObject`: a seekable read-only file over ranged GETs, in blocks of
  :data:`BLOCK` bytes fetched :data:`FETCH` at a time, with a few kept, so the archive's
  random-access reader (agent/archive/indexed.py) reads the footer, seal, index and
  header of an object as it does of a file, touching only those (``info``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import OrderedDict
from typing import Any

from agent.errors import ArchiveError
from agent.s3 import client as s3client
from agent.s3.names import S3Name, parse_object

log = logging.getLogger(__name__)

RESUMES = 5
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


class ObjectStream(_Counted):
    """The object, read once from start to end."""

    def __init__(self, name: str) -> None:
        self.target = parse_object(name)
        self._client = s3client.client(2)
        self.size, self.etag = _head(self._client, self.target)
        self._body: Any = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        want = min(len(b), self.size - self._pos)
        if want <= 0:
            return 0
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._body = self._get()
                data = self._body.read(want)
                if not data:
                    raise ConnectionError("the connection ended before the object did")
            except Exception as e:  # network errors: resume below
                if isinstance(e, ArchiveError):
                    raise
                failures += 1
                self._drop_body()
                if failures > RESUMES:
                    raise ArchiveError(s3client.describe(
                        e, f"{self.target}: reading at byte {self._pos}")) from e
                log.debug("%s: resuming at byte %d after %s", self.target, self._pos, e)
                time.sleep(min(8.0, 0.25 * 2 ** failures))
                continue
            n = len(data)
            memoryview(b).cast("B")[:n] = data
            self._pos += n
            _Counted.fetched += n
            return n

    def _get(self) -> Any:
        args: dict[str, Any] = {"Bucket": self.target.bucket, "Key": self.target.key,
                                "IfMatch": self.etag}
        if self._pos:
            args["Range"] = f"bytes={self._pos}-"
        _Counted.gets += 1
        try:
            return self._client.get_object(**args)["Body"]
        except Exception as e:
            code, status = s3client.error_code(e)
            if code == "PreconditionFailed" or status == 412:
                raise ArchiveError(f"{self.target} was replaced while it was being read") from e
            if status in (403, 404):
                raise ArchiveError(s3client.describe(e, str(self.target))) from e
            raise

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):  # a broken connection: nothing to keep
                self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


class RangedObject(_Counted):
    """A seekable read-only file over ranged GETs of one object (its ETag pinned)."""

    def __init__(self, name: str, *, block: int = BLOCK, fetch: int = FETCH,
                 client: Any = None, size: int | None = None, etag: str = "") -> None:
        """``block``, ``fetch``: bytes cached as a piece, pieces per GET at least (a prune
        reading the two ends of many archives asks for less). ``size`` and ``etag``: known
        from a listing (no HEAD then)."""
        self.target = parse_object(name)
        self._client = client if client is not None else s3client.client(2)
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

    def _get(self, first: int, last: int) -> bytes:
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
                time.sleep(min(8.0, 0.25 * 2 ** failures))
                continue
            _Counted.fetched += len(data)
            return data
