"""Configuration and request handling of the copy-before-write target nbdkit plugin.

``nbd-plugins/cbw_target.py`` only forwards nbdkit's callbacks here and turns errors into
errno values (``StoreFull`` -> ENOSPC, ``NotStored`` -> EIO, ``Replaced`` -> EPERM,
other errors -> EINVAL/EIO).
Parameters::

    size=SIZE           export size, the size of the disk being backed up (required)
    memory=SIZE         bytes of copied clusters kept in memory (default 256M)
    spool-dir=DIR       directory of the spool file (default: $TMPDIR)
    spool-limit=SIZE    bytes of copied clusters kept in the spool file (default 0: none)
    control=PATH        Unix socket for stored ranges, the copies' feed and stats (optional)
    cluster=SIZE        copy cluster size (default 64K, QEMU's for an NBD target)

SIZE takes a suffix K, M, G or T (powers of 1024), as nbdkit's own parameters do.

Who may connect: when the environment variable ``BACKUP_AGENT_CBW_EXPORT`` is set (the agent
sets it to 128 random bits per disk and backup, and gives the same name to QEMU's NBD client
node as its ``export``), a client asking for any other export name is refused at once, before
it can read or write anything. The name is a secret shared with the one QEMU being backed up:
under TLS it travels only inside the encrypted session (nbdkit ``--tls=require`` refuses every
option before STARTTLS), and it is no parameter because a command line is visible to every
user of the host, a process's environment only to its owner.
"""

from __future__ import annotations

import os

from agent import units
from agent.cbw.control import ControlServer
from agent.cbw.store import CLUSTER, ClusterStore, Extent
from agent.errors import InvalidArgument

#: The environment variable holding the one export name the target serves (module doc).
EXPORT_ENV = "BACKUP_AGENT_CBW_EXPORT"

def parse_size(key: str, text: str) -> int:
    """``64M`` -> 67108864 (agent.units' grammar); raises InvalidArgument naming the
    parameter."""
    try:
        return units.parse_size(text)
    except InvalidArgument:
        raise InvalidArgument(f"cbw_target: {key}={text!r} is not a size (e.g. 512M, 4G)"
                              ) from None


class Config:
    """The plugin's parameters."""

    def __init__(self) -> None:
        self.size: int | None = None
        self.memory = 256 << 20
        self.spool_dir: str | None = None
        self.spool_limit = 0
        self.control: str | None = None
        self.cluster = CLUSTER
        self.export: str | None = os.environ.get(EXPORT_ENV) or None


class WrongExport(InvalidArgument):
    """A client asked for another export than the secret one: not the QEMU being backed up."""


class CbwTarget:
    """One plugin instance: parameters, then the store and its control socket."""

    def __init__(self) -> None:
        self.config = Config()
        self._store: ClusterStore | None = None
        self._control: ControlServer | None = None

    def set(self, key: str, value: str) -> None:
        c = self.config
        if key == "size":
            c.size = parse_size(key, value)
        elif key == "memory":
            c.memory = parse_size(key, value)
        elif key == "spool-limit":
            c.spool_limit = parse_size(key, value)
        elif key == "cluster":
            c.cluster = parse_size(key, value)
        elif key == "spool-dir":
            c.spool_dir = value
        elif key == "control":
            c.control = value
        else:
            raise InvalidArgument(
                f"cbw_target: unknown parameter {key!r} "
                "(size, memory, spool-dir, spool-limit, control, cluster)"
            )

    def complete(self) -> None:
        """Check the parameters and make the store (before nbdkit forks or serves)."""
        if self.config.size is None:
            raise InvalidArgument("cbw_target: size=SIZE is required (the disk's size)")
        c = self.config
        self._store = ClusterStore(c.memory, c.spool_dir, c.spool_limit, c.cluster, size=c.size)

    def start(self) -> None:
        """Start the control socket's thread (nbdkit's after_fork: threads do not survive
        a fork, and nbdkit forks when it daemonizes)."""
        if self.config.control is not None and self._control is None:
            self._control = ControlServer(self.config.control, self.store)
            self._control.start()

    def stop(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            control.close()
        if self._store is not None:
            self._store.close()

    def check_export(self, name: str) -> None:
        """Refuse a connection that asks for another export than the configured one."""
        want = self.config.export
        if want is None:
            return
        import hmac  # here: only a connection needs it, not the plugin's start

        if not hmac.compare_digest(name.encode(), want.encode()):
            raise WrongExport("cbw_target: refused a client that asked for another export "
                              "than the one of this backup (not the QEMU being backed up)")

    @property
    def store(self) -> ClusterStore:
        if self._store is None:
            raise InvalidArgument("cbw_target: used before its configuration was complete")
        return self._store

    @property
    def size(self) -> int:
        return self.store.size or 0

    def pread(self, offset: int, length: int) -> bytes:
        return self.store.read(offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.store.write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.store.write_zeroes(offset, length)

    def trim(self, offset: int, length: int) -> None:
        self.store.trim(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.store.extents(offset, length)
