"""Runs the serving nbdkit: our Python plugin, every device one export, on a Unix socket.

nbdkit embeds the system Python and does not put the plugin's folder on sys.path, so it gets
the PYTHONPATH the copy-before-write target gets (:func:`agent.cbw.server._pythonpath`).
``--exit-with-parent`` stops it with the agent. nbdkit's standard error is read on a thread:
the lines the plugin writes for the user (``backup-agent: serve: ...``, a damaged record)
go to the agent's log as warnings; nbdkit's own (a Python traceback per failed request)
only with ``--debug``.

Over TCP (``listen=(host, port)``) the rules of live backups hold: TLS with the agent's
credentials (:meth:`agent.tls.TlsCreds.nbdkit_args`: x509 with the clients' certificates
checked against the CA, or a PSK), clear text only when the caller passes ``tls=None``
(``--insecure-plaintext``). nbdkit 1.32 cannot filter client addresses: TLS and the firewall
decide who may read the disks.

``writable``: nbdkit's ``cow`` filter takes the writes into a temporary overlay file in
``$TMPDIR`` (default /var/tmp), unlinked and gone when nbdkit exits; the archive is opened
read-only. nbdkit 1.32's cow filter keeps one overlay per server, not per export (a write to
one export shows in every other), so a writable server serves one device.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as socket_module
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

import agent
from agent.address import format_address
from agent.cbw.server import _pythonpath
from agent.errors import AgentError, InvalidArgument
from agent.process import START_TIMEOUT, accepts, accepts_tcp
from agent.tls import SERVER_CERT, SERVER_KEY, TlsCreds

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger("backup-agent")

USER_PREFIX = "backup-agent: serve: "

#: One thread per connection. nbdkit 1.32.5 aborts (``raw_send_socket: Assertion `sock >= 0'
#: failed``) when a client goes away while several threads of its connection still answer
#: requests: nbdcopy stopping at a read error, a client killed mid-read. Seen with the C file
#: plugin too, so it is nbdkit's, not ours. With one thread a connection's requests are
#: answered in turn; connections still run in parallel (multi-conn). What it costs a
#: single-connection reader at queue depth 16: docs/PERFORMANCE.md.
NBDKIT_THREADS = ["--threads=1"]


#: Private keys handed to one server at most (their raw bytes must fit a pipe's buffer).
MAX_KEYS = 64
KEY_BYTES = 32


def key_pipe(keys: Sequence[X25519PrivateKey]) -> int | None:
    """The read end of a pipe that holds the raw bytes of ``keys`` and nothing else, for the
    plugin's ``keyfd=`` (None without keys). A key never appears in nbdkit's command line
    or environment, which other users of the host may read; the pipe is read once, as the
    plugin is configured, and closed. The caller closes its copy once nbdkit started."""
    if not keys:
        return None
    if len(keys) > MAX_KEYS:
        raise InvalidArgument(f"give at most {MAX_KEYS} keys")
    from agent.keys import raw_private

    data = b"".join(raw_private(k) for k in keys)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, data)  # 2 KiB at most: the pipe's buffer takes it without a reader
    except BaseException:
        os.close(rfd)
        raise
    finally:
        os.close(wfd)
    return rfd


def find_plugin() -> Path:
    """The plugin script: beside ``agent/`` in a checkout, else where pip puts it."""
    here = Path(agent.__file__).resolve().parent.parent / "nbd-plugins" / "serve_archive.py"
    installed = Path(sys.prefix) / "share" / "backup-agent" / "serve_archive.py"
    return here if here.exists() or not installed.exists() else installed


def uri(device: str, socket: str) -> str:
    return f"nbd+unix:///{quote(device, safe='')}?socket={quote(socket, safe='/')}"


def tcp_uri(device: str, host: str, port: int, tls: TlsCreds | None) -> str:
    """``nbds://[USER@]HOST:PORT/DEVICE`` (the client adds its own credentials, e.g.
    ``?tls-psk-file=FILE``), or ``nbd://`` in clear text."""
    scheme = "nbds" if tls is not None else "nbd"
    user = f"{quote(tls.psk_user, safe='')}@" if tls is not None and tls.psk_user else ""
    return f"{scheme}://{user}{format_address(host, port)}/{quote(device, safe='')}"


def _free_port(host: str, port: int = 0) -> int:
    """``port``, or any port if 0, checked free on ``host`` (all addresses if empty) right
    now: a server already there would answer the readiness check in nbdkit's place."""
    family = socket_module.AF_INET6 if ":" in host else socket_module.AF_INET
    with socket_module.socket(family, socket_module.SOCK_STREAM) as s:
        s.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)  # as nbdkit
        try:
            s.bind((host, port))
        except OSError as e:
            where = format_address(host, port) if host else f"port {port}"
            hint = ("is another server on it?" if e.errno == errno.EADDRINUSE
                    else "is it an address of this host?")
            raise InvalidArgument(f"--listen: cannot listen on {where}: "
                                  f"{e.strerror or e} ({hint})") from e
        return int(s.getsockname()[1])


def check_server_creds(tls: TlsCreds) -> None:
    """Refuse x509 credentials without the server's certificate and key, saying why."""
    if tls.psk_file is not None:
        return
    for name in (SERVER_CERT, SERVER_KEY):
        if not os.path.isfile(os.path.join(tls.directory, name)):
            raise InvalidArgument(f"TLS credentials directory {tls.directory} has no {name}: "
                                  "serving over x509 needs this host's server certificate "
                                  "and key (or use --tls-psk FILE; see docs/NETWORK.md)")


