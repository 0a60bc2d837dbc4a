"""nbdkit Python plugin: serve the devices of a backup archive (or chain) over NBD.

All logic lives in ``agent.serve`` (tested there); this file only maps nbdkit's callbacks
and errno values. ``backup-agent serve`` starts it::

    nbdkit --foreground -r -U SOCK python nbd-plugins/serve_archive.py \\
        archive=FULL [archive=INC ...] [device=NAME ...] [cache=SIZE] [log=FILE]

``log=FILE``: write the lines for the user (a damaged record) there instead of stderr.

nbdkit does not put this folder on sys.path: start it with PYTHONPATH holding the repository
(for ``agent``) and the virtual environment's site-packages.
"""

from __future__ import annotations

import builtins
import errno
import sys
from collections.abc import Callable

import nbdkit

from agent.errors import AgentError
from agent.serve.image import DamagedRecord, DeviceImage
from agent.serve.plugin import NoSuchExport, ServePlugin

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _T = TypeVar("_T")

API_VERSION = 2

_plugin = ServePlugin()


def _fail(e: Exception) -> None:
    """Choose the errno the NBD client sees for ``e`` (raised again by the caller)."""
    if isinstance(e, NoSuchExport):
        nbdkit.set_error(errno.ENOENT)
        return
    if isinstance(e, DamagedRecord):
        # The log line the user reads, naming the record; the client gets EIO.
        sys.stderr.write(f"backup-agent: serve: {e}\n")
        sys.stderr.flush()
    nbdkit.set_error(errno.EIO)


def _call(fn: Callable[[], _T]) -> _T:
    """Run one request, choosing the errno the NBD client sees on failure."""
    try:
        return fn()
    except Exception as e:
        _fail(e)
        raise


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    if key == "log":
        # A daemonized nbdkit's stderr is /dev/null: the lines for the user go to this file
        # (opened now, before nbdkit forks; appended to, as nbdkit's own output may be).
        sys.stderr = builtins.open(value, "a", buffering=1)  # noqa: SIM115 (nbdkit's life)
        return
    _plugin.set(key, value)


def config_complete() -> None:
    try:
        _plugin.complete()
    except AgentError as e:
        # One line the agent shows as the reason nbdkit did not start.
        sys.stderr.write(f"backup-agent: serve: {e}\n")
        sys.stderr.flush()
        raise


def cleanup() -> None:
    _plugin.close()


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    return _plugin.exports()


def default_export(readonly: bool, is_tls: bool) -> str | None:
    return _plugin.default_export()


def open(readonly: bool) -> DeviceImage:  # shadows the builtin: nothing here needs it
    return _call(lambda: _plugin.device(nbdkit.export_name()))


def get_size(h: DeviceImage) -> int:
    return h.size


def can_write(h: Any) -> bool:
    return False


def can_extents(h: Any) -> bool:
    return True


def can_multi_conn(h: Any) -> bool:
    return True  # read-only, and every connection reads the same records


def can_cache(h: Any) -> int:
    return int(nbdkit.CACHE_EMULATE)


def pread(h: DeviceImage, buf: bytearray, offset: int, flags: int) -> None:
    try:  # not through _call: this is every read's path, a lambda less counts
        buf[:] = h.read(offset, len(buf))
    except Exception as e:
        _fail(e)
        raise


def extents(h: DeviceImage, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    limit = 1 if flags & nbdkit.FLAG_REQ_ONE else 4096
    return [(o, n, hole if zero else 0)
            for o, n, zero in _call(lambda: h.extents(offset, count, limit))]
