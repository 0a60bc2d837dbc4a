"""A small synchronous client for the QEMU guest agent (qemu-ga) on the host end of its
virtio-serial channel (a Unix socket: ``-chardev socket,path=...,server=on,wait=off``).

::

    with GuestAgent("/run/vm1/qga.sock", timeout=10) as ga:   # connects and synchronises
        ga.fsfreeze_freeze()             # -> number of file systems frozen
        ga.fsfreeze_status()             # -> "frozen"
        ga.fsfreeze_thaw()               # -> number thawed

The protocol (QEMU's docs/interop/qemu-ga and qga/qapi-schema.json) has no greeting and no
command ids: a reply is the next JSON object on the channel. A reply meant for an earlier
client may still be in the pipe (a client that timed out and went away), and a half-written
request may sit in qemu-ga's parser. So every connection starts with the resynchronisation
qemu-ga documents for ``guest-sync-delimited``: send the byte 0xFF (qemu-ga's JSON parser
resets on it, which is invalid UTF-8), then ``guest-sync-delimited`` with a random id; discard
everything up to the 0xFF byte qemu-ga puts before its reply, then read replies until one
carries our id (older ones, and the parser's error about our 0xFF, are dropped).

Like QMP, the channel serves one client at a time: a second client's ``connect`` succeeds
but nothing ever answers it. A client that QEMU accepted shows in ``/proc/net/unix`` as a
connected socket bound to the channel's path, so a busy channel is refused at once
(:class:`AgentBusy`, after :data:`BUSY_GRACE` for a client that is just leaving) instead
of after a timeout.

While the guest is frozen qemu-ga refuses most commands; sync, status and thaw are allowed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
from types import TracebackType
from typing import Any

from agent.errors import AgentError

log = logging.getLogger(__name__)

#: The byte qemu-ga sends before the reply to guest-sync-delimited (and resets its parser on).
SENTINEL = b"\xff"
#: Largest reply we buffer (guest-get-fsinfo of a guest with many disks is a few KiB).
MAX_REPLY = 1 << 20
#: Seconds a channel may look busy after its last client closed (QEMU notices in its loop).
BUSY_GRACE = 2.0
#: State of a connected socket in /proc/net/unix (SS_CONNECTED).
_SS_CONNECTED = "03"


class GuestAgentError(AgentError):
    """The guest agent cannot be reached, did not answer in time, or refused a command."""


class AgentBusy(GuestAgentError):
    """Another client holds the guest agent's channel."""


class AgentTimeout(GuestAgentError):
    """The guest agent did not answer within the timeout."""


class CommandFailed(GuestAgentError):
    """qemu-ga answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent command {command!r} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


def encode_command(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One request as qemu-ga reads it: a JSON object, newline-terminated."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class ReplyParser:
    """Splits the byte stream from qemu-ga into replies (pure: unit-tested).

    qemu-ga writes each reply as one line of JSON (an object, then a newline), the reply to
    guest-sync-delimited with a 0xFF byte before it. Reads need not end on a line: bytes are
    fed as they come and whole lines taken. A line that is no JSON object is dropped."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_REPLY and b"\n" not in self._buf:
            raise GuestAgentError(f"the guest agent sent over {MAX_REPLY} bytes without a "
                                  "complete reply")

    def skip_to_sentinel(self) -> bool:
        """Drop everything up to and including the 0xFF byte; False if none came yet (then
        everything so far is dropped)."""
        i = self._buf.find(SENTINEL)
        if i < 0:
            self._buf.clear()
            return False
        del self._buf[:i + 1]
        return True

    def next_object(self) -> dict[str, Any] | None:
        """The next complete reply, or None until more bytes come."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                return None
            line = bytes(self._buf[:end]).lstrip(SENTINEL).strip()
            del self._buf[:end + 1]
            try:
                obj = json.loads(line)
            except ValueError:  # also UnicodeDecodeError
                if line:
                    log.debug("guest agent: dropping %r", line[:200])
                continue
            if isinstance(obj, dict):
                return obj


def reply_value(command: str, reply: dict[str, Any]) -> Any:
    """The ``return`` of a reply, or :class:`CommandFailed` for its ``error``."""
    if "error" in reply:
        err = reply["error"] if isinstance(reply["error"], dict) else {}
        raise CommandFailed(command, str(err.get("class", "GenericError")),
                            str(err.get("desc", reply["error"])))
    if "return" not in reply:
        raise GuestAgentError(f"guest agent command {command!r}: unexpected reply {reply!r}")
    return reply["return"]


def channel_busy(path: str, proc_net_unix: str = "/proc/net/unix") -> bool:
    """Whether a client is connected to the listening socket at ``path`` (Linux only; False
    when that cannot be told). Sockets QEMU accepted carry the listener's path."""
    wanted = {path, os.path.abspath(path)}
    try:
        with open(proc_net_unix, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) >= 8 and fields[5] == _SS_CONNECTED and fields[6] != "0" \
                and " ".join(fields[7:]) in wanted:
            return True
    return False


