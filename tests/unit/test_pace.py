"""The sweep's pace (agent/pace.py): token bucket, copy rate and the adaptive policy, on a
simulated clock."""

from __future__ import annotations

import pytest

from agent.errors import InvalidArgument
from agent.pace import (
    BURST_SECONDS,
    FLOOR,
    QUIET,
    CopyRate,
    PaceSpec,
    SweepPacer,
    TokenBucket,
)

KiB = 1024
MiB = 1024 * KiB


def _sweep(pacer: SweepPacer, start: float, end: float, read: int = 2 * MiB,
           tick: float = 0.001, copies: int = 0, copied: list[int] | None = None) -> int:
    """Bytes a sweep of ``read``-byte reads gets from ``start`` to ``end``, while copies
    arrive at ``copies`` bytes per second (running total kept in ``copied``)."""
    total = copied if copied is not None else [0]
    got, now = 0, start
    while now < end:
        total[0] += int(copies * tick)
        pacer.observe_copies(total[0], now)
        if pacer.wait(now) == 0:
            pacer.spend(read, now)
            got += read
        now += tick
    return got


# -- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "spec"), [
    ("50M", PaceSpec(50 * MiB)),
    ("4096", PaceSpec(4096)),
    ("1g", PaceSpec(1024 * MiB)),
    ("auto", PaceSpec(None, adaptive=True)),
    ("AUTO:100M", PaceSpec(100 * MiB, adaptive=True)),
])
def test_parse(text: str, spec: PaceSpec) -> None:
    assert PaceSpec.parse(text) == spec


@pytest.mark.parametrize("text", ["fast", "10x", "-5M", "auto:", "auto:slow", "100", "4095",
                                  ""])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match="rate"):
        PaceSpec.parse(text)


def test_unpaced_by_default() -> None:
    assert not PaceSpec().paced
    assert PaceSpec(MiB).paced and PaceSpec(adaptive=True).paced


# -- the token bucket -----------------------------------------------------------------


def test_bucket_holds_the_rate_with_reads_larger_than_its_burst() -> None:
    bucket = TokenBucket(10 * MiB, now=0.0)
    assert 2 * MiB > 10 * MiB * BURST_SECONDS  # each read is larger than the burst
    got, now = 0, 0.0
    while now < 10.0:
        if bucket.wait(now) == 0:
            bucket.spend(2 * MiB, now)
            got += 2 * MiB
        now += 0.001
    assert 98 * MiB <= got <= 102 * MiB  # 10 s at 10 MiB/s, give or take one read


def test_bucket_saves_at_most_one_burst_while_idle() -> None:
    bucket = TokenBucket(10 * MiB, now=0.0)
    bucket.spend(64 * KiB, 0.0)
    # idle for a minute: the next reads go at once only while the burst lasts
    assert bucket.wait(60.0) == 0
    bucket.spend(int(10 * MiB * BURST_SECONDS), 60.0)
    assert bucket.wait(60.0) == 0
    bucket.spend(MiB, 60.0)
    assert bucket.wait(60.0) == pytest.approx(0.1)


def test_slowing_down_forgets_the_fast_rates_savings() -> None:
    bucket = TokenBucket(1000 * MiB, now=0.0)
    bucket.wait(5.0)  # full: a burst of 50 MiB
    bucket.set_rate(8 * MiB, 5.0)
    bucket.spend(2 * MiB, 5.0)
    assert bucket.wait(5.0) > 0.1  # the 50 MiB are gone; 2 MiB at 8 MiB/s takes time


def test_speeding_up_forgives_the_slow_rates_debt() -> None:
    bucket = TokenBucket(4 * KiB, now=0.0)
    bucket.spend(2 * MiB, 0.0)  # 512 s of debt at 4 KiB/s
    bucket.set_rate(100 * MiB, 1.0)
    assert bucket.wait(1.0) <= BURST_SECONDS


# -- the copy rate --------------------------------------------------------------------


def test_copy_rate_over_windows() -> None:
    rate = CopyRate(now=0.0)
    rate.observe(0, 0.0)
    assert not rate.busy()
    rate.observe(64 * KiB, 0.1)  # one cluster: not yet busy
    assert not rate.busy()
    rate.observe(10 * MiB, 0.2)  # a burst inside the window counts at once
    assert rate.busy()
    rate.observe(10 * MiB, 0.3)  # the window closes: 10 MiB in 0.3 s
    assert rate.rate == pytest.approx(10 * MiB / 0.3)
    rate.observe(10 * MiB, 0.6)  # nothing in the next one
    assert rate.rate == 0 and not rate.busy()


