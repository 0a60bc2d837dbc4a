"""Signals held off while the main thread starts threads, raised as the block ends."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from agent import interrupts
from agent.errors import Interrupted


@pytest.fixture
def installed() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupts.install()
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_signal_inside_the_block_is_raised_as_it_ends(installed: None) -> None:
    reached = []
    with pytest.raises(Interrupted, match="stopped by SIGTERM"), interrupts.held():
        os.kill(os.getpid(), signal.SIGTERM)
        t = threading.Thread(target=lambda: None)
        t.start()  # the case it is for: not interrupted half-way
        reached.append("end of block")
    t.join()
    assert reached == ["end of block"]


def test_outside_a_block_signals_raise_at_once(installed: None) -> None:
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next bytecode boundary
            pass
    with interrupts.held():
        pass  # nothing left pending from before


def test_nested_blocks_raise_once_at_the_outermost(installed: None) -> None:
    after_inner = []
    with pytest.raises(Interrupted), interrupts.held():
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
        after_inner.append(True)  # the inner block ended: still held
    assert after_inner == [True]


def test_an_error_of_the_block_wins_and_the_signal_is_kept(installed: None) -> None:
    with pytest.raises(ValueError), interrupts.held():
        os.kill(os.getpid(), signal.SIGTERM)
        raise ValueError("the block's own failure")
    # The interrupt is not lost: the next block's end reports it.
    with pytest.raises(Interrupted), interrupts.held():
        pass


def test_the_agents_thread_starters_start_inside_a_block(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each class that starts a thread from the main thread does it inside held() (the
    engine's threads and the restore's pool are covered by the signal tests that run
    whole backups and restores)."""
    from agent.qemu.qmp import _LoopThread
    from agent.releaser import Releaser
    from agent.targets import nbd as nbd_target

    depths: list[int] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        depths.append(interrupts._depth)
        if self.name != "ba-nbd-watch":  # it would run as long as the process: not here
            real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    releaser = Releaser(lambda *a: None)
    releaser.start(lambda e: None)
    releaser.close()
    loop = _LoopThread("test")
    loop.stop()
    watcher = nbd_target._Watcher()
    watcher.watch(object(), lambda: False)  # type: ignore[arg-type]
    assert depths == [1, 1, 1]
