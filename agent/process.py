"""Helper processes the agent runs (qemu-nbd, nbdkit): each in a private temporary
directory (for its sockets), its output kept for error messages, and stopped by its
own pid on every way out."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

from agent.errors import AgentError

START_TIMEOUT = 15.0


NBD_GREETING = b"NBDMAGIC"


def accepts(path: str, timeout: float = 1.0) -> bool:
    """Whether an NBD server on Unix socket ``path`` is serving.

    A successful connect() is not enough: qemu-nbd listens before it opens its image and
    exits if that fails, and the kernel completes connects to a listening socket on its own.
    Only a server that is really serving sends the greeting.
    """
    if not os.path.exists(path):
        return False
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(path)
            return _greeted(s)
    except OSError:  # includes the timeout: not serving yet
        return False


def accepts_tcp(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether an NBD server on TCP ``host:port`` is serving (its greeting, sent in clear
    text even by a TLS-only server: TLS starts later, with an NBD option)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return _greeted(s)
    except OSError:
        return False


def _greeted(s: socket.socket) -> bool:
    """Whether the server on ``s`` sends the NBD greeting (raises OSError, timeouts too)."""
    greeting = b""
    while len(greeting) < len(NBD_GREETING):
        chunk = s.recv(len(NBD_GREETING) - len(greeting))
        if not chunk:
            return False
        greeting += chunk
    return greeting == NBD_GREETING


class HelperProcess:
    """Make the directory first (:attr:`dir`, for the sockets named in the command
    line), then :meth:`start`, :meth:`wait_until` ready; :meth:`close` always."""

    def __init__(self, prefix: str) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, args: Sequence[str], *, missing: str,
              env: Mapping[str, str] | None = None) -> None:
        """Start ``args`` with the agent's environment plus ``env``; ``missing`` is the
        error when the program is not installed."""
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=self._log, env={**os.environ, **(env or {})})
        except FileNotFoundError as e:
            raise AgentError(missing) from e

    def wait_until(self, ready: Callable[[], bool], what: str,
                   timeout: float = START_TIMEOUT) -> None:
        """Wait for ``ready()``; ``what`` says what did not happen, in the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AgentError(f"{what}: {self.output()}")
            if ready():
                return
            time.sleep(0.005)
        raise AgentError(f"{what} within {timeout:.0f} s")

    def output(self) -> str:
        """The last line the process printed."""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else "no message"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
