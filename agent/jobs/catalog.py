"""A directory of archives: how they are named, what their headers say, one user at a time,
and pruning.

Names sort by time and show the kind: ``vm1-20261126T020000Z-full.arc`` (UTC, the time the
backup started). A job writes ``.vm1-20261126T020000Z.RANDOM.arc`` (the output layer first
writes it as ``..vm1-...arc.RANDOM.partial`` and renames it when complete), reads the kind
from the finished archive's header and only then renames it to its final name, so the name
says what the header says, whatever was asked for.

Only visible ``*.arc`` files count; hidden files (unfinished output) and other files are
never touched. Chains are found from headers (agent/jobs/retention.py), not from names, so
archives renamed or copied by hand are still recognised.
"""

from __future__ import annotations

import calendar
import contextlib
import fcntl
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from agent.archive.format import (
    DIGEST_SIZE,
    FRAME,
    PREAMBLE,
    Header,
    Kind,
    RecordType,
    check_preamble,
    digest,
    unpack_frame,
)
from agent.archive.indexed import seal_of
from agent.archive.output import rename_durably
from agent.errors import AgentError, ArchiveError
from agent.files import token
from agent.jobs.retention import ArchiveDesc, Plan, plan

SUFFIX = ".arc"
log = logging.getLogger("backup-agent")


def stamp(when: float) -> str:
    """UTC, to the second, in a form that sorts as text: ``20261126T020000Z``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))


def archive_name(job: str, when: float, kind: str | None) -> str:
    """``JOB-STAMP-KIND.arc``, or ``JOB-STAMP.arc`` when the kind is not known beforehand
    (an ``auto`` backup piped into a command)."""
    return f"{job}-{stamp(when)}-{kind}{SUFFIX}" if kind else f"{job}-{stamp(when)}{SUFFIX}"


_NAMED = re.compile(r"(.+?)-\d{8}T\d{6}Z(-[a-z]+)?(_\d+)?" + re.escape(SUFFIX))


def job_of(path: str) -> str:
    """The job an archive's name says it belongs to (``vm1`` for
    ``vm1-20261126T020000Z-full.arc``), or "" for a name not made by a job."""
    m = _NAMED.fullmatch(os.path.basename(path))
    return m.group(1) if m else ""


def kind_name(kind: Kind) -> str:
    return kind.name.lower()


def read_header(path: str) -> Header:
    """The header of an archive file, from its first record only: cheap whatever the
    archive's size, and there even when the rest of the archive is missing."""
    try:
        with open(path, "rb") as f:
            return header_from(f, path)
    except OSError as e:
        raise AgentError(f"cannot read {path}: {e.strerror}") from e


def header_from(f: BinaryIO, path: str) -> Header:
    """:func:`read_header` of an open file or object (agent/s3/bucket.py)."""
    check_preamble(f.read(PREAMBLE.size))
    frame = unpack_frame(f.read(FRAME.size).ljust(FRAME.size, b"\0"), PREAMBLE.size)
    body = f.read(frame.body_len)
    if frame.rtype != RecordType.HEADER or frame.seq != 0 or len(body) != frame.body_len:
        raise ArchiveError(f"{path}: the archive does not start with a header record")
    if digest(body) != f.read(DIGEST_SIZE):
        raise ArchiveError(f"{path}: the archive's header record fails its checksum")
    return Header.decode(body)


def read_desc(path: str) -> ArchiveDesc:
    """What retention needs of one file; raises AgentError if it is not a readable archive."""
    header = read_header(path)
    try:
        size = os.stat(path).st_size
        # The footer and end record say the writer finished the archive. Nothing else is
        # read (not the index): a directory of large archives is scanned in a few reads
        # per file, in memory that does not grow with them.
        seal_of(path)
        complete = True
    except ArchiveError:
        complete = False
    except OSError as e:
        raise AgentError(f"cannot read {path}: {e.strerror}") from e
    return ArchiveDesc(path=path, uuid=header.uuid, parent=header.parent_uuid,
                       kind=header.kind, created_ns=header.created_ns, complete=complete,
                       size=size)


@dataclass(frozen=True)
class Scan:
    archives: list[ArchiveDesc]
    unreadable: list[tuple[str, str]]  # (path, why): *.arc files that are no archive we read