class GuestAgent:
    """One connection to qemu-ga; every call waits at most ``timeout`` seconds."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._parser = ReplyParser()

    # -- connection -----------------------------------------------------------------------

    def connect(self, sync_timeout: float | None = None) -> None:
        """Connect and synchronise. :class:`AgentBusy` at once when another client holds
        the channel; :class:`AgentTimeout` when no guest agent answers."""
        deadline = time.monotonic() + BUSY_GRACE
        while channel_busy(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)  # a client that just closed: QEMU lets go of it in a moment
        if channel_busy(self.path):
            raise AgentBusy(f"the guest agent channel {self.path} is in use by another client "
                            "(it serves one at a time): stop that client, or give the agent's "
                            "channel to backup-agent (--qga), or use --freeze-command")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise GuestAgentError(f"cannot connect to the guest agent channel {self.path}: "
                                  f"{e.strerror or e}") from e
        self._sock = sock
        try:
            self.sync(self.timeout if sync_timeout is None else sync_timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestAgent:
        self.connect()
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- protocol -------------------------------------------------------------------------

    def sync(self, timeout: float) -> None:
        """The 0xFF + guest-sync-delimited resynchronisation (see the module docstring)."""
        sync_id = random.randrange(1, 2**31)
        self._send(SENTINEL + encode_command("guest-sync-delimited", {"id": sync_id}))
        deadline = time.monotonic() + timeout
        while not self._parser.skip_to_sentinel():
            self._recv(deadline, "guest-sync-delimited")
        while True:
            reply = self._next_reply(deadline, "guest-sync-delimited")
            if reply.get("return") == sync_id:
                return
            log.debug("guest agent: dropping stale reply %r", reply)

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """Send one command, return its ``return`` value."""
        self._send(encode_command(command, arguments))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return reply_value(command, self._next_reply(deadline, command))

    def send_only(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        """Queue a command without waiting (a thaw behind a freeze that is still running:
        qemu-ga handles requests one by one); read its reply later with :meth:`read_reply`."""
        self._send(encode_command(command, arguments))

    def read_reply(self, command: str, timeout: float) -> Any:
        return reply_value(command, self._next_reply(time.monotonic() + timeout, command))

    # -- the commands we use ----------------------------------------------------------------

    def fsfreeze_freeze(self, mountpoints: list[str] | None = None,
                        timeout: float | None = None) -> int:
        if mountpoints:
            return int(self.execute("guest-fsfreeze-freeze-list",
                                    {"mountpoints": mountpoints}, timeout))
        return int(self.execute("guest-fsfreeze-freeze", None, timeout))

    def fsfreeze_thaw(self, timeout: float | None = None) -> int:
        return int(self.execute("guest-fsfreeze-thaw", None, timeout))

    def fsfreeze_status(self, timeout: float | None = None) -> str:
        return str(self.execute("guest-fsfreeze-status", None, timeout))

    def fs_mountpoints(self, timeout: float | None = None) -> list[str]:
        """Mount points of the file systems qemu-ga would freeze (guest-get-fsinfo)."""
        info = self.execute("guest-get-fsinfo", None, timeout)
        return [str(fs["mountpoint"]) for fs in info if isinstance(fs, dict)
                and "mountpoint" in fs]

    # -- I/O ------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise GuestAgentError(f"not connected to the guest agent at {self.path}")
        try:
            self._sock.settimeout(self.timeout)
            self._sock.sendall(data)
        except OSError as e:
            raise GuestAgentError(f"cannot write to the guest agent channel {self.path}: "
                                  f"{e.strerror or e}") from e

    def _next_reply(self, deadline: float, command: str) -> dict[str, Any]:
        while True:
            obj = self._parser.next_object()
            if obj is not None:
                return obj
            self._recv(deadline, command)

    def _recv(self, deadline: float, command: str) -> None:
        if self._sock is None:
            raise GuestAgentError(f"not connected to the guest agent at {self.path}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout(f"the guest agent at {self.path} did not answer {command!r} "
                               "in time")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise AgentTimeout(f"the guest agent at {self.path} did not answer {command!r} "
                               "in time") from None
        except OSError as e:
            raise GuestAgentError(f"cannot read from the guest agent channel {self.path}: "
                                  f"{e.strerror or e}") from e
        if not data:
            raise GuestAgentError(f"the guest agent channel {self.path} closed")
        self._parser.feed(data)