# -- the pacer ------------------------------------------------------------------------


def test_fixed_rate() -> None:
    pacer = SweepPacer(PaceSpec(20 * MiB), now=0.0)
    got = _sweep(pacer, 0.0, 10.0, copies=100 * MiB)  # copies change nothing
    assert 198 * MiB <= got <= 202 * MiB
    assert pacer.rate == 20 * MiB and pacer.slowed == 0


def test_unpaced_spec_never_waits() -> None:
    pacer = SweepPacer(PaceSpec(), now=0.0)
    pacer.spend(1024 * MiB, 0.0)
    assert pacer.wait(0.0) == 0 and pacer.rate is None


def test_adaptive_without_copies_is_unpaced() -> None:
    pacer = SweepPacer(PaceSpec(adaptive=True), now=0.0)
    assert _sweep(pacer, 0.0, 1.0, tick=0.01) == 100 * 2 * MiB  # every tick a read
    assert pacer.rate is None


def test_adaptive_drops_to_the_floor_while_copies_are_frequent() -> None:
    pacer = SweepPacer(PaceSpec(adaptive=True), now=0.0)
    copied = [0]
    _sweep(pacer, 0.0, 1.0, copied=copied)
    got = _sweep(pacer, 1.0, 11.0, copies=200 * MiB, copied=copied)  # a busy guest
    assert pacer.rate == FLOOR and pacer.slowed == 1
    # 10 s at the floor: what a read or two over the floor's bytes
    assert 10 * FLOOR - 2 * MiB <= got <= 10 * FLOOR + 4 * MiB


def test_adaptive_never_stops_the_sweep() -> None:
    """Even a guest writing all the time leaves the sweep its floor: the backup ends."""
    pacer = SweepPacer(PaceSpec(adaptive=True), now=0.0)
    got = _sweep(pacer, 0.0, 60.0, copies=1000 * MiB, tick=0.005)
    assert got >= 59 * FLOOR


def test_adaptive_speeds_up_again_once_copies_are_rare() -> None:
    pacer = SweepPacer(PaceSpec(adaptive=True), now=0.0)
    copied = [0]
    _sweep(pacer, 0.0, 2.0, copies=200 * MiB, copied=copied)
    assert pacer.rate == FLOOR
    # the guest stops: the floor holds for QUIET seconds, then the rate doubles each step
    _sweep(pacer, 2.0, 2.0 + QUIET * 0.9, copied=copied)
    assert pacer.rate == FLOOR
    _sweep(pacer, 2.0 + QUIET * 0.9, 2.0 + QUIET + 2.0, copied=copied)
    assert pacer.rate is None  # back to unpaced
    # and down again at once when the guest writes again
    _sweep(pacer, 5.0, 5.3, copies=200 * MiB, copied=copied)
    assert pacer.rate == FLOOR and pacer.slowed == 2


def test_adaptive_ignores_a_trickle_of_copies() -> None:
    pacer = SweepPacer(PaceSpec(adaptive=True), now=0.0)
    _sweep(pacer, 0.0, 10.0, copies=256 * KiB)  # 4 clusters a second: a quiet guest
    assert pacer.rate is None and pacer.slowed == 0


def test_adaptive_with_a_ceiling() -> None:
    pacer = SweepPacer(PaceSpec(30 * MiB, adaptive=True), now=0.0)
    copied = [0]
    got = _sweep(pacer, 0.0, 10.0, copied=copied)
    assert 298 * MiB <= got <= 302 * MiB and pacer.rate == 30 * MiB
    _sweep(pacer, 10.0, 11.0, copies=100 * MiB, copied=copied)
    assert pacer.rate == FLOOR
    _sweep(pacer, 11.0, 20.0, copied=copied)
    assert pacer.rate == 30 * MiB  # back up, never past the ceiling


def test_a_ceiling_below_the_floor_wins() -> None:
    pacer = SweepPacer(PaceSpec(MiB, adaptive=True), now=0.0)
    _sweep(pacer, 0.0, 5.0, copies=100 * MiB)
    assert pacer.rate == MiB

