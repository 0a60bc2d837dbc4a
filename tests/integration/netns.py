"""Two "hosts" on one machine, and throwaway TLS credentials for them.

:func:`two_hosts` makes two network namespaces joined by a veth pair (iproute2; root)::

    namespace ba<id>-h (hypervisor)             namespace ba<id>-b (backup server)
    ba<id>-h0  10.203.0.1/24  ◀──── veth ────▶  ba<id>-b0  10.203.0.2/24

and deletes them, by the names it made, on the way out. With ``bridged=True`` a third
namespace sits between them (``ba<id>-h0 ◀─▶ ba<id>-m0 | ba<id>-m1 ◀─▶ ba<id>-b0``) for
bench/delay_bridge.py, which forwards every frame after a delay: netem for kernels without
``sch_netem``, such as this project's machines. Processes started with
:meth:`TwoHosts.run_in` (``ip netns exec NS ...``, which execs: the pid is the program's) see only
their namespace's network; Unix sockets and files are shared, as on one machine.

:func:`make_pki` writes certificates and PSK files with ``openssl`` (see :class:`Pki`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HV_ADDR = "10.203.0.1"
BK_ADDR = "10.203.0.2"
PREFIX_LEN = 24
PSK_USER = "backup"


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


@dataclass(frozen=True)
class TwoHosts:
    hv: str  # namespace of the hypervisor (QEMU)
    bk: str  # namespace of the backup server (the agent)
    hv_dev: str
    bk_dev: str
    mid: str | None = None  # bridged: the namespace between them, and its two ends
    mid_devs: tuple[str, str] = ("", "")

    @staticmethod
    def run_in(ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def delay(self, ms: float) -> None:
        """Delay every packet by ``ms`` in each direction with netem on both ends of the veth
        (a round trip takes ``2 * ms``); 0 removes the delay. Needs ``sch_netem`` in the
        kernel; else see ``bridged``."""
        for ns, dev in ((self.hv, self.hv_dev), (self.bk, self.bk_dev)):
            if ms:
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                     "netem", "delay", f"{ms}ms", "limit", "100000")
            else:
                with contextlib.suppress(RuntimeError):  # no qdisc of ours yet
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root")


@contextlib.contextmanager
def two_hosts(bridged: bool = False) -> Iterator[TwoHosts]:
    """Create the namespaces and the link(s); always delete what was created."""
    tag = "ba" + secrets.token_hex(3)
    hosts = TwoHosts(f"{tag}-h", f"{tag}-b", f"{tag}-h0", f"{tag}-b0",
                     f"{tag}-m" if bridged else None, (f"{tag}-m0", f"{tag}-m1"))
    pairs = ([(hosts.hv_dev, hosts.mid_devs[0]), (hosts.mid_devs[1], hosts.bk_dev)] if bridged
             else [(hosts.hv_dev, hosts.bk_dev)])
    made: list[str] = []
    veths: list[str] = []
    try:
        for ns in (hosts.hv, hosts.bk, *([hosts.mid] if hosts.mid else [])):
            _run("ip", "netns", "add", ns)
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for a, b in pairs:
            _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            veths.append(a)
        for ns, dev, addr in ((hosts.hv, hosts.hv_dev, HV_ADDR),
                              (hosts.bk, hosts.bk_dev, BK_ADDR)):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        if hosts.mid:
            for dev in hosts.mid_devs:
                _run("ip", "link", "set", dev, "netns", hosts.mid)
                _run("ip", "-n", hosts.mid, "link", "set", dev, "up")
        yield hosts
    finally:
        # Deleting a namespace deletes the veth pairs in it (both ends go together).
        for ns in reversed(made):
            with contextlib.suppress(RuntimeError):
                _run("ip", "netns", "del", ns)
        for dev in veths:  # still in the root namespace if moving it failed; else gone
            with contextlib.suppress(RuntimeError):
                _run("ip", "link", "del", dev)


# -- credentials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Throwaway credentials, in the layout QEMU, libnbd, nbdkit and the agent expect.

    - ``qemu``: QEMU's x509 directory on the hypervisor: ca-cert.pem, server-cert.pem and
      server-key.pem (names 10.203.0.1), client-cert.pem and client-key.pem (the same
      certificate: QEMU is a client of the agent's copy-before-write target);
    - ``agent``: the agent's ``--tls-creds``: the same CA, and a certificate naming 10.203.0.2
      (CN ``backup-server``) as client-cert.pem/client-key.pem and server-cert.pem/key.pem;
    - ``wrong_ca``: like ``agent`` but its ca-cert.pem is another CA, which signed nothing;
    - ``qemu_psk``: QEMU's PSK directory (keys.psk); ``psk``: the agent's copy of that key;
      ``wrong_psk``: a file with another key for the same user.
    """

    qemu: Path
    agent: Path
    wrong_ca: Path
    qemu_psk: Path
    psk: Path
    wrong_psk: Path
    agent_dn: str = "CN=backup-server"


