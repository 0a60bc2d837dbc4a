"""The guest-agent client's protocol (agent/qemu/qga.py) and the freeze's pure parts: framing,
the 0xFF resynchronisation, error replies, the busy check. A peer on a socketpair plays
qemu-ga's side of the wire, byte for byte as qemu-ga 7.2 answers (the real qemu-ga in a real
guest: tests/integration/test_freeze.py)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.live.freeze import FreezeOptions, FreezeResult
from agent.live.watchdog import watch
from agent.qemu.qga import (
    AgentTimeout,
    CommandFailed,
    GuestAgent,
    GuestAgentError,
    ReplyParser,
    channel_busy,
    encode_command,
    reply_value,
)


def test_a_command_is_one_line_of_json() -> None:
    assert encode_command("guest-fsfreeze-status") == b'{"execute":"guest-fsfreeze-status"}\n'
    line = encode_command("guest-fsfreeze-freeze-list", {"mountpoints": ["/", "/d a"]})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"execute": "guest-fsfreeze-freeze-list",
                                "arguments": {"mountpoints": ["/", "/d a"]}}


def test_replies_are_taken_whole_however_the_bytes_come() -> None:
    p = ReplyParser()
    data = b'{"return": 1}\n{"return": {"a": "x\\ny"}}\n'
    for i in range(len(data)):
        p.feed(data[i:i + 1])
    assert p.next_object() == {"return": 1}
    assert p.next_object() == {"return": {"a": "x\ny"}}
    assert p.next_object() is None
    p.feed(b'{"retu')
    assert p.next_object() is None
    p.feed(b'rn": 2}\n')
    assert p.next_object() == {"return": 2}


def test_the_sentinel_drops_what_came_before_it() -> None:
    p = ReplyParser()
    p.feed(b'{"return": 7}\n{"half": ')
    assert not p.skip_to_sentinel()  # no 0xFF yet: all of it was stale
    p.feed(b'{"return": 8}\n\xff{"return": 42}\n')
    assert p.skip_to_sentinel()
    assert p.next_object() == {"return": 42}


def test_lines_that_are_no_json_object_are_dropped() -> None:
    p = ReplyParser()
    p.feed(b'garbage\n\xff\xfe\n[1, 2]\n\n{"return": 3}\n')
    assert p.next_object() == {"return": 3}


def test_an_error_reply_is_a_command_failed() -> None:
    assert reply_value("x", {"return": 3}) == 3
    with pytest.raises(CommandFailed, match="'guest-fsfreeze-freeze' failed: GenericError: "
                       "fsfreeze hook failed"):
        reply_value("guest-fsfreeze-freeze",
                    {"error": {"class": "GenericError", "desc": "fsfreeze hook failed"}})
    with pytest.raises(GuestAgentError, match="unexpected reply"):
        reply_value("x", {"event": "y"})


def test_a_connected_client_makes_the_channel_busy(tmp_path: Path) -> None:
    header = "Num       RefCount Protocol Flags    Type St Inode Path\n"
    listener = "0000000000000001: 00000002 00000000 00010000 0001 01 817587 /run/vm/qga.sock\n"
    accepted = "0000000000000002: 00000003 00000000 00000000 0001 03 817699 /run/vm/qga.sock\n"
    waiting = "0000000000000003: 00000003 00000000 00000000 0001 02     0 /run/vm/qga.sock\n"
    other = "0000000000000004: 00000003 00000000 00000000 0001 03 817700 /run/vm/qmp.sock\n"
    proc = tmp_path / "unix"
    proc.write_text(header + listener + waiting + other)
    assert not channel_busy("/run/vm/qga.sock", str(proc))
    proc.write_text(header + listener + accepted)
    assert channel_busy("/run/vm/qga.sock", str(proc))
    assert not channel_busy("/run/vm/qga.sock", str(tmp_path / "missing"))


class FakeQga:
    """qemu-ga's side of the wire on a socketpair: ``script`` gets each request (bytes,
    without its newline) and returns the bytes to send back."""

    def __init__(self, script: Callable[[bytes], bytes], stale: bytes = b"") -> None:
        self.ours, self.theirs = socket.socketpair()
        self.requests: list[bytes] = []
        self.theirs.sendall(stale)
        self._script = script
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = self.theirs.recv(4096)
            except OSError:  # closed by the test
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.requests.append(line)
                try:
                    self.theirs.sendall(self._script(line))
                except OSError:  # the client went away (a test that closed it)
                    return

    def close(self) -> None:
        self.theirs.close()
        self._thread.join(5)


def qga_7_2(line: bytes) -> bytes:
    """Answers as qemu-ga does: the 0xFF makes its parser report an error, the sync reply
    comes after a 0xFF of its own."""
    reply = b""
    if line.startswith(b"\xff"):
        reply += b'{"error": {"class": "GenericError", "desc": "Invalid JSON syntax"}}\n'
        line = line[1:]
    req = json.loads(line)
    if req["execute"] == "guest-sync-delimited":
        return reply + b"\xff" + json.dumps({"return": req["arguments"]["id"]}).encode() + b"\n"
    answers = {"guest-fsfreeze-freeze": 2, "guest-fsfreeze-freeze-list": 1,
               "guest-fsfreeze-thaw": 2, "guest-fsfreeze-status": "thawed"}
    return reply + json.dumps({"return": answers[req["execute"]]}).encode() + b"\n"


@pytest.fixture
def connected() -> Iterator[Callable[..., tuple[GuestAgent, FakeQga]]]:
    made: list[tuple[GuestAgent, FakeQga]] = []

    def make(script: Callable[[bytes], bytes] = qga_7_2, stale: bytes = b"",
             timeout: float = 5.0) -> tuple[GuestAgent, FakeQga]:
        peer = FakeQga(script, stale)
        ga = GuestAgent("/fake/qga.sock", timeout=timeout)
        ga._sock = peer.ours  # (what connect() does after socket.connect)
        made.append((ga, peer))
        return ga, peer

    yield make
    for ga, peer in made:
        ga.close()
        peer.close()


def test_sync_skips_stale_replies_and_the_parser_error(
        connected: Callable[..., tuple[GuestAgent, FakeQga]]) -> None:
    # A previous client's late reply and half a line sit in the channel.
    ga, peer = connected(stale=b'{"return": 99}\n{"return": "frozen"}\n{"ret')
    ga.sync(timeout=5)
    assert peer.requests[0].startswith(b"\xff")
    assert ga.fsfreeze_freeze() == 2
    assert ga.fsfreeze_freeze(["/data"]) == 1
    assert json.loads(peer.requests[-1]) == {"execute": "guest-fsfreeze-freeze-list",
                                             "arguments": {"mountpoints": ["/data"]}}
    assert ga.fsfreeze_status() == "thawed"
    assert ga.fsfreeze_thaw() == 2


def test_sync_waits_for_its_own_id(connected: Callable[..., tuple[GuestAgent, FakeQga]]) -> None:
    def with_an_old_sync(line: bytes) -> bytes:
        # an older sync's delimited reply first (a client that gave up), then ours
        old = b'\xff{"return": 1}\n' if b"guest-sync" in line else b""
        return old + qga_7_2(line)
    ga, _ = connected(with_an_old_sync)
    ga.sync(timeout=5)
    assert ga.fsfreeze_status() == "thawed"


def test_no_answer_is_a_timeout(connected: Callable[..., tuple[GuestAgent, FakeQga]]) -> None:
    ga, _ = connected(lambda line: b"", timeout=0.2)
    with pytest.raises(AgentTimeout, match="did not answer 'guest-sync-delimited' in time"):
        ga.sync(timeout=0.2)


def test_a_closed_channel_says_so(connected: Callable[..., tuple[GuestAgent, FakeQga]]) -> None:
    ga, peer = connected(lambda line: b"")
    ga.send_only("guest-fsfreeze-status")
    peer.theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(GuestAgentError, match=r"channel /fake/qga\.sock closed"):
        ga.read_reply("guest-fsfreeze-status", 5)


def test_connecting_to_nothing_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match="cannot connect to the guest agent channel"):
        GuestAgent(str(tmp_path / "none.sock"), timeout=1).connect()


@pytest.mark.parametrize("opts, message", [
    (FreezeOptions(mode="sometimes"), "--fs-freeze must be one of"),
    (FreezeOptions(freeze_command="a"), "go together"),
    (FreezeOptions(qga="s", freeze_command="a", thaw_command="b"), "either --qga or"),
    (FreezeOptions(mountpoints=["/"]), "--freeze-mountpoint needs --qga"),
    (FreezeOptions(mode="required"), "required needs the guest agent's channel"),
    (FreezeOptions(qga="s", timeout=0), "must be positive"),
])
def test_freeze_options_that_cannot_work(opts: FreezeOptions, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        opts.check()


def test_the_header_records_the_consistency() -> None:
    assert FreezeResult().header_props() == {"consistency": "crash"}
    got = FreezeResult("application", 0.2, ("/", "/data"), 2).header_props()
    assert got == {"consistency": "application", "frozen-mountpoints": "/\n/data"}


@pytest.mark.parametrize("words, thaw", [
    ([], False), ([b"frozen\n"], True), ([b"frozen\n", b"thawed\n"], False),
    ([b"frozen\n", b"thawed\n", b"frozen\n"], True), ([b"frozen\n", b"done\n"], False),
])
def test_the_watchdog_thaws_when_the_pipe_closes_on_a_frozen_guest(
        words: list[bytes], thaw: bool) -> None:
    assert watch(iter(words)) is thaw
