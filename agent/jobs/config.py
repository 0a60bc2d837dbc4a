"""The job configuration file, ``/etc/backup-agent/jobs.toml``: parsed and checked.

Layout (deploy/jobs.toml is the example with every field explained)::

    [defaults]                      optional: what every job inherits unless it says otherwise
    keep_chains = 4

    [jobs.vm1]                      one table per job; the name appears in archive names
    qmp = "/run/backup-agent/vm1.qmp"         and in systemd instance names (backup-agent@vm1)
    dir = "/srv/backups/vm1"                  a directory (or "s3://BUCKET/vm1"), or
                                              command = "..." (a pipe)

Everything is checked before any job runs. A wrong field is one line naming the file, the
job and the field (``jobs.toml: job "vm1": keep_chains must be a positive integer, got
"x"``); an unknown key is refused with the list of known ones, so a typo never silently
turns an option off.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from agent.address import is_tcp
from agent.archive.codec import CompressionSpec
from agent.archive.format import check_name
from agent.errors import AgentError, ArchiveError, InvalidArgument
from agent.modes import MODES
from agent.pace import PaceSpec
from agent.units import parse_size

DEFAULT_PATH = "/etc/backup-agent/jobs.toml"

# Job names end up in file names, in shell commands ({name}) and in systemd instance names:
# keep them to characters that need no quoting or escaping anywhere.
_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

# Keys [defaults] may set; keep_chains and full_every from there apply to dir jobs only.
_SHARED = ("mode", "full_every", "keep_chains", "compression", "cbw_memory", "spool_dir",
           "spool_limit", "cbw_timeout", "max_rate", "fs_freeze", "freeze_timeout",
           "encrypt_to")
# The guest agent (docs/LIVE.md): each VM has its own channel or hooks.
_FREEZE_KEYS = ("qga", "freeze_mountpoints", "freeze_command", "thaw_command")
_NETWORK_KEYS = ("qemu_nbd_addr", "cbw_listen")  # jobs whose monitor is HOST:PORT only
_JOB_KEYS = ("qmp", "tls", "drives", "dir", "command", "commit_command", "qemu_nbd_socket",
             "configs", *_NETWORK_KEYS, *_SHARED, *_FREEZE_KEYS)
_TLS_KEYS = ("creds_dir", "psk_file", "psk_user")
_DIR_ONLY = ("keep_chains", "full_every")


@dataclass(frozen=True)
class Tls:
    """TLS for a VM on another host (docs/NETWORK.md): the agent's ``--tls-creds``,
    ``--tls-psk`` and ``--tls-username``."""

    creds_dir: str  # X.509: ca-cert.pem, client-cert.pem, client-key.pem (QMP needs X.509)
    psk_file: str | None = None  # TLS-PSK keys (USER:HEXKEY) for the NBD connections
    psk_user: str | None = None  # the identity in psk_file; None: its first


@dataclass(frozen=True)
class Job:
    name: str
    qmp: str  # a Unix socket path, or HOST:PORT (then ``tls`` is set)
    dir: str | None = None  # exactly one of dir and command
    command: str | None = None  # the archive is piped into it; {name} = the archive's name
    commit_command: str | None = None  # run after the archive went through ``command``
    tls: Tls | None = None
    drives: tuple[str, ...] = ()  # device ids or node names; () = every disk
    mode: str = "auto"
    keep_chains: int | None = None  # None: never prune
    full_every: int | None = None  # seconds
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    # None below: the agent's own default (agent/live/job.py LiveJob), one place to change it.
    cbw_memory: int | None = None
    spool_dir: str | None = None
    spool_limit: int | None = None
    cbw_timeout: int | None = None
    max_rate: PaceSpec | None = None  # the background sweep's pace (agent/pace.py)
    qemu_nbd_socket: str | None = None
    configs: tuple[tuple[str, str], ...] = ()  # (name in the archive, file)
    qemu_nbd_addr: str | None = None  # network jobs: QEMU's NBD server, HOST[:PORT]
    cbw_listen: str | None = None  # network jobs: where the copy-before-write target listens
    fs_freeze: str | None = None  # auto | required | off (docs/LIVE.md); None: auto
    freeze_timeout: int | None = None
    qga: str | None = None  # the guest agent's channel
    freeze_mountpoints: tuple[str, ...] = ()
    freeze_command: str | None = None
    thaw_command: str | None = None
    encrypt_to: tuple[bytes, ...] = ()  # X25519 public keys (--encrypt-to); () = plain

    @property
    def network(self) -> bool:
        """Whether the monitor is reached over TCP (``HOST:PORT``)."""
        return is_tcp(self.qmp)


@dataclass(frozen=True)
class JobsFile:
    path: str
    jobs: dict[str, Job]  # in the order of the file

    def select(self, names: Sequence[str]) -> list[Job]:
        """The jobs named (each once, in the order given), or every job for no names."""
        if not names:
            return list(self.jobs.values())
        chosen: list[Job] = []
        for name in names:
            if name not in self.jobs:
                have = ", ".join(self.jobs)
                raise InvalidArgument(f'{self.path}: no job "{name}" (it has: {have})')
            if self.jobs[name] not in chosen:
                chosen.append(self.jobs[name])
        return chosen


def load_jobs(path: str = DEFAULT_PATH) -> JobsFile:
    """Read and check the whole file; raises InvalidArgument with a one-line message."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise InvalidArgument(f"{path}: not valid TOML: {e}") from e
    return parse_jobs(data, path)