def _ca(d: Path, name: str) -> None:
    _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(d / f"{name}-key.pem"), "-out", str(d / f"{name}-cert.pem"),
         "-days", "2", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _cert(d: Path, name: str, ca: str, ip: str) -> None:
    """A certificate for both roles (QEMU checks serverAuth/clientAuth by file name)."""
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   f"subjectAltName=IP:{ip}\n")
    _run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(d / f"{name}-key.pem"), "-subj", f"/CN={name}",
         "-out", str(d / f"{name}.csr"))
    _run("openssl", "x509", "-req", "-in", str(d / f"{name}.csr"), "-CA",
         str(d / f"{ca}-cert.pem"), "-CAkey", str(d / f"{ca}-key.pem"), "-CAcreateserial",
         "-days", "2", "-extfile", str(ext), "-out", str(d / f"{name}-cert.pem"))


def _install(src: Path, name: str, dest: Path, ca: Path) -> None:
    dest.mkdir(mode=0o700)
    (dest / "ca-cert.pem").write_bytes(ca.read_bytes())
    for role in ("server", "client"):
        (dest / f"{role}-cert.pem").write_bytes((src / f"{name}-cert.pem").read_bytes())
        key = dest / f"{role}-key.pem"
        key.write_bytes((src / f"{name}-key.pem").read_bytes())
        key.chmod(0o600)


def _psk_file(path: Path, key: str) -> None:
    path.write_text(f"{PSK_USER}:{key}\n")
    path.chmod(0o600)


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    work = root / "openssl"
    work.mkdir(mode=0o700)
    _ca(work, "test-ca")
    _ca(work, "other-ca")
    _cert(work, "hypervisor", "test-ca", HV_ADDR)
    _cert(work, "backup-server", "test-ca", BK_ADDR)
    ca = work / "test-ca-cert.pem"
    pki = Pki(qemu=root / "qemu", agent=root / "agent", wrong_ca=root / "wrong-ca",
              qemu_psk=root / "qemu-psk", psk=root / "agent.psk",
              wrong_psk=root / "wrong.psk")
    _install(work, "hypervisor", pki.qemu, ca)
    _install(work, "backup-server", pki.agent, ca)
    _install(work, "backup-server", pki.wrong_ca, work / "other-ca-cert.pem")
    key = secrets.token_hex(32)
    pki.qemu_psk.mkdir(mode=0o700)
    _psk_file(pki.qemu_psk / "keys.psk", key)
    _psk_file(pki.psk, key)
    _psk_file(pki.wrong_psk, secrets.token_hex(32))
    os.chmod(root, 0o755)
    return pki


def qemu_tls_args(pki: Pki, qmp_port: int, plain_qmp_port: int | None = None) -> list[str]:
    """QEMU options: the TLS objects the agent expects by default (x509 ``backup-tls`` and
    ``backup-tls-client``), PSK ones (``backup-psk``, ``backup-psk-client``), an authz object
    for the agent's certificate (``backup-authz``), and a QMP monitor over TLS on
    ``HV_ADDR:qmp_port`` (and a clear-text one on ``plain_qmp_port``)."""
    args = [
        "-object", f"tls-creds-x509,id=backup-tls,endpoint=server,dir={pki.qemu},"
                   "verify-peer=on",
        "-object", f"tls-creds-x509,id=backup-tls-client,endpoint=client,dir={pki.qemu}",
        "-object", f"tls-creds-psk,id=backup-psk,endpoint=server,dir={pki.qemu_psk}",
        "-object", f"tls-creds-psk,id=backup-psk-client,endpoint=client,dir={pki.qemu_psk},"
                   f"username={PSK_USER}",
        "-object", f"authz-simple,id=backup-authz,identity={pki.agent_dn}",
        "-chardev", f"socket,id=ba-tls-mon,host={HV_ADDR},port={qmp_port},server=on,"
                    "wait=off,tls-creds=backup-tls",
        "-mon", "chardev=ba-tls-mon,mode=control",
    ]
    if plain_qmp_port is not None:
        args += ["-chardev", f"socket,id=ba-plain-mon,host={HV_ADDR},port={plain_qmp_port},"
                             "server=on,wait=off",
                 "-mon", "chardev=ba-plain-mon,mode=control"]
    return args
