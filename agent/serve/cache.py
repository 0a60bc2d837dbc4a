"""A bounded cache of decompressed records, shared by every connection and thread.

Serving reads the same record many times in a row (a sequential reader asks for 256 KiB at a
time, a record holds 2 MiB), so each is decompressed once and kept while the budget allows,
least recently used out first. A record larger than the whole budget is served but not kept.

Several threads asking for a record not yet in the cache wait for one of them to load it
(single flight): nbdcopy's parallel requests into one record cost one read and one
decompression, not one each. A load that fails is not remembered: the next read tries again
(and fails again, on a damaged record).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import cast

Buffer = bytes | bytearray | memoryview


@dataclass
class CacheStats:
    hits: int = 0
    loads: int = 0  # records read and decoded
    evictions: int = 0
    peak_bytes: int = 0


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Buffer | None = None
        self.error: BaseException | None = None


class RecordCache:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self.stats = CacheStats()
        self._items: OrderedDict[Hashable, Buffer] = OrderedDict()
        self._flights: dict[Hashable, _Flight] = {}
        self._lock = threading.Lock()

    def has(self, key: Hashable) -> bool:
        """Whether ``key`` is cached or being loaded (a hint: it may change at once)."""
        return key in self._items or key in self._flights

    def get(self, key: Hashable, load: Callable[[], Buffer]) -> Buffer:
        """The cached value of ``key``, or ``load()``'s (once, however many threads ask)."""
        value = self._items.get(key)  # the common case, without the lock: dict.get is atomic
        if value is not None:
            try:  # noqa: SIM105 (contextlib.suppress costs every cached read a context)
                self._items.move_to_end(key)
            except KeyError:  # evicted meanwhile: the value is still good for this read
                pass
            self.stats.hits += 1  # a counter for tests and benchmarks: a lost update is fine
            return value
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
                self.stats.hits += 1
                return value
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return cast(Buffer, flight.value)  # set before done, when there is no error
        try:
            value = load()
        except BaseException as e:
            flight.error = e
            raise
        else:
            flight.value = value
            self._keep(key, value)
            return value
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def _keep(self, key: Hashable, value: Buffer) -> None:
        size = len(value)
        with self._lock:
            self.stats.loads += 1
            if size > self.limit:
                return
            while self.bytes + size > self.limit and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)
                self.stats.evictions += 1
            self._items[key] = value
            self.bytes += size
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.bytes)
