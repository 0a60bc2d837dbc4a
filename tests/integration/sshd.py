"""A real, throwaway OpenSSH server on 127.0.0.1 for tests that carry archives over ssh.

``SshServer.start(directory)`` generates a host key and a client key with ``ssh-keygen``,
writes an ``sshd_config`` of its own (loopback only, a free port, keys only, no PAM, no pid
file), and runs ``/usr/sbin/sshd -D -e -f CONFIG`` in the foreground. It is ready when it
answers with its ``SSH-2.0-`` banner. :meth:`SshServer.stop` ends it by its own pid
(SIGTERM, then SIGKILL after a timeout); nothing is ever killed by name.

:meth:`SshServer.authorize` adds further client keys, optionally with ``authorized_keys``
options (``restrict,command="..."``); sshd reads the file at every login, so keys can be
added while it runs.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
HOST = "127.0.0.1"


def _keygen(path: Path, comment: str) -> Path:
    """A fresh ed25519 key pair without passphrase at ``path`` and ``path.pub``."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, capture_output=True)
    return path


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _banner(port: int, timeout: float = 0.5) -> bool:
    """True when an ssh server on ``port`` sends its identification line."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            return s.recv(8).startswith(b"SSH-2.0-")
    except OSError:
        return False


@dataclass
class SshServer:
    directory: Path
    """Holds the keys, sshd_config, authorized_keys and sshd's log."""
    port: int
    proc: subprocess.Popen[bytes]
    key: Path
    """The client key authorized without restrictions."""
    user: str = field(default_factory=lambda: pwd.getpwuid(os.geteuid()).pw_name)

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"

    @classmethod
    def start(cls, directory: Path, attempts: int = 3) -> SshServer:
        """Keys, config and a running sshd in ``directory`` (which must exist)."""
        _keygen(directory / "host_key", "backup-agent-test-host")
        key = _keygen(directory / "client_key", "backup-agent-test-client")
        (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
        if os.geteuid() == 0:
            PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        for attempt in range(attempts):
            port = _free_port()
            config = directory / "sshd_config"
            config.write_text("\n".join([
                f"ListenAddress {HOST}",
                f"Port {port}",
                f"HostKey {directory / 'host_key'}",
                f"AuthorizedKeysFile {directory / 'authorized_keys'}",
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "PidFile none",
                "PrintMotd no",
                "LogLevel VERBOSE",
                "",
            ]))
            with open(directory / "sshd.log", "ab") as log:
                proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
            server = cls(directory, port, proc, key)
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and not _banner(port):
                if time.monotonic() > deadline:
                    server.stop()
                    pytest.fail(f"sshd did not answer on port {port} within "
                                f"{START_TIMEOUT:.0f} s\n{server.log_text()}", pytrace=False)
                time.sleep(0.02)
            if proc.poll() is None:
                return server
            # Most likely another process took the port between _free_port() and bind().
            if attempt == attempts - 1:
                pytest.fail(f"sshd exited with {proc.returncode} before accepting "
                            f"connections\n{server.log_text()}", pytrace=False)
        raise AssertionError("unreachable")

    def authorize(self, name: str, options: str = "") -> Path:
        """A new client key, appended to authorized_keys with ``options`` in front."""
        key = _keygen(self.directory / f"{name}_key", f"backup-agent-test-{name}")
        line = (self.directory / f"{name}_key.pub").read_text().strip()
        with open(self.authorized_keys, "a") as f:
            f.write(f"{options} {line}\n" if options else f"{line}\n")
        return key

    def argv(self, key: Path | None = None) -> list[str]:
        """``ssh ... user@127.0.0.1``: append the remote command. Unattended, and blind to
        the caller's own ssh configuration, agent and known_hosts."""
        return ["ssh", "-F", "/dev/null", "-i", str(key or self.key), "-p", str(self.port),
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                f"{self.user}@{HOST}"]

    def command(self, key: Path | None = None) -> str:
        """:meth:`argv` quoted for a shell command line."""
        return shlex.join(self.argv(key))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int:
        """Stop this sshd by its own pid: SIGTERM, wait, SIGKILL after STOP_TIMEOUT.
        Sessions still open are separate processes that end when their client goes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> SshServer:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.stop()
