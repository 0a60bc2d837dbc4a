"""What every restore target is (:class:`Target`), and :class:`Sink`: one device's target
together with how the restore commits it or throws it away."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from agent.archive.format import Device
from agent.errors import AgentError, TargetError
from agent.files import is_ours, remove_if_ours, remove_made_dirs, rename_noreplace

if TYPE_CHECKING:
    from agent.nbd.qemu_nbd import QemuNbd

log = logging.getLogger(__name__)

# Shared by every target (a restore of 1,024 devices opens 1,024 of them at once), and
# never written to: its pages stay the kernel's shared zero page, costing no memory.
ZEROS = bytes(32 * 1024 * 1024)


class Target(Protocol):
    name: str
    size: int
    fresh: bool  # reads as zeros everywhere: zero ranges need no request

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    # ``parts`` one after another from ``offset``: adjacent records in one request.
    def writev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    # Once stopped() is true (the restore was interrupted), no wait for a server lasts.
    def stop_when(self, stopped: Callable[[], bool]) -> None: ...


class Sink:
    """Where one device goes, and how it is committed or thrown away: the target, and
    for a new file its temporary and final names, the agent's qemu-nbd serving it and the
    directories the restore made for it."""

    def __init__(self, device: Device, target: Target, final: Path | None = None,
                 temp: Path | None = None, server: QemuNbd | None = None,
                 in_place: bool = False, made_dirs: list[Path] | None = None,
                 lock_fd: int = -1, reopen: Reopen | None = None,
                 ident: tuple[int, int] | None = None) -> None:
        self.device = device
        self.target = target
        # Opens the target again after suspend() (None: never suspended; it holds nothing
        # worth bounding, or is the only one).
        self.reopen = reopen
        self.is_open = True
        self.final = final  # rename temp -> final on commit
        self.temp = temp
        # The temporary file's (device, inode): only that file is renamed or removed, never
        # whatever someone put at its name meanwhile.
        if temp is not None and ident is None:
            raise ValueError("internal: a sink's temporary file needs its identity")
        self.ident = ident
        self.server = server
        # Directories the restore created (shared by its sinks): removed again on failure.
        self.made_dirs = made_dirs if made_dirs is not None else []
        # The temporary file, open and locked while this restore lives (qemu-nbd writes it
        # by name): another run's agent.files.remove_stale then leaves it alone.
        self.lock_fd = lock_fd
        # Written over what was there (restore --to): a failure leaves it half old, half new.
        self.in_place = in_place
        self.touched = False  # a write or zero request was sent
        self.where = str(final) if final else target.name

    def suspend(self) -> None:
        """Close the target, its qemu-nbd and lock, keeping what was written (restore
        opens only so many targets at once: RestoreOptions.open_targets)."""
        if self.server is not None:
            self.target.flush()  # on the image before its qemu-nbd goes
        self.target.close()
        if self.server is not None:
            self.server.close()
            self.server = None
        self._unlock()
        self.is_open = False

    def resume(self, fresh: bool, stopped: Callable[[], bool]) -> None:
        """Open the target again after :meth:`suspend`."""
        if self.reopen is None:
            raise RuntimeError("internal: resuming a sink that cannot reopen")
        self.target, self.server, self.lock_fd = self.reopen()
        self.target.fresh = fresh
        self.target.stop_when(stopped)
        self.is_open = True

    def commit(self) -> None:
        self.target.flush()
        self.target.close()
        if self.server is not None:
            self.server.close()
        if self.temp is not None and self.final is not None:
            if self.ident is not None and not is_ours(self.temp, self.ident):
                raise TargetError(f"{self.where}: its temporary file {self.temp} was "
                                  "replaced while the restore ran: it was left as it is; is "
                                  f"{self.temp.parent} writable by others?")
            try:
                rename_noreplace(self.temp, self.final)
            except FileExistsError:
                raise TargetError(f"{self.final} appeared while the restore ran: it was left "
                                  "as it is; remove it or restore elsewhere") from None
            except OSError as e:
                raise TargetError(f"cannot rename {self.temp} to {self.final}: "
                                  f"{e.strerror}") from e
            log.debug("renamed %s to %s", self.temp, self.final)
            self.temp = None  # nothing of ours left to remove under that name
        self._unlock()

    def _unlock(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def discard(self) -> None:
        with contextlib.suppress(AgentError, OSError):
            self.target.close()
        if self.server is not None:
            self.server.close()
        if self.temp is not None and self.ident is not None:
            remove_if_ours(self.temp, self.ident)
        self._unlock()
        remove_made_dirs(self.made_dirs)  # once the last sink's temporary file is gone


#: A sink's target (and its qemu-nbd and lock descriptor, or -1) opened again.
Reopen = Callable[[], "tuple[Target, QemuNbd | None, int]"]
#: Makes the sink of each device of an archive (None: the device is not restored).
SinkFactory = Callable[[Device], Sink | None]
