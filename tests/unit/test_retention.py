"""Retention (agent/jobs/retention.py, agent/jobs/catalog.py): chains found by parent links,
whole chains deleted oldest first, the newest chain and whatever cannot be placed in a chain
never touched; then the same on real archive files in a directory."""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.archive.format import Header, Kind
from agent.archive.writer import ArchiveWriter
from agent.errors import AgentError, InvalidArgument
from agent.jobs import catalog
from agent.jobs.retention import ArchiveDesc, Plan, find_chains, plan
from tests.unit.archive_util import write_archive

F, INC, D = Kind.FULL, Kind.INCREMENTAL, Kind.DIFFERENTIAL
_uuids = iter(range(1, 1 << 30))


def arc(path: str, kind: Kind, parent: ArchiveDesc | uuid.UUID | None = None, t: int = 0,
        complete: bool = True) -> ArchiveDesc:
    if isinstance(parent, ArchiveDesc):
        parent = parent.uuid
    return ArchiveDesc(path, uuid.UUID(int=next(_uuids)), parent, kind, t, complete)


def paths(p: Plan) -> tuple[list[list[str]], list[list[str]]]:
    return ([[a.path for a in c.archives] for c in p.keep],
            [[a.path for a in c.archives] for c in p.delete])


def test_chains_by_parent_links_not_by_names() -> None:
    # The names lie (and sort in the wrong order); the headers tell the chains.
    f1 = arc("z-full.arc", F, t=10)
    i1 = arc("a-full.arc", INC, f1, t=11)
    d1 = arc("m.arc", D, f1, t=12)
    i2 = arc("b-incremental.arc", INC, d1, t=13)  # an incremental on a differential
    f2 = arc("y-incremental.arc", F, t=20)
    i3 = arc("c.arc", INC, f2, t=21)
    items = [i3, i2, f2, d1, i1, f1]
    random.Random(1).shuffle(items)
    chains, orphans = find_chains(items)
    assert orphans == []
    got = sorted([a.path for a in c.archives] for c in chains)
    assert got == [["y-incremental.arc", "c.arc"],
                   ["z-full.arc", "a-full.arc", "m.arc", "b-incremental.arc"]]


def test_keep_the_newest_chains_delete_older_ones_whole() -> None:
    f1, f2, f3 = arc("f1", F, t=10), arc("f2", F, t=20), arc("f3", F, t=30)
    i11 = arc("i11", INC, f1, t=11)
    i12 = arc("i12", INC, i11, t=12)
    i21 = arc("i21", INC, f2, t=21)
    p = plan([f1, f2, f3, i11, i12, i21], keep_chains=2)
    assert paths(p) == ([["f2", "i21"], ["f3"]], [["f1", "i11", "i12"]])
    # children before their parents: an interrupted prune never leaves an archive whose
    # parent is gone
    assert [a.path for a in p.doomed()] == ["i12", "i11", "f1"]
    assert paths(plan([f1, f2, f3, i11, i12, i21], keep_chains=3))[1] == []
    assert paths(plan([f1, f2, f3, i11, i12, i21], keep_chains=9))[1] == []


def test_never_the_newest_chain() -> None:
    f1, f2 = arc("f1", F, t=10), arc("f2", F, t=20)
    assert paths(plan([f2, f1], keep_chains=1)) == ([["f2"]], [["f1"]])
    assert paths(plan([f1], keep_chains=1)) == ([["f1"]], [])
    assert paths(plan([], keep_chains=1)) == ([], [])
    with pytest.raises(InvalidArgument, match="keep_chains must be at least 1, got 0"):
        plan([f1, f2], keep_chains=0)


def test_a_chain_still_growing_outranks_a_younger_idle_one() -> None:
    # A full taken by hand on day 5 does not make the nightly chain (full on day 1,
    # incrementals every night since) the one to prune.
    nightly = arc("nightly-full", F, t=1)
    manual = arc("manual-full", F, t=5)
    last = nightly
    growing = [nightly]
    for day in range(2, 10):
        last = arc(f"nightly-inc-{day}", INC, last, t=day)
        growing.append(last)
    p = plan([manual, *growing], keep_chains=1)
    assert paths(p) == ([[a.path for a in growing]], [["manual-full"]])


