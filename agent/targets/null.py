"""The target that discards everything: restore to it and you have verified the archive."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agent.archive.format import Device


class NullTarget:
    """Discards everything: restore to it and you have verified the archive."""

    def __init__(self, device: Device) -> None:
        self.name = f"(verify {device.name})"
        self.size = device.size
        self.fresh = True

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pass

    def writev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        pass

    def zero(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stop_when(self, stopped: Callable[[], bool]) -> None:
        pass