def parse_jobs(data: dict[str, Any], path: str) -> JobsFile:
    """Check the parsed TOML ``data``; ``path`` names the file in messages."""
    top = _Table(data, path, ("defaults", "jobs"))
    defaults = _shared(_Table(top.table("defaults") or {}, f"{path}: defaults", _SHARED))
    jobs_table = top.table("jobs")
    if not jobs_table:
        top.fail("no jobs: add a [jobs.NAME] table for each VM to back up")
    jobs: dict[str, Job] = {}
    for name, body in jobs_table.items():
        if not _JOB_NAME.fullmatch(name):
            top.fail(f'job name "{name}" is not usable: use up to 64 letters, digits, "_", '
                     '"." and "-", starting with a letter or digit')
        if not isinstance(body, dict):
            top.fail(f'job "{name}" must be a table ([jobs.{name}]), got {_show(body)}')
        jobs[name] = _job(name, _Table(body, f'{path}: job "{name}"', _JOB_KEYS), defaults)
    _check_dirs_unshared(path, jobs)
    return JobsFile(path, jobs)


def _job(name: str, t: _Table, defaults: dict[str, Any]) -> Job:
    own = _shared(t)
    qmp = t.string("qmp")
    if qmp is None:
        t.fail('qmp is missing: the VM\'s QMP monitor for the agent, e.g. '
               'qmp = "/run/backup-agent/vm1.qmp"')
    tls_body = t.table("tls")
    tls = None
    if is_tcp(qmp):
        if tls_body is None:
            t.fail(f"qmp {_show(qmp)} is a network address: it needs a [jobs.{name}.tls] table "
                   '(creds_dir = "..."); a monitor on a Unix socket needs none')
        tls = _tls(_Table(tls_body, f"{t.where}: tls", _TLS_KEYS))
    else:
        if not os.path.isabs(qmp):
            t.fail(f"qmp must be an absolute Unix socket path or HOST:PORT, got {_show(qmp)}")
        if tls_body is not None:
            t.fail('tls is only for a monitor reached over the network (qmp = "HOST:PORT")')
        for key in _NETWORK_KEYS:
            if key in t.data:
                t.fail(f'{key} is only for a monitor reached over the network '
                       '(qmp = "HOST:PORT")')

    dest_dir, command = t.destination("dir"), t.string("command")
    if (dest_dir is None) == (command is None):
        t.fail('give exactly one destination: dir = "/srv/backups/NAME" (files) or '
               "command = \"ssh backup@host 'cat > /srv/NAME/{name}'\" (a pipe)")
    commit_command = t.string("commit_command")
    if command is None and commit_command is not None:
        t.fail("commit_command goes with command (a dir destination renames its files "
               "itself)")
    settings = {**defaults, **own}
    if command is not None:
        for key in _DIR_ONLY:
            if key in own:
                t.fail(f"{key} needs a dir destination: the agent cannot see the files behind "
                       "a command (run backup-agent prune on the host that keeps them)")
            settings.pop(key, None)  # from [defaults]: meant for the dir jobs
    return Job(name=name, qmp=qmp, tls=tls, dir=dest_dir, command=command,
               commit_command=commit_command, drives=t.strings("drives") or (),
               qemu_nbd_socket=t.path("qemu_nbd_socket"), configs=_configs(t),
               qemu_nbd_addr=t.string("qemu_nbd_addr"), cbw_listen=t.string("cbw_listen"),
               **_freeze(t, settings), **settings)