def test_orphans_and_loops_are_left_alone() -> None:
    f1, f2 = arc("f1", F, t=10), arc("f2", F, t=20)
    lost = arc("lost", INC, uuid.UUID(int=999_999_999_999), t=11)  # its parent is elsewhere
    on_lost = arc("on-lost", INC, lost, t=12)
    no_parent = arc("no-parent", INC, None, t=13)
    a = arc("loop-a", INC, t=14)
    b = arc("loop-b", INC, a, t=15)
    a = ArchiveDesc(a.path, a.uuid, b.uuid, INC, a.created_ns)  # a builds on b builds on a
    me = arc("self", D, t=16)
    me = ArchiveDesc(me.path, me.uuid, me.uuid, D, me.created_ns)
    p = plan([f1, f2, lost, on_lost, no_parent, a, b, me], keep_chains=1)
    assert paths(p) == ([["f2"]], [["f1"]])
    assert [o.path for o in p.orphans] == ["lost", "on-lost", "no-parent", "loop-a",
                                           "loop-b", "self"]


def test_an_incomplete_full_neither_counts_nor_goes() -> None:
    # The newest full was cut short (an upload that failed): the last good chain stays.
    good = arc("good", F, t=10)
    good_inc = arc("good-inc", INC, good, t=11)
    older = arc("older", F, t=5)
    broken = arc("broken", F, t=20, complete=False)
    on_broken = arc("on-broken", INC, broken, t=21)
    p = plan([older, good, good_inc, broken, on_broken], keep_chains=1)
    assert paths(p) == ([["good", "good-inc"]], [["older"]])
    assert [[a.path for a in c.archives] for c in p.incomplete] == [["broken", "on-broken"]]
    # an incomplete incremental in a chain is part of it: it goes with its chain
    cut = arc("cut-inc", INC, older, t=6, complete=False)
    assert paths(plan([older, cut, good], keep_chains=1))[1] == [["older", "cut-inc"]]


def test_copies_of_one_archive_stay_or_go_together() -> None:
    f1 = arc("f1", F, t=10)
    copy = ArchiveDesc("f1-copy", f1.uuid, None, F, 10)
    i1 = arc("i1", INC, f1, t=11)
    f2 = arc("f2", F, t=20)
    assert paths(plan([f1, copy, i1, f2], keep_chains=1)) == (
        [["f2"]], [["f1", "f1-copy", "i1"]])


def test_chains_count_per_group() -> None:
    # Two VMs' archives in one directory (a backup host's): each keeps its newest chain,
    # however many more chains the other makes.
    a1, a2 = arc("a-1", F, t=1), arc("a-2", F, t=2)
    b = [arc(f"b-{n}", F, t=10 + n) for n in range(5)]
    p = plan([a1, a2, *b], keep_chains=1, group=lambda x: x.path[0])
    assert paths(p) == ([["a-2"], ["b-4"]], [["a-1"], ["b-0"], ["b-1"], ["b-2"], ["b-3"]])


# -- invariants over random directories -----------------------------------------------------

@st.composite
def directories(draw: st.DrawFn) -> list[ArchiveDesc]:
    """Random forests of fulls, incrementals and differentials, some archives incomplete,
    some with parents that are not there, created in random order."""
    n = draw(st.integers(0, 25))
    out: list[ArchiveDesc] = []
    for k in range(n):
        kind = draw(st.sampled_from([F, F, INC, INC, INC, D]))
        parent = None
        if kind != F:
            choice = draw(st.integers(-1, len(out) - 1))
            parent = out[choice].uuid if choice >= 0 else uuid.UUID(int=(1 << 100) + k)
        out.append(ArchiveDesc(f"a{k}", uuid.UUID(int=k + 1), parent, kind,
                               draw(st.integers(0, 50)), draw(st.booleans())))
    return out


@settings(max_examples=300, deadline=None)
@given(directories(), st.integers(1, 5), st.integers(1, 3))
@pytest.mark.slow
def test_invariants(archives: list[ArchiveDesc], keep: int, groups: int) -> None:
    def group(a: ArchiveDesc) -> str:
        return str(a.uuid.int % groups)

    p = plan(archives, keep, group)
    doomed = {a.uuid for a in p.doomed()}
    kept = [a for c in (*p.keep, *p.incomplete) for a in c.archives] + list(p.orphans)
    # every archive is placed exactly once
    assert sorted(a.path for a in [*kept, *p.doomed()]) == sorted(a.path for a in archives)
    # nothing kept builds on something deleted
    assert all(a.parent not in doomed for a in kept)
    # in each group, the newest N complete chains stay, the newest of all among them
    for g in {group(c.full) for c in (*p.keep, *p.delete)}:
        kept_g = [c for c in p.keep if group(c.full) == g]
        gone_g = [c for c in p.delete if group(c.full) == g]
        assert len(kept_g) == min(keep, len(kept_g) + len(gone_g))
        if gone_g:
            assert max(c.newest_ns for c in gone_g) <= min(c.newest_ns for c in kept_g)
    # only chains with a complete full are ever deleted; orphans never are
    assert all(c.full.complete and c.full.kind == F for c in p.delete)
    assert not {o.uuid for o in p.orphans} & doomed


