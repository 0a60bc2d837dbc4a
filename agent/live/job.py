"""What a live backup is asked to do: a :class:`LiveJob`, its options grouped by the part
that reads them (as :class:`~agent.options.EngineOptions` is the engine's).

Defaults live here only: the command line and the job file leave out what the user did
not give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.live.freeze import FreezeOptions
from agent.modes import Mode
from agent.options import CbwOptions as CbwOptions  # re-exported for its users
from agent.options import EngineOptions
from agent.tls import QEMU_TLS_CLIENT, QEMU_TLS_SERVER


@dataclass(frozen=True)
class NetworkOptions:
    """How the agent reaches QEMU and QEMU the agent: agent/live/network.py decides every
    transport from these (and the ``--qmp`` address) before anything runs."""

    # Where QEMU's NBD server listens when something else started it already (QEMU 7.2
    # cannot tell); None: the agent starts one on a private socket.
    nbd_socket: str | None = None
    # A VM on another host (qmp = HOST:PORT; see agent.live.network and agent.tls).
    tls_creds: str | None = None  # x509 directory: ca-cert.pem, client-cert.pem, ...
    tls_psk: str | None = None  # PSK file (USER:HEXKEY lines) for the NBD connections
    tls_username: str | None = None  # identity in tls_psk; None: its first
    insecure_plaintext: bool = False  # allow TCP without TLS
    qemu_nbd_addr: str | None = None  # HOST[:PORT] of QEMU's NBD server on TCP
    cbw_listen: str | None = None  # [HOST][:PORT] the copy-before-write target listens on
    qemu_tls_server: str = QEMU_TLS_SERVER  # QEMU's endpoint=server credentials object
    qemu_tls_client: str = QEMU_TLS_CLIENT  # QEMU's endpoint=client credentials object
    qemu_tls_authz: str | None = None  # QEMU's authz object for x509 NBD clients


@dataclass(frozen=True)
class LiveJob:
    qmp: str  # the agent's own QMP monitor: a Unix socket path or HOST:PORT
    output: str  # see agent.writing.write_archive
    drives: list[str] = field(default_factory=list)  # device ids or node names; [] = all
    configs: list[tuple[str, str]] = field(default_factory=list)  # (name, file)
    mode: Mode = Mode.FULL  # see agent.qemu.checkpoints
    engine: EngineOptions = field(default_factory=EngineOptions)
    cbw: CbwOptions = field(default_factory=CbwOptions)
    network: NetworkOptions = field(default_factory=NetworkOptions)
    freeze: FreezeOptions = field(default_factory=FreezeOptions)  # --fs-freeze and friends
