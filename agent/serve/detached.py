"""An nbdkit serving archives to a VM that outlives the agent (``restore --live``).

Unlike :class:`agent.serve.server.ArchiveServer`, this nbdkit is not tied to the agent: it
runs as a daemon in a session of its own (Ctrl-C on the agent's terminal does not reach it)
and writes its messages into a log file, never into a pipe to the agent. A VM whose disk is
still backed by the served archive keeps reading from it when the agent is killed.

Everything lives in one private directory (``$TMPDIR/ba-live-XXXXXXXX``: the socket
``nbd.sock``, the log ``nbdkit.log``, the pid file ``nbdkit.pid``). :class:`ServerRecord`
says which process serves where; the live restore stores it in QEMU
(:mod:`agent.qemu.stream`), so that ``backup-agent cleanup`` can stop this nbdkit by its pid
later, after checking that the pid still names the same process (its start time and its
command line). A stopped daemon may stay a zombie (its parent is init, which on some
machines does not reap): it counts as gone.

The server never outlives the last of its readers: nbdkit's ``exitlast`` filter stops it
once its last client connection closes, and the agent holds a connection of its own (the
"holder") from the moment the server serves until :meth:`DetachedServer.stop`. An agent
killed before QEMU opened the served backup (the holder closes with it) leaves no server
running for nobody; one killed later leaves it to QEMU, whose connection keeps it serving
until the nodes are removed (by the agent or ``backup-agent cleanup``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from agent.cbw.server import _pythonpath
from agent.errors import AgentError
from agent.process import START_TIMEOUT, accepts
from agent.serve.server import NBDKIT_THREADS, USER_PREFIX, find_plugin, key_pipe, uri

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger("backup-agent")

#: Start of the name of every directory a detached server lives in.
DIR_PREFIX = "ba-live-"
SOCKET_NAME = "nbd.sock"
LOG_NAME = "nbdkit.log"
PID_NAME = "nbdkit.pid"
#: Seconds to wait for nbdkit to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerRecord:
    """Which process serves where: enough to find and stop it from another process."""

    pid: int
    started: int
    """The process's start time (``/proc/PID/stat`` field 22): a reused pid has another."""
    directory: str
    socket: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerRecord:
        try:
            data = json.loads(text)
            rec = cls(pid=int(data["pid"]), started=int(data["started"]),
                      directory=str(data["directory"]), socket=str(data["socket"]))
        except (ValueError, KeyError, TypeError) as e:
            raise AgentError(f"unreadable record of a live restore's server: {text!r:.200}") \
                from e
        if rec.pid <= 1 or not os.path.basename(rec.directory).startswith(DIR_PREFIX):
            raise AgentError(f"implausible record of a live restore's server: {text!r:.200}")
        return rec