def check_socket_path(path: str) -> str:
    """The absolute socket path, refused if something is there already or it is too long."""
    full = os.path.abspath(path)
    if len(os.fsencode(full)) > 107:
        raise InvalidArgument(f"socket path {full} is longer than the 107 bytes a Unix "
                              "socket may have: choose a shorter one")
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        pass
    else:
        what = "a socket (is another server using it?)" if stat.S_ISSOCK(st.st_mode) else \
            "a file"
        raise InvalidArgument(f"{full} exists and is {what}: choose another --socket path "
                              "or remove it")
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise InvalidArgument(f"--socket {full}: directory {parent} does not exist")
    return full


class ArchiveServer:
    """One nbdkit serving ``devices`` of the archives ``paths`` (a chain, oldest first) on
    the Unix socket ``socket``, which must not exist (:func:`check_socket_path`).
    The constructor starts nbdkit and waits until it serves."""

    def __init__(self, paths: Sequence[str], devices: Sequence[str], socket: str | None, *,
                 cache: int, writable: bool = False,
                 listen: tuple[str, int] | None = None, tls: TlsCreds | None = None,
                 insecure: bool = False, keys: Sequence[X25519PrivateKey] = ()) -> None:
        plugin = find_plugin()
        if not plugin.exists():
            raise AgentError(f"the serving plugin is missing: {plugin}")
        if writable and len(devices) != 1:
            raise InvalidArgument("--writable serves one device per server (nbdkit's cow "
                                  "filter keeps one overlay for all exports): choose it with "
                                  "--device NAME, and run one serve per device")
        if (socket is None) == (listen is None):
            raise InvalidArgument("serve on a Unix socket or on TCP: one of the two")
        if listen is not None and tls is None and not insecure:
            raise InvalidArgument("serving over TCP needs TLS (or --insecure-plaintext)")
        self.socket = socket
        self.devices = list(devices)
        self.tls = tls
        self.tcp: tuple[str, int] | None = None
        self._last_user_line = ""
        self._ready = False  # serving: the plugin's lines are warnings from now on
        args = ["nbdkit", "--foreground", "--exit-with-parent", *NBDKIT_THREADS]
        if listen is not None:
            host, port = listen
            self.tcp = (host, _free_port(host, port))
            if tls is not None:
                check_server_creds(tls)
            args += [*(["-i", host] if host else []), "-p", str(self.tcp[1]),
                     *(tls.nbdkit_args() if tls is not None else [])]
        else:
            args += ["-U", str(socket)]
        args += ["--filter=cow"] if writable else ["-r"]
        keyfd = key_pipe(keys)
        args += ["python", str(plugin), *(f"archive={p}" for p in paths),
                 *(f"device={d}" for d in devices), f"cache={cache}",
                 *([f"keyfd={keyfd}"] if keyfd is not None else [])]
        log.debug("starting %s", " ".join(args))
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": _pythonpath()},
                pass_fds=() if keyfd is None else (keyfd,))
        except FileNotFoundError as e:
            raise AgentError("nbdkit is not installed (Debian packages nbdkit, "
                             "nbdkit-plugin-python)") from e
        finally:
            if keyfd is not None:
                os.close(keyfd)
        self._relay = threading.Thread(target=self._relay_stderr, name="nbdkit-stderr",
                                       daemon=True)
        self._relay.start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        self._ready = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def uris(self) -> list[str]:
        if self.tcp is not None:
            host = self.tcp[0] or socket_module.gethostname()
            return [tcp_uri(d, host, self.tcp[1], self.tls) for d in self.devices]
        return [uri(d, str(self.socket)) for d in self.devices]

    def _serving(self) -> bool:
        if self.tcp is not None:
            return accepts_tcp(self.tcp[0] or "localhost", self.tcp[1])
        return accepts(str(self.socket))

    @property
    def where(self) -> str:
        if self.tcp is not None:
            return format_address(self.tcp[0] or "*", self.tcp[1])
        return str(self.socket)

    def _relay_stderr(self) -> None:
        stream = self.proc.stderr
        if stream is None:
            return
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(USER_PREFIX):
                self._last_user_line = line[len(USER_PREFIX):]
                if self._ready:  # before, it is why nbdkit did not start: the error says it
                    log.warning("%s", self._last_user_line)
                else:
                    log.debug("nbdkit: %s", line)
            elif line:
                log.debug("nbdkit: %s", line)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._relay.join(1.0)
                why = self._last_user_line or f"nbdkit exited with status {self.proc.returncode}"
                raise AgentError(f"could not serve: {why}")
            if self._serving():
                return
            time.sleep(0.01)
        raise AgentError(f"nbdkit did not start serving on {self.where} within "
                         f"{START_TIMEOUT:.0f} s")

    def wait(self, timeout: float) -> int | None:
        """nbdkit's exit status, or None if it still runs after ``timeout`` seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        proc = self.proc
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._relay.join(2.0)
        if proc.stderr is not None:
            proc.stderr.close()
        # nbdkit removes its socket on a clean exit; after a crash it may be left behind.
        if self.socket is None:
            return
        try:
            if stat.S_ISSOCK(os.lstat(self.socket).st_mode):
                os.unlink(self.socket)
        except OSError:
            pass

    def __enter__(self) -> ArchiveServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
