"""The archive output into a bucket: a multipart upload fed by the stream.

::

    write() ─▶ part buffer (filled in place) ─▶ full: upload_part on a pool thread
                                              (at most UPLOADS at once; the writer waits
                                               for a free slot, so memory stays bounded)
    commit() ─▶ last part ─▶ wait for all ─▶ CompleteMultipartUpload(If-None-Match: *)
    abort()  ─▶ AbortMultipartUpload: no object, and no parts left to pay for

Nothing is visible under the archive's name until the upload is completed, so a failed,
interrupted or killed backup never leaves a complete-looking object. The name is checked
to be free before the upload starts, and the completion is conditional (``If-None-Match:
*``): another agent that wrote the same name meanwhile makes this one fail, never
overwritten. SeaweedFS, AWS S3 and MinIO honour the condition (PreconditionFailed); a store
that answers NotImplemented gets a second HEAD just before an unconditional completion.

Part sizes: S3 takes at most 10,000 parts per upload, each 5 MiB to 5 GiB (the last one
smaller). Parts start at :data:`PART_SIZE` (``BACKUP_AGENT_S3_PART_SIZE``, 8 MiB) and grow
by that much every 1,000 parts (8, 16, ... 80 MiB): 10,000 parts hold 55,000 times the
first size, 430 GiB at 8 MiB. Once the devices' total size is known (:meth:`expect`), the
first size is raised so that the total fits with room. Memory: one part being filled plus
``BACKUP_AGENT_S3_UPLOADS`` (4) being sent, 40 MiB for 8 MiB parts; fewer are sent at once
when that would pass :data:`MEMORY` (256 MiB), but at least one: a stream of N bytes needs
parts of N/10,000 bytes at least, and two of them in memory (a 2 TiB disk of incompressible
data ends with parts of 432 MiB: 864 MiB).

An upload whose process was killed (``kill -9``, a crash, power) stays in the bucket,
invisible but billed, until a bucket lifecycle rule (``AbortIncompleteMultipartUpload``,
docs/DEPLOY.md) or ``prune`` aborts it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from agent import interrupts
from agent.archive.output import Buf, SequentialOutput
from agent.errors import InvalidArgument, OutputError
from agent.s3 import client as s3client
from agent.s3.names import S3Name, parse_object
from agent.units import GiB, MiB, parse_size

log = logging.getLogger(__name__)

PART_SIZE = 8 * MiB
MIN_PART = 5 * MiB  # S3's minimum for every part but the last
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
GROW_EVERY = 1_000  # parts; then parts grow by one first size
UPLOADS = 4
ABORT_WAIT = 10.0  # seconds
#: Part buffers alive at once stay within this, as long as two parts fit in it.
MEMORY = 256 * MiB
#: 10,000 parts growing as above hold this many times the first part's size.
CAPACITY = sum(1 + n // GROW_EVERY for n in range(MAX_PARTS))  # 55,000
#: Room over the devices' total size: record framing, index, incompressible data.
_ROOM = 1.25


def settings() -> tuple[int, int]:
    """(first part size, uploads at once) from the environment, checked."""
    size = PART_SIZE
    text = os.environ.get("BACKUP_AGENT_S3_PART_SIZE", "")
    if text:
        size = parse_size(text)
        if not MIN_PART <= size <= MAX_PART:
            raise InvalidArgument(f"BACKUP_AGENT_S3_PART_SIZE={text}: S3 parts are 5M to 5G")
    uploads = UPLOADS
    text = os.environ.get("BACKUP_AGENT_S3_UPLOADS", "")
    if text:
        if not text.isdecimal() or not 1 <= int(text) <= 64:
            raise InvalidArgument(f"BACKUP_AGENT_S3_UPLOADS={text}: give 1 to 64")
        uploads = int(text)
    return size, uploads


def first_part_for(nbytes: int, configured: int) -> int:
    """The first part's size for an archive of about ``nbytes`` of devices: ``configured``,
    or larger (whole MiB) so that 10,000 growing parts hold the devices with room."""
    need = -(-int(nbytes * _ROOM) // CAPACITY)
    need = -(-need // MiB) * MiB
    return min(MAX_PART, max(configured, need))


def capacity(first: int) -> int:
    """The longest stream 10,000 parts hold when the first is ``first`` bytes."""
    return sum(part_size(first, n) for n in range(1, MAX_PARTS + 1))


def part_size(first: int, number: int) -> int:
    """The size of part ``number`` (1-based) when the first is ``first``."""
    return min(MAX_PART, first * (1 + (number - 1) // GROW_EVERY))


class S3Output(SequentialOutput):
    """``s3://BUCKET/KEY``: see the module's docstring."""

    def __init__(self, name: str) -> None:
        super().__init__(-1, name)
        self.target: S3Name = parse_object(name)
        self.first_part, self.uploads = settings()
        self._client = s3client.client(self.uploads + 2)
        self._what = str(self.target)
        self._check_free()
        try:
            reply = self._client.create_multipart_upload(Bucket=self.target.bucket,
                                                         Key=self.target.key)
        except Exception as e:
            raise OutputError(s3client.describe(e, self._what)) from e
        self.upload_id: str | None = reply["UploadId"]
        log.debug("%s: multipart upload %s, parts from %d bytes, %d at once", name,
                  self.upload_id, self.first_part, self.uploads)
        self._pool = cf.ThreadPoolExecutor(self.uploads, thread_name_prefix="s3-upload")
        self._pending: set[cf.Future[None]] = set()
        self._etags: dict[int, str] = {}
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._spare: list[bytearray] = []
        self._number = 1  # of the part being filled
        self._buf = bytearray(self._size())
        self._fill = 0
        self.parts_sent = 0
        self.peak_parts = 0  # buffers alive at once, the one being filled included

    # -- checks ---------------------------------------------------------------------------

    def _check_free(self) -> None:
        """The bucket exists and nothing has the archive's name yet."""
        b, k = self.target
        try:
            self._client.head_bucket(Bucket=b)
        except Exception as e:
            if s3client.is_missing(e):
                raise OutputError(f"{self._what}: the bucket {b!r} does not exist") from e
            raise OutputError(s3client.describe(e, f"s3://{b}")) from e
        try:
            self._client.head_object(Bucket=b, Key=k)
        except Exception as e:
            if s3client.is_missing(e):
                return
            raise OutputError(s3client.describe(e, self._what)) from e
        raise OutputError(f"{self._what} already exists: an archive is never replaced; "
                          "choose another name or delete that object first")

    # -- writing --------------------------------------------------------------------------

    def expect(self, nbytes: int) -> None:
        """The archive will be about ``nbytes`` long (the devices' size): make the parts
        large enough that 10,000 of them hold it."""
        first = first_part_for(nbytes, self.first_part)
        if first > self.first_part:
            log.debug("%s: parts from %d bytes for %d bytes of devices", self.name, first,
                      nbytes)
            self.first_part = first

    def _size(self) -> int:
        return part_size(self.first_part, self._number)

    def write(self, parts: Sequence[Buf]) -> None:
        for p in parts:
            view = memoryview(p).cast("B")
            while len(view):
                if self._number > MAX_PARTS:
                    raise OutputError(f"{self._what}: the archive outgrew 10,000 parts: "
                                      "raise BACKUP_AGENT_S3_PART_SIZE (docs/S3.md)")
                size = self._size()
                if len(self._buf) < size:  # the first part grew (expect) or a new tier
                    self._buf.extend(bytes(size - len(self._buf)))
                take = min(len(view), size - self._fill)
                self._buf[self._fill:self._fill + take] = view[:take]
                self._fill += take
                self.position += take
                view = view[take:]
                if self._fill == size:
                    self._send()

    def _send(self) -> None:
        """Hand the full buffer to a pool thread; wait first while all slots are busy."""
        self._raise_failure()
        while len(self._pending) >= self._slots(len(self._buf)):
            self._wait_one()
        body = self._buf if self._fill == len(self._buf) else bytes(self._buf[:self._fill])
        number = self._number
        with interrupts.held():  # submit may start a thread
            self._pending.add(self._pool.submit(self._upload, number, body))
        self.peak_parts = max(self.peak_parts, len(self._pending) + 1)
        self._number += 1
        with self._lock:
            spare = self._spare.pop() if self._spare else None
        self._buf = spare if spare is not None else bytearray(self._size())
        self._fill = 0

    def _slots(self, size: int) -> int:
        """Parts sent at once: ``uploads``, fewer once parts are so large that they and the
        one being filled pass the memory budget (never fewer than one)."""
        return max(1, min(self.uploads, MEMORY // size - 1))

    def _upload(self, number: int, body: bytearray | bytes) -> None:
        b, k = self.target
        try:
            reply = self._client.upload_part(Bucket=b, Key=k, UploadId=self.upload_id,
                                             PartNumber=number, Body=body)
        except BaseException as e:
            with self._lock:
                if self._error is None:
                    self._error = e
            raise
        with self._lock:
            self._etags[number] = reply["ETag"]
            self.parts_sent += 1
            if isinstance(body, bytearray) and len(body) == part_size(self.first_part,
                                                                      self._number):
                self._spare.append(body)  # the next part's size: reuse it

    def _wait_one(self) -> None:
        # In steps, so that Ctrl-C is answered (agent.interrupts).
        done, self._pending = cf.wait(self._pending, timeout=interrupts.STEP,
                                      return_when=cf.FIRST_COMPLETED)
        for f in done:
            if f.exception() is not None:
                self._raise_failure()

    def _raise_failure(self) -> None:
        with self._lock:
            e = self._error
        if e is not None:
            raise OutputError(s3client.describe(e, f"{self._what}: uploading a part")) from e

    # -- the end --------------------------------------------------------------------------

    def commit(self) -> None:
        if self._fill or self._number == 1:
            self._send()  # the last part (any size), or the only one
        while self._pending:
            self._wait_one()
        self._raise_failure()
        parts = [{"PartNumber": n, "ETag": t} for n, t in sorted(self._etags.items())]
        self._complete(parts)
        self.upload_id = None  # completed: nothing to abort
        self._check_size()

    def _complete(self, parts: list[dict[str, Any]]) -> None:
        b, k = self.target
        args = {"Bucket": b, "Key": k, "UploadId": self.upload_id,
                "MultipartUpload": {"Parts": parts}}
        try:
            self._client.complete_multipart_upload(**args, IfNoneMatch="*")
            return
        except Exception as e:
            code, status = s3client.error_code(e)
            if code == "PreconditionFailed" or status == 412:
                raise OutputError(f"{self._what} was created by someone else during this "
                                  "backup: it is left as it is, this backup is dropped") from e
            if code not in ("NotImplemented", "InvalidArgument") and status != 501:
                raise OutputError(s3client.describe(e, f"{self._what}: completing")) from e
            log.debug("%s: conditional completion not supported (%s): HEAD, then complete",
                      self.name, code)
        self._check_free_again()
        try:
            self._client.complete_multipart_upload(**args)
        except Exception as e:
            raise OutputError(s3client.describe(e, f"{self._what}: completing")) from e

    def _check_free_again(self) -> None:
        try:
            self._client.head_object(Bucket=self.target.bucket, Key=self.target.key)
        except Exception as e:
            if s3client.is_missing(e):
                return
            raise OutputError(s3client.describe(e, self._what)) from e
        raise OutputError(f"{self._what} was created by someone else during this backup: "
                          "it is left as it is, this backup is dropped")

    def _check_size(self) -> None:
        """The object the store made is as long as the stream written (a store that lost
        a part must not pass for a complete archive)."""
        try:
            head = self._client.head_object(Bucket=self.target.bucket, Key=self.target.key)
        except Exception as e:
            raise OutputError(s3client.describe(e, f"{self._what}: checking")) from e
        if int(head["ContentLength"]) != self.position:
            # Ours (the completion was conditional): never leave it to look complete.
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.target.bucket, Key=self.target.key)
            raise OutputError(f"{self._what}: the store made an object of "
                              f"{head['ContentLength']} bytes of the {self.position} written; "
                              "it was deleted")

    def abort(self) -> None:
        """Stop sending and abort the upload; never raises (the first error is the news).
        Parts being sent get :data:`ABORT_WAIT` seconds to end (a stalled store must not
        hold the way out); one that ends later fails, as its upload is gone."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        cf.wait(self._pending, timeout=ABORT_WAIT)
        if self.upload_id is None:
            return
        for attempt in range(3):
            try:
                self._client.abort_multipart_upload(Bucket=self.target.bucket,
                                                    Key=self.target.key,
                                                    UploadId=self.upload_id)
                log.debug("%s: upload %s aborted", self.name, self.upload_id)
                self.upload_id = None
                return
            except Exception as e:  # cleanup: report, never mask the cause
                if s3client.is_missing(e):  # NoSuchUpload: nothing left
                    self.upload_id = None
                    return
                if attempt == 2:  # the error that brought us here is the news, in one line
                    log.debug("%s", s3client.describe(
                        e, f"{self._what}: cannot abort upload {self.upload_id} (the bucket's "
                        "lifecycle rule or prune removes it)"))
                    return
                time.sleep(0.5 * (attempt + 1))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)  # (commit waited for all)
