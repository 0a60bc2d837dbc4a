"""Choosing the kind of a backup from the checkpoints the disks carry (pure logic)."""

from __future__ import annotations

import time
import uuid

import pytest

from agent.archive.format import Kind, new_archive_uuid
from agent.modes import Mode
from agent.qemu import checkpoints as cp
from agent.qemu.block import BlockDevice
from agent.qemu.checkpoints import Bitmap, CheckpointError, DiskCheckpoints

U1 = uuid.UUID("01a2171c-147b-71c2-807a-1d61622430bd")  # older
U2 = uuid.UUID("01a2171c-164d-7ef1-8846-98fc02243da0")  # newer


def dev(name: str, fmt: str = "qcow2") -> BlockDevice:
    return BlockDevice(id=name, qdev=name, device="", node_name=f"{name}-fmt", format=fmt,
                       virtual_size=1 << 30, filename=f"/{name}", read_only=False)


def bm(name: str, *, recording: bool = True, persistent: bool = True,
       inconsistent: bool = False, busy: bool = False) -> Bitmap:
    return Bitmap(name, recording, persistent, inconsistent, busy, 0)


def disk(name: str, *bitmaps: Bitmap, fmt: str = "qcow2") -> DiskCheckpoints:
    return DiskCheckpoints(dev(name, fmt), bitmaps)


def test_uuid7_sorts_by_time_and_has_version_7() -> None:
    now = time.time_ns()
    ids = [new_archive_uuid(now + i * 2_000_000) for i in range(50)]
    assert ids == sorted(ids)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert len(set(ids)) == 50


def test_checkpoint_names() -> None:
    assert cp.checkpoint_uuid(f"ba-inc-{U1}", cp.INC) == U1
    assert cp.checkpoint_uuid(f"ba-inc-{U1}", cp.FULL) is None
    assert cp.checkpoint_uuid(f"ba-full-{U1}", cp.FULL) == U1
    for other in ("ba-inc-", "ba-inc-xyz", f"ba-inc-{U1}x", "bitmap0", f"x-ba-inc-{U1}"):
        assert cp.checkpoint_uuid(other, cp.INC) is None


def test_full_starts_checkpoints_on_qcow2_only() -> None:
    plan = cp.choose(Mode.FULL, [disk("vda"), disk("vdb")])
    assert (plan.kind, plan.parent, plan.base, plan.checkpoints) == (Kind.FULL, None, None, True)
    assert cp.new_checkpoints(plan, U2) == [f"ba-inc-{U2}", f"ba-full-{U2}"]
    raw = cp.choose(Mode.FULL, [disk("vda"), disk("vdb", fmt="raw")])
    assert raw.kind is Kind.FULL and not raw.checkpoints
    assert "'vdb' is raw" in raw.note
    assert cp.new_checkpoints(raw, U2) == []


def test_incremental_uses_the_oldest_usable_checkpoint() -> None:
    disks = [disk("vda", bm(f"ba-inc-{U2}"), bm(f"ba-inc-{U1}"), bm(f"ba-full-{U1}"),
                  bm("someone-elses"))]
    plan = cp.choose(Mode.INCREMENTAL, disks)
    assert (plan.kind, plan.parent, plan.base) == (Kind.INCREMENTAL, U1, f"ba-inc-{U1}")
    assert cp.new_checkpoints(plan, U2) == [f"ba-inc-{U2}"]
    assert cp.choose(Mode.AUTO, disks) == plan


def test_differential_builds_on_the_full_checkpoint() -> None:
    disks = [disk("vda", bm(f"ba-inc-{U2}"), bm(f"ba-full-{U1}"))]
    plan = cp.choose(Mode.DIFFERENTIAL, disks)
    assert (plan.kind, plan.parent, plan.base) == (Kind.DIFFERENTIAL, U1, f"ba-full-{U1}")


@pytest.mark.parametrize(("disks", "words"), [
    ([disk("vda")], ["no checkpoint"]),
    ([disk("vda", bm(f"ba-inc-{U1}"), fmt="raw")], ["raw", "qcow2"]),
    ([disk("vda", bm(f"ba-inc-{U1}", inconsistent=True))], ["inconsistent"]),
    ([disk("vda", bm(f"ba-inc-{U1}", recording=False))], ["disabled"]),
    ([disk("vda", bm(f"ba-inc-{U1}", persistent=False))], ["not persistent"]),
    ([disk("vda", bm(f"ba-inc-{U1}", busy=True))], ["in use"]),
    ([disk("vda", bm(f"ba-inc-{U1}")), disk("vdb")], ["'vdb'", "no checkpoint"]),
    ([disk("vda", bm(f"ba-inc-{U1}")), disk("vdb", bm(f"ba-inc-{U2}"))],
     ["different times", str(U1), str(U2)]),
])
def test_unusable_checkpoints(disks: list[DiskCheckpoints], words: list[str]) -> None:
    with pytest.raises(CheckpointError) as e:
        cp.choose(Mode.INCREMENTAL, disks)
    for w in ["cannot make an incremental", "full", *words]:
        assert w in str(e.value), str(e.value)
    plan = cp.choose(Mode.AUTO, disks)
    assert plan.kind is Kind.FULL and plan.parent is None and plan.base is None
    assert plan.note.startswith("full backup instead of incremental: ")
    for w in words:
        assert w in plan.note


def test_differential_needs_a_full_checkpoint() -> None:
    with pytest.raises(CheckpointError, match=r"cannot make a differential.*earlier full"):
        cp.choose(Mode.DIFFERENTIAL, [disk("vda", bm(f"ba-inc-{U1}"))])


def test_transaction_freezes_the_changes_and_adds_the_new_checkpoint() -> None:
    plan = cp.choose(Mode.INCREMENTAL, [disk("vda", bm(f"ba-inc-{U1}"))])
    actions = cp.transaction(plan, U2, "t1", [dev("vda")])
    assert actions == [
        {"type": "block-dirty-bitmap-add", "data": {
            "node": "vda-fmt", "name": f"ba-inc-{U2}", "persistent": True, "disabled": False,
            "granularity": cp.GRANULARITY}},
        {"type": "block-dirty-bitmap-add", "data": {
            "node": "vda-fmt", "name": "ba-t1-chg", "persistent": False, "disabled": True,
            "granularity": cp.GRANULARITY}},
        {"type": "block-dirty-bitmap-merge", "data": {
            "node": "vda-fmt", "target": "ba-t1-chg", "bitmaps": [f"ba-inc-{U1}"]}},
    ]
    full = cp.choose(Mode.FULL, [disk("vda")])
    assert [a["data"]["name"] for a in cp.transaction(full, U2, "t1", [dev("vda")])] == [
        f"ba-inc-{U2}", f"ba-full-{U2}"]
    raw = cp.choose(Mode.FULL, [disk("vda", fmt="raw")])
    assert cp.transaction(raw, U2, "t1", [dev("vda", "raw")]) == []


def test_parse_bitmaps_skips_anonymous_ones() -> None:
    reply = [{"name": "a", "recording": True, "persistent": True, "busy": False, "count": 65536,
              "granularity": 65536},
             {"recording": True, "busy": True, "count": 0, "granularity": 65536}, "junk"]
    assert cp.parse_bitmaps(reply) == (Bitmap("a", True, True, False, False, 65536),)
    assert cp.parse_bitmaps(None) == ()
