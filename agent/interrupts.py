"""SIGTERM and Ctrl-C as exceptions in the main thread, held off while it starts threads.

CPython's ``Thread.start()`` is not safe against an exception from a signal handler: one
raised just after the new thread began makes ``start()`` undo its bookkeeping while the
thread runs on, and the thread then dies on a ``KeyError`` with a traceback on stderr
(seen: SIGTERM to a backup as its writer thread started; 1 run in about 30). Code of the
main thread that starts threads, directly or through a pool's ``submit``, does it
inside :func:`held`; a signal that comes meanwhile is raised as the block ends.

The main thread also never waits without a bound while other threads run. Linux may
hand a signal sent to the process to any thread; Python runs the handler in the main
thread, but only once that thread runs Python again, and a wait that does not end leaves
Ctrl-C unanswered (seen: a restore blocked on a stalled pipe, 1 run in 15). So reads of
pipes, joins and waits for results go in steps of :data:`STEP` seconds.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from agent.errors import Interrupted

#: Longest single wait of the main thread (see above).
STEP = 0.2

_depth = 0  # held() blocks the main thread is in
_pending: BaseException | None = None  # the first signal that came inside them


def install() -> None:
    """Make SIGTERM raise :class:`Interrupted` and SIGINT ``KeyboardInterrupt`` in the
    main thread, outside :func:`held` blocks."""
    signal.signal(signal.SIGTERM, _handler(lambda: Interrupted("stopped by SIGTERM")))
    # Python's own handler, unless SIGINT was ignored (started in the background): keep that.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler(KeyboardInterrupt))


def _handler(make: Callable[[], BaseException]) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        global _pending
        if _depth:
            _pending = _pending or make()
            return
        raise make()

    return handle


def join(t: threading.Thread) -> None:
    """``t.join()`` in steps of :data:`STEP` (see above)."""
    while t.is_alive():
        t.join(STEP)


@contextmanager
def held() -> Iterator[None]:
    """Hold off the signal handlers' exceptions for the block (main thread only; in other
    threads, where handlers never run, it does nothing)."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    # Reached only when the block did not raise: then the held signal is the news.
    if not _depth and _pending is not None:
        e, _pending = _pending, None
        raise e