def _files(directory: Path) -> list[str]:
    """What a directory holds, without the lock file a job run or a prune leaves."""
    return sorted(set(os.listdir(directory)) - {catalog.LOCK})


# -- on real files ----------------------------------------------------------------------------

def _write(path: Path, kind: Kind = F, parent: uuid.UUID | None = None,
           created_ns: int = 0) -> uuid.UUID:
    """A small real archive with the given header fields; returns its uuid."""
    header = Header(uuid=uuid.uuid4(), created_ns=created_ns, tool_version="unit-test",
                    kind=kind, parent_uuid=parent)

    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4096)
        w.write_zero(0, 0, 4096)

    path.write_bytes(write_archive(build, header))
    return header.uuid


def test_prune_a_directory(tmp_path: Path) -> None:
    old = _write(tmp_path / "vm1-1-full.arc", created_ns=10)
    inc = _write(tmp_path / "vm1-2-incremental.arc", INC, old, created_ns=11)
    _write(tmp_path / "renamed-by-hand.arc", INC, inc, created_ns=12)  # same chain, odd name
    new = _write(tmp_path / "vm1-3-full.arc", created_ns=20)
    _write(tmp_path / "vm1-4-differential.arc", D, new, created_ns=21)
    _write(tmp_path / "orphan.arc", INC, uuid.uuid4(), created_ns=5)
    (tmp_path / "notes.arc").write_text("not an archive\n")
    (tmp_path / "README").write_text("not ours\n")
    (tmp_path / ".vm1-5-full.arc.partial").write_bytes(b"unfinished")
    (tmp_path / "link.arc").symlink_to(tmp_path / "vm1-1-full.arc")
    _write(tmp_path / "vm1-6-full.arc", created_ns=30)  # a later full, cut short
    (tmp_path / "vm1-6-full.arc").write_bytes((tmp_path / "vm1-6-full.arc").read_bytes()[:-100])
    before = _files(tmp_path)

    dry = catalog.prune(str(tmp_path), 1, dry_run=True)
    assert _files(tmp_path) == before and dry.deleted == []
    assert [[os.path.basename(a.path) for a in c.archives] for c in dry.plan.delete] == [
        ["vm1-1-full.arc", "vm1-2-incremental.arc", "renamed-by-hand.arc"]]
    assert [os.path.basename(p) for p, _ in dry.unreadable] == ["notes.arc"]

    with catalog.locked(str(tmp_path)):
        done = catalog.prune(str(tmp_path), 1)
    assert [os.path.basename(a.path) for a in done.deleted] == [
        "renamed-by-hand.arc", "vm1-2-incremental.arc", "vm1-1-full.arc"]
    assert _files(tmp_path) == sorted(
        set(before) - {"vm1-1-full.arc", "vm1-2-incremental.arc", "renamed-by-hand.arc"})
    assert [[os.path.basename(a.path) for a in c.archives] for c in done.plan.incomplete] == [
        ["vm1-6-full.arc"]]


def test_prune_counts_chains_per_job(tmp_path: Path) -> None:
    """A backup host keeps the archives of all VMs of a hypervisor in one directory."""
    for n in range(3):
        _write(tmp_path / f"vm1-2026112{n}T020000Z-full.arc", created_ns=10 + n)
    web = _write(tmp_path / "web-1-20261101T020000Z-full.arc", created_ns=1)
    _write(tmp_path / "web-1-20261102T020000Z-incremental_2.arc", INC, web, created_ns=2)
    _write(tmp_path / "hand-made.arc", created_ns=0)  # no job's name: a group of its own
    catalog.prune(str(tmp_path), 1)
    assert _files(tmp_path) == [
        "hand-made.arc", "vm1-20261122T020000Z-full.arc", "web-1-20261101T020000Z-full.arc",
        "web-1-20261102T020000Z-incremental_2.arc"]
    assert catalog.job_of("/x/web-1-20261101T020000Z-full.arc") == "web-1"
    assert catalog.job_of("vm.2-20261101T020000Z.arc") == "vm.2"
    assert catalog.job_of("vm1-20261101T020000Z-full_3.arc") == "vm1"
    assert catalog.job_of("vm1-full.arc") == ""