def scan(directory: str) -> Scan:
    """Every visible ``*.arc`` regular file of ``directory`` (symbolic links are not
    followed: what they point to is not this directory's to prune)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise AgentError(f"cannot read directory {directory}: {e.strerror}") from e
    archives, unreadable = [], []
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.endswith(SUFFIX):
            continue
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            archives.append(read_desc(path))
        except FileNotFoundError:
            continue  # deleted while we looked
        except (AgentError, OSError) as e:
            unreadable.append((path, str(e)))
    return Scan(archives, unreadable)


def newest_full(found: Scan) -> ArchiveDesc | None:
    """The newest complete full archive, by the time in its header."""
    fulls = [a for a in found.archives if a.kind == Kind.FULL and a.complete]
    return max(fulls, key=lambda a: a.created_ns, default=None)


LOCK = ".backup-agent.lock"


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold the directory for one job run or prune at a time: an advisory lock, released
    when the process ends however it ends. It is taken on a file in the directory, not on
    the directory itself: over NFS a lock is a byte-range lock and needs a file open for
    writing. Where locks do not work at all, the work goes on unlocked (the lock only keeps
    a manual prune from racing a nightly job)."""
    path = os.path.join(directory, LOCK)
    try:
        # Never through a symbolic link planted at the name: the lock is this directory's.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise AgentError(f"cannot use directory {directory}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AgentError(f"{directory} is in use by another backup-agent (a job run or "
                             "a prune); try again when it is done") from None
        except OSError as e:
            log.warning("cannot lock %s (%s): going on without the lock", path, e.strerror)
        yield
    finally:
        os.close(fd)


def hidden_path(directory: str, job: str, when: float) -> str:
    """Where a job's backup goes until its header says its kind: ``.JOB-STAMP.RANDOM.arc``.
    Random, so that nothing can be planted at it beforehand (the output layer writes
    straight into a FIFO or a device found at its path, through a symbolic link too)."""
    return os.path.join(directory, f".{job}-{stamp(when)}.{token()}{SUFFIX}")


def final_path(directory: str, job: str, when: float, kind: str) -> str:
    """Where a finished archive goes: its name, or with ``_2``, ``_3``... if two backups of
    the job started within the same second (``_`` sorts after the ``.`` of the first)."""
    base = archive_name(job, when, kind)[: -len(SUFFIX)]
    path, n = os.path.join(directory, base + SUFFIX), 1
    while os.path.lexists(path):
        n += 1
        path = os.path.join(directory, f"{base}_{n}{SUFFIX}")
    return path


def publish(tmp: str, directory: str, job: str, when: float) -> tuple[str, str]:
    """Give the finished archive ``tmp`` its final name (with the kind from its header);
    returns the new path and the kind. Call it holding :func:`locked`."""
    kind = kind_name(read_header(tmp).kind)
    while True:
        path = final_path(directory, job, when, kind)
        try:
            # Never over a name that appeared since final_path looked: take the next one.
            rename_durably(tmp, path, replace=False)
        except FileExistsError:
            continue
        except OSError as e:
            raise AgentError(f"cannot rename {tmp} to {path}: {e.strerror}") from e
        return path, kind


def adopt_leftovers(directory: str, job: str) -> list[str]:
    """Finished archives a killed run did not get to rename (``.JOB-STAMP.RANDOM.arc``, or
    ``.JOB-STAMP.arc`` from earlier versions): rename them now, so that they count for
    retention and as parents. Returns the new paths."""
    pattern = re.compile(
        rf"\.{re.escape(job)}-(\d{{8}}T\d{{6}}Z)(?:\.[a-z0-9]{{8}})?{re.escape(SUFFIX)}")
    adopted = []
    for name in sorted(os.listdir(directory)):
        m = pattern.fullmatch(name)
        if m is None:
            continue
        tmp = os.path.join(directory, name)
        when = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))
        try:
            if not stat.S_ISREG(os.lstat(tmp).st_mode):
                continue  # a symbolic link is not an archive this job wrote
            seal_of(tmp)  # only a complete archive gets a visible name
        except (ArchiveError, OSError):
            continue
        adopted.append(publish(tmp, directory, job, when)[0])
    return adopted


@dataclass(frozen=True)
class PruneResult:
    plan: Plan
    deleted: list[ArchiveDesc]
    unreadable: list[tuple[str, str]]


def prune(directory: str, keep_chains: int, dry_run: bool = False) -> PruneResult:
    """Delete the chains older than the newest ``keep_chains`` of each job (the name of the
    chain's full archive tells the job; names no job made count as one more job: see
    agent/jobs/retention.py). Call it holding :func:`locked` unless ``dry_run``."""
    found = scan(directory)
    todo = plan(found.archives, keep_chains, lambda a: job_of(a.path))
    deleted = []
    for a in [] if dry_run else todo.doomed():
        try:
            os.unlink(a.path)
        except FileNotFoundError:
            pass  # gone already: what we wanted
        except OSError as e:
            raise AgentError(f"cannot delete {a.path}: {e.strerror}") from e
        deleted.append(a)
    return PruneResult(todo, deleted, found.unreadable)
