"""How fast the background sweep of a backup may read: the guest first.

A live backup reads two things (agent/engine.py): the clusters QEMU just copied before a
guest write, which sit in the copy-before-write target's memory until read, and the
background sweep over the rest of the disk. Only the sweep is paced here; copies are
never held back. The sweep's reads compete with the guest for QEMU's I/O thread and for
the cores, so a user may cap it (``--max-rate 50M``) or let it adapt (``--max-rate
auto``): copies arriving often mean the guest is busy writing clusters the backup has
not reached, so the sweep drops to a floor rate, and climbs back once copies are rare::

    copy rate ≥ BUSY ─▶ sweep at FLOOR (at once: the guest comes first)
    copy rate < BUSY for QUIET s ─▶ sweep rate doubles every STEP s, up to the ceiling
                                    (--max-rate auto:RATE, or unlimited)

The floor keeps the backup moving under a guest that never stops writing, and the
copies themselves back the disk up as well: once most of it is backed up, the guest's
writes stop causing copies and the sweep speeds up to finish.

Pure logic: every method takes the time ``now`` (seconds, monotonic) from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import InvalidArgument
from agent.units import MiB, parse_size

#: Smallest rate a user may set: a 4K rate still moves a 2M read every 512 s.
MIN_RATE = 4096
#: The adaptive sweep never goes slower than this (bytes/s): 2 GiB in 4.3 minutes.
FLOOR = 8 * MiB
#: Copies per second (bytes) from which the guest counts as busy: 16 clusters of 64 KiB.
BUSY = 1 * MiB
#: Seconds of few copies before the sweep speeds up again, and between doublings.
QUIET = 1.0
STEP = 0.1
#: Copy rates are measured over windows this long (seconds).
WINDOW = 0.25
#: Above this the adaptive sweep is not paced at all (bytes/s).
UNPACED = 4096 * MiB
#: A bucket holds at most this many seconds of its rate (and at least one read).
BURST_SECONDS = 0.05

def _size(text: str) -> int:
    try:
        n = parse_size(text)
    except InvalidArgument:
        raise InvalidArgument(
            f"not a rate: {text!r} (bytes per second, e.g. 50M or auto)") from None
    if n < MIN_RATE:
        raise InvalidArgument(f"rate {text!r} is too small (at least 4K per second)")
    return n


@dataclass(frozen=True)
class PaceSpec:
    """What the user asked: a fixed cap, an adaptive sweep (with an optional cap), or
    neither (the sweep goes as fast as the output takes it)."""

    max_rate: int | None = None  # bytes/s; the ceiling when adaptive
    adaptive: bool = False

    def __post_init__(self) -> None:
        if self.max_rate is not None and self.max_rate < MIN_RATE:
            raise InvalidArgument("the sweep's rate must be at least 4K per second")

    @property
    def paced(self) -> bool:
        return self.adaptive or self.max_rate is not None

    @classmethod
    def parse(cls, text: str) -> PaceSpec:
        """``50M`` (bytes per second; sizes as agent/units.py reads them), ``auto`` or
        ``auto:100M``."""
        t = text.strip().lower()
        if t == "auto":
            return cls(None, adaptive=True)
        if t.startswith("auto:"):
            return cls(_size(t[5:]), adaptive=True)
        return cls(_size(t))

    def __str__(self) -> str:
        rate = "unlimited" if self.max_rate is None else f"{self.max_rate} B/s"
        return f"auto (at most {rate})" if self.adaptive else rate


class TokenBucket:
    """Bytes at ``rate`` per second. A read may start whenever the bucket is not in debt,
    and then takes its whole length, so a read larger than the burst still goes and the
    average holds."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = now

    def _fill(self, now: float) -> None:
        if now > self._at:
            burst = self.rate * BURST_SECONDS
            self._tokens = min(max(burst, 0.0), self._tokens + (now - self._at) * self.rate)
        self._at = max(self._at, now)

    def set_rate(self, rate: float, now: float) -> None:
        self._fill(now)
        self.rate = rate
        # What was saved or owed at the old rate is at most one burst of the new one: a
        # slowed sweep must not spend a fast rate's savings, nor a sped-up one wait out a
        # slow rate's debt.
        burst = rate * BURST_SECONDS
        self._tokens = min(burst, max(self._tokens, -burst))

    def wait(self, now: float) -> float:
        """Seconds until a read may start (0: now)."""
        self._fill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def spend(self, n: int, now: float) -> None:
        self._fill(now)
        self._tokens -= n


class CopyRate:
    """Bytes per second of copy-before-write copies, from a running total."""

    def __init__(self, now: float) -> None:
        self._start = now
        self._total: int | None = None  # at the window's start
        self._last = 0
        self.rate = 0.0  # over the last complete window

    def observe(self, total: int, now: float) -> None:
        if self._total is None:
            self._total, self._start = total, now
        self._last = total
        span = now - self._start
        if span >= WINDOW:
            self.rate = (total - self._total) / span
            self._total, self._start = total, now

    def busy(self) -> bool:
        # Copies in the window so far count at once: a burst need not wait for its end.
        return self.rate >= BUSY or (self._total is not None and
                                     self._last - self._total >= BUSY * WINDOW)


class SweepPacer:
    """The sweep's pace: a token bucket whose rate is fixed, or adapted to the copies."""

    def __init__(self, spec: PaceSpec, now: float) -> None:
        self.spec = spec
        self._ceiling = float(spec.max_rate or UNPACED)
        self._bucket = TokenBucket(self._ceiling, now)
        self._copies = CopyRate(now)
        self._quiet_since = now
        self._stepped = now
        self.slowed = 0  # times the adaptive sweep dropped to its floor

    @property
    def rate(self) -> float | None:
        """The sweep's rate now (bytes/s), None when unpaced."""
        r = self._bucket.rate
        return None if r >= UNPACED else r

    def observe_copies(self, total: int, now: float) -> None:
        """``total``: bytes copied before guest writes so far (every disk)."""
        if not self.spec.adaptive:
            return
        self._copies.observe(total, now)
        floor = min(FLOOR, self._ceiling)
        if self._copies.busy():
            self._quiet_since = now
            if self._bucket.rate > floor:
                self._bucket.set_rate(floor, now)
                self.slowed += 1
            return
        if now - self._quiet_since >= QUIET and now - self._stepped >= STEP:
            self._stepped = now
            if self._bucket.rate < self._ceiling:
                self._bucket.set_rate(min(self._ceiling, self._bucket.rate * 2), now)

    def wait(self, now: float) -> float:
        """Seconds until the next sweep read may start (0: now)."""
        if self.rate is None:
            return 0.0
        return self._bucket.wait(now)

    def spend(self, n: int, now: float) -> None:
        """A sweep read of ``n`` bytes starts."""
        if self.rate is not None:
            self._bucket.spend(n, now)
