"""The remote copy-before-write target serves the QEMU being backed up and no one else.

A live backup across two network namespaces (as in test_network.py) with the target on a
known port. While the backup runs, an intruder on the hypervisor's address holding valid
credentials — a certificate from the same CA, or the PSK — connects with libnbd:

- asking for any export name but the backup's secret one, it is refused at the handshake;
- holding even the secret name (read here from nbdkit's environment, as only root or the
  agent's user could), it cannot replace a cluster QEMU already copied: EPERM;
- from the backup server's address, it cannot read the snapshot from QEMU's NBD server
  under the disk's name either (the export names are secret there too);

and the backup completes with the disk as it was when it started.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.cli_util import (
    AGENT,
    agent_from_file,
    describe,
    finish_streaming,
    running,
)
from tests.integration.netns import BK_ADDR, HV_ADDR, PSK_USER, Pki, TwoHosts
from tests.integration.test_network import (  # noqa: F401 (fixtures)
    QMP_PORT,
    TIMEOUT,
    _restore_and_compare,
    hosts,
    pki,
    remote_vm,
)
from tests.integration.vm import Vm

NBD_PORT = 10809  # QEMU's NBD server, started by the agent (agent.live.network.NBD_PORT)

pytestmark = [pytest.mark.integration, pytest.mark.root("network namespaces"), pytest.mark.network]

KiB = 1024
MiB = 1024 * KiB
CBW_PORT = 10950  # vda's target (--cbw-listen gives disk i the port + i)

#: The intruder: a libnbd client. argv: host port kind(x509|psk) creds export offset; it
#: writes 64 KiB at offset, or reads them if offset starts with "read:".
INTRUDER = f"""
import sys, nbd
host, port, kind, creds, export, offset = sys.argv[1:]
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
if kind == "psk":
    h.set_tls_psk_file(creds)
    h.set_tls_username("{PSK_USER}")
else:
    h.set_tls_certificates(creds)
h.set_export_name(export)
try:
    h.connect_tcp(host, port)
except nbd.Error as e:
    print("refused:", e)
    sys.exit(0)
if offset.startswith("read:"):
    h.pread(65536, int(offset[5:]))
    print("read")
    sys.exit(0)
try:
    h.pwrite(b"\\xee" * 65536, int(offset))
except nbd.Error as e:
    print("write refused:", e)
    sys.exit(0)
print("wrote")
"""


def _intruder(net: TwoHosts, kind: str, creds: Path, export: str, offset: int | str,
              at: tuple[str, str, int] | None = None) -> str:
    """Run the intruder (by default on the hypervisor, against the target; ``at``: namespace,
    host, port); what it printed."""
    ns, host, port = at or (net.hv, BK_ADDR, CBW_PORT)
    done = subprocess.run(net.run_in(ns, [
        sys.executable, "-c", INTRUDER, host, str(port), kind, str(creds), export,
        str(offset)]), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _secret_export(agent_pid: int) -> str:
    """The export name of the agent's first nbdkit (vda's), from that process's environment
    (readable only by its owner and root)."""
    for pid in sorted(int(p) for p in Path(f"/proc/{agent_pid}/task").glob("*/children")
                      for p in p.read_text().split()):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"nbdkit" in cmdline and f"{CBW_PORT}".encode() in cmdline:
            for var in environ:
                if var.startswith(b"BACKUP_AGENT_CBW_EXPORT="):
                    name = var.split(b"=", 1)[1].decode()
                    assert re.fullmatch(r"[0-9a-f]{32}", name), name
                    return name
    raise AssertionError("the agent's nbdkit was not found")


@pytest.mark.parametrize("kind", ["x509", "psk"])
@pytest.mark.slow
def test_only_the_qemu_being_backed_up_reaches_the_target(
    remote_vm: tuple[Vm, dict[str, Path]], hosts: TwoHosts, pki: Pki, tmp_path: Path,  # noqa: F811
    kind: str
) -> None:
    vm, before = remote_vm
    tls = ["--tls-creds", str(pki.agent)]
    creds = pki.qemu  # the hypervisor's own certificate, signed by the agent's CA
    if kind == "psk":
        tls += ["--tls-psk", str(pki.psk), "--qemu-tls-server", "backup-psk",
                "--qemu-tls-client", "backup-psk-client"]
        creds = pki.psk
    with running(
        hosts.run_in(hosts.bk, [
            AGENT, "backup", "--qmp", f"{HV_ADDR}:{QMP_PORT}", *tls, "--drive", "vda",
            "--cbw-listen", f"{BK_ADDR}:{CBW_PORT}", "--compress", "none",
            "--connections", "1", "--memory", "4M", "--request-size", "1M", "-o", "-"]),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(4096)  # the snapshot exists; the backup stalls on the pipe
        assert head.startswith(b"\x89BAGENT\n"), proc.stderr.read().decode()
        vm.guest_write("vda", 0xA1, 20 * MiB, 64 * KiB)  # QEMU copies the old cluster first
        for export in ("", "vda", "0" * 32):
            said = _intruder(hosts, kind, creds, export, 20 * MiB)
            assert said.startswith("refused:"), (export, said)
        said = _intruder(hosts, kind, creds, _secret_export(proc.pid), 20 * MiB)
        assert said.startswith("write refused:") and "(EPERM)" in said, said
        # The other way round: QEMU's NBD server serves the snapshot to the agent alone.
        reader = pki.qemu if kind == "x509" else pki.psk  # any CA-signed client, or the PSK
        said = _intruder(hosts, kind, reader, "vda", "read:0",
                         at=(hosts.bk, HV_ADDR, NBD_PORT))
        assert said.startswith("refused:"), said
        rest, err, status = finish_streaming(proc, TIMEOUT)
        assert status == 0, err.decode()
    assert b"refused 1 write(s) over clusters it had already stored" in err, err.decode()
    arc = tmp_path / "remote.arc"
    arc.write_bytes(head + rest)
    done = agent_from_file(arc, "verify", "-")
    assert done.returncode == 0, describe(done)
    _restore_and_compare([arc], {"vda": before["vda"]}, tmp_path / "r")
    vm.guest_verify("vda", 0xA1, 20 * MiB, 64 * KiB)

