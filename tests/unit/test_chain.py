"""Checking a chain of archives before a restore writes anything (pure logic)."""

from __future__ import annotations

import uuid

import pytest

from agent.archive.format import Device, Header, Kind
from agent.chain import Link, check_chain
from agent.errors import InvalidArgument

F, I1, I2, D, X = (uuid.UUID(int=i) for i in range(1, 6))
DEVS = [Device(0, "vda", 1 << 20, {}), Device(1, "vdb", 2 << 20, {})]


def link(label: str, u: uuid.UUID, kind: Kind = Kind.FULL, parent: uuid.UUID | None = None,
         devices: list[Device] = DEVS) -> Link:
    return Link(label, Header(uuid=u, created_ns=0, tool_version="t", kind=kind,
                              parent_uuid=parent), devices)


full = link("full.arc", F)
inc1 = link("inc1.arc", I1, Kind.INCREMENTAL, F)
inc2 = link("inc2.arc", I2, Kind.INCREMENTAL, I1)
diff = link("diff.arc", D, Kind.DIFFERENTIAL, F)
other = link("other.arc", X, Kind.INCREMENTAL, uuid.UUID(int=99))


@pytest.mark.parametrize("chain", [[full], [full, inc1], [full, inc1, inc2], [full, diff],
                                   [full, diff, link("i.arc", I2, Kind.INCREMENTAL, D)]])
def test_good_chains(chain: list[Link]) -> None:
    check_chain(chain)


@pytest.mark.parametrize(("chain", "words"), [
    ([], ["no archive"]),
    ([inc1], ["inc1.arc is an incremental", "starting with the full"]),
    ([diff], ["diff.arc is a differential"]),
    ([full, inc2, inc1], ["wrong order", "inc2.arc builds on inc1.arc", "oldest first"]),
    ([full, inc2], ["missing link", str(I1)]),
    ([full, inc1, other], ["missing link", "another VM"]),
    ([full, inc1, diff], ["diff.arc builds on full.arc, not on inc1.arc"]),
    ([full, full], ["twice"]),
    ([full, link("f2.arc", I1)], ["f2.arc is a full backup"]),
    ([full, link("i.arc", I1, Kind.INCREMENTAL, F, DEVS[:1])], ["'vdb' is not in i.arc"]),
    ([full, link("i.arc", I1, Kind.INCREMENTAL, F, [Device(0, "vda", 4 << 20, {}), DEVS[1]])],
     ["resized", "'vda'"]),
])
def test_bad_chains(chain: list[Link], words: list[str]) -> None:
    with pytest.raises(InvalidArgument) as e:
        check_chain(chain)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_only_wanted_devices_must_be_in_every_archive() -> None:
    partial = link("i.arc", I1, Kind.INCREMENTAL, F, DEVS[:1])
    check_chain([full, partial], wanted=["vda"])
    with pytest.raises(InvalidArgument, match=r"'vdb' is not in i\.arc"):
        check_chain([full, partial], wanted=["vdb"])


@pytest.mark.parametrize("verb", ["restore", "serve"])
def test_messages_say_what_the_command_does(verb: str) -> None:
    resized = link("i.arc", I1, Kind.INCREMENTAL, F, [Device(0, "vda", 4 << 20, {}), DEVS[1]])
    for chain, words in (([], f"no archive to {verb}"),
                         ([full, link("f2.arc", I1)], f"{verb} it on its own"),
                         ([full, link("i.arc", I1, Kind.INCREMENTAL, F, DEVS[:1])],
                          f"{verb} it with --device"),
                         ([full, resized], f"{verb} a chain from a full backup")):
        with pytest.raises(InvalidArgument) as e:
            check_chain(chain, verb=verb)
        assert words in str(e.value)
        other = "serve" if verb == "restore" else "restore"
        assert other not in str(e.value)
