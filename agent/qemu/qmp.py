"""A small synchronous client for QEMU's QMP monitor, built on the ``qemu.qmp`` library.

::

    with Monitor("/run/vm1/agent.qmp") as mon:
        mon.execute("query-status")                  # -> {"running": True, ...}
        mon.execute("blockdev-del", {"node-name": "x"})
        # QmpError: QMP command 'blockdev-del' failed: GenericError: Failed to find node ...

Errors (``str(e)`` is the one line the user reads)::

    AgentError                 (agent.errors)
     └── QmpError              the monitor cannot be reached, a command failed or got no reply;
          │                    .command, .error_class and .desc carry QEMU's answer
          └── MonitorBusy      the monitor already serves another client: no greeting comes

Why a background thread and not ``asyncio.run`` per call: ``QMPClient`` is asyncio-only and
its connection (stream reader and writer, reader and writer tasks) belongs to the event loop
that opened it. A fresh loop per call would need a fresh connection per call: a greeting and
capabilities negotiation for every command, and, worse, the monitor let go between commands,
where another client (libvirt, a person with socat) can take it and lock the agent out in the
middle of building or tearing down a block graph. So each :class:`Monitor` owns one event loop
running in one daemon thread for its whole life; the calling thread hands it coroutines
(``run_coroutine_threadsafe``) and waits for their results. As a side effect, ``execute`` may be
called from several threads at once: QEMU answers in turn and the library matches replies by id.
(The library's ``legacy`` synchronous wrapper is not used: it is fragile on newer Pythons.)

Two details of the library this module takes care of:

- ``QMPClient`` keeps every event QEMU sends in a default listener (queue and history) that
  nobody drains, a slow leak on a connection that lives for a whole backup. That listener cannot
  be removed, so it is given a filter that refuses every event: this facade delivers none.
- The library logs each failure at ERROR before raising it; the same facts reach the user in
  our :class:`QmpError`, so its records are demoted to DEBUG (visible with ``--debug``).

QMP over TLS (``Monitor("10.0.0.1:4444", tls=ctx)``, QEMU's ``-chardev socket,...,tls-creds=``)
meets a QEMU 7.2 defect, seen here on every connection: QEMU acts on a TLS record only once
another record arrives after it. It sends no greeting after the handshake until the client
sends something, and answers each command only when the next bytes come. QMP's JSON parser
skips whitespace, so :class:`_Client` sends a newline in a record of its own after the
handshake and after every message: each command is then answered at once. (The handshake
itself runs on the socket we connected, so connection errors keep their own messages.) These
are overrides of ``QMPClient`` internals (``_do_connect``, ``_do_send``, ``_bh_flush_writer``,
as in qemu.qmp 0.0.6), used only with TLS; tests/integration/test_network.py covers them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar, cast

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp import StateError as _StateError
from qemu.qmp.message import Message
from qemu.qmp.qmp_client import GreetingError

from agent import interrupts
from agent.address import is_tcp, parse_address
from agent.errors import AgentError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait for the loop thread to finish its last tasks when a monitor is closed.
_STOP_TIMEOUT = 5.0


class QmpError(AgentError):
    """A QMP monitor cannot be reached, or a command failed or got no reply.

    For a command QEMU answered with an error, ``command``, ``error_class`` (e.g.
    ``GenericError``, ``DeviceNotFound``) and ``desc`` hold the command and QEMU's answer.
    """

    def __init__(
        self, message: str, *, command: str | None = None, error_class: str | None = None,
        desc: str | None = None,
    ) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MonitorBusy(QmpError):
    """The monitor serves another client already; QEMU's monitors take one client at a time."""


class MonitorGone(QmpError):
    """The connection to the monitor is closed: QEMU most likely exited."""


