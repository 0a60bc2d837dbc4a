"""Releaser: ranges released off the writer's thread, merged, dropped at close."""

from __future__ import annotations

import threading

from agent.releaser import Releaser

C = 64 * 1024


def test_ranges_queued_during_a_release_are_merged() -> None:
    started, go = threading.Event(), threading.Event()
    done: list[tuple[str, int, int]] = []

    def release(device: str, offset: int, length: int) -> None:
        done.append((device, offset, length))
        started.set()
        go.wait(5)

    errors: list[BaseException] = []
    r = Releaser(release)
    r.start(errors.append)
    rel = r.for_device("vda")
    rel(0, C)
    assert started.wait(5)
    for i in (3, 1, 2):  # queued while the first is in progress; they touch
        rel(i * C, C)
    r.for_device("vdb")(0, C)
    go.set()
    for _ in range(500):  # at most 5 s
        if len(done) == 3:
            break
        threading.Event().wait(0.01)
    r.close()
    assert done[0] == ("vda", 0, C)
    assert sorted(done[1:]) == [("vda", C, 3 * C), ("vdb", 0, C)]
    assert errors == []


def test_close_drops_what_is_queued() -> None:
    started, go = threading.Event(), threading.Event()
    done: list[int] = []

    def release(device: str, offset: int, length: int) -> None:
        done.append(offset)
        started.set()
        go.wait(5)

    r = Releaser(release)
    r.start(lambda e: None)
    rel = r.for_device("vda")
    rel(0, C)
    assert started.wait(5)
    rel(5 * C, C)
    rel(9 * C, C)
    closer = threading.Thread(target=r.close)
    closer.start()
    go.set()
    closer.join(5)
    assert not closer.is_alive()
    assert done == [0]  # the one in progress finished; the queued ones were dropped


def test_the_first_error_is_reported_and_stops_the_releases() -> None:
    calls: list[int] = []
    errors: list[BaseException] = []
    failed = threading.Event()

    def release(device: str, offset: int, length: int) -> None:
        calls.append(offset)
        raise OSError("trim failed")

    def fail(e: BaseException) -> None:
        errors.append(e)
        failed.set()

    r = Releaser(release)
    r.start(fail)
    r.for_device("vda")(0, C)
    assert failed.wait(5)
    r.for_device("vda")(4 * C, C)
    r.close()
    assert calls == [0]
    assert [str(e) for e in errors] == ["trim failed"]
