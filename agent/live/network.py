"""How a live backup reaches a VM on another host, and how that VM's QEMU reaches the agent.

With ``--qmp HOST:PORT`` the agent runs on a backup server and makes, or serves, three TCP
connections (every one under TLS unless ``--insecure-plaintext``; see :mod:`agent.tls`)::

    backup server                                   hypervisor
    agent ───── QMP (x509) ──────────────────────▶ QEMU monitor    -chardev ...,tls-creds=
    agent ───── NBD: reads, trims ───────────────▶ QEMU NBD server --qemu-nbd-addr
                                                     (default: the --qmp host, port 10809)
    nbdkit + plugin ◀── NBD: old clusters ──────── QEMU copy-before-write filter
      (--cbw-listen; default: this host's address on the QMP connection, any free port)

The copy-before-write target runs here, next to the agent, not next to QEMU: the agent can
start it and read its control socket locally, nothing has to be installed or started on the
hypervisor, and the old clusters come straight to the backup server. The price is that a
guest write to a cluster not yet backed up waits for the copy to cross the network (one
round trip and the cluster's transfer; docs/NETWORK.md and docs/PERFORMANCE.md measure it).
Who wants no such cost runs the agent on the hypervisor and sends the archive over ssh.

QEMU's TLS credentials objects are created by the VM's administrator on QEMU's command line,
next to the monitor (which needs one anyway: a running QEMU cannot add TLS to a monitor).
The agent only names them: ``--qemu-tls-server`` (default ``backup-tls``, ``endpoint=server``,
used by QEMU's NBD server) and ``--qemu-tls-client`` (default ``backup-tls-client``,
``endpoint=client``, used to reach the copy-before-write target), and checks that they exist
and fit before it changes anything in the VM. Their files live on the hypervisor, where the
agent cannot check them, and nothing is left to clean up after a killed backup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.address import NBD_PORT as NBD_PORT  # re-exported for its tests
from agent.address import host_port as host_port
from agent.address import parse_address, parse_port
from agent.errors import AgentError, InvalidArgument
from agent.qemu.graph import NbdTls
from agent.qemu.qmp import Monitor
from agent.tls import TlsCreds, require_tls

if TYPE_CHECKING:
    import ssl

    from agent.live.job import NetworkOptions

@dataclass(frozen=True)
class Network:
    """The transports of one live backup, decided from its options before anything runs."""

    creds: TlsCreds | None = None
    insecure: bool = False
    qmp_tls: ssl.SSLContext | None = None
    nbd_tcp: tuple[str, int] | None = None  # QEMU's NBD server on TCP; None: Unix socket
    nbd_explicit: bool = False  # the user named nbd_tcp (else: the --qmp host, NBD_PORT)
    nbd_tls: NbdTls | None = None
    cbw_tcp: bool = False  # QEMU reaches the copy-before-write target over TCP
    cbw_listen: tuple[str | None, int] = (None, 0)  # host (None: see module doc), port
    qemu_tls_client: str | None = None  # QEMU's endpoint=client credentials object

    @property
    def cbw_tls(self) -> TlsCreds | None:
        return self.creds if self.cbw_tcp and not self.insecure else None

    def cbw_address(self, mon: Monitor, index: int) -> tuple[str, int] | None:
        """Where disk ``index``'s copy-before-write target listens (None: Unix socket)."""
        if not self.cbw_tcp:
            return None
        host, port = self.cbw_listen
        host = host or mon.local_host
        if host is None:
            raise AgentError("cannot tell this host's address on the QMP connection: give "
                             "--cbw-listen HOST")
        return host, port + index if port else 0

    def check_qemu(self, mon: Monitor) -> None:
        """Check, before changing anything in the VM, that QEMU has the TLS credentials
        objects this backup names, of the right kind and endpoint."""
        wanted: list[tuple[str, str, str, str]] = []
        if self.nbd_tls is not None:
            wanted.append((self.nbd_tls.creds, "server", "--qemu-tls-server",
                           "for its NBD server, which the agent reads from"))
        if self.cbw_tls is not None and self.qemu_tls_client is not None:
            wanted.append((self.qemu_tls_client, "client", "--qemu-tls-client",
                           "to reach the copy-before-write target on the agent's host"))
        if not wanted and (self.nbd_tls is None or self.nbd_tls.authz is None):
            return
        objects = {o.get("name"): str(o.get("type", "")) for o in
                   mon.execute("qom-list", {"path": "/objects"})}
        kind = self.creds.nbd_kind if self.creds else "x509"
        for obj, endpoint, flag, purpose in wanted:
            example = (f"-object tls-creds-{kind},id={obj},endpoint={endpoint},dir=DIR"
                       + (",verify-peer=on" if kind == "x509" and endpoint == "server" else "")
                       + (",username=USER" if kind == "psk" and endpoint == "client" else ""))
            have = objects.get(obj)
            if have is None:
                raise AgentError(
                    f"QEMU has no TLS credentials object {obj!r} {purpose}: start the VM with "
                    f"{example} (see docs/NETWORK.md), or name the one it has with {flag} ID")
            if have != f"child<tls-creds-{kind}>":
                raise AgentError(
                    f"QEMU's object {obj!r} ({have.removeprefix('child<').rstrip('>')}) is "
                    f"no tls-creds-{kind}, which the agent uses "
                    f"({'--tls-psk' if kind == 'psk' else 'x509: --tls-creds'}) {purpose}; "
                    f"QEMU needs {example}")
            got = mon.execute("qom-get", {"path": f"/objects/{obj}", "property": "endpoint"})
            if got != endpoint:
                raise AgentError(f"QEMU's TLS credentials object {obj!r} has endpoint={got}; "
                                 f"{purpose} it needs endpoint={endpoint} ({example})")
        authz = self.nbd_tls.authz if self.nbd_tls else None
        if authz is not None and authz not in objects:
            raise AgentError(f"QEMU has no object {authz!r} (--qemu-tls-authz): create it "
                             "with -object authz-simple,id=ID,identity=DN (see "
                             "docs/NETWORK.md)")