def test_descriptions_read_from_headers(tmp_path: Path) -> None:
    parent = uuid.uuid4()
    u = _write(tmp_path / "x.arc", D, parent, created_ns=1234)
    d = catalog.read_desc(str(tmp_path / "x.arc"))
    assert (d.uuid, d.parent, d.kind, d.created_ns, d.complete) == (u, parent, D, 1234, True)
    assert d.size == (tmp_path / "x.arc").stat().st_size
    data = (tmp_path / "x.arc").read_bytes()
    (tmp_path / "cut.arc").write_bytes(data[: len(data) // 2])
    cut = catalog.read_desc(str(tmp_path / "cut.arc"))
    assert (cut.uuid, cut.parent, cut.complete) == (u, parent, False)  # lineage still known
    (tmp_path / "junk.arc").write_bytes(b"\0" * 100)
    with pytest.raises(AgentError):
        catalog.read_desc(str(tmp_path / "junk.arc"))


def test_newest_full_ignores_incomplete_ones(tmp_path: Path) -> None:
    _write(tmp_path / "a.arc", created_ns=10)
    b = _write(tmp_path / "b.arc", created_ns=20)
    _write(tmp_path / "c.arc", INC, b, created_ns=30)
    _write(tmp_path / "d.arc", created_ns=40)
    (tmp_path / "d.arc").write_bytes((tmp_path / "d.arc").read_bytes()[:-60])
    newest = catalog.newest_full(catalog.scan(str(tmp_path)))
    assert newest is not None and newest.uuid == b


def test_names_publish_and_leftovers(tmp_path: Path) -> None:
    when = 1795658400  # 2026-11-26 02:00:00 UTC
    assert catalog.archive_name("vm1", when, "full") == "vm1-20261126T020000Z-full.arc"
    assert catalog.archive_name("vm1", when, None) == "vm1-20261126T020000Z.arc"
    # what a job writes: a hidden name, renamed with the kind from the header
    _write(tmp_path / ".vm1-20261126T020000Z.arc", INC, uuid.uuid4())
    path, kind = catalog.publish(str(tmp_path / ".vm1-20261126T020000Z.arc"), str(tmp_path),
                               "vm1", when)
    assert (os.path.basename(path), kind) == ("vm1-20261126T020000Z-incremental.arc",
                                              "incremental")
    # two backups started in one second: the second name gets a number, nothing is replaced
    _write(tmp_path / ".vm1-20261126T020000Z.arc", INC, uuid.uuid4())
    path, _ = catalog.publish(str(tmp_path / ".vm1-20261126T020000Z.arc"), str(tmp_path), "vm1",
                            when)
    assert os.path.basename(path) == "vm1-20261126T020000Z-incremental_2.arc"
    # a killed run left a finished archive under its hidden name: the next run names it
    _write(tmp_path / ".vm1-20261125T020000Z.arc")
    _write(tmp_path / ".vm2-20261125T020000Z.arc")  # another job's: not ours to touch
    (tmp_path / ".vm1-20261124T020000Z.arc").write_bytes(b"cut short")  # not finished
    adopted = catalog.adopt_leftovers(str(tmp_path), "vm1")
    assert [os.path.basename(p) for p in adopted] == ["vm1-20261125T020000Z-full.arc"]
    assert _files(tmp_path) == [
        ".vm1-20261124T020000Z.arc", ".vm2-20261125T020000Z.arc",
        "vm1-20261125T020000Z-full.arc", "vm1-20261126T020000Z-incremental.arc",
        "vm1-20261126T020000Z-incremental_2.arc"]


def test_one_user_of_a_directory_at_a_time(tmp_path: Path) -> None:
    with (catalog.locked(str(tmp_path)),
          pytest.raises(AgentError, match="is in use by another"),
          catalog.locked(str(tmp_path))):
        pass
    with catalog.locked(str(tmp_path)):  # released on the way out
        pass
    with (pytest.raises(AgentError, match=r"cannot use directory .*missing"),
          catalog.locked(str(tmp_path / "missing"))):
        pass
    with pytest.raises(AgentError, match=r"cannot read directory .*missing"):
        catalog.scan(str(tmp_path / "missing"))