class _DemotedLog(logging.LoggerAdapter[logging.Logger]):
    """A logger for ``QMPClient`` that records everything at DEBUG (see the module docstring)."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        super().log(min(level, logging.DEBUG), msg, *args, **kwargs)


class _LoopThread:
    """One asyncio event loop running in one daemon thread, fed from other threads."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        with interrupts.held():  # see agent.interrupts
            self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (or its exception).

        If the wait is interrupted (Ctrl-C in the calling thread, or ``timeout``), the
        coroutine is cancelled before the exception propagates.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not future.done():  # in steps, so that Ctrl-C is answered: agent.interrupts
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError
                concurrent.futures.wait([future], interrupts.STEP if left is None
                                        else min(interrupts.STEP, left))
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop the thread and close the loop. Idempotent."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            try:
                self.run(_cancel_other_tasks(), timeout=_STOP_TIMEOUT)
            except Exception as e:  # cleanup must go on
                log.debug("QMP loop: cancelling leftover tasks failed: %r", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(_STOP_TIMEOUT)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Monitor:
    """A connection to one QMP monitor; a context manager that always disconnects.

    ``address`` is a Unix socket path or ``HOST:PORT``. ``timeout`` (seconds) bounds connecting,
    waiting for QEMU's greeting (a monitor that already has a client never sends one: that is
    :class:`MonitorBusy`), and each command unless :meth:`execute` is given its own.

    ``tls`` (TCP only) is the client context of QMP over TLS (:meth:`agent.tls.TlsCreds.
    qmp_context`); the server's certificate must name the host as written in ``address``.

    Raises :class:`QmpError` when the monitor cannot be reached. :meth:`execute` may be called
    from several threads at once. Close the monitor (or use ``with``) when done: until then
    QEMU serves no other client on it.
    """

    def __init__(self, address: str, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.tls = tls
        self.local_host: str | None = None
        """For a TCP monitor: this host's address on the connection, which QEMU can reach."""
        self._client: QMPClient | None = None
        if tls is not None and not is_tcp(address):
            raise QmpError(f"QMP over TLS needs a HOST:PORT address, not {address}")
        self._loop = _LoopThread(name=f"qmp {address}")
        try:
            sock = self._open_socket()
            self._client = self._loop.run(self._start_session(sock))
        except BaseException:
            self._loop.stop()
            raise

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._client is None

    def _open_socket(self) -> socket.socket:
        """Connect a socket to the monitor (in the calling thread; it is quick or it fails)."""
        target = parse_address(self.address)
        where = self.address
        try:
            if isinstance(target, tuple):
                tcp = socket.create_connection(target, timeout=self.timeout)
                self.local_host = str(tcp.getsockname()[0])
                return tcp
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout)
                sock.connect(target)
            except BaseException:
                sock.close()
                raise
            return sock
        except FileNotFoundError as e:
            raise QmpError(f"no QMP monitor at {where}: no such socket") from e
        except ConnectionRefusedError as e:
            if os.path.exists(where) and not stat.S_ISSOCK(os.stat(where).st_mode):
                raise QmpError(f"no QMP monitor at {where}: not a socket") from e
            raise QmpError(
                f"no QMP monitor at {where}: connection refused (is QEMU running?)"
            ) from e
        except TimeoutError as e:
            raise QmpError(
                f"cannot connect to the QMP monitor at {where}: no answer within "
                f"{self.timeout:g} s"
            ) from e
        except OSError as e:
            raise QmpError(
                f"cannot connect to the QMP monitor at {where}: {e.strerror or e}"
            ) from e

    async def _start_session(self, sock: socket.socket) -> QMPClient:
        """Greeting and capabilities negotiation on the connected ``sock``."""
        target = parse_address(self.address)
        client = _Client(self.tls, target[0] if isinstance(target, tuple) else None)
        # See the module docstring: a typed Logger is expected, an adapter behaves as one.
        client.logger = cast(logging.Logger, _DemotedLog(client.logger))
        client.events.event_filter = _drop  # the default listener may not be removed
        try:
            await asyncio.wait_for(client.connect(sock), self.timeout)
        except TimeoutError as e:
            sock.close()
            plain_tcp = isinstance(target, tuple) and self.tls is None
            raise MonitorBusy(
                f"the QMP monitor at {self.address} is busy: another client holds it "
                f"(no QMP greeting within {self.timeout:g} s); give the agent a monitor of its "
                "own (-qmp unix:PATH,server=on,wait=off)"
                + (", or the monitor expects TLS and the agent was told "
                   "--insecure-plaintext" if plain_tcp else "")
            ) from e
        except ConnectError as e:
            sock.close()
            tls_error = _tls_failure(self.address, e.exc) if self.tls is not None else None
            if tls_error is not None:
                raise QmpError(tls_error) from e
            if isinstance(e.exc, GreetingError):
                raise QmpError(
                    f"{self.address} is not a QMP monitor: its greeting is not QMP's ({e.exc})"
                ) from e
            if isinstance(e.exc, EOFError):
                raise QmpError(
                    f"the QMP monitor at {self.address} closed the connection before the "
                    "session began (is QEMU exiting?)"
                ) from e
            raise QmpError(f"cannot start a QMP session with {self.address}: {e}") from e
        except BaseException:  # cancelled (Ctrl-C in the caller): the socket is ours to close
            sock.close()
            raise
        return client

    def execute(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run QMP command ``cmd`` with ``args`` and return QEMU's ``return`` value.

        ``timeout`` (default: the monitor's) bounds the wait for the reply. Raises
        :class:`QmpError`: for QEMU's error reply (``QMP command 'blockdev-add' failed:
        GenericError: Duplicate nodes with node-name='x'``), no reply in time, or a closed
        connection.
        """
        client = self._client
        if client is None:
            raise MonitorGone(f"QMP command '{cmd}' not sent: the monitor connection was closed")
        wait = self.timeout if timeout is None else timeout
        try:
            return self._loop.run(_execute(client, cmd, args, wait))
        except ExecuteError as e:
            raise QmpError(
                f"QMP command '{cmd}' failed: {e.error_class}: {e.error.error.desc}",
                command=cmd, error_class=e.error_class, desc=e.error.error.desc,
            ) from e
        except ExecInterruptedError as e:
            raise MonitorGone(
                f"QMP command '{cmd}' got no reply: the monitor at {self.address} closed the "
                "connection (did QEMU exit?)", command=cmd,
            ) from e
        except _StateError as e:
            raise MonitorGone(
                f"QMP command '{cmd}' not sent: the connection to the monitor at "
                f"{self.address} is closed (did QEMU exit?)", command=cmd,
            ) from e
        except TimeoutError as e:
            raise QmpError(
                f"QMP command '{cmd}' got no reply within {wait:g} s from the monitor at "
                f"{self.address}", command=cmd,
            ) from e
        except QMPError as e:  # a malformed reply, or another protocol error
            raise QmpError(f"QMP command '{cmd}' failed: {e}", command=cmd) from e

    def close(self) -> None:
        """Disconnect and stop the loop thread. Idempotent; never raises (a connection that
        QEMU already closed, e.g. after ``quit``, is not an error here)."""
        client, self._client = self._client, None
        try:
            if client is not None:
                self._loop.run(_disconnect(client, self.timeout))
        except Exception as e:
            log.debug("QMP %s: disconnect: %r", self.address, e)
        finally:
            self._loop.stop()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Monitor {self.address} {state}>"


class _Client(QMPClient):
    """``QMPClient`` that starts TLS on the socket it is given and nudges QEMU 7.2 after every
    message (see the module docstring). Without ``tls`` it is ``QMPClient``."""

    def __init__(self, tls: ssl.SSLContext | None, hostname: str | None) -> None:
        super().__init__()
        self._tls = tls
        self._hostname = hostname

    async def _do_connect(self, address: str | tuple[str, int] | socket.socket,
                          ssl: ssl.SSLContext | None = None) -> None:
        await super()._do_connect(address, ssl)
        if self._tls is not None and self._writer is not None:
            await self._writer.start_tls(self._tls, server_hostname=self._hostname)
            self._writer.write(b"\n")
            await self._writer.drain()

    def _do_send(self, msg: Message) -> None:
        super()._do_send(msg)
        if self._tls is not None and self._writer is not None:
            self._writer.write(b"\n")  # a record of its own: asyncio encrypts each write

    async def _bh_flush_writer(self) -> None:
        if self._tls is None:
            await super()._bh_flush_writer()
            return
        # The library flushes with write-buffer limits of 0, on which Python 3.11's TLS
        # transport pauses and never resumes: every disconnect would hang. A plain drain
        # after the queue is empty sends the same bytes.
        if self._writer_task is not None:
            await self._outgoing.join()
        if self._writer is not None:
            await self._writer.drain()


def _tls_failure(address: str, exc: BaseException) -> str | None:
    """What a TLS handshake failure means, for the user; None if ``exc`` is no such failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the QMP monitor at {address} presented a certificate the agent does not "
                f"trust ({exc.verify_message}): ca-cert.pem in --tls-creds must be the CA "
                "that signed QEMU's server-cert.pem, and that certificate must name the "
                "host as given to --qmp")
    if isinstance(exc, ssl.SSLError):
        if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc):
            return (f"the QMP monitor at {address} does not speak TLS (its -chardev has no "
                    "tls-creds=): give it TLS (see docs/NETWORK.md); the agent does not send "
                    "QMP over a network in clear text unless told --insecure-plaintext")
        return (f"TLS handshake with the QMP monitor at {address} failed: "
                f"{exc.reason or exc}; QEMU may have refused the agent's certificate "
                "(client-cert.pem must be signed by the CA in QEMU's credentials directory)")
    if isinstance(exc, (EOFError, ConnectionResetError, BrokenPipeError)):
        return (f"the QMP monitor at {address} closed the connection during the TLS "
                "handshake: QEMU did not accept the agent's client certificate "
                "(client-cert.pem must be signed by the CA in QEMU's credentials directory)")
    return None


def _drop(event: object) -> bool:
    return False


async def _execute(
    client: QMPClient, cmd: str, args: Mapping[str, Any] | None, timeout: float
) -> Any:
    return await asyncio.wait_for(client.execute(cmd, args), timeout)


async def _disconnect(client: QMPClient, timeout: float) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), timeout)
    except Exception as e:  # EOFError/ConnectionResetError after QEMU quit: nothing to undo
        log.debug("QMP disconnect: %r", e)