def _freeze(t: _Table, settings: dict[str, Any]) -> dict[str, Any]:
    """The guest agent's keys, checked together as ``backup`` checks its options."""
    from agent.live.freeze import FreezeOptions  # (only jobs files pay for it)
    found: dict[str, Any] = {
        "qga": t.path("qga"), "freeze_mountpoints": t.strings("freeze_mountpoints") or (),
        "freeze_command": t.string("freeze_command"), "thaw_command": t.string("thaw_command"),
    }
    try:
        FreezeOptions(mode=settings.get("fs_freeze") or "auto", qga=found["qga"],
                      mountpoints=list(found["freeze_mountpoints"]),
                      freeze_command=found["freeze_command"],
                      thaw_command=found["thaw_command"]).check()
    except InvalidArgument as e:
        t.fail(str(e).replace("--fs-freeze", "fs_freeze").replace("--", "").replace("-", "_"))
    return found


def _shared(t: _Table) -> dict[str, Any]:
    """The keys a job and [defaults] both take; only those given."""
    found = {
        "mode": t.choice("mode", MODES),
        "keep_chains": t.positive("keep_chains"),
        "full_every": t.duration("full_every"),
        "compression": t.compression("compression"),
        "cbw_memory": t.size("cbw_memory"),
        "spool_dir": t.path("spool_dir"),
        "spool_limit": t.size("spool_limit"),
        "cbw_timeout": t.positive("cbw_timeout"),
        "max_rate": t.rate("max_rate"),
        "fs_freeze": t.choice("fs_freeze", ("auto", "required", "off")),
        "freeze_timeout": t.positive("freeze_timeout"),
        "encrypt_to": t.recipients("encrypt_to"),
    }
    return {k: v for k, v in found.items() if v is not None}


def _tls(t: _Table) -> Tls:
    creds_dir = t.path("creds_dir")
    if creds_dir is None:
        t.fail("creds_dir is missing: the directory of the agent's X.509 credentials "
               "(ca-cert.pem, client-cert.pem, client-key.pem; QMP over TLS needs them)")
    psk_file, psk_user = t.path("psk_file"), t.string("psk_user")
    if psk_user is not None and psk_file is None:
        t.fail("psk_user goes with psk_file (the TLS-PSK keys of the NBD connections)")
    return Tls(creds_dir, psk_file, psk_user)


def _configs(t: _Table) -> tuple[tuple[str, str], ...]:
    body = t.table("configs")
    if body is None:
        return ()
    out = []
    for name, file in body.items():
        try:
            check_name(name, "config")
        except ArchiveError as e:
            t.fail(f"configs: {e}")
        if not isinstance(file, str) or not os.path.isabs(file):
            t.fail(f'configs: "{name}" must be the absolute path of a file, got {_show(file)}')
        out.append((name, file))
    return tuple(out)


def _check_dirs_unshared(path: str, jobs: dict[str, Job]) -> None:
    # Retention works on a whole directory (chains are found by their headers, whatever
    # the file names), so two jobs in one directory would prune each other's archives.
    seen: dict[str, str] = {}
    for job in jobs.values():
        if job.dir is None:
            continue
        key = os.path.normpath(job.dir)
        if key in seen:
            raise InvalidArgument(
                f'{path}: jobs "{seen[key]}" and "{job.name}" both write to {job.dir}: give '
                "each job a directory of its own (retention works on whole directories)")
        seen[key] = job.name