def plan(qmp_address: str, opts: NetworkOptions) -> Network:
    """Check the network options of a live backup of the VM whose monitor is at
    ``qmp_address`` and decide every transport (no I/O besides reading the credential
    files)."""
    qmp = parse_address(qmp_address)
    qmp_tcp = isinstance(qmp, tuple)
    if opts.nbd_socket is not None and (qmp_tcp or opts.qemu_nbd_addr is not None):
        raise InvalidArgument("--qemu-nbd-socket is QEMU's NBD server on a Unix socket, for an "
                              "agent on the VM's host; with --qmp HOST:PORT or --qemu-nbd-addr, "
                              "QEMU's NBD server is on TCP")
    if opts.cbw_listen is not None and not qmp_tcp:
        raise InvalidArgument("--cbw-listen is for an agent on another host than the VM "
                              "(--qmp HOST:PORT); with a local monitor the copy-before-write "
                              "target is a Unix socket")
    nbd_tcp: tuple[str, int] | None = None
    if opts.qemu_nbd_addr is not None:
        nbd_tcp = host_port(opts.qemu_nbd_addr, NBD_PORT, "--qemu-nbd-addr")
    elif isinstance(qmp, tuple):
        nbd_tcp = (qmp[0], NBD_PORT)
    given = (opts.tls_creds, opts.tls_psk, opts.tls_username)
    if nbd_tcp is None and not qmp_tcp:
        if any(x is not None for x in given) or opts.insecure_plaintext:
            raise InvalidArgument("--tls-creds, --tls-psk, --tls-username and "
                                  "--insecure-plaintext apply to TCP connections: --qmp "
                                  "HOST:PORT or --qemu-nbd-addr")
        return Network()
    creds = TlsCreds.load(opts.tls_creds, opts.tls_psk, opts.tls_username)
    insecure = opts.insecure_plaintext
    qmp_tls = None
    if isinstance(qmp, tuple):
        use = require_tls("the QMP monitor", qmp_address, creds, insecure)
        qmp_tls = use.qmp_context() if use else None
    nbd_tls = None
    if nbd_tcp is not None:
        use = require_tls("QEMU's NBD server", f"{nbd_tcp[0]}:{nbd_tcp[1]}", creds, insecure)
        nbd_tls = NbdTls(opts.qemu_tls_server, use, opts.qemu_tls_authz) if use else None
    listen: tuple[str | None, int] = (None, 0)
    if opts.cbw_listen is not None:
        # A bare port is the common case: ":10900" or "10900".
        text = opts.cbw_listen
        if text.isdigit():
            text = f":{text}"
        if text.startswith(":"):
            listen = (None, parse_port(text[1:], opts.cbw_listen, "--cbw-listen"))
        else:
            listen = host_port(text, 0, "--cbw-listen")
    if qmp_tcp and creds is not None and not insecure:
        creds.nbdkit_args()  # the files QEMU's connections to us need: checked now
    return Network(creds=creds, insecure=insecure, qmp_tls=qmp_tls, nbd_tcp=nbd_tcp,
                   nbd_explicit=opts.qemu_nbd_addr is not None, nbd_tls=nbd_tls,
                   cbw_tcp=qmp_tcp, cbw_listen=listen,
                   qemu_tls_client=opts.qemu_tls_client if qmp_tcp else None)


def explain_setup_error(e: AgentError, net: Network, where: str) -> AgentError:
    """A failure of the network parts of the snapshot set-up, explained: QEMU's connection to
    the copy-before-write targets at ``where``, QEMU's NBD server's port."""
    text = str(e).rstrip(".")
    if net.nbd_tcp is not None and "nbd-server-start" in text and "in use" in text:
        return AgentError(f"{text}: choose a free port of the VM's host with --qemu-nbd-addr "
                          "HOST:PORT")
    if not net.cbw_tcp or "copy-before-write target" not in text:
        return e
    if "TLS" in text:
        what = ("the same PSK (its keys.psk and --tls-psk)" if net.creds and net.creds.psk_file
                else "certificates from one CA (QEMU's client-cert.pem signed by the CA in "
                "--tls-creds, and the agent's server-cert.pem by the CA in QEMU's directory)")
        return AgentError(f"{text}; QEMU could not reach the copy-before-write target at "
                          f"{where} over TLS: QEMU's object {net.qemu_tls_client!r} and the "
                          f"agent need {what}")
    if "Connection refused" in text or "No route" in text or "timed out" in text:
        return AgentError(f"{text}; QEMU cannot reach this host at {where}: give --cbw-listen "
                          "an address of this host that the VM's host can reach, and let the "
                          "port through its firewall")
    return e
