"""nbdkit Python plugin: the copy-before-write target of a live backup.

QEMU's copy-before-write filter writes the old contents of each cluster here just before the
guest overwrites it; the control socket sends them on to the agent, which tells it when they
may go (QEMU reads them here only for an agent read of the snapshot view that got there
first, and trims those). All logic lives in ``agent.cbw`` (tested there); this file only maps
nbdkit's callbacks and errno values.

    nbdkit --foreground -U SOCK python nbd-plugins/cbw_target.py \\
        size=SIZE [memory=SIZE] [spool-dir=DIR] [spool-limit=SIZE] [control=PATH]

nbdkit does not put this folder on sys.path: start it with PYTHONPATH holding the repository
(for ``agent``) and the virtual environment's site-packages.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import nbdkit

from agent.cbw.plugin import CbwTarget, WrongExport
from agent.cbw.store import Misaligned, NotStored, Replaced, StoreFull

# typing costs every live backup's start (this plugin's) 9 ms; mypy takes this as True.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

API_VERSION = 2

_target = CbwTarget()


def _call(fn: Callable[[], _T]) -> _T:
    """Run one request, choosing the errno the NBD client sees on failure."""
    try:
        return fn()
    except StoreFull as e:
        nbdkit.set_error(errno.ENOSPC)  # QEMU breaks the snapshot, never the guest write
        nbdkit.debug(str(e))
        raise
    except NotStored:
        nbdkit.set_error(errno.EIO)
        raise
    except Replaced:
        nbdkit.set_error(errno.EPERM)  # nbdkit logs the exception's message on stderr
        raise
    except WrongExport:
        nbdkit.set_error(errno.EPERM)
        raise
    except Misaligned:
        nbdkit.set_error(errno.EINVAL)
        raise
    except Exception:
        nbdkit.set_error(errno.EIO)
        raise


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    _target.set(key, value)


def config_complete() -> None:
    _target.complete()


def after_fork() -> None:
    _target.start()


def cleanup() -> None:
    _target.stop()


def open(readonly: bool) -> object:  # shadows the builtin: nothing here needs it
    # Only the QEMU being backed up knows the export name (agent.cbw.plugin): anyone else
    # is turned away here, before a single read or write.
    _call(lambda: _target.check_export(nbdkit.export_name()))
    return _target


def get_size(h: Any) -> int:
    return _target.size


def can_write(h: Any) -> bool:
    return True


def can_trim(h: Any) -> bool:
    return True


def can_zero(h: Any) -> bool:
    return True


def can_extents(h: Any) -> bool:
    return True


def can_flush(h: Any) -> bool:
    return True


def can_multi_conn(h: Any) -> bool:
    return True  # one shared store: every connection sees every completed write


def pread(h: Any, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = _call(lambda: _target.pread(offset, len(buf)))


def pwrite(h: Any, buf: bytes, offset: int, flags: int) -> None:
    _call(lambda: _target.pwrite(offset, buf))  # the store copies buf before returning


def zero(h: Any, count: int, offset: int, flags: int) -> None:
    _call(lambda: _target.zero(offset, count))


def trim(h: Any, count: int, offset: int, flags: int) -> None:
    _call(lambda: _target.trim(offset, count))


def flush(h: Any, flags: int) -> None:
    pass  # nothing here outlives the process: there is nothing to make durable


def extents(h: Any, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    def kind(stored: bool, zero: bool) -> int:
        if not stored:
            return int(nbdkit.EXTENT_HOLE)
        return int(nbdkit.EXTENT_ZERO) if zero else 0

    return [
        (e.offset, e.length, kind(e.stored, e.zero))
        for e in _call(lambda: _target.extents(offset, count))
    ]