class _Table:
    """One TOML table being read: unknown keys are refused up front; each getter returns
    None for a missing key and fails, with the table's place in the message, on a bad one."""

    def __init__(self, data: dict[str, Any], where: str, known: Sequence[str]) -> None:
        self.data = data
        self.where = where
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1) or [
                    k for k in sorted(known) if k.startswith(key)][:1]
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.fail(f'unknown key "{key}"{hint}; known keys: {", ".join(sorted(known))}')

    def fail(self, message: str) -> NoReturn:
        raise InvalidArgument(f"{self.where}: {message}")

    def _bad(self, key: str, what: str) -> NoReturn:
        self.fail(f"{key} must be {what}, got {_show(self.data[key])}")

    def table(self, key: str) -> dict[str, Any] | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, dict):
            self._bad(key, f"a table ([...{key}])")
        return value

    def string(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self._bad(key, "a non-empty string")
        return value

    def path(self, key: str) -> str | None:
        value = self.string(key)
        if value is not None and not os.path.isabs(value):
            self._bad(key, "an absolute path")
        return value

    def destination(self, key: str) -> str | None:
        """An absolute directory, or a prefix in a bucket (``s3://BUCKET/PREFIX``)."""
        value = self.string(key)
        if value is not None and value.startswith("s3://"):
            from agent.s3.names import parse_prefix  # (no boto3: names only)

            try:
                return str(parse_prefix(value))
            except InvalidArgument as e:
                self.fail(f"{key}: {e}")
        if value is not None and not os.path.isabs(value):
            self._bad(key, "an absolute path")  # (or s3://BUCKET/PREFIX: docs/S3.md)
        return value

    def choice(self, key: str, choices: Sequence[str]) -> str | None:
        value = self.data.get(key)
        if value is not None and value not in choices:
            self._bad(key, "one of " + ", ".join(f'"{c}"' for c in choices))
        return value

    def positive(self, key: str) -> int | None:
        value = self.data.get(key)
        # bool is an int in Python; true is no count
        if value is not None and (type(value) is not int or value < 1):
            self._bad(key, "a positive integer")
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self._bad(key, 'a list of names, e.g. ["vda", "vdb"]')
        if len(set(value)) != len(value):
            self._bad(key, "a list without repeats")
        return tuple(value)

    def size(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        n = -1
        if type(value) is int:
            n = value
        elif isinstance(value, str):
            with contextlib.suppress(InvalidArgument):
                n = parse_size(value)
        if n < 4096:
            self._bad(key, 'a size of at least 4K, such as "256M" or "1G"')
        return n

    def rate(self, key: str) -> PaceSpec | None:
        value = self.data.get(key)
        if value is None:
            return None
        if type(value) is int:
            value = str(value)
        if not isinstance(value, str):
            self._bad(key, 'a rate in bytes per second such as "50M", or "auto"')
        try:
            return PaceSpec.parse(value)
        except InvalidArgument as e:
            self.fail(f"{key}: {e}")

    def duration(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        m = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
        if m is None or int(m.group(1)) < 1:
            self._bad(key, 'a duration such as "7d", "12h" or "2w" (units s, m, h, d, w)')
        return int(m.group(1)) * _SECONDS[m.group(2)]

    def recipients(self, key: str) -> tuple[bytes, ...] | None:
        """Public keys (``bapub1:...``) or files holding one, as ``--encrypt-to`` takes."""
        given = self.strings(key)
        if given is None:
            return None
        from agent.keys import public_from_arg  # only jobs that encrypt pay for cryptography

        try:
            return tuple(public_from_arg(g) for g in given)
        except AgentError as e:
            self.fail(f"{key}: {e}")

    def compression(self, key: str) -> CompressionSpec | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self._bad(key, '"zstd", "zstd:LEVEL" or "none"')
        try:
            return CompressionSpec.parse(value)
        except ValueError as e:
            self.fail(f"{key}: {e}")


def _show(value: Any) -> str:
    """A value as it was written in the file (TOML-like), short enough for one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, str | int | float):
        text = json.dumps(value)
    else:  # dates and times
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."