def _start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat``; None if there is no such process (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name, in (), may hold spaces
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _is_ours(rec: ServerRecord) -> bool:
    """Whether ``rec.pid`` is still the nbdkit it names (same start, serving its socket)."""
    if _start_time(rec.pid) != rec.started:
        return False
    try:
        with open(f"/proc/{rec.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"nbdkit" \
        and os.fsencode(rec.socket) in argv


def _remove_directory(rec: ServerRecord) -> None:
    """Remove what a detached server leaves: its socket, its log, its directory."""
    for name in (SOCKET_NAME, LOG_NAME, PID_NAME):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(rec.directory, name))
    try:
        os.rmdir(rec.directory)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", rec.directory, e.strerror or e)


def stop_recorded(rec: ServerRecord) -> bool:
    """Stop the server ``rec`` names (started by another agent) and remove its directory.
    True if it was running; False if it was gone already (its directory is removed anyway)."""
    running = _is_ours(rec)
    if running:
        try:
            os.kill(rec.pid, signal.SIGTERM)
        except ProcessLookupError:
            running = False
        deadline = time.monotonic() + STOP_TIMEOUT
        while _start_time(rec.pid) == rec.started:
            if time.monotonic() > deadline:
                os.kill(rec.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.02)
    _remove_directory(rec)
    return running


class DetachedServer:
    """nbdkit serving ``devices`` of the archives ``paths`` (a chain, oldest first) on a
    Unix socket in a fresh private directory; the constructor waits until it serves.
    :meth:`stop` stops it; leaving it running is what a killed agent does.

    nbdkit runs as a daemon (it forks, and the process the agent started exits once the
    server is set up; ``-P`` names the server's pid). Started with ``--foreground`` it
    would die with the agent even without ``--exit-with-parent``: nbdkit 1.32 then sets
    ``PR_SET_PDEATHSIG`` itself (seen with strace here), and a forked child does not keep it.
    """

    def __init__(self, paths: Sequence[str], devices: Sequence[str], *, cache: int,
                 keys: Sequence[X25519PrivateKey] = ()) -> None:
        plugin = find_plugin()
        if not plugin.exists():
            raise AgentError(f"the serving plugin is missing: {plugin}")
        self.directory = tempfile.mkdtemp(prefix=DIR_PREFIX)
        self.socket = os.path.join(self.directory, SOCKET_NAME)
        self._log_path = os.path.join(self.directory, LOG_NAME)
        self._log_pos = 0
        self.record: ServerRecord | None = None
        pidfile = os.path.join(self.directory, PID_NAME)
        keyfd = key_pipe(keys)
        self._holder: Any = None  # the agent's own connection (module docstring)
        args = ["nbdkit", "-U", self.socket, "-P", pidfile, "--log=stderr", *NBDKIT_THREADS,
                "-r", "--filter=exitlast", "python", str(plugin),
                *(f"archive={p if p.startswith('s3://') else os.path.abspath(p)}"
                  for p in paths),
                *(f"device={d}" for d in devices), f"cache={cache}", f"log={self._log_path}",
                *([f"keyfd={keyfd}"] if keyfd is not None else [])]
        log.debug("starting %s (a daemon)", " ".join(args))
        try:
            # O_APPEND: the plugin appends its lines to the same file (its log=).
            fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                         0o600)
            with open(fd, "ab") as logfile:
                # The daemon's pid comes from the pid file; this process exits at once.
                status = subprocess.run(
                    args, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                    start_new_session=True, cwd="/", timeout=START_TIMEOUT,
                    env={**os.environ, "PYTHONPATH": _pythonpath()},
                    pass_fds=() if keyfd is None else (keyfd,)).returncode
            if status != 0:
                lines = self.messages()
                raise AgentError("could not serve: " + (
                    lines[-1] if lines else f"nbdkit exited with status {status}"))
            self.record = self._wait_ready(pidfile)
            self._holder = _connect(uri(devices[0], self.socket))
        except FileNotFoundError as e:
            self.stop()
            raise AgentError("nbdkit is not installed (Debian packages nbdkit, "
                             "nbdkit-plugin-python)") from e
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise AgentError(f"nbdkit did not start within {START_TIMEOUT:.0f} s") from e
        except BaseException:
            self.stop()
            raise
        finally:
            if keyfd is not None:
                os.close(keyfd)

    @property
    def pid(self) -> int:
        if self.record is None:
            raise AgentError("the server is stopped")
        return self.record.pid

    def _wait_ready(self, pidfile: str) -> ServerRecord:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip() or "0")
            except (FileNotFoundError, ValueError):
                pid = 0
            if pid:
                started = _start_time(pid)
                if started is None:
                    lines = self.messages()
                    raise AgentError("could not serve: " + (
                        lines[-1] if lines else f"nbdkit (pid {pid}) exited as it started"))
                if accepts(self.socket):  # the pid file stays: for a person, if QEMU is gone
                    return ServerRecord(pid, started, self.directory, self.socket)
            time.sleep(0.01)
        raise AgentError(f"nbdkit did not start serving on {self.socket} within "
                         f"{START_TIMEOUT:.0f} s")

    def messages(self) -> list[str]:
        """The lines the plugin wrote for the user since the last call (a damaged record);
        nbdkit's own lines are logged at debug level."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # whole lines only
        self._log_pos += end
        out = []
        for raw in data[:end].splitlines():
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(USER_PREFIX):
                out.append(line[len(USER_PREFIX):])
            elif line:
                log.debug("nbdkit: %s", line)
        return out

    def running(self) -> bool:
        return self.record is not None and _is_ours(self.record)

    def stop(self) -> None:
        """Stop nbdkit (by its own pid) and remove its directory. Idempotent."""
        # The holder first: nbdkit waits for its open connections before it exits.
        holder, self._holder = self._holder, None
        if holder is not None:
            with contextlib.suppress(Exception):  # a server gone already: nothing to say
                holder.shutdown()
            del holder  # its last reference: libnbd closes the socket
        rec, self.record = self.record, None
        if rec is not None:
            stop_recorded(rec)
        else:
            _remove_directory(ServerRecord(0, 0, self.directory, self.socket))


def _connect(where: str) -> Any:
    """An NBD connection to ``where`` (an open libnbd handle)."""
    import nbd

    h = nbd.NBD()
    try:
        h.connect_uri(where)
    except nbd.Error as e:
        raise AgentError(f"cannot connect to the server it started: {e.string}") from e
    return h
