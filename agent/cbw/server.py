"""Runs the copy-before-write target: nbdkit with our Python plugin, one per disk.

nbdkit embeds the system Python and does not put the plugin's folder on sys.path, so the
process gets a PYTHONPATH holding this package's root and the site-packages we run from.
``--exit-with-parent`` makes nbdkit die with the agent: QEMU then breaks the snapshot after
``cbw-timeout`` and the guest keeps writing unharmed.

Where it listens: on a Unix socket when QEMU runs on this host; on TCP (``listen=(host,
port)``) when the agent drives a VM on another host. QEMU's NBD client then connects across
the network and every old cluster comes straight to this host. TCP is served only under TLS
(:meth:`agent.tls.TlsCreds.nbdkit_args`), unless the caller explicitly passes ``tls=None`` and
``insecure=True``. The control socket stays a local Unix socket: only the agent uses it.

Who may use the target: only the QEMU being backed up. A certificate signed by the CA, or the
PSK, is not enough — other hosts and programs hold those too, and a client that can write here
could put data of its own into the backup. So each target serves one export whose name is 128
random bits (:attr:`CbwTargetServer.export`), given to nbdkit in its environment and to QEMU in
the NBD client node's options (over QMP); other names are refused (:mod:`agent.cbw.plugin`).
And the store takes each cluster once (:mod:`agent.cbw.store`), so even a client that got through
could not replace what QEMU copied.
"""

from __future__ import annotations

import os
import site
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import agent
from agent.address import format_address
from agent.cbw.control import ControlClient
from agent.cbw.plugin import EXPORT_ENV
from agent.errors import AgentError, InvalidArgument
from agent.process import HelperProcess, accepts, accepts_tcp
from agent.tls import TlsCreds


def find_plugin() -> Path:
    """The nbdkit plugin script: in the repository beside ``agent/`` (a checkout, an
    editable install), else where ``pip install`` puts it (pyproject's data-files:
    ``<prefix>/share/backup-agent/``)."""
    here = Path(agent.__file__).resolve().parent.parent / "nbd-plugins" / "cbw_target.py"
    installed = Path(sys.prefix) / "share" / "backup-agent" / "cbw_target.py"
    return here if here.exists() or not installed.exists() else installed


PLUGIN = find_plugin()


def _pythonpath() -> str:
    # The package's root (a checkout, or site-packages) and this interpreter's
    # site-packages: nbdkit's embedded Python knows neither.
    paths = [str(Path(agent.__file__).resolve().parent.parent), *site.getsitepackages()]
    paths += [p for p in sys.path if p.endswith("site-packages") and p not in paths]
    return ":".join(paths)


def free_port(host: str) -> int:
    """A TCP port free on ``host`` right now (nbdkit binds it a moment later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as e:
            raise InvalidArgument(f"cannot listen on {host} for QEMU's copy-before-write "
                                  f"connections: {e.strerror or e} (is it an address of this "
                                  "host? see --cbw-listen)") from e
        return int(s.getsockname()[1])


class CbwTargetServer:
    """One nbdkit process serving one disk's copy-before-write target.

    ``listen=None``: a Unix socket (QEMU on this host). ``listen=(host, port)``: TCP on this
    host (port 0: any free one), under TLS with ``tls`` and QEMU's credentials object
    ``qemu_tls_creds`` (``endpoint=client``), or in clear text if ``insecure``.

    The constructor starts nbdkit; :meth:`wait_ready` before QEMU connects.
    """

    def __init__(self, size: int, *, memory: int, spool_dir: str | None, spool_limit: int,
                 label: str, listen: tuple[str, int] | None = None,
                 tls: TlsCreds | None = None, qemu_tls_creds: str | None = None,
                 insecure: bool = False) -> None:
        if not PLUGIN.exists():
            raise AgentError(f"the copy-before-write plugin is missing: {PLUGIN}")
        if listen is not None and tls is None and not insecure:
            raise InvalidArgument("the copy-before-write target serves TCP only under TLS")
        self.label = label
        self._proc = HelperProcess("ba-cbw-")
        self.socket = os.path.join(self._proc.dir, "nbd.sock")
        self.control_path = os.path.join(self._proc.dir, "ctl.sock")
        self.control = ControlClient(self.control_path)
        self.tcp: tuple[str, int] | None = None
        # The secret export name (module docstring); os.urandom, not secrets: its import
        # costs every start 6 ms.
        self.export = os.urandom(16).hex()
        self._qemu_tls_creds = qemu_tls_creds if tls is not None else None
        where = ["-U", self.socket]
        if listen is not None:
            host, port = listen
            self.tcp = (host, port or free_port(host))
            where = ["-i", host, "-p", str(self.tcp[1]), *(tls.nbdkit_args() if tls else [])]
        args = ["nbdkit", "--foreground", "--exit-with-parent", *where,
                "python", str(PLUGIN), f"size={size}", f"memory={memory}",
                f"spool-limit={spool_limit}", f"control={self.control_path}"]
        if spool_dir:
            args.append(f"spool-dir={spool_dir}")
        try:
            self._proc.start(args, env={"PYTHONPATH": _pythonpath(), EXPORT_ENV: self.export},
                             missing="nbdkit is not installed (Debian packages nbdkit, "
                             "nbdkit-plugin-python)")
        except BaseException:
            self.close()
            raise
        self._ready = False

    def wait_ready(self) -> None:
        """Wait until the target serves (it was started by the constructor, so that several
        start at once and the caller can work meanwhile). Idempotent."""
        if not self._ready:
            self._proc.wait_until(
                lambda: self._serving() and os.path.exists(self.control_path),
                f"device {self.label!r}: the copy-before-write target did not start"
                + (f" on {self.address}" if self.tcp else ""))
            self._ready = True

    @property
    def address(self) -> str:
        """Where QEMU connects: ``HOST:PORT`` or the Unix socket's path."""
        if self.tcp is None:
            return self.socket
        return format_address(*self.tcp)

    def _serving(self) -> bool:
        if self.tcp is None:
            return accepts(self.socket)
        return accepts_tcp(*self.tcp)

    def output(self) -> str:
        return self._proc.output()

    def stats(self) -> dict[str, int]:
        """The store's counters (clusters copied, bytes spilled, peaks, full errors)."""
        return self.control.stats()

    def blockdev(self) -> dict[str, Any]:
        """QEMU blockdev-add options of an NBD client node reaching this target."""
        if self.tcp is None:
            return {"driver": "nbd", "server": {"type": "unix", "path": self.socket},
                    "export": self.export}
        host, port = self.tcp
        opts: dict[str, Any] = {"driver": "nbd", "export": self.export,
                                "server": {"type": "inet", "host": host, "port": str(port)}}
        if self._qemu_tls_creds is not None:
            opts["tls-creds"] = self._qemu_tls_creds
        return opts

    def close(self) -> None:
        self.control.close()
        self._proc.close()

    def __enter__(self) -> CbwTargetServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
