"""A prefix in a bucket as a directory of archives: what it holds, retention, stale uploads.

``s3://BUCKET/PREFIX`` is read like a directory (agent/jobs/catalog.py): the ``*.arc``
objects directly under the prefix (not in deeper "folders"; names starting with ``.`` are
left alone), each known by its header and its seal, read with two small ranged GETs, never
by its name. Chains and retention are the directory's (agent/jobs/retention.py).

Uploads: a backup killed with ``kill -9`` leaves its multipart upload behind, invisible but
billed. :func:`prune` aborts those under the prefix started more than ``uploads_older_than``
seconds ago (24 h by default: longer than a backup runs, so that an agent of the fleet
uploading right now is never cut off). A bucket lifecycle rule does the same without
``prune`` (docs/S3.md).

There is no lock in a bucket: a prune racing a job's backup is harmless, as the upload is
invisible until complete and the newest chain of a job is always kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.archive.indexed import read_seal
from agent.errors import AgentError, ArchiveError
from agent.jobs import catalog
from agent.jobs.retention import ArchiveDesc, plan
from agent.s3 import client as s3client
from agent.s3.names import S3Name, parse_prefix
from agent.s3.objects import RangedObject

log = logging.getLogger(__name__)

STALE_UPLOADS = 24 * 3600.0  # seconds
_PIECE = 64 * 1024  # bytes per ranged GET of a header or a seal


def _list(c: Any, prefix: S3Name) -> list[dict[str, Any]]:
    """The objects directly under ``prefix``."""
    objects: list[dict[str, Any]] = []
    try:
        for page in c.get_paginator("list_objects_v2").paginate(
                Bucket=prefix.bucket, Prefix=prefix.key, Delimiter="/"):
            objects.extend(page.get("Contents", []))
    except Exception as e:
        raise AgentError(s3client.describe(e, f"cannot list {prefix}")) from e
    return objects


def read_desc(c: Any, path: str, size: int, etag: str) -> ArchiveDesc:
    """What retention needs of one object: its header and whether it is sealed."""
    f = RangedObject(path, block=_PIECE, fetch=1, client=c, size=size, etag=etag)
    with f:
        header = catalog.header_from(f, path)  # type: ignore[arg-type]
        try:
            read_seal(f)  # type: ignore[arg-type]
            complete = True
        except ArchiveError:
            complete = False
    return ArchiveDesc(path=path, uuid=header.uuid, parent=header.parent_uuid,
                       kind=header.kind, created_ns=header.created_ns, complete=complete,
                       size=size)


def scan(prefix: str) -> catalog.Scan:
    """Every visible ``*.arc`` object directly under ``prefix``."""
    where = parse_prefix(prefix)
    c = s3client.client()
    archives, unreadable = [], []
    for obj in sorted(_list(c, where), key=lambda o: str(o["Key"])):
        name = str(obj["Key"])[len(where.key):]
        if name.startswith(".") or not name.endswith(catalog.SUFFIX):
            continue
        path = str(where.child(name))
        try:
            archives.append(read_desc(c, path, int(obj["Size"]), str(obj.get("ETag", ""))))
        except AgentError as e:
            unreadable.append((path, str(e)))
    return catalog.Scan(archives, unreadable)


@dataclass(frozen=True)
class Upload:
    key: str
    upload_id: str
    initiated: float  # seconds since the epoch


def stale_uploads(prefix: str, older_than: float) -> list[Upload]:
    """Multipart uploads directly under ``prefix`` started more than ``older_than`` s ago."""
    where = parse_prefix(prefix)
    c = s3client.client()
    found = []
    now = time.time()
    try:
        for page in c.get_paginator("list_multipart_uploads").paginate(
                Bucket=where.bucket, Prefix=where.key):
            for up in page.get("Uploads", []):
                key = str(up["Key"])
                when = up.get("Initiated")
                started = when.timestamp() if isinstance(when, datetime) else now
                if "/" in key[len(where.key):] or now - started < older_than:
                    continue
                found.append(Upload(key, str(up["UploadId"]), started))
    except Exception as e:
        raise AgentError(s3client.describe(e, f"cannot list the uploads of {where}")) from e
    return found


@dataclass(frozen=True)
class BucketPrune:
    result: catalog.PruneResult
    aborted: list[Upload]


def prune(prefix: str, keep_chains: int, dry_run: bool = False,
          uploads_older_than: float = STALE_UPLOADS) -> BucketPrune:
    """Delete the chains older than the newest ``keep_chains`` of each job, children first
    (as :func:`agent.jobs.catalog.prune` in a directory), and abort stale uploads."""
    where = parse_prefix(prefix)
    found = scan(prefix)
    todo = plan(found.archives, keep_chains, lambda a: catalog.job_of(a.path))
    c = s3client.client()
    deleted = []
    for a in [] if dry_run else todo.doomed():
        key = a.path[len(f"s3://{where.bucket}/"):]
        try:
            c.delete_object(Bucket=where.bucket, Key=key)
        except Exception as e:
            raise AgentError(s3client.describe(e, f"cannot delete {a.path}")) from e
        deleted.append(a)
    stale = stale_uploads(prefix, uploads_older_than)
    aborted = []
    for up in [] if dry_run else stale:
        try:
            c.abort_multipart_upload(Bucket=where.bucket, Key=up.key, UploadId=up.upload_id)
        except Exception as e:
            if not s3client.is_missing(e):  # gone already: what we wanted
                raise AgentError(s3client.describe(
                    e, f"cannot abort the upload of s3://{where.bucket}/{up.key}")) from e
        aborted.append(up)
    return BucketPrune(catalog.PruneResult(todo, deleted, found.unreadable),
                       stale if dry_run else aborted)


def when(up: Upload) -> str:
    return datetime.fromtimestamp(up.initiated, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
